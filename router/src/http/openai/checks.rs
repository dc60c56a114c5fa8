//! What the OpenAI routes refuse, and their errors in OpenAI's own parameter names (the shared
//! validation speaks TGI's: `max_new_tokens`, `best_of`, `top_n_tokens`, `inputs`).

use super::types::ChatMessage;
use super::types::MessageContent;
use crate::api::{first_meaningful, is_empty_value, UnknownFields};
use crate::args::LimitArgs;
use crate::infer::chat::TemplateMessage;
use crate::error::{InferError, ValidationError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Route {
    Completions,
    Chat,
}

impl Route {
    /// The field holding the prompt.
    fn prompt(self) -> &'static str {
        match self {
            Route::Completions => "prompt",
            Route::Chat => "messages",
        }
    }
    /// The field asking for alternatives per token.
    fn top_n(self) -> &'static str {
        match self {
            Route::Completions => "logprobs",
            Route::Chat => "top_logprobs",
        }
    }
}

fn param(message: String, param: &str) -> ValidationError {
    ValidationError::Param { message, param: param.to_string() }
}

/// OpenAI's `response_format` (taken out of the unknown fields) as TGI's `grammar`:
/// `{"type": "text"}` none, `{"type": "json_object"}` any JSON object (with huggingface_hub's
/// `"value": schema`, that schema), `{"type": "json_schema", "json_schema": {"name", "schema",
/// "strict"}}` that schema. Anything else is refused, naming the field.
pub fn response_format(unknown: &mut UnknownFields) -> Result<Option<serde_json::Value>, ValidationError> {
    use serde_json::{json, Value};
    let Some(v) = unknown.remove("response_format").filter(|v| !v.is_null()) else { return Ok(None) };
    let bad = |why: &str| param(format!("`response_format` {why}"), "response_format");
    let kind = v.get("type").and_then(Value::as_str).ok_or_else(|| bad("needs a `type`: text, json_object or json_schema"))?;
    match kind {
        "text" => Ok(None),
        "json_object" | "json" => Ok(Some(json!({"type": "json", "value": v.get("value").or_else(|| v.get("schema"))}))),
        "json_schema" => {
            let schema = v
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .or_else(|| v.get("value"))
                .ok_or_else(|| bad("of type json_schema needs `json_schema.schema`"))?;
            Ok(Some(json!({"type": "json", "value": schema})))
        }
        other => Err(bad(&format!("type {other:?} is not one of text, json_object, json_schema"))),
    }
}

/// A grammar error in OpenAI's field name.
pub fn as_response_format(e: InferError) -> InferError {
    match e {
        InferError::Validation(ValidationError::Grammar(_, m)) => InferError::Validation(ValidationError::Grammar("response_format", m)),
        e => e,
    }
}

/// Fields this server does not implement are refused, naming the field; a field that says
/// nothing (`null`, `[]`, `{}`) or asks for what happens anyway is accepted.
pub fn refuse_unsupported(unknown: &UnknownFields) -> Result<(), ValidationError> {
    use serde_json::{json, Value};
    for (k, v) in unknown {
        let as_default = match k.as_str() {
            "tool_choice" => v == "none",
            // Only meaningful with `tools`, which are refused.
            "parallel_tool_calls" => v.is_boolean(),
            "store" => v == &Value::Bool(false),
            // Tags for stored completions; nothing is stored.
            "metadata" => v.is_object(),
            "service_tier" => v == "auto" || v == "default",
            "modalities" => v == &json!(["text"]),
            "suffix" => v == "",
            "best_of" => v == 1,
            _ => false,
        };
        if !(as_default || is_empty_value(v)) {
            return Err(param(format!("`{k}` is not supported by this server yet"), k));
        }
    }
    Ok(())
}

/// `n`: how many choices, 1..=--max-best-of.
pub fn choices(n: Option<i64>, limits: &LimitArgs) -> Result<u32, ValidationError> {
    let n = n.unwrap_or(1);
    let max = limits.max_best_of;
    if n < 1 || n > max as i64 {
        return Err(param(format!("`n` must be between 1 and {max}, got {n}"), "n"));
    }
    Ok(n as u32)
}

