//! Chat templates rendered as transformers renders them: Jinja through minijinja with
//! `trim_blocks` / `lstrip_blocks`, Python-style string methods (pycompat), loop controls,
//! `raise_exception`, a `tojson` that writes what Python's `json.dumps` writes, and the
//! `{% generation %}` block that marks assistant text for `assistant_only_loss`.

use crate::Error;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

/// The chat template a model folder ships, as transformers finds it: `chat_template.jinja`,
/// else the `chat_template` string of `tokenizer_config.json`; the first of `dirs` that has one
/// wins (an adapter folder before its base model, as TRL saves the template with the adapter).
pub fn find_chat_template(dirs: &[&std::path::Path]) -> Result<Option<String>, Error> {
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(&path).map_err(|e| Error::TemplateFile { path, message: e.to_string() })
    };
    for dir in dirs {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return read(jinja).map(Some);
        }
        let cfg = dir.join("tokenizer_config.json");
        if cfg.is_file() {
            let text = read(cfg.clone())?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::TemplateFile { path: cfg, message: format!("not valid JSON: {e}") })?;
            if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
                return Ok(Some(t.to_owned()));
            }
        }
    }
    Ok(None)
}

/// Private-use characters that mark the start and end of `{% generation %}` output.
const GEN_START: char = '\u{E000}';
const GEN_END: char = '\u{E001}';

/// What a render produced: the text, and the byte ranges of assistant text inside
/// `{% generation %}` blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The rendered conversation.
    pub text: String,
    /// Byte ranges of `text` produced inside generation blocks.
    pub assistant_spans: Vec<std::ops::Range<usize>>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    has_generation: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("has_generation", &self.has_generation).finish()
    }
}

