//! Recipes: an alignment-handbook / TRL YAML, layered with environment and command-line
//! overrides, turned into one validated plan for the rest of nibble.
//!
//! ```text
//! defaults  <  recipe.yaml  <  NIBBLE_* environment  <  --key value flags
//! ```
//!
//! Keys mirror TRL's three argument groups ([`ModelArgs`], [`DataArgs`], [`TrainingArgs`]) with
//! TRL's defaults. Older spellings (`max_seq_length`, `dataset_mixer`, `torch_dtype`,
//! `packing_strategy: ffd`, ...) are read with their current meaning and a warning. Every
//! problem is reported at once, each with its key and its place (file, line and column; or the
//! environment variable; or the flag). This crate never links libtorch.

#![deny(missing_docs)]

mod diag;
mod fields;
mod known;
mod layers;
mod legacy;
mod spans;
pub mod types;
mod validate;
pub mod yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use figment::Figment;
use figment::value::Value as FValue;
use serde::Serialize;
use serde_json::Value as J;

pub use diag::{Diagnostic, Error, Kind, Origin, Source};
pub use fields::{DataArgs, DpoArgs, Field, ModelArgs, Support, TrainingArgs};
pub use known::{TrlField, TrlFields, trl_fields};
pub use layers::{ENV_PREFIX, RESERVED_ENV, Warning};
pub use legacy::{OBSOLETE, RENAMES};
pub use spans::{Position, SpanIndex};
pub use types::Trainer;

use layers::{FigmentLayer, Layer};

/// The validated plan: every key resolved, with where its value came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// Which trainer the recipe is for (`sft train` or `sft dpo`): its keys and defaults.
    pub trainer: Trainer,
    /// What to load and how to adapt it.
    pub model: ModelArgs,
    /// What to train on.
    pub data: DataArgs,
    /// How to train.
    pub training: TrainingArgs,
    /// DPOConfig's own keys, for a DPO recipe.
    pub dpo: Option<DpoArgs>,
    /// The recipe's `env:` map, to export before anything else runs.
    pub env: BTreeMap<String, String>,
    /// TRL keys that nibble accepts but does not type (all of them are reported as not acted on).
    pub extra: BTreeMap<String, J>,
    /// Which layer each key's value came from.
    pub sources: BTreeMap<String, Source>,
    /// Where each key's value came from (file, line and column; variable; flag), so that a problem
    /// found after loading points where one found while loading does ([`Recipe::problem`]).
    pub origins: BTreeMap<String, Origin>,
    /// Accepted oddities: old spellings, keys not acted on.
    pub warnings: Vec<Warning>,
}

impl Recipe {
    /// A problem with `key`'s value found after loading (by a consumer of the recipe, e.g. when a
    /// run is planned), pointing where the value came from; report them with [`Error::invalid`].
    pub fn problem(&self, kind: Kind, key: &str, message: impl Into<String>) -> Diagnostic {
        let top = key.split('.').next().unwrap_or(key);
        let origin = self.origins.get(top).cloned().unwrap_or(Origin::Default);
        Diagnostic { kind, key: key.to_owned(), origin, message: message.into() }
    }

    /// The plan as `--print-config` prints it: sections, env, extra keys and sources.
    pub fn to_json(&self) -> J {
        let mut j = serde_json::json!({
            "trainer": self.trainer,
            "model": self.model,
            "data": self.data,
            "training": self.training_keys(),
            "env": self.env,
            "extra": self.extra,
            "sources": self.sources,
        });
        if let Some(dpo) = &self.dpo {
            j["dpo"] = serde_json::to_value(dpo).unwrap_or(J::Null);
        }
        j
    }

    /// The training keys this recipe's trainer reads (a DPO recipe has no `packing`).
    fn training_keys(&self) -> BTreeMap<String, J> {
        let mut t = flatten(&self.training);
        t.retain(|k, _| known::reads_training_key(self.trainer, k));
        t
    }

    /// The plan as a flat recipe YAML that loads back into the same plan (by the same trainer).
    pub fn to_yaml(&self) -> String {
        let mut flat = flatten(&self.model);
        flat.extend(flatten(&self.data));
        flat.extend(self.training_keys());
        if let Some(dpo) = &self.dpo {
            flat.extend(flatten(dpo));
        }
        flat.extend(self.extra.clone());
        if !self.env.is_empty() {
            flat.insert("env".into(), serde_json::to_value(&self.env).unwrap_or(J::Null));
        }
        yaml::to_string(&J::Object(flat.into_iter().collect()))
    }
}

fn flatten(section: &impl Serialize) -> BTreeMap<String, J> {
    match serde_json::to_value(section) {
        Ok(J::Object(m)) => m.into_iter().collect(),
        _ => BTreeMap::new(),
    }
}

