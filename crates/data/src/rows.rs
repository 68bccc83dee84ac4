//! Reading rows and recognising their format: plain `text`; `prompt`/`completion` strings;
//! conversational `messages` (with optional `tools` and `chat_template_kwargs`); conversational
//! `prompt`/`completion` (lists of messages).

use crate::Error;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The text (templates may read other keys too; they are kept in `extra`).
    #[serde(default)]
    pub content: Value,
    /// Other keys of the message (`tool_calls`, `name`, ...), passed to the template as is.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// A row in one of TRL's formats.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Language modelling on raw text.
    Text(String),
    /// Prompt and completion strings (loss on the completion with `completion_only_loss`).
    PromptCompletion {
        /// The prompt.
        prompt: String,
        /// The completion.
        completion: String,
    },
    /// A conversation, rendered with the chat template.
    Conversation {
        /// The messages.
        messages: Vec<Message>,
        /// Tool definitions for the template.
        tools: Option<Value>,
        /// Extra template variables.
        kwargs: Option<serde_json::Map<String, Value>>,
    },
    /// A conversational prompt and completion (lists of messages).
    ConversationalPromptCompletion {
        /// The prompt messages.
        prompt: Vec<Message>,
        /// The completion messages.
        completion: Vec<Message>,
        /// Tool definitions for the template.
        tools: Option<Value>,
        /// Extra template variables.
        kwargs: Option<serde_json::Map<String, Value>>,
    },
}

