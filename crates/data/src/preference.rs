//! Preference rows (DPO's data) as TRL 1.16's DPOTrainer prepares them: a prompt with a chosen
//! and a rejected completion, as text or as conversations, the prompt explicit or extracted from
//! the two sides' shared beginning; tokenized as prompt, prompt + chosen and prompt + rejected and
//! split where their token ids diverge; then collated into one batch of 2B sequences (every
//! chosen one, then every rejected one), right-padded, with a completion mask.
//!
//! Where TRL's own code fails on a row (an empty side, mixed formats) nibble names the row and
//! what is wrong instead.

use config::types::TruncationMode;
use serde_json::{Map, Value};

use crate::Error;
use crate::rows::Message;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// One side of a preference row: text, or a list of messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Side {
    /// Standard format: a string.
    Text(String),
    /// Conversational format: messages.
    Messages(Vec<Message>),
}

impl Side {
    fn is_empty(&self) -> bool {
        match self {
            Side::Text(s) => s.is_empty(),
            Side::Messages(m) => m.is_empty(),
        }
    }
}

/// A preference row ready to tokenize (its prompt extracted when the data had none).
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRow {
    /// The prompt (empty when the two sides share nothing).
    pub prompt: Side,
    /// The preferred completion.
    pub chosen: Side,
    /// The other one.
    pub rejected: Side,
    /// `tools` for the chat template (a list, or a JSON string TRL decodes).
    pub tools: Option<Value>,
    /// `chat_template_kwargs`: extra template variables.
    pub template_kwargs: Option<Map<String, Value>>,
}

fn side(v: &Value, key: &str) -> Result<Side, String> {
    match v {
        Value::String(s) => Ok(Side::Text(s.clone())),
        Value::Array(_) => Ok(Side::Messages(crate::rows::messages(v, key)?)),
        other => Err(format!(
            "`{key}` must be a string or a list of messages, found {}",
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::Object(_) => "an object",
                _ => "something else",
            }
        )),
    }
}