/// Builds a [`Recipe`] from its layers; everything is read at [`Loader::load`].
#[derive(Debug, Default, Clone)]
pub struct Loader {
    trainer: Trainer,
    file: Option<(PathBuf, Option<String>)>,
    env: Vec<(String, String)>,
    cli: Vec<(String, Option<String>)>,
}

impl Loader {
    /// An empty loader: defaults only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Read the recipe as `trainer`'s (SFT unless said): its keys, its defaults.
    pub fn trainer(mut self, trainer: Trainer) -> Self {
        self.trainer = trainer;
        self
    }

    /// Read the recipe from this YAML file.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some((path.into(), None));
        self
    }

    /// Use this YAML text as the recipe file (`path` names it in messages).
    pub fn yaml(mut self, path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        self.file = Some((path.into(), Some(text.into())));
        self
    }

    /// Environment variables; those starting with `NIBBLE_` override recipe keys.
    pub fn env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env = vars.into_iter().collect();
        self
    }

    /// Command-line overrides as `(flag, value)` pairs, e.g. from [`split_flags`].
    pub fn cli(mut self, pairs: Vec<(String, Option<String>)>) -> Self {
        self.cli = pairs;
        self
    }

    /// Merge, translate, type and validate; all problems come back together.
    pub fn load(self) -> Result<Recipe, Error> {
        match self.load_checked()? {
            (recipe, diags) if diags.is_empty() => Ok(recipe),
            (_, diags) => Err(Error::invalid(diags)),
        }
    }

    /// [`Loader::load`] for a caller with checks of its own (a run plan), so that its problems
    /// and config's are reported together: the recipe as far as it could be typed (a key whose
    /// value failed keeps its default) with config's problems beside it. Still an error when the
    /// file cannot be read or is not YAML (nothing else is worth checking then).
    pub fn load_checked(self) -> Result<(Recipe, Vec<Diagnostic>), Error> {
        let mut diags = Vec::new();
        let mut warnings = Vec::new();

        let trainer = self.trainer;
        let mut defaults = flatten(&ModelArgs::default());
        defaults.extend(flatten(&DataArgs::default()));
        let mut training = flatten(&TrainingArgs::defaults_for(trainer));
        training.retain(|k, _| known::reads_training_key(trainer, k));
        defaults.extend(training);
        if trainer == Trainer::Dpo {
            defaults.extend(flatten(&DpoArgs::default()));
        }
        let mut layers = vec![Layer::defaults(defaults)];

        let mut env_map = BTreeMap::new();
        if let Some((path, text)) = self.file {
            let text = match text {
                Some(t) => t,
                None => std::fs::read_to_string(&path)
                    .map_err(|source| Error::Read { path: path.clone(), source })?,
            };
            let (layer, env) = Layer::from_yaml(&path, &text, &mut diags);
            env_map = env;
            layers.push(layer);
        }
        // A file that does not parse gives nothing else worth reporting.
        if diags.iter().any(|d| d.kind == Kind::Syntax) {
            return Err(Error::Invalid(diags));
        }
        layers.push(Layer::from_env(trainer, self.env));
        layers.push(Layer::from_cli(trainer, self.cli, &mut diags));

        // The highest layer's `rpo_alpha` applies to the merged losses.
        let mut rpo_alpha = None;
        for layer in layers.iter_mut().skip(1) {
            rpo_alpha = legacy::translate(layer, trainer, &mut diags, &mut warnings).or(rpo_alpha);
            reject_unknown(layer, trainer, &mut diags);
        }

        let figment = layers.iter().fold(Figment::new(), |f, l| f.merge(FigmentLayer(l)));
        let mut x = Extractor {
            figment: &figment,
            layers: &layers,
            diags: &mut diags,
            failed: BTreeSet::new(),
            skip: BTreeSet::new(),
        };
        let model = ModelArgs::extract(&mut x);
        let data = DataArgs::extract(&mut x);
        let mut dpo = (trainer == Trainer::Dpo).then(|| DpoArgs::extract(&mut x));
        // Training keys the trainer does not read keep their defaults (DPO's `loss_type` is its own).
        x.skip = TrainingArgs::FIELDS
            .iter()
            .map(|f| f.name)
            .filter(|k| !known::reads_training_key(trainer, k))
            .collect();
        let training = TrainingArgs::extract(&mut x);
        let failed = std::mem::take(&mut x.failed);
        if let (Some(dpo), Some(a)) = (dpo.as_mut(), rpo_alpha) {
            legacy::apply_rpo_alpha(dpo, a, &mut diags, &mut warnings);
        }
        let extra = extract_extra(&layers, trainer, &mut diags);

        let (mut sources, mut origins) = (BTreeMap::new(), BTreeMap::new());
        let keys = known::typed_fields(trainer).map(|f| f.name.to_owned()).chain(extra.keys().cloned());
        for key in keys {
            let layer = winner(&layers, &key);
            sources.insert(key.clone(), layer.map_or(Source::Default, |l| l.source));
            origins.insert(key.clone(), layer.map_or(Origin::Default, |l| l.origin_of(&key)));
        }

        let mut reporter = Reporter { layers: &layers, diags: &mut diags, failed: &failed };
        validate::check(&model, &data, &training, &mut reporter);
        if let Some(dpo) = &dpo {
            validate::check_dpo(&model, dpo, &mut reporter);
        }
        let mut recipe =
            Recipe { trainer, model, data, training, dpo, env: env_map, extra, sources, origins, warnings };
        not_acted_warning(&mut recipe, &layers);
        resolve_effective(&mut recipe);
        Ok((recipe, diags))
    }
}