/// Rewrite `{% generation %}` / `{% endgeneration %}` (with any whitespace control) into plain
/// Jinja that emits marker characters and keeps the tags' trim/lstrip behaviour: the markers sit
/// between two block tags, so the newline after the original tag still follows a block tag.
fn rewrite_generation(src: &str) -> (String, bool) {
    let re = regex::Regex::new(r"\{%(-?)\s*(generation|endgeneration)\s*(-?)%\}").expect("valid regex");
    let mut found = false;
    let out = re
        .replace_all(src, |c: &regex::Captures<'_>| {
            found = true;
            let (l, r) = (&c[1], &c[3]);
            if &c[2] == "generation" {
                format!("{{%{l} if true %}}{GEN_START}{{% if true {r}%}}")
            } else {
                format!("{{%{l} endif %}}{GEN_END}{{% endif {r}%}}")
            }
        })
        .into_owned();
    (out, found)
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)` for template values, as
/// transformers' `tojson` filter calls it.
fn py_json(v: &serde_json::Value, indent: Option<usize>) -> String {
    pyfiles::json::Dumps { indent, sort_keys: false, ensure_ascii: false }.dumps(v)
}

fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let j = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(py_json(&j, indent)))
}

/// Instructions one render may run: a real chat template renders a long conversation in a few
/// hundred thousand; a template that loops (or is made to) stops with an error instead of
/// hanging or growing its output without bound.
pub const TEMPLATE_FUEL: u64 = 50_000_000;

impl ChatTemplate {
    /// Compile a template source (from tokenizer_config.json, chat_template.jinja or a recipe).
    pub fn new(source: &str) -> Result<Self, Error> {
        let (src, has_generation) = rewrite_generation(source);
        let mut env = Environment::new();
        let syntax = env
            .syntax()
            .to_builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(Error::TemplateCompile)?;
        env.set_syntax(syntax);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", src).map_err(Error::TemplateCompile)?;
        Ok(ChatTemplate { env, has_generation })
    }

    /// Whether the template marks assistant text with `{% generation %}`.
    pub fn has_generation(&self) -> bool {
        self.has_generation
    }

    /// Render a conversation. `context` holds `messages` and anything else the template reads
    /// (`tools`, `bos_token`, `eos_token`, `add_generation_prompt`, chat_template_kwargs, ...).
    pub fn render(&self, context: &serde_json::Value) -> Result<Rendered, Error> {
        let tmpl = self.env.get_template("chat").map_err(Error::TemplateRender)?;
        let ctx: Value = serde_json::from_value(context.clone()).map_err(|e| {
            Error::TemplateRender(minijinja::Error::new(ErrorKind::BadSerialization, e.to_string()))
        })?;
        let raw = tmpl.render(ctx).map_err(Error::TemplateRender)?;
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut open = None;
        for ch in raw.chars() {
            match ch {
                GEN_START => open = Some(text.len()),
                GEN_END => {
                    if let Some(start) = open.take() {
                        spans.push(start..text.len());
                    }
                }
                c => text.push(c),
            }
        }
        Ok(Rendered { text, assistant_spans: spans })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_first_folder_with_a_template_gives_it_jinja_before_tokenizer_config() {
        let root = std::env::temp_dir().join(format!("nibble-find-template-{}", std::process::id()));
        let (adapter, model, broken) = (root.join("adapter"), root.join("model"), root.join("broken"));
        for d in [&adapter, &model, &broken] {
            std::fs::create_dir_all(d).expect("dir");
        }
        std::fs::write(model.join("tokenizer_config.json"), r#"{"chat_template": "from config"}"#)
            .expect("w");
        assert_eq!(find_chat_template(&[&adapter, &model]).expect("find").as_deref(), Some("from config"));
        std::fs::write(model.join("chat_template.jinja"), "from jinja").expect("w");
        assert_eq!(find_chat_template(&[&adapter, &model]).expect("find").as_deref(), Some("from jinja"));
        std::fs::write(adapter.join("chat_template.jinja"), "the adapter's").expect("w");
        assert_eq!(find_chat_template(&[&adapter, &model]).expect("find").as_deref(), Some("the adapter's"));
        assert_eq!(find_chat_template(&[&root]).expect("none"), None);
        std::fs::write(broken.join("tokenizer_config.json"), "{not json").expect("w");
        let err = find_chat_template(&[&broken]).expect_err("bad JSON").to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("not valid JSON"), "{err}");
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn a_template_that_loops_stops_with_an_error() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        )
        .expect("compiles");
        let e = t.render(&json!({"messages": []})).expect_err("runs out of fuel").to_string();
        assert!(e.contains("chat template failed to render"), "{e}");
    }

    proptest::proptest! {
        /// Garbage and near-misses compile to a template or an error, and render to text or an
        /// error: never a panic.
        #[test]
        fn garbage_templates_never_panic(src in "(\\{%|%\\}|\\{\\{|\\}\\}|[a-z ]|for|if|endfor|endif|in|messages|\\.|\\||\\(|\\)){0,40}") {
            if let Ok(t) = ChatTemplate::new(&src) {
                let _ = t.render(&json!({"messages": [{"role": "user", "content": "hi"}]}));
            }
        }
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let v = json!({"name": "f", "args": [1, 2.5, "é", {"a": null}], "ok": true});
        assert_eq!(py_json(&v, None), r#"{"name": "f", "args": [1, 2.5, "é", {"a": null}], "ok": true}"#);
        assert_eq!(py_json(&json!({"a": [1, 2]}), Some(2)), "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
    }

    #[test]
    fn generation_blocks_become_spans() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{{ '\n' }}{% endfor %}",
        )
        .expect("compiles");
        assert!(t.has_generation());
        let r = t
            .render(&json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
            .expect("renders");
        assert_eq!(r.text, "user: hi\nassistant: yo\n");
        assert_eq!(&r.text[r.assistant_spans[0].clone()], "yo");
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").expect("compiles");
        let e = t.render(&json!({"messages": []})).expect_err("raises");
        assert!(e.to_string().contains("roles must alternate"), "{e}");
    }
}
