//! One row to token ids and labels, as TRL 1.16's `SFTTrainer._prepare_dataset` does it.
//!
//! What TRL does, which nibble reproduces (each pinned by the golden tests):
//! - Plain text: the eos token is appended to the *text* unless it already ends with it, and the
//!   text is tokenized with `add_special_tokens=True`, so the tokenizer's post-processor adds its
//!   bos (and eos, if it adds one: then the sequence ends with two).
//! - Prompt/completion strings: the eos is appended to the completion text; the prompt and
//!   prompt+completion are tokenized separately, both with special tokens. The completion starts
//!   where the two token lists first differ (not always at the prompt's length: tokens can merge
//!   across the boundary, and a post-processor eos ends the prompt alone), and `completion_mask`
//!   is 0 before that point and 1 after.
//! - Conversations: the chat template renders the messages (with `tools`, the row's
//!   `chat_template_kwargs`, the named special tokens and `add_generation_prompt=False`), and the
//!   text is tokenized with `add_special_tokens=False`: no bos/eos beyond what the template writes,
//!   and no eos appended.
//! - Conversational prompt/completion: the prompt is rendered with `add_generation_prompt=True`,
//!   prompt+completion without; completion_mask as above.
//! - `assistant_only_loss`: tokens overlapping a `{% generation %}` span (by character offsets)
//!   are trained; a row with none is an error. Labels are the ids where every applicable mask is
//!   1 (`completion_mask` only with `completion_only_loss`), else -100.
//! - Truncation (only without packing): `keep_start` keeps the first `max_length` tokens,
//!   `keep_end` the last; rows left with no trained label are then dropped. With packing nothing is
//!   truncated here, and fully masked rows are kept.
//!
//! One difference remains by design: TRL reads rows through `datasets`, whose Arrow schema gives
//! every row the union of the keys seen in any row (missing ones as null). A template then sees
//! e.g. a `chat_template_kwargs` key another row set, as none, or a tool schema with null
//! fields. nibble renders each row as written.

use config::types::{PackingStrategy, PadTo, TruncationMode};
use serde_json::{Map, Value};

use super::rows::{Example, Message};
use super::tokenizer::Tokenizer;
use crate::template::ChatTemplate;

/// The label of a token that does not contribute to the loss.
pub const IGNORE_INDEX: i32 = -100;

/// Every setting that shapes the tokenized dataset, with TRL's `SFTConfig` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeOptions {
    /// Column of plain-text rows (`dataset_text_field`); used when reading rows.
    pub dataset_text_field: String,
    /// Truncate, or pack, to this many tokens (`max_length`, default 1024).
    pub max_length: Option<usize>,
    /// Which end of a long row survives truncation.
    pub truncation_mode: TruncationMode,
    /// Pack several rows into each sample.
    pub packing: bool,
    /// How to pack.
    pub packing_strategy: PackingStrategy,
    /// Flatten each batch into one row with restarting position ids.
    pub padding_free: bool,
    /// Pad batch lengths up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    /// Loss on completion tokens only; `None` means "when the data is prompt/completion".
    pub completion_only_loss: Option<bool>,
    /// Loss on assistant tokens only (needs `{% generation %}` in the chat template).
    pub assistant_only_loss: bool,
    /// Shuffle rows before packing and samples after (`shuffle_dataset`), seeded by `seed`.
    pub shuffle_dataset: bool,
    /// Seed of `shuffle_dataset`.
    pub seed: u64,
    /// `dataset_num_proc`: TRL packs each of this many contiguous shards on its own, so it
    /// changes where pack boundaries fall.
    pub num_proc: Option<usize>,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            dataset_text_field: "text".into(),
            max_length: Some(1024),
            truncation_mode: TruncationMode::KeepStart,
            packing: false,
            packing_strategy: PackingStrategy::Bfd,
            padding_free: false,
            pad_to_multiple_of: None,
            completion_only_loss: None,
            assistant_only_loss: false,
            shuffle_dataset: false,
            seed: 42,
            num_proc: None,
        }
    }
}

