//! Chat templates from the model's tokenizer_config.json (or chat_template.jinja), rendered in
//! Rust with minijinja and Python-compatible string methods.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template renders a `tools` variable itself (else the router describes the tools).
    pub renders_tools: bool,
}

/// A message as templates expect it.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
}

fn token_string(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The model's chat template, if it has one.
    /// The model's template, or `given` (`--chat-template`: a file, or the template's text)
    /// instead; its bos/eos tokens come from the model either way.
    pub fn load(model_dir: &Path, given: Option<&str>) -> Result<Option<Self>, String> {
        let cfg: serde_json::Value = match std::fs::read_to_string(model_dir.join("tokenizer_config.json")) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| format!("tokenizer_config.json: {e}"))?,
            Err(_) => serde_json::Value::Null,
        };
        if let Some(t) = given {
            let p = Path::new(t);
            let source = if !t.contains('{') && p.is_file() {
                std::fs::read_to_string(p).map_err(|e| format!("--chat-template {t}: {e}"))?
            } else if !t.contains('{') {
                return Err(format!("--chat-template {t:?} is neither a file nor a Jinja template"));
            } else {
                t.to_string()
            };
            return Self::new(source, token_string(cfg.get("bos_token")), token_string(cfg.get("eos_token"))).map(Some);
        }
        let source = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => std::fs::read_to_string(model_dir.join("chat_template.jinja")).ok(),
        };
        let Some(source) = source else { return Ok(None) };
        Self::new(source, token_string(cfg.get("bos_token")), token_string(cfg.get("eos_token"))).map(Some)
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        let renders_tools = source.contains("tools");
        env.add_template_owned("chat", source).map_err(|e| format!("chat template: {e}"))?;
        Ok(Self { env, bos_token, eos_token, renders_tools })
    }

    /// The prompt of a conversation; `tools`: OpenAI's tool list, for templates that render it.
    pub fn apply(&self, messages: &[TemplateMessage], add_generation_prompt: bool) -> Result<String, String> {
        self.apply_with_tools(messages, add_generation_prompt, None)
    }

    pub fn apply_with_tools(&self, messages: &[TemplateMessage], add_generation_prompt: bool,
                            tools: Option<&serde_json::Value>) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            tools => tools,
        })
        .map_err(|e| format!("chat template: {e}"))
    }
}

/// Templates' `strftime_now(format)` (transformers provides it): today's date, UTC, formatted
/// by chrono's strftime; a format chrono cannot render is a template error.
fn strftime_now(fmt: String) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Utc::now().format(&fmt))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: cannot render the format {fmt:?}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe nice<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML.into(), "".into(), "<|im_end|>".into()).unwrap();
        let out = t.apply(&[msg("user", "Hi")], true).unwrap();
        assert_eq!(out, "<|im_start|>system\nBe nice<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let src = "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}{{ bos_token }}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(t.apply(&[msg("user", "  hi  ")], false).unwrap(), "<s>HI");
        assert!(t.apply(&[msg("bad", "x")], false).unwrap_err().contains("no bad roles"));
    }

    #[test]
    fn loads_from_tokenizer_config_or_jinja_file() {
        let dir = std::env::temp_dir().join(format!("tessera-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#).unwrap();
        assert!(ChatTemplate::load(&dir, None).unwrap().is_none());
        std::fs::write(dir.join("chat_template.jinja"), "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}").unwrap();
        let t = ChatTemplate::load(&dir, None).unwrap().unwrap();
        assert_eq!(t.apply(&[msg("user", "x")], false).unwrap(), "<s>x</s>");
        // --chat-template: the text itself, or a file; the model's bos/eos tokens still apply
        let given = ChatTemplate::load(&dir, Some("[{{ messages[0].content }}]{{ eos_token }}")).unwrap().unwrap();
        assert_eq!(given.apply(&[msg("user", "x")], false).unwrap(), "[x]</s>");
        std::fs::write(dir.join("other.jinja"), "<{{ messages[0].content }}>").unwrap();
        let file = dir.join("other.jinja");
        let from_file = ChatTemplate::load(&dir, Some(file.to_str().unwrap())).unwrap().unwrap();
        assert_eq!(from_file.apply(&[msg("user", "x")], false).unwrap(), "<x>");
        let missing = ChatTemplate::load(&dir, Some("/no/such/template.jinja")).err().unwrap();
        assert!(missing.contains("neither a file nor a Jinja template"), "{missing}");
        assert!(ChatTemplate::load(&dir, Some("{{ unclosed")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strftime_formats_a_date_and_refuses_what_it_cannot() {
        let s = strftime_now("%d %b %Y".into()).unwrap();
        assert_eq!(s.len(), 11, "{s}");
        assert_eq!(strftime_now("%Y-%m-%d".into()).unwrap(), chrono::Utc::now().format("%Y-%m-%d").to_string());
        assert!(strftime_now("%Q".into()).is_err());
        let t = ChatTemplate::new("{{ strftime_now('%Q') }}".into(), "".into(), "".into()).unwrap();
        assert!(t.apply(&[msg("user", "x")], false).is_err(), "a template error, not a panic");
    }
}
