//! A model's tokenizer as transformers 5 loads it: `tokenizer.json` through the `tokenizers`
//! library (the same code transformers calls) and the named special tokens of
//! `tokenizer_config.json`, with TRL's `eos_token` / `pad_token` overrides.
//!
//! What transformers does on load, and nibble with it:
//! - With a `tokenizer.json`, `add_bos_token` / `add_eos_token` in `tokenizer_config.json` are
//!   dropped: the post-processor stored in `tokenizer.json` alone decides which special tokens
//!   `tokenizer(text)` adds (a missing post-processor adds none).
//! - Named special tokens (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`,
//!   `cls_token`, `mask_token`, and `extra_special_tokens` / `additional_special_tokens`) that
//!   `tokenizer.json` does not register as added tokens are added as special tokens, so they are
//!   matched whole in text.
//! - TRL sets `tokenizer.eos_token` to the recipe's `eos_token` (an error if it is not in the
//!   vocabulary) and `tokenizer.pad_token` to the recipe's `pad_token`, else the tokenizer's own,
//!   else the eos token. Both changes are visible to chat templates (`eos_token`, `pad_token`).
//!
//! Not reproduced: transformers 5 rebuilds the normalizer / pre-tokenizer of a few model-specific
//! tokenizer classes (e.g. `Qwen2Tokenizer`) from the class instead of reading them from
//! `tokenizer.json`; for checkpoints saved by those classes the two agree.

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::AddedToken;

use crate::Error;

/// transformers' named special-token attributes, in its order.
pub const SPECIAL_TOKEN_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// Token ids and the `(start, end)` character offsets of each token.
pub type EncodedText = (Vec<u32>, Vec<(usize, usize)>);

/// A loaded tokenizer with its special tokens resolved as TRL resolves them.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Named special tokens (`bos_token` -> `<s>`), in [`SPECIAL_TOKEN_NAMES`] order; what chat
    /// templates see.
    special: Vec<(&'static str, String)>,
    /// The pad token is the eos token because the tokenizer names none.
    pad_from_eos: bool,
    /// Hash of the files and overrides, for cache keys.
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("special", &self.special)
            .finish()
    }
}

