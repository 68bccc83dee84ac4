//! The four layers of a recipe (defaults < YAML file < `NIBBLE_` environment < command line),
//! each read into a flat key map with the origin of every key, old key spellings translated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::value::{Dict, Map, Value as FValue};
use figment::{Metadata, Profile, Provider};
use serde_json::Value as J;

use crate::diag::{Diagnostic, Kind, Origin, Source};
use crate::known;
use crate::spans::{Position, SpanIndex};
use crate::types::Trainer;
use crate::yaml;

/// Environment variables with the `NIBBLE_` prefix that configure tooling, not the recipe
/// (`NIBBLE_REF_CPU` pins the Python reference processes of the tests, scripts/refcpu;
/// `NIBBLE_QUANT_F32_SEARCH` picks quant's comparison kernel; `NIBBLE_BACKTRACE` asks sft for
/// a backtrace with an error).
pub const RESERVED_ENV: &[&str] = &[
    "NIBBLE_HOME",
    "NIBBLE_LOG",
    "NIBBLE_PYTHON",
    "NIBBLE_VENV",
    "NIBBLE_CACHE",
    "NIBBLE_REF_CPU",
    "NIBBLE_QUANT_F32_SEARCH",
    "NIBBLE_BACKTRACE",
];

/// Prefix of environment variables that override recipe keys.
pub const ENV_PREFIX: &str = "NIBBLE_";

/// A warning about a recipe: something accepted but worth telling the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Dotted key path.
    pub key: String,
    /// Where the key came from.
    pub origin: Origin,
    /// What nibble did with it.
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.origin {
            // Summaries over many keys have no single place.
            Origin::Default => write!(f, "{}: {}", self.message, self.key),
            _ => write!(f, "{}: {}: {}", self.origin, self.key, self.message),
        }
    }
}

/// One layer: flat top-level keys with JSON values and the origin of each.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub source: Source,
    pub values: BTreeMap<String, J>,
    pub origins: BTreeMap<String, Origin>,
    /// Raw text of env / CLI values, to retry a key as a plain string.
    pub raw: BTreeMap<String, String>,
    /// For a file layer: the file and its key positions.
    pub file: Option<(PathBuf, SpanIndex)>,
}

impl Layer {
    fn new(source: Source) -> Self {
        Layer { source, values: BTreeMap::new(), origins: BTreeMap::new(), raw: BTreeMap::new(), file: None }
    }

    /// Origin of a (possibly nested) key path in this layer.
    pub fn origin_of(&self, path: &str) -> Origin {
        if let Some((file, spans)) = &self.file {
            return Origin::File { path: file.clone(), position: spans.nearest(path) };
        }
        let top = path.split('.').next().unwrap_or(path);
        self.origins.get(top).cloned().unwrap_or(Origin::Default)
    }

    fn insert(&mut self, key: String, value: J, origin: Origin) {
        self.origins.insert(key.clone(), origin);
        self.values.insert(key, value);
    }

    /// The defaults layer, from nibble's typed defaults.
    pub fn defaults(flat: BTreeMap<String, J>) -> Self {
        let mut l = Layer::new(Source::Default);
        for (k, v) in flat {
            l.insert(k, v, Origin::Default);
        }
        l
    }

