//! OpenAI tool calling on `/v1/chat/completions`: `tools` and `tool_choice` become a grammar that
//! lets the model answer only with a call (`{"name": ..., "arguments": {...}}`, the arguments
//! matching the function's JSON schema) or, with `auto`, with `no_tool`'s text; the answer is
//! read back into `message.tool_calls` (streamed as `delta.tool_calls`).

use serde_json::{json, Value};

use crate::api::UnknownFields;
use crate::error::ValidationError;

/// The pseudo-function `auto` adds: its `content` is the answer when no tool fits.
pub const NO_TOOL: &str = "no_tool";

/// The tools a request offers and how the model may use them (`tool_choice` "none" or no tools:
/// no `Tools` at all).
#[derive(Debug, Clone)]
pub struct Tools {
    /// The request's `tools`, as sent (the chat template renders them).
    pub list: Value,
    functions: Vec<(String, Value)>,
    choice: Choice,
}

#[derive(Debug, Clone, PartialEq)]
enum Choice {
    Auto,
    Required,
    Named(String),
}

fn param(message: String) -> ValidationError {
    ValidationError::Param { message, param: "tools".into() }
}

/// Takes `tools`, `tool_choice` and `parallel_tool_calls` out of the unknown fields.
pub fn take(unknown: &mut UnknownFields) -> Result<Option<Tools>, ValidationError> {
    let tools = unknown.remove("tools").filter(|v| !v.is_null());
    let choice = unknown.remove("tool_choice").filter(|v| !v.is_null());
    if let Some(p) = unknown.remove("parallel_tool_calls").filter(|v| !v.is_null()) {
        if !p.is_boolean() {
            return Err(ValidationError::Param { message: "`parallel_tool_calls` must be a boolean".into(), param: "parallel_tool_calls".into() });
        }
    }
    let list = match tools {
        None => {
            return match choice {
                None => Ok(None),
                Some(c) if c == "none" || c == "auto" => Ok(None),
                Some(_) => Err(ValidationError::Param { message: "`tool_choice` needs `tools`".into(), param: "tool_choice".into() }),
            }
        }
        Some(Value::Array(a)) if a.is_empty() => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(param("`tools` must be an array of {\"type\": \"function\", \"function\": {...}}".into())),
    };
    let mut functions = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(param(format!("`tools[{i}].type` must be \"function\"")));
        }
        let f = t.get("function").ok_or_else(|| param(format!("`tools[{i}].function` is missing")))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or("");
        let ok_name = !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok_name {
            return Err(param(format!("`tools[{i}].function.name` must be 1-64 letters, digits, '_' or '-'")));
        }
        if name == NO_TOOL || functions.iter().any(|(n, _)| n == name) {
            return Err(param(format!("`tools[{i}].function.name` {name:?} is reserved or given twice")));
        }
        let mut params = f.get("parameters").filter(|p| !p.is_null()).cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        let Some(obj) = params.as_object_mut() else {
            return Err(param(format!("`tools[{i}].function.parameters` must be a JSON schema object")));
        };
        // A call's arguments are the function's parameters only (OpenAI's strict mode), unless
        // the schema says otherwise.
        if obj.get("type").and_then(Value::as_str) == Some("object") {
            obj.entry("additionalProperties").or_insert(Value::Bool(false));
        }
        functions.push((name.to_string(), params));
    }
    let choice = match choice {
        None => Choice::Auto,
        Some(c) if c == "auto" => Choice::Auto,
        Some(c) if c == "required" => Choice::Required,
        Some(c) if c == "none" => return Ok(None),
        Some(c) => {
            let name = c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).filter(|_| c.get("type").and_then(Value::as_str) == Some("function"));
            match name {
                Some(n) if functions.iter().any(|(f, _)| f == n) => Choice::Named(n.to_string()),
                Some(n) => return Err(ValidationError::Param { message: format!("`tool_choice` names {n:?}, which is not in `tools`"), param: "tool_choice".into() }),
                None => {
                    return Err(ValidationError::Param {
                        message: "`tool_choice` must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                        param: "tool_choice".into(),
                    })
                }
            }
        }
    };
    Ok(Some(Tools { list: Value::Array(list), functions, choice }))
}

fn call_schema(name: &str, arguments: &Value) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": false
    })
}