/// A special token's text: a string, or an `AddedToken` object with `content`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Load `tokenizer.json` (required) and `tokenizer_config.json` (optional) from a model
    /// directory.
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let json_path = dir.join("tokenizer.json");
        let json = std::fs::read(&json_path)
            .map_err(|e| Error::Tokenizer { path: json_path.clone(), message: e.to_string() })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            Some(
                std::fs::read(&cfg_path)
                    .map_err(|e| Error::Tokenizer { path: cfg_path.clone(), message: e.to_string() })?,
            )
        } else {
            None
        };
        Self::from_bytes(&json, cfg.as_deref(), dir)
    }

    /// Build from the bytes of `tokenizer.json` and `tokenizer_config.json`; `origin` names them
    /// in errors.
    pub fn from_bytes(json: &[u8], config: Option<&[u8]>, origin: &Path) -> Result<Self, Error> {
        let err = |file: &str, message: String| Error::Tokenizer { path: origin.join(file), message };
        // The tokenizers library panics on some damaged files (a cut inside its decoder section):
        // the JSON is checked first, and a panic left in the library is caught, both named.
        serde_json::from_slice::<serde::de::IgnoredAny>(json)
            .map_err(|e| err("tokenizer.json", format!("not valid JSON: {e}")))?;
        let parsed =
            std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(json)).map_err(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                err("tokenizer.json", format!("the tokenizers library could not read it ({why})"))
            })?;
        let mut inner = parsed.map_err(|e| err("tokenizer.json", e.to_string()))?;
        let cfg: serde_json::Map<String, Value> = match config {
            None => serde_json::Map::new(),
            Some(bytes) => match serde_json::from_slice(bytes) {
                Ok(Value::Object(m)) => m,
                Ok(_) => return Err(err("tokenizer_config.json", "must hold a JSON object".into())),
                Err(e) => return Err(err("tokenizer_config.json", format!("not valid JSON: {e}"))),
            },
        };
        // Each special token is a string or an AddedToken object (`{"content": ...}`); anything
        // else would silently leave the token unset.
        let kind = |v: &Value| match v {
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object without a string `content`",
            _ => "a string",
        };
        let wrong = |key: String, v: &Value| {
            err(
                "tokenizer_config.json",
                format!(
                    "`{key}` must be a string or an AddedToken object with `content`, found {} ({v})",
                    kind(v)
                ),
            )
        };
        for name in SPECIAL_TOKEN_NAMES {
            if let Some(v) = cfg.get(name).filter(|v| !v.is_null() && token_text(v).is_none()) {
                return Err(wrong(name.to_owned(), v));
            }
        }
        for key in ["extra_special_tokens", "additional_special_tokens"] {
            if let Some(Value::Array(items)) = cfg.get(key)
                && let Some((i, v)) = items.iter().enumerate().find(|(_, v)| token_text(v).is_none())
            {
                return Err(wrong(format!("{key}[{i}]"), v));
            }
        }
        let special: Vec<(&'static str, String)> = SPECIAL_TOKEN_NAMES
            .iter()
            .filter_map(|&name| cfg.get(name).and_then(token_text).map(|t| (name, t)))
            .collect();
        let extra: Vec<String> = ["extra_special_tokens", "additional_special_tokens"]
            .iter()
            .filter_map(|k| cfg.get(*k).and_then(Value::as_array))
            .flatten()
            .filter_map(token_text)
            .collect();
        // Tokens the config names but tokenizer.json does not register get added, as
        // transformers' `_post_init` does.
        let registered = inner.get_added_vocabulary().get_vocab().clone();
        let missing: Vec<AddedToken> = special
            .iter()
            .map(|(_, t)| t)
            .chain(extra.iter())
            .filter(|t| !registered.contains_key(t.as_str()))
            .map(|t| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        if !missing.is_empty() {
            tracing::debug!(
                "registering {} special token(s) missing from tokenizer.json: {:?}",
                missing.len(),
                missing.iter().map(|t| &t.content).collect::<Vec<_>>()
            );
            inner.add_special_tokens(missing).map_err(|e| err("tokenizer.json", e.to_string()))?;
        }
        let mut h = Sha256::new();
        h.update(b"tokenizer.json\0");
        h.update(json);
        h.update(b"tokenizer_config.json\0");
        h.update(config.unwrap_or(b"<none>"));
        let mut tok = Tokenizer { inner, special, pad_from_eos: false, fingerprint: h.finalize().into() };
        // TRL always resolves the pad token (its own, else eos).
        if tok.special_token("pad_token").is_none()
            && let Some(eos) = tok.special_token("eos_token").map(str::to_owned)
        {
            tok.set_special("pad_token", eos);
            tok.pad_from_eos = true;
        }
        tok.refresh_fingerprint();
        Ok(tok)
    }

    /// Apply the recipe's `eos_token` and `pad_token` as TRL does: each must be in the
    /// vocabulary; the pad token defaults to the tokenizer's own, else the (new) eos token.
    pub fn with_overrides(mut self, eos_token: Option<&str>, pad_token: Option<&str>) -> Result<Self, Error> {
        if let Some(eos) = eos_token {
            if self.inner.token_to_id(eos).is_none() {
                return Err(Error::UnknownToken { key: "eos_token", token: eos.to_owned() });
            }
            self.set_special("eos_token", eos.to_owned());
            // A pad token that only defaulted to the old eos follows the new one.
            if self.pad_from_eos {
                self.set_special("pad_token", eos.to_owned());
            }
        }
        if let Some(pad) = pad_token {
            if self.inner.token_to_id(pad).is_none() {
                return Err(Error::UnknownToken { key: "pad_token", token: pad.to_owned() });
            }
            self.set_special("pad_token", pad.to_owned());
            self.pad_from_eos = false;
        }
        self.refresh_fingerprint();
        Ok(self)
    }

    /// [`Tokenizer::from_dir`] with the recipe's `eos_token` / `pad_token`.
    pub fn from_recipe(dir: &Path, recipe: &config::Recipe) -> Result<Self, Error> {
        Self::from_dir(dir)?
            .with_overrides(recipe.training.eos_token.as_deref(), recipe.training.pad_token.as_deref())
    }

    fn set_special(&mut self, name: &'static str, token: String) {
        if let Some(slot) = self.special.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = token;
        } else {
            self.special.push((name, token));
            self.special.sort_by_key(|(n, _)| SPECIAL_TOKEN_NAMES.iter().position(|x| x == n));
        }
    }

    fn refresh_fingerprint(&mut self) {
        let mut h = Sha256::new();
        h.update(self.fingerprint);
        for (name, tok) in &self.special {
            h.update(name.as_bytes());
            h.update(b"=");
            h.update(tok.as_bytes());
            h.update(b"\0");
        }
        self.fingerprint = h.finalize().into();
    }

    /// A named special token (`"eos_token"`, `"pad_token"`, ...), if the tokenizer has it.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special.iter().find(|(n, _)| *n == name).map(|(_, t)| t.as_str())
    }

    /// The named special tokens (`bos_token` -> `<s>`, ...) chat templates are rendered with.
    pub fn special_tokens(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.special.iter().map(|(n, t)| (*n, t.as_str()))
    }

    /// The eos token text.
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    /// The pad token text (the eos token when the tokenizer has none).
    pub fn pad_token(&self) -> Option<&str> {
        self.special_token("pad_token")
    }

    /// The eos token id.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token().and_then(|t| self.inner.token_to_id(t))
    }

    /// The pad token id.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token().and_then(|t| self.inner.token_to_id(t))
    }

    /// Id of a token, added tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `tokenizer(text, add_special_tokens=...)["input_ids"]`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.inner.encode(text, add_special_tokens).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }

    /// Token ids and their character (not byte) offsets in `text`, as Python's tokenizers
    /// reports them.
    pub fn encode_with_char_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<EncodedText, String> {
        let e = self.inner.encode_char_offsets(text, add_special_tokens).map_err(|e| e.to_string())?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    /// The `tokenizers` tokenizer underneath.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A hash of the files and special tokens this tokenizer was built from.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        Tokenizer::from_dir(&dir).expect("tiny tokenizer loads")
    }

    mod garbage {
        use super::*;
        use proptest::prelude::*;

        fn files() -> (Vec<u8>, Vec<u8>) {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
            let read = |f: &str| std::fs::read(dir.join(f)).expect("tiny tokenizer files");
            (read("tokenizer.json"), read("tokenizer_config.json"))
        }

        fn json_leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|i| Value::Number(i.into())),
                "\\PC{0,6}".prop_map(Value::String),
                Just(serde_json::json!({"content": 5})),
                Just(serde_json::json!([1, "a"])),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            /// A damaged tokenizer.json (a cut or a flipped byte) is an error naming the file, or
            /// still a tokenizer; never a panic.
            #[test]
            fn a_damaged_tokenizer_json_never_panics(
                cut in any::<prop::sample::Index>(),
                at in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let (json, cfg) = files();
                let mut flipped = json.clone();
                let i = at.index(flipped.len());
                flipped[i] ^= flip;
                for bad in [json[..cut.index(json.len())].to_vec(), flipped] {
                    if let Err(e) = Tokenizer::from_bytes(&bad, Some(&cfg), Path::new("m")) {
                        prop_assert!(e.to_string().contains("tokenizer.json"), "{}", e);
                    }
                }
            }

            /// tokenizer_config.json with any key set to any kind of value, or not an object, or
            /// not JSON: a tokenizer or an error naming the file, never a panic.
            #[test]
            fn a_wrong_tokenizer_config_never_panics(
                key in prop::sample::select(vec![
                    "eos_token", "pad_token", "bos_token", "unk_token", "chat_template",
                    "added_tokens_decoder", "model_max_length", "padding_side", "additional_special_tokens",
                ]),
                value in json_leaf(),
                cut in any::<prop::sample::Index>(),
            ) {
                let (json, cfg) = files();
                let mut m: serde_json::Map<String, Value> = serde_json::from_slice(&cfg).expect("config");
                m.insert(key.to_owned(), value);
                let changed = serde_json::to_vec(&m).expect("json");
                let truncated = cfg[..cut.index(cfg.len())].to_vec();
                for bad in [changed, truncated, b"[1, 2]".to_vec()] {
                    if let Err(e) = Tokenizer::from_bytes(&json, Some(&bad), Path::new("m")) {
                        prop_assert!(e.to_string().contains("tokenizer"), "{}", e);
                    }
                }
            }
        }
    }

    #[test]
    fn a_special_token_of_the_wrong_kind_is_an_error_naming_it() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let json = std::fs::read(dir.join("tokenizer.json")).expect("tokenizer.json");
        let with = |extra: serde_json::Value| {
            let mut cfg: serde_json::Map<String, Value> =
                serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).expect("config"))
                    .expect("object");
            for (k, v) in extra.as_object().expect("object") {
                cfg.insert(k.clone(), v.clone());
            }
            Tokenizer::from_bytes(&json, Some(&serde_json::to_vec(&cfg).expect("json")), Path::new("m"))
        };
        let e = with(serde_json::json!({"eos_token": 5})).expect_err("a number");
        assert!(
            e.to_string().contains("tokenizer_config.json") && e.to_string().contains("`eos_token`"),
            "{e}"
        );
        assert!(e.to_string().contains("found a number (5)"), "{e}");
        let e = with(serde_json::json!({"additional_special_tokens": ["<a>", {"id": 3}]}))
            .expect_err("no content");
        assert!(e.to_string().contains("`additional_special_tokens[1]`"), "{e}");
        assert!(with(serde_json::json!({"pad_token": null, "bos_token": {"content": "<s>"}})).is_ok());
    }

    #[test]
    fn special_tokens_come_from_the_config() {
        let t = tiny();
        assert_eq!(t.eos_token(), Some("<|im_end|>"));
        assert_eq!(t.pad_token(), Some("<pad>"));
        assert_eq!(t.special_token("bos_token"), Some("<s>"));
        assert_eq!(t.eos_token_id(), Some(5));
        assert_eq!(t.pad_token_id(), Some(3));
    }

    #[test]
    fn overrides_must_be_in_the_vocabulary() {
        let t = tiny().with_overrides(Some("</s>"), None).expect("known token");
        assert_eq!(t.eos_token_id(), Some(2));
        assert_eq!(t.pad_token(), Some("<pad>"));
        let e = tiny().with_overrides(Some("<nope>"), None).expect_err("unknown eos");
        assert!(e.to_string().contains("<nope>"), "{e}");
        let e = tiny().with_overrides(None, Some("<nope>")).expect_err("unknown pad");
        assert!(e.to_string().contains("pad_token"), "{e}");
    }

    #[test]
    fn pad_defaults_to_eos() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let json = std::fs::read(dir.join("tokenizer.json")).expect("read");
        let cfg = br#"{"eos_token": "</s>", "bos_token": {"content": "<s>", "__type": "AddedToken"}}"#;
        let t = Tokenizer::from_bytes(&json, Some(cfg), &dir).expect("loads");
        assert_eq!(t.pad_token(), Some("</s>"));
        assert_eq!(t.special_token("bos_token"), Some("<s>"));
        // TRL resolves the pad token after the eos override.
        let t2 = t.clone().with_overrides(Some("<|im_end|>"), None).expect("override");
        assert_eq!(t2.pad_token(), Some("<|im_end|>"));
        let t = t.with_overrides(None, Some("<unk>")).expect("override");
        assert_eq!(t.pad_token_id(), Some(0));
    }

    #[test]
    fn special_tokens_missing_from_tokenizer_json_are_added_whole() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let json = std::fs::read(dir.join("tokenizer.json")).expect("read");
        let cfg = br#"{"eos_token": "<|brand new|>"}"#;
        let t = Tokenizer::from_bytes(&json, Some(cfg), &dir).expect("loads");
        let id = t.eos_token_id().expect("added");
        assert_eq!(id as usize, t.vocab_size() - 1);
        let ids = t.encode("a<|brand new|>", false).expect("encodes");
        assert_eq!(ids.last(), Some(&id));
    }

    #[test]
    fn fingerprint_follows_overrides() {
        let a = tiny();
        let b = tiny().with_overrides(Some("</s>"), None).expect("override");
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), tiny().fingerprint());
    }
}