    /// Parse a recipe YAML text. Returns the layer and the top-level `env:` map.
    pub fn from_yaml(
        path: &Path,
        text: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> (Self, BTreeMap<String, String>) {
        let mut layer = Layer::new(Source::File);
        let mut env = BTreeMap::new();
        let file_origin = |pos: Option<Position>| Origin::File { path: path.to_owned(), position: pos };
        let (doc, spans) = match yaml::parse_with_spans(text) {
            Ok(parsed) => parsed,
            Err(e) => {
                diags.push(Diagnostic {
                    kind: Kind::Syntax,
                    key: "(file)".into(),
                    origin: file_origin(e.position),
                    message: format!("not valid YAML: {}", e.message),
                });
                return (layer, env);
            }
        };
        let map = match doc {
            J::Object(m) => m,
            J::Null => serde_json::Map::new(),
            other => {
                diags.push(Diagnostic {
                    kind: Kind::Syntax,
                    key: "(file)".into(),
                    origin: file_origin(Some(Position { line: 1, column: 1 })),
                    message: format!("a recipe is a mapping of keys to values, found {}", yaml_kind(&other)),
                });
                return (layer, env);
            }
        };
        for (key, v) in map {
            let origin = file_origin(spans.get(&key));
            if key == "env" {
                read_env_map(&key, v, &origin, &spans, path, &mut env, diags);
                continue;
            }
            layer.insert(key, v, origin);
        }
        layer.file = Some((path.to_owned(), spans));
        (layer, env)
    }

    /// The `NIBBLE_*` environment layer (reserved tooling variables excluded).
    pub fn from_env(trainer: Trainer, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut layer = Layer::new(Source::Env);
        for (var, raw) in vars {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
            if RESERVED_ENV.contains(&var.as_str()) || rest.is_empty() {
                continue;
            }
            let key = rest.to_ascii_lowercase();
            let value = parse_cli_value(trainer, &key, &raw);
            layer.raw.insert(key.clone(), raw);
            layer.insert(key, value, Origin::Env { var });
        }
        layer
    }

    /// The command-line layer from `--key value` / `--key=value` pairs (already split).
    pub fn from_cli(
        trainer: Trainer,
        pairs: Vec<(String, Option<String>)>,
        diags: &mut Vec<Diagnostic>,
    ) -> Self {
        let mut layer = Layer::new(Source::Cli);
        for (flag, raw) in pairs {
            let key = flag.trim_start_matches('-').replace('-', "_");
            if key.is_empty() {
                diags.push(Diagnostic {
                    kind: Kind::Syntax,
                    key: flag.clone(),
                    origin: Origin::Cli { flag },
                    message: "empty flag name".into(),
                });
                continue;
            }
            // A bare `--flag` means true, as TRL's parser takes boolean flags.
            let raw = raw.unwrap_or_else(|| "true".to_owned());
            let value = parse_cli_value(trainer, &key, &raw);
            layer.raw.insert(key.clone(), raw);
            layer.insert(key, value, Origin::Cli { flag });
        }
        layer
    }
}

fn yaml_kind(v: &J) -> &'static str {
    match v {
        J::Null => "nothing",
        J::Bool(_) => "a boolean",
        J::Number(_) => "a number",
        J::String(_) => "a string",
        J::Array(_) => "a list",
        J::Object(_) => "a mapping",
    }
}

fn read_env_map(
    key: &str,
    v: J,
    origin: &Origin,
    spans: &SpanIndex,
    path: &Path,
    env: &mut BTreeMap<String, String>,
    diags: &mut Vec<Diagnostic>,
) {
    let J::Object(m) = v else {
        diags.push(Diagnostic {
            kind: Kind::WrongType,
            key: key.into(),
            origin: origin.clone(),
            message: format!("expected a mapping of variable names to values, found {}", yaml_kind(&v)),
        });
        return;
    };
    for (name, value) in m {
        let sub = format!("env.{name}");
        let text = match value {
            J::String(s) => s,
            J::Bool(b) => b.to_string(),
            J::Number(n) => n.to_string(),
            other => {
                diags.push(Diagnostic {
                    kind: Kind::WrongType,
                    origin: Origin::File { path: path.to_owned(), position: spans.get(&sub) },
                    key: sub,
                    message: format!("an environment value must be a scalar, found {}", yaml_kind(&other)),
                });
                continue;
            }
        };
        env.insert(name, text);
    }
}

/// Parse a command-line or environment value: a YAML scalar or flow collection, or for list
/// keys a comma list (of scalars: `--loss_weights 0.8,0.2` is two numbers).
pub(crate) fn parse_cli_value(trainer: Trainer, key: &str, raw: &str) -> J {
    let list = known::typed(trainer, key).map(|f| f.list).unwrap_or(false)
        || known::passthrough(trainer, key).is_some_and(|f| f.kind == "list");
    let t = raw.trim();
    if list && !t.starts_with('[') && t.contains(',') {
        let scalar = |s: &str| match yaml::parse(s) {
            Ok(v @ (J::Number(_) | J::Bool(_))) => v,
            _ => J::String(s.into()),
        };
        return J::Array(t.split(',').map(str::trim).filter(|s| !s.is_empty()).map(scalar).collect());
    }
    yaml::parse(t).unwrap_or_else(|_| J::String(raw.to_owned()))
}

/// Adapter that hands a layer to figment, named after its source so that figment's metadata
/// tells which layer a merged value came from.
pub(crate) struct FigmentLayer<'a>(pub &'a Layer);

impl Provider for FigmentLayer<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.0.source.to_string())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (k, v) in &self.0.values {
            dict.insert(k.clone(), FValue::serialize(v)?);
        }
        Ok(Profile::Default.collect(dict))
    }
}