impl Tools {
    /// TGI's grammar for the allowed answers.
    pub fn grammar(&self) -> Value {
        let mut calls: Vec<Value> = self
            .functions
            .iter()
            .filter(|(n, _)| match &self.choice {
                Choice::Named(want) => n == want,
                _ => true,
            })
            .map(|(n, p)| call_schema(n, p))
            .collect();
        if self.choice == Choice::Auto {
            let text = json!({"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
                              "additionalProperties": false});
            calls.push(call_schema(NO_TOOL, &text));
        }
        let schema = if calls.len() == 1 { calls.pop().expect("one") } else { json!({"anyOf": calls}) };
        json!({"type": "json", "value": schema})
    }

    /// What the model is told when its chat template does not render `tools` itself.
    pub fn prompt(&self) -> String {
        let mut s = String::from(
            "You can call these functions. Answer with one JSON object {\"name\": <function name>, \"arguments\": <its arguments>}",
        );
        if self.choice == Choice::Auto {
            s.push_str(&format!(", or with {{\"name\": \"{NO_TOOL}\", \"arguments\": {{\"content\": <your answer>}}}} when none fits"));
        }
        s.push_str(".\n");
        for (n, p) in &self.functions {
            let description = self
                .list
                .as_array()
                .and_then(|a| a.iter().find(|t| t["function"]["name"] == n.as_str()))
                .and_then(|t| t["function"]["description"].as_str())
                .unwrap_or("");
            s.push_str(&format!("- {n}: {description} Arguments: {p}\n"));
        }
        s
    }

    /// The model's answer (it followed `grammar`): a call, or `no_tool`'s text.
    pub fn read(&self, text: &str) -> Answer {
        let Ok(v) = serde_json::from_str::<Value>(text.trim()) else { return Answer::Text(text.to_string()) };
        let name = v.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let arguments = v.get("arguments").cloned().unwrap_or(json!({}));
        if name == NO_TOOL {
            return Answer::Text(arguments.get("content").and_then(Value::as_str).unwrap_or_default().to_string());
        }
        if name.is_empty() {
            return Answer::Text(text.to_string());
        }
        Answer::Call { name, arguments: arguments.to_string() }
    }
}

/// What the model answered.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Text(String),
    Call { name: String, arguments: String },
}

/// A new call id, OpenAI-shaped.
pub fn call_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 12];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    format!("call_{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(v: Value) -> Result<Option<Tools>, ValidationError> {
        let mut u: UnknownFields = serde_json::from_value(v).unwrap();
        let t = take(&mut u);
        assert!(u.is_empty());
        t
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
               {"type": "function", "function": {"name": "get_time"}}])
    }

    #[test]
    fn choices_make_their_grammars() {
        let auto = tools(json!({"tools": weather()})).unwrap().unwrap();
        let g = auto.grammar();
        assert_eq!(g["value"]["anyOf"].as_array().unwrap().len(), 3, "two functions and no_tool");
        let named = tools(json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
            .unwrap()
            .unwrap();
        assert_eq!(named.grammar()["value"]["properties"]["name"]["const"], "get_weather");
        let required = tools(json!({"tools": weather(), "tool_choice": "required"})).unwrap().unwrap();
        assert_eq!(required.grammar()["value"]["anyOf"].as_array().unwrap().len(), 2);
        assert!(tools(json!({"tools": weather(), "tool_choice": "none"})).unwrap().is_none());
        assert!(auto.prompt().contains("get_weather: Weather in a city"));
    }

    #[test]
    fn answers_are_read_back() {
        let t = tools(json!({"tools": weather()})).unwrap().unwrap();
        assert_eq!(t.read(r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#),
                   Answer::Call { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() });
        assert_eq!(t.read(r#"{"name": "no_tool", "arguments": {"content": "Hello"}}"#), Answer::Text("Hello".into()));
        assert_eq!(t.read("{\"name\": \"get_we"), Answer::Text("{\"name\": \"get_we".into()), "cut off by max_tokens");
    }

    #[test]
    fn bad_tools_are_refused_naming_the_field() {
        for (body, field) in [
            (json!({"tools": {"a": 1}}), "tools"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools"),
            (json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}), "tools"),
            (json!({"tools": [{"type": "function", "function": {"name": "no_tool"}}]}), "tools"),
            (json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tools": weather(), "tool_choice": "sometimes"}), "tool_choice"),
        ] {
            let e = tools(body.clone()).unwrap_err();
            assert!(matches!(&e, ValidationError::Param { param, .. } if param == field), "{body}: {e}");
        }
    }
}