/// Split `--key value`, `--key=value` and bare `--flag` arguments into pairs. A bare flag is
/// followed by another flag or by nothing.
pub fn split_flags(args: &[String]) -> Result<Vec<(String, Option<String>)>, Error> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let Some(body) = a.strip_prefix("--") else {
            return Err(Error::Invalid(vec![Diagnostic {
                kind: Kind::Syntax,
                key: a.clone(),
                origin: Origin::Cli { flag: a.clone() },
                message: "expected a `--key value` flag".into(),
            }]));
        };
        if let Some((k, v)) = body.split_once('=') {
            out.push((format!("--{k}"), Some(v.to_owned())));
            i += 1;
        } else if i + 1 < args.len() && !args[i + 1].starts_with("--") {
            out.push((a.clone(), Some(args[i + 1].clone())));
            i += 2;
        } else {
            out.push((a.clone(), None));
            i += 1;
        }
    }
    Ok(out)
}

/// The highest-precedence layer that sets `key`.
fn winner<'a>(layers: &'a [Layer], key: &str) -> Option<&'a Layer> {
    layers.iter().rev().find(|l| l.values.contains_key(key))
}

/// Where a diagnostic sorts: defaults, then the file in order, then variables, then flags.
pub(crate) fn order(o: &Origin) -> (u8, usize, usize, String) {
    match o {
        Origin::Default => (0, 0, 0, String::new()),
        Origin::File { position, .. } => {
            let p = position.unwrap_or(Position { line: usize::MAX, column: 0 });
            (1, p.line, p.column, String::new())
        }
        Origin::Env { var } => (2, 0, 0, var.clone()),
        Origin::Cli { flag } => (3, 0, 0, flag.clone()),
    }
}

/// " (did you mean `x`?)" for the closest candidate, or nothing.
pub(crate) fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    candidates
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(s, _)| *s > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

fn reject_unknown(layer: &mut Layer, trainer: Trainer, diags: &mut Vec<Diagnostic>) {
    let unknown: Vec<String> = layer
        .values
        .keys()
        .filter(|k| known::typed(trainer, k).is_none() && known::passthrough(trainer, k).is_none())
        .cloned()
        .collect();
    for key in unknown {
        layer.values.remove(&key);
        if let Some(other) = known::other_trainer(trainer, &key) {
            diags.push(Diagnostic {
                kind: Kind::UnknownKey,
                origin: layer.origin_of(&key),
                message: format!(
                    "a {} key: `{}` does not read it (it is for `{}`)",
                    other.config_class(),
                    trainer.command(),
                    other.command()
                ),
                key,
            });
            continue;
        }
        let candidates: Vec<&str> = known::typed_fields(trainer)
            .map(|f| f.name)
            .chain(
                ["model", "data", trainer.group()]
                    .into_iter()
                    .flat_map(|g| trl_fields().groups.get(g).into_iter().flatten().map(|f| f.name.as_str())),
            )
            .chain(legacy::old_names())
            .collect();
        let hint = suggest(&key, candidates.into_iter());
        diags.push(Diagnostic {
            kind: Kind::UnknownKey,
            origin: layer.origin_of(&key),
            message: format!("unknown key{hint}; neither nibble nor TRL {} knows it", trl_fields().trl),
            key,
        });
    }
}

struct Extractor<'a> {
    figment: &'a Figment,
    layers: &'a [Layer],
    diags: &'a mut Vec<Diagnostic>,
    /// Keys whose value did not have the right type (their checks would only repeat that).
    failed: BTreeSet<String>,
    /// Keys the section being extracted leaves at their defaults.
    skip: BTreeSet<&'static str>,
}