pub(crate) fn messages(v: &Value, what: &str) -> Result<Vec<Message>, String> {
    let list = v.as_array().ok_or_else(|| format!("`{what}` must be a list of messages"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let msg: Message =
                serde_json::from_value(m.clone()).map_err(|e| format!("`{what}[{i}]`: {e}"))?;
            if msg.role.trim().is_empty() {
                return Err(format!("`{what}[{i}].role` is empty"));
            }
            match &msg.content {
                Value::Null if !msg.extra.contains_key("tool_calls") => {
                    return Err(format!("`{what}[{i}]` has no `content`"));
                }
                Value::Null | Value::String(_) => {}
                Value::Array(parts) => content_parts(parts, &format!("{what}[{i}].content"))?,
                // A template would fail later on an operator, naming neither the field nor the row.
                other => {
                    let kind = match other {
                        Value::Number(_) => "a number",
                        Value::Bool(_) => "a boolean",
                        _ => "an object",
                    };
                    return Err(format!(
                        "`{what}[{i}].content` must be a string or a list of content parts, found {kind} ({other})"
                    ));
                }
            }
            if let Some(calls) = msg.extra.get("tool_calls").filter(|c| !c.is_null()) {
                tool_calls(calls, &format!("{what}[{i}].tool_calls"))?;
            }
            Ok(msg)
        })
        .collect()
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A message's content parts (`[{"type": "text", "text": ...}, ...]`), as chat templates read
/// them: each an object with a string `type`; a text part has a string `text`.
fn content_parts(parts: &[Value], path: &str) -> Result<(), String> {
    for (j, part) in parts.iter().enumerate() {
        let Value::Object(o) = part else {
            return Err(format!("`{path}[{j}]` must be a content part object, found {}", kind_of(part)));
        };
        match o.get("type") {
            Some(Value::String(t)) if t == "text" => match o.get("text") {
                Some(Value::String(_)) => {}
                other => {
                    return Err(format!(
                        "`{path}[{j}].text` must be a string, found {}",
                        other.map_or("nothing", kind_of)
                    ));
                }
            },
            Some(Value::String(_)) => {}
            other => {
                return Err(format!(
                    "`{path}[{j}].type` must be a string (`text`, `image`, ...), found {}",
                    other.map_or("nothing", kind_of)
                ));
            }
        }
    }
    Ok(())
}

/// An assistant message's `tool_calls`, as chat templates read them: a list of
/// `{"type": "function", "function": {"name": ..., "arguments": {...} or "..."}}` (or the
/// function's fields without the wrapper).
fn tool_calls(calls: &Value, path: &str) -> Result<(), String> {
    let Value::Array(calls) = calls else {
        return Err(format!("`{path}` must be a list of tool calls, found {}", kind_of(calls)));
    };
    for (j, call) in calls.iter().enumerate() {
        let at = format!("{path}[{j}]");
        let Value::Object(c) = call else {
            return Err(format!("`{at}` must be an object, found {}", kind_of(call)));
        };
        if let Some(t) = c.get("type").filter(|t| !t.is_string() && !t.is_null()) {
            return Err(format!("`{at}.type` must be a string, found {}", kind_of(t)));
        }
        // `{"function": {"name", "arguments"}}`, or the flat `{"name", "arguments"}` templates
        // also read (`tool_call.function if defined else tool_call`).
        // (A null field is a missing one: `datasets` fills the fields of the other form with null.)
        let (f, fpath) = match c.get("function") {
            Some(Value::Object(f)) => (f, format!("{at}.function")),
            None | Some(Value::Null) => (c, at.clone()),
            Some(other) => {
                return Err(format!("`{at}.function` must be an object, found {}", kind_of(other)));
            }
        };
        match f.get("name") {
            Some(Value::String(n)) if !n.is_empty() => {}
            other => {
                return Err(format!(
                    "`{fpath}.name` must be a non-empty string, found {}",
                    other.map_or("nothing", kind_of)
                ));
            }
        }
        match f.get("arguments") {
            None | Some(Value::Object(_) | Value::String(_) | Value::Null) => {}
            Some(other) => {
                return Err(format!(
                    "`{fpath}.arguments` must be an object or a JSON string, found {}",
                    kind_of(other)
                ));
            }
        }
    }
    Ok(())
}

/// A row's `tools` (function definitions for the chat template): a list of objects, or a JSON
/// string holding one (as `datasets` stores it, decoded as TRL decodes it).
pub(crate) fn check_tools(tools: &Value) -> Result<(), String> {
    let decoded;
    let list = match tools {
        Value::String(s) => {
            decoded = serde_json::from_str::<Value>(s)
                .map_err(|e| format!("`tools` is a string that is not JSON: {e}"))?;
            &decoded
        }
        v => v,
    };
    let Value::Array(items) = list else {
        return Err(format!("`tools` must be a list of tool definitions, found {}", kind_of(list)));
    };
    for (j, t) in items.iter().enumerate() {
        let Value::Object(o) = t else {
            return Err(format!("`tools[{j}]` must be an object, found {}", kind_of(t)));
        };
        // `{"type": "function", "function": {"name": ...}}`, or a bare function definition.
        let f = match o.get("function") {
            Some(Value::Object(f)) => f,
            None | Some(Value::Null) => o,
            Some(other) => {
                return Err(format!("`tools[{j}].function` must be an object, found {}", kind_of(other)));
            }
        };
        if let Some(n) = f.get("name").filter(|n| !n.is_string() && !n.is_null()) {
            return Err(format!("`tools[{j}]`'s function `name` must be a string, found {}", kind_of(n)));
        }
    }
    Ok(())
}

/// Recognise a row's format; `text_field` is the recipe's `dataset_text_field`.
pub fn classify(row: &Value, text_field: &str) -> Result<Example, String> {
    let obj = row.as_object().ok_or("a row must be a JSON object")?;
    let tools = obj.get("tools").filter(|t| !t.is_null()).cloned();
    if let Some(t) = &tools {
        check_tools(t)?;
    }
    let kwargs = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return Err("`chat_template_kwargs` must be an object".into()),
    };
    if let Some(m) = obj.get("messages") {
        return Ok(Example::Conversation { messages: messages(m, "messages")?, tools, kwargs });
    }
    match (obj.get("prompt"), obj.get("completion")) {
        (Some(Value::String(p)), Some(Value::String(c))) => {
            return Ok(Example::PromptCompletion { prompt: p.clone(), completion: c.clone() });
        }
        (Some(p @ Value::Array(_)), Some(c @ Value::Array(_))) => {
            return Ok(Example::ConversationalPromptCompletion {
                prompt: messages(p, "prompt")?,
                completion: messages(c, "completion")?,
                tools,
                kwargs,
            });
        }
        (Some(_), Some(_)) => {
            return Err("`prompt` and `completion` must both be strings or both lists of messages".into());
        }
        (Some(_), None) | (None, Some(_)) => return Err("`prompt` and `completion` come together".into()),
        (None, None) => {}
    }
    match obj.get(text_field) {
        Some(Value::String(t)) => Ok(Example::Text(t.clone())),
        Some(_) => Err(format!("`{text_field}` must be a string")),
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            Err(format!(
                "fits no dataset format (expected `messages`, `prompt`+`completion`, or `{text_field}`); it has {keys:?}"
            ))
        }
    }
}

