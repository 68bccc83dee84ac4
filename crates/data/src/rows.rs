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
            match &msg.content {
                Value::Null if !msg.extra.contains_key("tool_calls") => {
                    return Err(format!("`{what}[{i}]` has no `content`"));
                }
                Value::Null | Value::String(_) | Value::Array(_) => {}
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
            Ok(msg)
        })
        .collect()
}

/// Recognise a row's format; `text_field` is the recipe's `dataset_text_field`.
pub fn classify(row: &Value, text_field: &str) -> Result<Example, String> {
    let obj = row.as_object().ok_or("a row must be a JSON object")?;
    let tools = obj.get("tools").filter(|t| !t.is_null()).cloned();
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