/// `logprobs` (completions) / `top_logprobs` (chat): alternatives per token, 0..=--max-top-n-tokens.
pub fn top_n(n: Option<i64>, route: Route, limits: &LimitArgs) -> Result<u32, ValidationError> {
    let n = n.unwrap_or(0);
    let max = limits.max_top_n_tokens;
    if n < 0 || n > max as i64 {
        let name = route.top_n();
        return Err(param(format!("`{name}` must be between 0 and {max}, got {n}"), name));
    }
    Ok(n as u32)
}

/// Chat messages as the template reads them: roles `system` (`developer` is its new name),
/// `user` and `assistant`, with text content. Tool messages, images and the like are refused:
/// the model would answer without having seen them.
pub fn template_messages(messages: &[ChatMessage]) -> Result<Vec<TemplateMessage>, ValidationError> {
    if messages.is_empty() {
        return Err(param("`messages` cannot be empty".into(), "messages"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let mut unknown = m.unknown.clone();
        // A tool's answer names its call; an assistant's earlier calls are shown to the model as
        // the JSON it answered with.
        let calls = unknown.remove("tool_calls").filter(|v| !is_empty_value(v));
        if m.role == "tool" {
            unknown.remove("tool_call_id");
            unknown.remove("name");
        }
        if let Some(f) = first_meaningful(&unknown) {
            return Err(param(format!("`messages[{i}].{f}` is not supported by this server yet"), "messages"));
        }
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(param(format!("`messages[{i}].role` must be system, developer, user, assistant or tool, got {other:?}"), "messages"))
            }
        };
        if let Some(calls) = calls {
            if role != "assistant" {
                return Err(param(format!("`messages[{i}].tool_calls` belongs to assistant messages"), "messages"));
            }
            let shown: Vec<serde_json::Value> = calls
                .as_array()
                .ok_or_else(|| param(format!("`messages[{i}].tool_calls` must be an array"), "messages"))?
                .iter()
                .map(|c| {
                    let f = &c["function"];
                    let args = f["arguments"].as_str().and_then(|a| serde_json::from_str(a).ok()).unwrap_or(f["arguments"].clone());
                    serde_json::json!({"name": f["name"], "arguments": args})
                })
                .collect();
            let text = shown.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("\n");
            out.push(TemplateMessage { role: role.to_string(), content: text });
            continue;
        }
        let content = match &m.content {
            None => return Err(param(format!("`messages[{i}].content` cannot be null for a `{}` message", m.role), "messages")),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        ("text", None) => return Err(param(format!("`messages[{i}].content`: a text part needs `text`"), "messages")),
                        (kind, _) => {
                            return Err(param(
                                format!("`messages[{i}].content`: parts of type {kind:?} are not supported; this model reads text only"),
                                "messages",
                            ))
                        }
                    }
                }
                text
            }
        };
        out.push(TemplateMessage { role: role.to_string(), content });
    }
    Ok(out)
}