impl TokenizeOptions {
    /// The training set's options from a recipe. `pad_to_multiple_of: auto` means no padding
    /// (TRL pads to 128 only on Neuron devices).
    pub fn from_recipe(recipe: &config::Recipe) -> Self {
        let t = &recipe.training;
        TokenizeOptions {
            dataset_text_field: t.dataset_text_field.clone(),
            max_length: t.max_length.map(|n| n.max(0) as usize),
            truncation_mode: t.truncation_mode,
            packing: t.packing,
            packing_strategy: t.packing_strategy,
            padding_free: t.padding_free,
            pad_to_multiple_of: match &t.pad_to_multiple_of {
                Some(PadTo::Multiple(n)) => Some(*n as usize),
                Some(PadTo::Word(_)) | None => None,
            },
            completion_only_loss: t.completion_only_loss,
            assistant_only_loss: t.assistant_only_loss,
            shuffle_dataset: t.shuffle_dataset,
            seed: t.seed,
            num_proc: t.dataset_num_proc.map(|n| n.max(1) as usize),
        }
    }

    /// The evaluation set's options: as training, packed as `eval_packing` says (default: as
    /// `packing`).
    pub fn for_eval(recipe: &config::Recipe) -> Self {
        let mut o = Self::from_recipe(recipe);
        o.packing = recipe.training.eval_packing.unwrap_or(recipe.training.packing);
        o
    }

    /// TRL's padding-free switch: asked for, or implied by best-fit packing.
    pub fn effective_padding_free(&self) -> bool {
        self.padding_free
            || (self.packing
                && matches!(self.packing_strategy, PackingStrategy::Bfd | PackingStrategy::BfdSplit))
    }
}

/// The format of a row, as TRL tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// `text`.
    Text,
    /// `prompt` / `completion` strings.
    PromptCompletion,
    /// `messages`.
    Conversation,
    /// `prompt` / `completion` message lists.
    ConversationalPromptCompletion,
}

impl RowKind {
    /// The kind of a row.
    pub fn of(ex: &Example) -> Self {
        match ex {
            Example::Text(_) => RowKind::Text,
            Example::PromptCompletion { .. } => RowKind::PromptCompletion,
            Example::Conversation { .. } => RowKind::Conversation,
            Example::ConversationalPromptCompletion { .. } => RowKind::ConversationalPromptCompletion,
        }
    }

    /// Rendered with a chat template.
    pub fn is_conversational(self) -> bool {
        matches!(self, RowKind::Conversation | RowKind::ConversationalPromptCompletion)
    }

    /// Has a prompt and a completion.
    pub fn is_prompt_completion(self) -> bool {
        matches!(self, RowKind::PromptCompletion | RowKind::ConversationalPromptCompletion)
    }
}

/// A tokenized row before labels: ids and the masks TRL builds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoded {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// 1 on completion tokens (prompt/completion rows).
    pub completion_mask: Option<Vec<u8>>,
    /// 1 on tokens inside `{% generation %}` output (with `assistant_only_loss`).
    pub assistant_mask: Option<Vec<u8>>,
    /// The tokenized prompt was not a prefix of prompt+completion.
    pub prompt_not_prefix: bool,
}

/// Messages as transformers hands them to a template: keys whose value is null dropped, and the
/// reasoning fields aliased (`reasoning_content` / `thinking` / `reasoning`).
fn template_messages(messages: &[Message]) -> Result<Vec<Value>, String> {
    const REASONING: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];
    messages
        .iter()
        .map(|m| {
            let v = serde_json::to_value(m).map_err(|e| format!("message does not serialize: {e}"))?;
            let Value::Object(obj) = v else { return Err("a message must be an object".into()) };
            let obj: Map<String, Value> = obj.into_iter().filter(|(_, v)| !v.is_null()).collect();
            let reasoning = REASONING.iter().find_map(|k| obj.get(*k)).cloned();
            Ok(Value::Object(match reasoning {
                None => obj,
                Some(r) => {
                    let mut out = Map::new();
                    out.insert("thinking".into(), r.clone());
                    out.extend(obj);
                    out.insert("reasoning_content".into(), r);
                    out
                }
            }))
        })
        .collect()
}