/// TRL's `extract_prompt` for rows without a prompt: the longest shared beginning of chosen and
/// rejected (per character for text, per message for conversations), as TRL computes it — one
/// space before the divergence moves into the completions, and when one side is a prefix of the
/// other (or both are equal) the last shared element stays in both completions.
pub fn extract_prompt(chosen: &Side, rejected: &Side) -> Result<(Side, Side, Side), String> {
    fn split<T: PartialEq + Clone>(c: &[T], r: &[T], is_space: impl Fn(&T) -> bool) -> (usize, Vec<T>) {
        let n = c.len().min(r.len());
        let mut idx = n.saturating_sub(1);
        for i in 0..n.saturating_sub(1) {
            if c[i] != r[i] {
                idx = i;
                // TRL steps back over one space; at index 0 its Python index wraps to the end of
                // chosen (a bug): nibble keeps the split at 0 there.
                if i > 0 && is_space(&c[i - 1]) {
                    idx = i - 1;
                }
                break;
            }
        }
        (idx, c[..idx].to_vec())
    }
    if chosen.is_empty() || rejected.is_empty() {
        return Err("an implicit-prompt row needs non-empty `chosen` and `rejected`".into());
    }
    match (chosen, rejected) {
        (Side::Text(c), Side::Text(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let (idx, prompt) = split(&cc, &rc, |ch| *ch == ' ');
            Ok((
                Side::Text(prompt.into_iter().collect()),
                Side::Text(cc[idx..].iter().collect()),
                Side::Text(rc[idx..].iter().collect()),
            ))
        }
        (Side::Messages(c), Side::Messages(r)) => {
            let (idx, prompt) = split(c, r, |_| false);
            Ok((Side::Messages(prompt), Side::Messages(c[idx..].to_vec()), Side::Messages(r[idx..].to_vec())))
        }
        _ => Err("`chosen` and `rejected` must both be text or both be message lists".into()),
    }
}

/// A dataset row (JSON object) as a preference row: explicit `prompt` + `chosen` + `rejected`, or
/// implicit (`chosen` + `rejected` only, the prompt extracted as TRL does).
pub fn preference_row(v: &Value) -> Result<PreferenceRow, String> {
    let obj = v.as_object().ok_or("a preference row must be a JSON object")?;
    let get = |k: &str| {
        obj.get(k).ok_or_else(|| format!("missing `{k}` (preference rows need chosen and rejected)"))
    };
    let (chosen, rejected) = (side(get("chosen")?, "chosen")?, side(get("rejected")?, "rejected")?);
    let (prompt, chosen, rejected) = match obj.get("prompt") {
        // A null prompt is a row without one in a file whose other rows have one (`datasets`
        // fills the column with null): extracted, where TRL fails on it.
        Some(p) if !p.is_null() => {
            let prompt = side(p, "prompt")?;
            let same = matches!(
                (&prompt, &chosen, &rejected),
                (Side::Text(_), Side::Text(_), Side::Text(_))
                    | (Side::Messages(_), Side::Messages(_), Side::Messages(_))
            );
            if !same {
                return Err(
                    "`prompt`, `chosen` and `rejected` must all be text or all be message lists".into()
                );
            }
            (prompt, chosen, rejected)
        }
        _ => extract_prompt(&chosen, &rejected)?,
    };
    let template_kwargs = match obj.get("chat_template_kwargs") {
        None => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return Err("`chat_template_kwargs` must be an object".into()),
    };
    let tools = obj.get("tools").filter(|t| !t.is_null()).cloned();
    if let Some(t) = &tools {
        crate::rows::check_tools(t)?;
    }
    Ok(PreferenceRow { prompt, chosen, rejected, tools, template_kwargs })
}

/// A tokenized preference row, as TRL stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceIds {
    /// The prompt's ids (up to where prompt + chosen and prompt + rejected first diverge from it).
    pub prompt: Vec<u32>,
    /// The chosen completion's ids.
    pub chosen: Vec<u32>,
    /// The rejected completion's ids.
    pub rejected: Vec<u32>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokenize a row as DPOTrainer 1.16 does: text rows get the EOS text appended to each completion
/// that lacks it and are encoded with the tokenizer's special tokens; conversations are rendered
/// with the chat template (the prompt with the generation prompt, prompt + completion without)
/// and encoded without adding any. The prompt ends where either full sequence leaves it.
pub fn tokenize_preference(
    row: &PreferenceRow,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<PreferenceIds, String> {
    let (prompt_ids, chosen_ids, rejected_ids) = match (&row.prompt, &row.chosen, &row.rejected) {
        (Side::Text(p), Side::Text(c), Side::Text(r)) => {
            let eos = tok.eos_token().unwrap_or_default();
            let with_eos = |s: &str| if s.ends_with(eos) { s.to_owned() } else { format!("{s}{eos}") };
            (
                tok.encode(p, true)?,
                tok.encode(&format!("{p}{}", with_eos(c)), true)?,
                tok.encode(&format!("{p}{}", with_eos(r)), true)?,
            )
        }
        (Side::Messages(p), Side::Messages(c), Side::Messages(r)) => {
            let template =
                template.ok_or("conversational rows need a chat template (the tokenizer has none)")?;
            let render = |messages: Vec<Message>, generation: bool| -> Result<Vec<u32>, String> {
                let ctx = crate::tokenize::template_context(
                    &messages,
                    row.tools.as_ref(),
                    row.template_kwargs.as_ref(),
                    generation,
                    tok,
                )?;
                let text = template.render(&ctx).map_err(|e| e.to_string())?.text;
                tok.encode(&text, false)
            };
            let joined = |tail: &[Message]| p.iter().chain(tail).cloned().collect::<Vec<_>>();
            (render(p.clone(), true)?, render(joined(c), false)?, render(joined(r), false)?)
        }
        _ => return Err("`prompt`, `chosen` and `rejected` must all be text or all be message lists".into()),
    };
    let len = common_prefix(&prompt_ids, &chosen_ids).min(common_prefix(&prompt_ids, &rejected_ids));
    Ok(PreferenceIds {
        prompt: prompt_ids[..len].to_vec(),
        chosen: chosen_ids[len..].to_vec(),
        rejected: rejected_ids[len..].to_vec(),
    })
}

/// Tokenize `rows` (JSON objects), dropping as TRL does the rows whose prompt alone fills
/// `max_length` under `keep_start`; returns the kept rows and how many were dropped. A row TRL
/// cannot read is an error naming it (1-based).
pub fn prepare_preferences(
    rows: &[Value],
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    max_length: Option<usize>,
    mode: TruncationMode,
) -> Result<(Vec<PreferenceIds>, usize), Error> {
    let mut kept = Vec::with_capacity(rows.len());
    let mut dropped = 0;
    for (i, v) in rows.iter().enumerate() {
        let row_err = |message: String| Error::Row { file: None, row: i + 1, message };
        let ids =
            tokenize_preference(&preference_row(v).map_err(row_err)?, tok, template).map_err(row_err)?;
        if mode == TruncationMode::KeepStart && max_length.is_some_and(|m| ids.prompt.len() >= m) {
            dropped += 1;
            continue;
        }
        kept.push(ids);
    }
    Ok((kept, dropped))
}

/// [`prepare_preferences`] over loaded rows: an error names the file and row the bad row came
/// from; with `skip_invalid` (nibble's `skip_invalid_rows`) such rows are dropped and counted
/// instead. Returns the pairs, the rows truncation dropped and the rows skipped.
pub fn prepare_preference_rows(
    rows: &crate::mixture::Rows,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    max_length: Option<usize>,
    mode: TruncationMode,
    skip_invalid: bool,
) -> Result<(Vec<PreferenceIds>, usize, usize), Error> {
    let mut kept = Vec::with_capacity(rows.len());
    let (mut dropped, mut skipped) = (0, 0);
    for (i, v) in rows.values.iter().enumerate() {
        let ids = match preference_row(v).and_then(|row| tokenize_preference(&row, tok, template)) {
            Ok(ids) => ids,
            Err(_) if skip_invalid => {
                skipped += 1;
                continue;
            }
            Err(message) => {
                return Err(match rows.origins.get(i) {
                    Some(o) => Error::Row { file: Some(o.file.to_path_buf()), row: o.row, message },
                    None => Error::Row { file: None, row: i + 1, message },
                });
            }
        };
        if mode == TruncationMode::KeepStart && max_length.is_some_and(|m| ids.prompt.len() >= m) {
            dropped += 1;
            continue;
        }
        kept.push(ids);
    }
    Ok((kept, dropped, skipped))
}

/// A collated DPO batch: `rows` = 2B sequences of `len` tokens (every prompt + chosen, then every
/// prompt + rejected), right-padded, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceBatch {
    /// Sequences (twice the pairs).
    pub rows: usize,
    /// Tokens per sequence after padding.
    pub len: usize,
    /// `[rows * len]` token ids, `pad_id` after each sequence's end.
    pub input_ids: Vec<i64>,
    /// `[rows * len]` 1 on completion tokens.
    pub completion_mask: Vec<i64>,
    /// `[rows * len]` 1 on real tokens.
    pub attention_mask: Vec<i64>,
}

/// TRL's `DataCollatorForPreference`: each prompt + completion truncated on its own to
/// `max_length` (`keep_start` keeps the beginning, `keep_end` the end), padded on the right to the
/// longest (rounded up to `pad_to_multiple_of`).
pub fn collate_preferences(
    examples: &[&PreferenceIds],
    pad_id: i64,
    max_length: Option<usize>,
    mode: TruncationMode,
    pad_to_multiple_of: Option<usize>,
) -> PreferenceBatch {
    let mut seqs: Vec<(Vec<i64>, Vec<i64>)> = Vec::with_capacity(2 * examples.len());
    for pick_chosen in [true, false] {
        for e in examples {
            let completion = if pick_chosen { &e.chosen } else { &e.rejected };
            let mut ids: Vec<i64> = e.prompt.iter().chain(completion).map(|&t| i64::from(t)).collect();
            let mut mask: Vec<i64> = std::iter::repeat_n(0, e.prompt.len())
                .chain(std::iter::repeat_n(1, completion.len()))
                .collect();
            if let Some(m) = max_length.filter(|&m| ids.len() > m) {
                match mode {
                    TruncationMode::KeepStart => {
                        ids.truncate(m);
                        mask.truncate(m);
                    }
                    TruncationMode::KeepEnd => {
                        ids.drain(..ids.len() - m);
                        mask.drain(..mask.len() - m);
                    }
                }
            }
            seqs.push((ids, mask));
        }
    }
    let longest = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    let len = match pad_to_multiple_of.filter(|&m| m > 0) {
        Some(m) => longest.div_ceil(m) * m,
        None => longest,
    };
    let rows = seqs.len();
    let (mut input_ids, mut completion_mask, mut attention_mask) =
        (Vec::with_capacity(rows * len), Vec::with_capacity(rows * len), Vec::with_capacity(rows * len));
    for (ids, mask) in seqs {
        let pad = len - ids.len();
        attention_mask.extend(std::iter::repeat_n(1, ids.len()).chain(std::iter::repeat_n(0, pad)));
        input_ids.extend(ids.into_iter().chain(std::iter::repeat_n(pad_id, pad)));
        completion_mask.extend(mask.into_iter().chain(std::iter::repeat_n(0, pad)));
    }
    PreferenceBatch { rows, len, input_ids, completion_mask, attention_mask }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(s: &str) -> Side {
        Side::Text(s.into())
    }

    #[test]
    fn implicit_prompts_split_as_trl_splits_them() {
        let got = extract_prompt(&text("The sky is blue."), &text("The sky is green.")).expect("split");
        assert_eq!(got, (text("The sky is"), text(" blue."), text(" green.")));
        // One side a prefix of the other, or equal: the last shared character stays in both.
        assert_eq!(
            extract_prompt(&text("abc"), &text("abcdef")).expect("split"),
            (text("ab"), text("c"), text("cdef"))
        );
        assert_eq!(
            extract_prompt(&text("abc"), &text("abc")).expect("split"),
            (text("ab"), text("c"), text("c"))
        );
        // Different from the first character: no prompt (TRL's index wraps there; nibble does not).
        assert_eq!(
            extract_prompt(&text("xyz "), &text("abc")).expect("split"),
            (text(""), text("xyz "), text("abc"))
        );
        assert!(extract_prompt(&text(""), &text("abc")).is_err());
        let m = |role: &str, c: &str| -> Message {
            serde_json::from_value(json!({"role": role, "content": c})).expect("message")
        };
        let chosen = Side::Messages(vec![m("user", "hi"), m("assistant", "hello")]);
        let rejected = Side::Messages(vec![m("user", "hi"), m("assistant", "go away")]);
        let (p, c, r) = extract_prompt(&chosen, &rejected).expect("split");
        assert_eq!(p, Side::Messages(vec![m("user", "hi")]));
        // A null prompt (a mixed file's missing column) is extracted too.
        let row = json!({"prompt": null, "chosen": "The sky is blue.", "rejected": "The sky is green."});
        assert_eq!(preference_row(&row).expect("row").prompt, text("The sky is"));
        assert_eq!(
            (c, r),
            (Side::Messages(vec![m("assistant", "hello")]), Side::Messages(vec![m("assistant", "go away")]))
        );
    }

    #[test]
    fn rows_of_mixed_formats_are_errors() {
        let e = preference_row(
            &json!({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}),
        )
        .expect_err("mixed");
        assert!(e.contains("all be text or all be message lists"), "{e}");
        assert!(preference_row(&json!({"chosen": "a"})).expect_err("no rejected").contains("rejected"));
        assert!(
            preference_row(&json!({"prompt": 3, "chosen": "a", "rejected": "b"}))
                .expect_err("number")
                .contains("a number")
        );
    }

    #[test]
    fn collation_truncates_each_sequence_and_pads_right() {
        let e = PreferenceIds { prompt: vec![1, 2, 3], chosen: vec![4, 5], rejected: vec![6, 7, 8] };
        let b = collate_preferences(&[&e], 0, Some(4), TruncationMode::KeepStart, None);
        assert_eq!((b.rows, b.len), (2, 4));
        assert_eq!(b.input_ids, vec![1, 2, 3, 4, 1, 2, 3, 6]);
        assert_eq!(b.completion_mask, vec![0, 0, 0, 1, 0, 0, 0, 1]);
        let b = collate_preferences(&[&e], 9, Some(4), TruncationMode::KeepEnd, Some(8));
        assert_eq!(b.len, 8);
        assert_eq!(&b.input_ids[..8], &[2, 3, 4, 5, 9, 9, 9, 9]);
        assert_eq!(&b.input_ids[8..], &[3, 6, 7, 8, 9, 9, 9, 9]);
        assert_eq!(&b.completion_mask[8..], &[0, 1, 1, 1, 0, 0, 0, 0]);
        assert_eq!(&b.attention_mask[..8], &[1, 1, 1, 1, 0, 0, 0, 0]);
    }
}