/// Read every row of a local JSONL or JSON (a list of rows) file.
pub fn read_rows(path: &Path, text_field: &str) -> Result<Vec<Example>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let row_err = |row: usize, message: String| Error::Row { file: Some(path.to_owned()), row, message };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let values: Vec<(usize, Value)> = match ext {
        "jsonl" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map(|v| (i + 1, v))
                    .map_err(|e| row_err(i + 1, format!("not valid JSON: {e}")))
            })
            .collect::<Result<_, _>>()?,
        "json" => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(a)) => a.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect(),
            Ok(_) => return Err(row_err(1, "a .json data file must hold a list of rows".into())),
            Err(e) => return Err(row_err(e.line(), format!("not valid JSON: {e}"))),
        },
        _ => return Err(Error::UnsupportedFile { path: path.to_owned() }),
    };
    values.into_iter().map(|(row, v)| classify(&v, text_field).map_err(|m| row_err(row, m))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn tool_calls_content_parts_and_tools_are_checked_with_their_path() {
        let row = |messages: Value, tools: Value| json!({"messages": messages, "tools": tools});
        let user = json!({"role": "user", "content": "weather?"});
        let call = |c: Value| json!([user, {"role": "assistant", "content": null, "tool_calls": c}]);
        let good_call = json!([{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]);
        let good_tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]);
        assert!(classify(&row(call(good_call.clone()), good_tools.clone()), "text").is_ok());
        // Arguments as a JSON string, tools as a JSON string (as `datasets` stores them).
        let string_args = json!([{"function": {"name": "f", "arguments": "{\"x\": 1}"}}]);
        let tools_text = Value::String(good_tools.to_string());
        assert!(classify(&row(call(string_args), tools_text), "text").is_ok());
        let flat = json!([{"name": "add", "arguments": "{\"a\": 1}", "function": null, "type": null}]);
        assert!(
            classify(&row(call(flat), Value::Null), "text").is_ok(),
            "the unwrapped form templates also read"
        );
        let cases = [
            (row(call(json!({"name": "f"})), Value::Null), "`messages[1].tool_calls` must be a list"),
            (
                row(call(json!([{"function": {"arguments": {}}}])), Value::Null),
                "`messages[1].tool_calls[0].function.name`",
            ),
            (
                row(call(json!([{"function": "f"}])), Value::Null),
                "`messages[1].tool_calls[0].function` must be an object",
            ),
            (
                row(call(json!([{"arguments": {}}])), Value::Null),
                "`messages[1].tool_calls[0].name` must be a non-empty string",
            ),
            (
                row(call(json!([{"function": {"name": "f", "arguments": 3}}])), Value::Null),
                "`messages[1].tool_calls[0].function.arguments` must be an object or a JSON string, found a number",
            ),
            (row(json!([user]), json!({"name": "f"})), "`tools` must be a list"),
            (
                row(json!([user]), json!([{"function": {"name": 7}}])),
                "`tools[0]`'s function `name` must be a string",
            ),
            (row(json!([user]), json!([{"function": "f"}])), "`tools[0].function` must be an object"),
            (row(json!([user]), json!("[{")), "`tools` is a string that is not JSON"),
            (
                row(json!([{"role": "user", "content": [{"type": "text", "text": 5}]}]), Value::Null),
                "`messages[0].content[0].text` must be a string, found a number",
            ),
            (
                row(json!([{"role": "user", "content": ["hi"]}]), Value::Null),
                "`messages[0].content[0]` must be a content part object",
            ),
            (row(json!([{"role": "", "content": "hi"}]), Value::Null), "`messages[0].role` is empty"),
        ];
        for (r, want) in cases {
            let e = classify(&r, "text").expect_err("a schema error");
            assert!(e.contains(want), "{e}\n  wanted: {want}");
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| Value::Number(i.into())),
            "\\PC{0,8}".prop_map(Value::String),
            prop::sample::select(vec![
                "messages",
                "prompt",
                "completion",
                "role",
                "content",
                "text",
                "tools"
            ])
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "messages",
                        "prompt",
                        "completion",
                        "role",
                        "content",
                        "text",
                        "tools",
                        "chat_template_kwargs",
                        "tool_calls",
                        "x",
                    ]),
                    inner,
                    0..4,
                )
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Any JSON row (deeply nested, wrong types in every field TRL's formats read) is a row
        /// or an error: never a panic (issue 22).
        #[test]
        fn any_json_row_is_classified_or_refused(row in json_value()) {
            let _ = classify(&row, "text");
            let _ = crate::preference::preference_row(&row);
        }
    }
}