/// The context transformers' `apply_chat_template` renders with.
pub(crate) fn template_context(
    messages: &[Message],
    tools: Option<&Value>,
    kwargs: Option<&Map<String, Value>>,
    add_generation_prompt: bool,
    tok: &Tokenizer,
) -> Result<Value, String> {
    let tools = match tools {
        // TRL decodes tools stored as a JSON string.
        Some(Value::String(s)) => {
            serde_json::from_str(s).map_err(|e| format!("`tools` is a string but not valid JSON: {e}"))?
        }
        Some(v) => v.clone(),
        None => Value::Null,
    };
    let mut ctx = Map::new();
    ctx.insert("messages".into(), Value::Array(template_messages(messages)?));
    ctx.insert("tools".into(), tools);
    ctx.insert("documents".into(), Value::Null);
    ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
    for (name, token) in tok.special_tokens() {
        ctx.insert(name.into(), Value::String(token.into()));
    }
    if let Some(kw) = kwargs {
        ctx.extend(kw.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Ok(Value::Object(ctx))
}

/// Character positions of sorted byte positions in `text`.
fn byte_to_char_positions(text: &str, bytes: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut chars = 0;
    let mut at = 0;
    let mut it = text.char_indices().peekable();
    for &b in bytes {
        if b < at {
            // Not sorted: count from the start.
            out.push(text[..b].chars().count());
            continue;
        }
        while let Some(&(i, _)) = it.peek() {
            if i >= b {
                break;
            }
            it.next();
            chars += 1;
        }
        at = b;
        out.push(chars);
    }
    out
}

/// transformers' assistant mask: 1 on every token overlapping a generation span, in one pass
/// over tokens and spans (both by character offsets).
fn assistant_mask(offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<u8> {
    let mut mask = vec![0u8; offsets.len()];
    let mut s = 0;
    for (i, &(start, end)) in offsets.iter().enumerate() {
        while s < spans.len() && start >= spans[s].1 {
            s += 1;
        }
        if s == spans.len() {
            break;
        }
        if end > spans[s].0 {
            mask[i] = 1;
        }
    }
    mask
}

/// Render and tokenize a conversation (`add_special_tokens=False`), with the assistant mask when
/// asked.
fn tokenize_chat(
    tok: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    tools: Option<&Value>,
    kwargs: Option<&Map<String, Value>>,
    add_generation_prompt: bool,
    with_mask: bool,
) -> Result<(Vec<u32>, Option<Vec<u8>>), String> {
    if messages.is_empty() {
        return Err("cannot apply the chat template to an empty conversation".into());
    }
    let ctx = template_context(messages, tools, kwargs, add_generation_prompt, tok)?;
    let rendered = template.render(&ctx).map_err(|e| e.to_string())?;
    if !with_mask {
        return Ok((tok.encode(&rendered.text, false)?, None));
    }
    let (ids, offsets) = tok.encode_with_char_offsets(&rendered.text, false)?;
    let bounds: Vec<usize> = rendered.assistant_spans.iter().flat_map(|r| [r.start, r.end]).collect();
    let chars = byte_to_char_positions(&rendered.text, &bounds);
    let spans: Vec<(usize, usize)> = chars.chunks(2).map(|c| (c[0], c[1])).collect();
    Ok((ids, Some(assistant_mask(&offsets, &spans))))
}

fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn with_eos(text: &str, eos: &str) -> String {
    if text.ends_with(eos) { text.to_owned() } else { format!("{text}{eos}") }
}

/// Tokenize one row as TRL does (see the module docs). `template` is needed for conversational
/// rows; `assistant_only_loss` asks for the assistant mask.
pub fn tokenize_example(
    ex: &Example,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    assistant_only_loss: bool,
) -> Result<Encoded, String> {
    let eos = || tok.eos_token().ok_or("the tokenizer has no eos_token; set `eos_token` in the recipe");
    let need_template = || template.ok_or("conversational rows need a chat template");
    let completion = |prompt_ids: Vec<u32>, ids: Vec<u32>, assistant_mask| {
        let n = common_prefix_length(&prompt_ids, &ids);
        let mut mask = vec![0u8; n];
        mask.resize(ids.len(), 1);
        Encoded {
            prompt_not_prefix: n < prompt_ids.len(),
            input_ids: ids,
            completion_mask: Some(mask),
            assistant_mask,
        }
    };
    Ok(match ex {
        Example::Text(t) => {
            Encoded { input_ids: tok.encode(&with_eos(t, eos()?), true)?, ..Encoded::default() }
        }
        Example::PromptCompletion { prompt, completion: c } => {
            let full = format!("{prompt}{}", with_eos(c, eos()?));
            completion(tok.encode(prompt, true)?, tok.encode(&full, true)?, None)
        }
        Example::Conversation { messages, tools, kwargs } => {
            let (input_ids, assistant_mask) = tokenize_chat(
                tok,
                need_template()?,
                messages,
                tools.as_ref(),
                kwargs.as_ref(),
                false,
                assistant_only_loss,
            )?;
            Encoded { input_ids, assistant_mask, ..Encoded::default() }
        }
        Example::ConversationalPromptCompletion { prompt, completion: c, tools, kwargs } => {
            let t = need_template()?;
            let (prompt_ids, _) =
                tokenize_chat(tok, t, prompt, tools.as_ref(), kwargs.as_ref(), true, false)?;
            let all: Vec<Message> = prompt.iter().chain(c).cloned().collect();
            let (ids, mask) =
                tokenize_chat(tok, t, &all, tools.as_ref(), kwargs.as_ref(), false, assistant_only_loss)?;
            completion(prompt_ids, ids, mask)
        }
    })
}

/// Labels: the id where every applicable mask is 1, else [`IGNORE_INDEX`]. The completion mask
/// applies only with `completion_only_loss`; the assistant mask whenever present.
pub fn build_labels(enc: &Encoded, completion_only_loss: bool) -> Vec<i32> {
    let completion = enc.completion_mask.as_deref().filter(|_| completion_only_loss);
    let assistant = enc.assistant_mask.as_deref();
    enc.input_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let on = completion.is_none_or(|m| m[i] == 1) && assistant.is_none_or(|m| m[i] == 1);
            if on { id as i32 } else { IGNORE_INDEX }
        })
        .collect()
}

/// Keep `max_length` tokens of a row, from the start or the end.
pub fn truncate<T: Clone>(v: &[T], max_length: usize, mode: TruncationMode) -> Vec<T> {
    if v.len() <= max_length {
        return v.to_vec();
    }
    match mode {
        TruncationMode::KeepStart => v[..max_length].to_vec(),
        TruncationMode::KeepEnd => v[v.len() - max_length..].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn tiny() -> Tokenizer {
        Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama"))
            .expect("tok")
    }

    fn msg(role: &str, content: &str) -> Message {
        serde_json::from_value(json!({"role": role, "content": content})).expect("message")
    }

    const GEN: &str = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}\
        {% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}\
        {% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn truncation_keeps_the_asked_end() {
        let v = [1, 2, 3, 4, 5];
        assert_eq!(truncate(&v, 3, TruncationMode::KeepStart), vec![1, 2, 3]);
        assert_eq!(truncate(&v, 3, TruncationMode::KeepEnd), vec![3, 4, 5]);
        assert_eq!(truncate(&v, 9, TruncationMode::KeepEnd), v.to_vec());
    }

    #[test]
    fn text_gets_one_eos() {
        let t = tiny();
        let a = tokenize_example(&Example::Text("hi".into()), &t, None, false).expect("ok");
        let b = tokenize_example(&Example::Text("hi<|im_end|>".into()), &t, None, false).expect("ok");
        assert_eq!(a, b);
        assert_eq!(a.input_ids.last(), Some(&5));
        assert_eq!(a.input_ids.iter().filter(|&&i| i == 5).count(), 1);
    }

    #[test]
    fn completion_mask_starts_after_the_prompt() {
        let t = tiny();
        let ex = Example::PromptCompletion { prompt: "What is".into(), completion: " four".into() };
        let e = tokenize_example(&ex, &t, None, false).expect("ok");
        let prompt = t.encode("What is", true).expect("enc");
        let mask = e.completion_mask.clone().expect("mask");
        assert_eq!(mask.iter().take_while(|&&m| m == 0).count(), prompt.len());
        assert!(mask[prompt.len()..].iter().all(|&m| m == 1));
        let labels = build_labels(&e, true);
        assert!(labels[..prompt.len()].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(labels.last(), Some(&5));
        assert!(build_labels(&e, false).iter().all(|&l| l != IGNORE_INDEX));
    }

    #[test]
    fn assistant_mask_covers_generation_output() {
        let t = tiny();
        let tmpl = ChatTemplate::new(GEN).expect("compiles");
        let ex = Example::Conversation {
            messages: vec![msg("user", "héllo"), msg("assistant", "wörld")],
            tools: None,
            kwargs: None,
        };
        let e = tokenize_example(&ex, &t, Some(&tmpl), true).expect("ok");
        let mask = e.assistant_mask.clone().expect("mask");
        assert_eq!(mask.len(), e.input_ids.len());
        // The last token (<|im_end|> of the reply) is trained, followed by the "\n" that is not.
        let n = mask.len();
        assert_eq!(&mask[n - 2..], &[1, 0]);
        assert_eq!(e.input_ids[n - 2], 5);
        // No bos/eos added to templated text.
        assert_eq!(e.input_ids[0], 4);
        let labels = build_labels(&e, false);
        assert_eq!(
            labels.iter().filter(|&&l| l != IGNORE_INDEX).count(),
            mask.iter().filter(|&&m| m == 1).count()
        );
    }

    #[test]
    fn mask_overlap_rules() {
        // Tokens [0,2) [2,4) [4,6) [6,8); spans [3,5) and [7,7): transformers' single pass marks
        // the token around an empty span too.
        let offsets = [(0, 2), (2, 4), (4, 6), (6, 8)];
        assert_eq!(assistant_mask(&offsets, &[(3, 5), (7, 7)]), vec![0, 1, 1, 1]);
        assert_eq!(assistant_mask(&offsets, &[(4, 4)]), vec![0, 0, 0, 0]);
        assert_eq!(assistant_mask(&offsets, &[]), vec![0, 0, 0, 0]);
    }

    #[test]
    fn byte_positions_become_char_positions() {
        let s = "aé€b";
        assert_eq!(byte_to_char_positions(s, &[0, 1, 3, 6, 7]), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn null_keys_are_dropped_and_reasoning_aliased() {
        let m: Message = serde_json::from_value(
            json!({"role": "assistant", "content": "x", "reasoning": "r", "name": null}),
        )
        .expect("message");
        let v = template_messages(&[m]).expect("ok");
        assert_eq!(
            v[0],
            json!({"thinking": "r", "role": "assistant", "content": "x", "reasoning": "r", "reasoning_content": "r"})
        );
    }

    #[test]
    fn conversations_need_a_template() {
        let ex = Example::Conversation { messages: vec![msg("user", "a")], tools: None, kwargs: None };
        let e = tokenize_example(&ex, &tiny(), None, false).expect_err("no template");
        assert!(e.contains("chat template"), "{e}");
    }
}