/// An error of the shared validation, in the route's own parameter names.
pub fn rename(e: InferError, route: Route) -> InferError {
    use ValidationError as V;
    let InferError::Validation(v) = e else { return e };
    let prompt = route.prompt();
    let renamed = match v {
        V::Param { .. } => v,
        V::MaxNewTokens(n) => param(format!("`max_tokens` must be at least 1, got {n}"), "max_tokens"),
        V::BestOf(max, n) => param(format!("`n` must be between 1 and {max}, got {n}"), "n"),
        V::TopNTokens(max, n) => param(format!("`{}` must be between 0 and {max}, got {n}", route.top_n()), route.top_n()),
        V::EmptyInput => param(format!("`{prompt}` cannot be empty"), prompt),
        V::InputLength(max, n) => param(format!("the prompt has {n} tokens; at most {max} are allowed"), prompt),
        V::InputBytes(bytes, max) => {
            param(format!("the prompt is {bytes} bytes long: more than any prompt of at most {max} tokens can be"), prompt)
        }
        V::TotalTokens(max, n, m) => param(
            format!("prompt tokens + `max_tokens` must be <= {max}. Given: {n} prompt tokens and {m} `max_tokens`"),
            "max_tokens",
        ),
        V::Template(_) => param(v.to_string(), "messages"),
        V::Tokenizer(_) => param(v.to_string(), prompt),
        V::AdapterName(_) => param(v.to_string(), "model"),
        V::TopP(_) => param(v.to_string(), "top_p"),
        V::TopK(_) => param(v.to_string(), "top_k"),
        V::RepetitionPenalty(_) => param(v.to_string(), "repetition_penalty"),
        V::FrequencyPenalty(_) => param(v.to_string(), "frequency_penalty"),
        V::PresencePenalty(_) => param(v.to_string(), "presence_penalty"),
        V::StopSequences(..) | V::EmptyStop => param(v.to_string(), "stop"),
        V::OpenAiTemperature(_) | V::Temperature(_) => param(v.to_string(), "temperature"),
        other => other,
    };
    InferError::Validation(renamed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tgi_names_become_openai_names() {
        let e = rename(InferError::from(ValidationError::BestOf(2, 0)), Route::Chat);
        assert_eq!(e.to_string(), "`n` must be between 1 and 2, got 0");
        let e = rename(InferError::from(ValidationError::TotalTokens(10, 8, 5)), Route::Completions);
        assert!(e.to_string().starts_with("prompt tokens + `max_tokens`"), "{e}");
        let e = rename(InferError::from(ValidationError::TopNTokens(5, 9)), Route::Chat);
        assert!(e.to_string().starts_with("`top_logprobs`"), "{e}");
        use crate::error::ErrorKind;
        assert_eq!(e.body().param.as_deref(), Some("top_logprobs"));
        let e = rename(InferError::from(ValidationError::MaxNewTokens(0)), Route::Chat);
        assert!(!e.to_string().contains("max_new_tokens"));
    }

    #[test]
    fn unsupported_fields_are_refused_unless_they_say_nothing() {
        let fields = |v: serde_json::Value| -> UnknownFields { serde_json::from_value(v).unwrap() };
        for ok in [
            serde_json::json!({"tools": null, "logit_bias": {}, "functions": []}),
            serde_json::json!({"tool_choice": "none", "store": false}),
        ] {
            assert!(refuse_unsupported(&fields(ok)).is_ok());
        }
        for (body, name) in [
            (serde_json::json!({"tools": [{"type": "function"}]}), "tools"),
            (serde_json::json!({"response_format": {"type": "json_object"}}), "response_format"),
            (serde_json::json!({"logit_bias": {"50256": -100}}), "logit_bias"),
            (serde_json::json!({"suffix": "end"}), "suffix"),
            (serde_json::json!({"min_p": 0.1}), "min_p"),
        ] {
            let e = refuse_unsupported(&fields(body)).unwrap_err();
            assert!(matches!(&e, ValidationError::Param { param, .. } if param == name), "{e}");
        }
    }

    #[test]
    fn response_format_becomes_tgis_grammar() {
        use serde_json::json;
        let take = |v: serde_json::Value| {
            let mut u: UnknownFields = serde_json::from_value(json!({"response_format": v})).unwrap();
            let out = response_format(&mut u);
            assert!(u.is_empty(), "response_format is taken out of the unknown fields");
            out
        };
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(take(json!({"type": "text"})).unwrap(), None);
        assert_eq!(take(json!({"type": "json_object"})).unwrap(), Some(json!({"type": "json", "value": null})));
        assert_eq!(take(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}})).unwrap(),
                   Some(json!({"type": "json", "value": schema})));
        // huggingface_hub's InferenceClient sends a json_schema format this way
        assert_eq!(take(json!({"type": "json_object", "value": schema})).unwrap(), Some(json!({"type": "json", "value": schema})));
        for bad in [json!({"type": "xml"}), json!({"type": "json_schema"}), json!("json")] {
            let e = take(bad).unwrap_err();
            assert!(matches!(&e, ValidationError::Param { param, .. } if param == "response_format"), "{e}");
        }
    }
}