impl fields::Extract for Extractor<'_> {
    fn get<T: serde::de::DeserializeOwned>(&mut self, key: &str, default: T) -> T {
        if self.skip.contains(key) {
            return default;
        }
        let err = match self.figment.extract_inner::<T>(key) {
            Ok(v) => return v,
            Err(e) => e,
        };
        let Some(layer) = winner(self.layers, key) else { return default };
        // An env or CLI value that looked like a number may be meant as a string.
        if let Some(raw) = layer.raw.get(key)
            && let Ok(v) = FValue::from(raw.clone()).deserialize::<T>()
        {
            return v;
        }
        // figment appends the extracted key after the path inside the value.
        let mut inner = err.path.clone();
        if inner.last().is_some_and(|k| k == key) {
            inner.pop();
        }
        let path = std::iter::once(key.to_owned()).chain(inner).collect::<Vec<_>>().join(".");
        self.failed.insert(key.to_owned());
        self.diags.push(Diagnostic {
            kind: Kind::WrongType,
            origin: layer.origin_of(&path),
            key: path,
            message: match &err.kind {
                // A closed set: the nearest spelling first, then the whole set.
                figment::error::Kind::UnknownVariant(found, expected) => format!(
                    "unknown value `{found}`{}; expected one of: {}",
                    suggest(found, expected.iter().copied()),
                    expected.join(", ")
                ),
                kind => kind.to_string(),
            },
        });
        default
    }
}

fn extract_extra(layers: &[Layer], trainer: Trainer, diags: &mut Vec<Diagnostic>) -> BTreeMap<String, J> {
    let mut extra = BTreeMap::new();
    for layer in layers.iter().skip(1) {
        for (k, v) in &layer.values {
            let Some(f) = known::passthrough(trainer, k) else { continue };
            let mut ok = known::fits_kind(&f.kind, v);
            if let (Some(choices), Some(s)) = (&f.choices, v.as_str()) {
                ok &= choices.iter().any(|c| c == s);
            }
            if !ok {
                let expected = match &f.choices {
                    Some(c) => format!("one of {}", c.join(", ")),
                    None => format!("a value of type {}", f.kind),
                };
                diags.push(Diagnostic {
                    kind: Kind::WrongType,
                    key: k.clone(),
                    origin: layer.origin_of(k),
                    message: format!("expected {expected}, found {v}"),
                });
                continue;
            }
            extra.insert(k.clone(), v.clone());
        }
    }
    extra
}

struct Reporter<'a> {
    layers: &'a [Layer],
    diags: &'a mut Vec<Diagnostic>,
    failed: &'a BTreeSet<String>,
}

impl validate::Report for Reporter<'_> {
    fn report(&mut self, kind: Kind, key: &str, message: String) {
        let top = key.split('.').next().unwrap_or(key);
        // A key that failed to parse already has its diagnostic; a missing dataset is not
        // missing when the mixture was given but malformed.
        if self.failed.contains(top) || (key == "dataset_name" && self.failed.contains("dataset_mixture")) {
            return;
        }
        let origin = match winner(self.layers, top) {
            Some(l) if l.source != Source::Default => l.origin_of(key),
            _ => match self.layers.iter().find(|l| l.source == Source::File) {
                Some(file) => match &file.file {
                    Some((path, _)) => Origin::File { path: path.clone(), position: None },
                    None => Origin::Default,
                },
                None => Origin::Default,
            },
        };
        self.diags.push(Diagnostic { kind, key: key.to_owned(), origin, message });
    }
}

/// One warning naming the keys a user set that nibble does not act on (yet).
fn not_acted_warning(recipe: &mut Recipe, layers: &[Layer]) {
    let defaults = layers[0].values.clone();
    let mut planned = BTreeSet::new();
    let mut ignored = BTreeSet::new();
    for f in known::typed_fields(recipe.trainer) {
        if f.support == Support::Acted || recipe.sources.get(f.name) == Some(&Source::Default) {
            continue;
        }
        let current = winner(layers, f.name).and_then(|l| l.values.get(f.name));
        if current == defaults.get(f.name) {
            continue;
        }
        if f.support == Support::Planned {
            planned.insert(f.name)
        } else {
            ignored.insert(f.name)
        };
    }
    let extra: Vec<&str> = recipe.extra.keys().map(String::as_str).collect();
    ignored.extend(extra);
    let mk = |names: BTreeSet<&str>, why: &str| Warning {
        key: names.iter().copied().collect::<Vec<_>>().join(", "),
        origin: Origin::Default,
        message: why.to_owned(),
    };
    if !planned.is_empty() {
        recipe.warnings.push(mk(planned, "understood and validated, not acted on yet"));
    }
    if !ignored.is_empty() {
        recipe.warnings.push(mk(ignored, "understood, but nibble does not act on them"));
    }
}

/// Fill in values TRL derives when left unset, so the plan shows what would really happen.
fn resolve_effective(r: &mut Recipe) {
    let t = &mut r.training;
    if t.bf16.is_none() {
        t.bf16 = Some(!t.fp16);
    }
    if t.eval_packing.is_none() {
        t.eval_packing = Some(t.packing);
    }
    if t.output_dir.is_none() {
        t.output_dir = Some("trainer_output".into());
    }
}
