//! The LoRA settings as plain data, and `adapter_config.json` both ways with PEFT 0.21.2's field
//! set and defaults, so an adapter nibble writes is one PEFT would have written and a PEFT adapter
//! that uses a feature nibble lacks is refused instead of silently computed differently.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use tch::Kind;

use crate::Error;

/// The file PEFT reads an adapter's settings from.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The file PEFT reads an adapter's tensors from.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The PEFT release whose format nibble writes (recorded as `peft_version`).
pub const PEFT_VERSION: &str = "0.21.2";

/// Which linear layers get an adapter (PEFT's `target_modules`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Names that match a module's full name or its `.`-separated ending (`q_proj` matches
    /// `model.layers.0.self_attn.q_proj`, not `model.layers.0.self_attn.xq_proj`).
    List(Vec<String>),
    /// A regex that must match a module's whole name (Python's `re.fullmatch`).
    Regex(String),
    /// Every linear the model offers (PEFT's `"all-linear"`; the output head is never offered).
    AllLinear,
}

/// How a new adapter's A and B start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: A kaiming-uniform with `a = sqrt(5)` (uniform in ±1/sqrt(in_features)), B zero,
    /// so the adapted layer starts equal to the base.
    Default,
    /// `"gaussian"`: A normal with std 1/r, B zero.
    Gaussian,
    /// `false`: A and B both as `nn.Linear` initializes them (uniform in ±1/sqrt(fan_in)), so the
    /// adapter is not the identity at start; for tests and debugging, as in PEFT.
    False,
}

/// The settings of one LoRA adapter: what PEFT's `LoraConfig` holds, restricted to what nibble
/// implements, plus the adapter dtype (which PEFT takes from the model instead).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank of the update (rows of A, columns of B); at least 1.
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Dropout probability on the adapter's input while training, in `[0, 1)`.
    pub dropout: f64,
    /// Which linears get an adapter.
    pub target_modules: TargetModules,
    /// Modules trained and saved in full (PEFT's `modules_to_save`): each module whose name ends
    /// with an entry gets a trainable copy (see [`crate::inject_with_modules`]); they are never
    /// LoRA targets.
    pub modules_to_save: Vec<String>,
    /// Rank-stabilized LoRA: scale by `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Weight-decomposed LoRA (DoRA): a trainable magnitude per output row on top of A and B.
    pub use_dora: bool,
    /// How A and B start.
    pub init: LoraInit,
    /// dtype A and B are stored and computed in (Float, BFloat16 or Half); the input is cast to
    /// it and the update cast back to the base layer's output dtype.
    pub dtype: Kind,
    /// The base model's id or path, recorded for whoever loads the adapter.
    pub base_model_name_or_path: Option<String>,
    /// PEFT's `task_type` (`CAUSAL_LM` for nibble's models).
    pub task_type: Option<String>,
    /// Which biases train (`"none"` is the only value nibble supports).
    pub bias: String,
    /// Parameters adapted in place of modules (PEFT's `target_parameters`, its `ParamWrapper`):
    /// a mixture of experts' router weight (`gate.weight`) and expert banks (`gate_up_proj`,
    /// `down_proj`), matched as `<module>.<param>` ends with an entry.
    pub target_parameters: Vec<String>,
    /// Per-target rank (PEFT's `rank_pattern`: a key matches a target whose name it ends, as a
    /// regex, after a dot), else `r`.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-target alpha (PEFT's `alpha_pattern`, matched as `rank_pattern`), else `alpha`.
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl LoraConfig {
    /// A config with PEFT's defaults for everything but rank, alpha and targets (no dropout, no
    /// rsLoRA, default init, Float adapters, task `CAUSAL_LM`).
    pub fn new(r: usize, alpha: f64, target_modules: TargetModules) -> Self {
        LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            target_modules,
            modules_to_save: Vec::new(),
            use_rslora: false,
            use_dora: false,
            init: LoraInit::Default,
            dtype: Kind::Float,
            base_model_name_or_path: None,
            task_type: Some("CAUSAL_LM".to_owned()),
            bias: "none".to_owned(),
            target_parameters: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    /// The factor on `B(A(x))`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        self.scaling_of(self.r, self.alpha)
    }

    fn scaling_of(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 }
    }

    /// Whether `target_parameters` adapt the parameter `<module>.<param>` (PEFT's rule: the name
    /// is an entry or ends with `.` and an entry).
    pub fn adapts_param(&self, key: &str) -> bool {
        self.target_parameters.iter().any(|t| key == t || key.ends_with(&format!(".{t}")))
    }

    /// The rank, alpha and scaling of the target named `name` (a module, or `<module>.<param>`),
    /// after `rank_pattern` and `alpha_pattern` as PEFT reads them: the first key (in the
    /// patterns' order) that matches `(.*\.)?(key)$`.
    pub fn rank_of(&self, name: &str) -> (usize, f64, f64) {
        let matches =
            |k: &str| regex::Regex::new(&format!("^(.*\\.)?({k})$")).is_ok_and(|re| re.is_match(name));
        let r = self.rank_pattern.iter().find(|(k, _)| matches(k)).map_or(self.r, |(_, &r)| r);
        let alpha = self.alpha_pattern.iter().find(|(k, _)| matches(k)).map_or(self.alpha, |(_, &a)| a);
        (r, alpha, self.scaling_of(r, alpha))
    }

    /// Refuse values nibble cannot honour, before any layer is touched.
    pub fn validate(&self) -> Result<(), Error> {
        if self.bias != "none" {
            return Err(Error::Unsupported(format!("bias = {:?} (only \"none\")", self.bias)));
        }
        if self.r == 0 {
            return Err(Error::InvalidConfig("r must be at least 1".into()));
        }
        if !self.alpha.is_finite() {
            return Err(Error::InvalidConfig(format!("lora_alpha must be finite, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidConfig(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if !matches!(self.dtype, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(Error::InvalidConfig(format!(
                "adapter dtype {:?} is not supported (use Float, BFloat16 or Half)",
                self.dtype
            )));
        }
        if let TargetModules::List(l) = &self.target_modules
            && l.is_empty()
            && self.target_parameters.is_empty()
        {
            return Err(Error::InvalidConfig("target_modules is an empty list".into()));
        }
        if !self.target_parameters.is_empty() && (self.dropout != 0.0 || self.use_dora) {
            return Err(Error::Unsupported(
                "target_parameters with lora_dropout or use_dora (PEFT's ParamWrapper supports neither)"
                    .into(),
            ));
        }
        if self.rank_pattern.values().any(|&r| r == 0) {
            return Err(Error::InvalidConfig("rank_pattern has a rank of 0".into()));
        }
        if self.modules_to_save.iter().any(String::is_empty) {
            return Err(Error::InvalidConfig("modules_to_save has an empty entry".into()));
        }
        Ok(())
    }

    /// The text `LoraConfig.save_pretrained` writes for this config (PEFT's field set and
    /// defaults, keys sorted, two-space indent, ASCII only).
    pub fn to_json(&self) -> String {
        self.to_json_with(&self.target_modules, false)
    }

    /// The config text with `target_modules` as resolved against a model and `inference_mode`
    /// as `PeftModel.save_pretrained` writes it.
    pub(crate) fn to_json_with(&self, targets: &TargetModules, inference_mode: bool) -> String {
        let targets = match targets {
            TargetModules::List(l) => {
                let mut l = l.clone();
                l.sort();
                l.dedup();
                Value::from(l)
            }
            TargetModules::Regex(re) => Value::from(re.as_str()),
            TargetModules::AllLinear => Value::from("all-linear"),
        };
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 9.0e15 {
            Value::from(self.alpha as i64)
        } else {
            Value::from(self.alpha)
        };
        let init = match self.init {
            LoraInit::Default => Value::Bool(true),
            LoraInit::Gaussian => Value::from("gaussian"),
            LoraInit::False => Value::Bool(false),
        };
        let modules_to_save = if self.modules_to_save.is_empty() {
            Value::Null
        } else {
            Value::from(self.modules_to_save.clone())
        };
        let mut fields: Vec<(&str, Value)> = DEFAULTS.iter().map(|(k, v)| (*k, default_value(v))).collect();
        let mut set = |key: &str, value: Value| {
            let slot = fields.iter_mut().find(|(k, _)| *k == key);
            if let Some((_, v)) = slot {
                *v = value;
            }
        };
        set("base_model_name_or_path", self.base_model_name_or_path.clone().map_or(Value::Null, Value::from));
        set("bias", Value::from(self.bias.as_str()));
        set("inference_mode", Value::Bool(inference_mode));
        set("init_lora_weights", init);
        set("lora_alpha", alpha);
        set("lora_dropout", Value::from(self.dropout));
        set("modules_to_save", modules_to_save);
        set("r", Value::from(self.r));
        set("target_modules", targets);
        set("task_type", self.task_type.clone().map_or(Value::Null, Value::from));
        set("use_dora", Value::Bool(self.use_dora));
        set("use_rslora", Value::Bool(self.use_rslora));
        if !self.target_parameters.is_empty() {
            let mut t = self.target_parameters.clone();
            t.sort();
            t.dedup();
            set("target_parameters", Value::from(t));
        }
        set(
            "rank_pattern",
            Value::Object(self.rank_pattern.iter().map(|(k, &v)| (k.clone(), Value::from(v))).collect()),
        );
        set(
            "alpha_pattern",
            Value::Object(
                self.alpha_pattern
                    .iter()
                    .map(|(k, &v)| {
                        let v = if v.fract() == 0.0 && v.abs() < 9.0e15 {
                            Value::from(v as i64)
                        } else {
                            Value::from(v)
                        };
                        (k.clone(), v)
                    })
                    .collect(),
            ),
        );
        fields.sort_by(|a, b| a.0.cmp(b.0));
        pyfiles::json::dumps_sorted(&Value::Object(
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ))
    }

    /// Read `dir/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(CONFIG_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        LoraConfig::from_json(&text, &path)
    }

    /// Parse an `adapter_config.json` text (`path` names it in errors). Missing keys take PEFT's
    /// defaults; a key that changes the computation in a way nibble does not implement is an
    /// error; unknown keys are logged.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, Error> {
        let bad = |problem: String| Error::Config { path: path.to_owned(), problem };
        let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(bad("not a JSON object".into()));
        };
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let field_err = |k: &str, want: &str| bad(format!("`{k}` must be {want}, got {}", obj[k]));

        if let Some(t) = get("peft_type")
            && t.as_str() != Some("LORA")
        {
            return Err(Error::Unsupported(format!("{}: peft_type {t} (only LORA)", path.display())));
        }
        for (key, value) in &obj {
            match DEFAULTS.iter().find(|(k, _)| k == key) {
                None => {
                    tracing::warn!(file = %path.display(), key, "unknown adapter_config.json key ignored")
                }
                Some((_, MustBe(_))) if !is_unset(value) => {
                    return Err(Error::Unsupported(format!("{}: `{key}` = {value}", path.display())));
                }
                Some(_) => {}
            }
        }

        let r = match get("r") {
            None => 8,
            Some(v) => {
                v.as_u64().filter(|r| *r >= 1).ok_or_else(|| field_err("r", "a positive integer"))? as usize
            }
        };
        let number = |k: &str, default: f64| match get(k) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| field_err(k, "a number")),
        };
        let flag = |k: &str| match get(k) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| field_err(k, "true or false")),
        };
        let string = |k: &str| match get(k) {
            None => Ok(None),
            Some(v) => v.as_str().map(|s| Some(s.to_owned())).ok_or_else(|| field_err(k, "a string")),
        };
        let strings = |k: &str| match get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| field_err(k, "a list of strings")),
            Some(_) => Err(field_err(k, "a list of strings")),
        };
        let target_modules = match get("target_modules") {
            None => {
                return Err(Error::Unsupported(format!(
                    "{}: no target_modules (PEFT's per-architecture default targets)",
                    path.display()
                )));
            }
            Some(Value::String(s)) if s.to_lowercase() == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(_) => TargetModules::List(strings("target_modules")?.unwrap_or_default()),
        };
        let init = match get("init_lora_weights") {
            None | Some(Value::Bool(true)) => LoraInit::Default,
            Some(Value::Bool(false)) => LoraInit::False,
            Some(Value::String(s)) if s.to_lowercase() == "gaussian" => LoraInit::Gaussian,
            Some(other) => {
                return Err(Error::Unsupported(format!("{}: init_lora_weights = {other}", path.display())));
            }
        };
        let modules_to_save = strings("modules_to_save")?.unwrap_or_default();
        // With tied embeddings in modules_to_save, PEFT then shares one trainable copy between
        // the tied modules; nibble unties them as PEFT does without it.
        if flag("ensure_weight_tying")? && !modules_to_save.is_empty() {
            return Err(Error::Unsupported(format!(
                "{}: `ensure_weight_tying` = true with modules_to_save",
                path.display()
            )));
        }
        let pattern = |k: &str| -> Result<Vec<(String, f64)>, Error> {
            match get(k) {
                None => Ok(Vec::new()),
                Some(Value::Object(o)) => o
                    .iter()
                    .map(|(key, v)| {
                        v.as_f64()
                            .map(|x| (key.clone(), x))
                            .ok_or_else(|| field_err(k, "an object of numbers"))
                    })
                    .collect(),
                Some(_) => Err(field_err(k, "an object of numbers")),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, v)| {
                if v >= 1.0 && v.fract() == 0.0 {
                    Ok((k, v as usize))
                } else {
                    Err(field_err("rank_pattern", "positive integers"))
                }
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let alpha_pattern: BTreeMap<String, f64> = pattern("alpha_pattern")?.into_iter().collect();
        Ok(LoraConfig {
            target_parameters: strings("target_parameters")?.unwrap_or_default(),
            rank_pattern,
            alpha_pattern,
            r,
            alpha: number("lora_alpha", 8.0)?,
            dropout: number("lora_dropout", 0.0)?,
            target_modules,
            modules_to_save,
            use_rslora: flag("use_rslora")?,
            use_dora: flag("use_dora")?,
            init,
            dtype: Kind::Float,
            base_model_name_or_path: string("base_model_name_or_path")?,
            task_type: string("task_type")?,
            bias: string("bias")?.unwrap_or_else(|| "none".to_owned()),
        })
    }
}

/// What a key of PEFT's `LoraConfig` defaults to (as JSON), and what nibble does with it when
/// reading.
enum Key {
    /// Typed into [`LoraConfig`] or informational (version, inference mode, init-only
    /// settings): accepted with any value.
    Is(&'static str),
    /// Changes the computation in a way nibble does not implement: must be null, false, `{}` or
    /// `[]` (PEFT's "off" values).
    MustBe(&'static str),
}

use Key::{Is, MustBe};

/// Every key PEFT 0.21.2's `LoraConfig.save_pretrained` writes, with its default as JSON.
const DEFAULTS: &[(&str, Key)] = &[
    ("alora_invocation_tokens", MustBe("null")),
    ("alpha_pattern", Is("{}")),
    ("arrow_config", MustBe("null")),
    ("auto_mapping", Is("null")),
    ("base_model_name_or_path", Is("null")),
    ("bias", Is("\"none\"")),
    ("corda_config", Is("null")),
    ("ensure_weight_tying", Is("false")),
    ("eva_config", Is("null")),
    ("exclude_modules", MustBe("null")),
    ("fan_in_fan_out", MustBe("false")),
    ("inference_mode", Is("false")),
    ("init_lora_weights", Is("true")),
    ("kasa_config", MustBe("null")),
    ("layer_replication", MustBe("null")),
    ("layers_pattern", Is("null")),
    ("layers_to_transform", MustBe("null")),
    ("loftq_config", Is("{}")),
    ("lora_alpha", Is("8")),
    ("lora_bias", MustBe("false")),
    ("lora_dropout", Is("0.0")),
    ("lora_ga_config", Is("null")),
    ("megatron_config", MustBe("null")),
    ("megatron_core", Is("\"megatron.core\"")),
    ("modules_to_save", Is("null")),
    ("monteclora_config", MustBe("null")),
    ("peft_type", Is("\"LORA\"")),
    ("peft_version", Is("\"0.21.2\"")),
    ("qalora_group_size", Is("16")),
    ("r", Is("8")),
    ("rank_pattern", Is("{}")),
    ("revision", Is("null")),
    ("target_modules", Is("null")),
    ("target_parameters", Is("null")),
    ("task_type", Is("null")),
    ("trainable_token_indices", MustBe("null")),
    ("use_bdlora", MustBe("null")),
    ("use_dora", Is("false")),
    ("use_qalora", MustBe("false")),
    ("use_rslora", Is("false")),
    ("velora_config", MustBe("null")),
];

fn default_value(d: &Key) -> Value {
    let (Is(text) | MustBe(text)) = d;
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// null, false, `{}` or `[]`: the "feature off" values of PEFT's optional settings.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// adapter_config.json garbage and near-misses give a config or an error naming the
        /// file: never a panic (issue 22).
        #[test]
        fn garbage_and_near_miss_adapter_configs_never_panic(
            garbage in "\\PC{0,120}",
            key in proptest::sample::select(vec![
                "r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "use_rslora",
                "modules_to_save", "init_lora_weights", "peft_type", "rank_pattern", "bias",
            ]),
            value in proptest::sample::select(vec![
                "null", "-1", "0", "1e300", "18446744073709551615", "\"x\"", "[]", "{}", "true",
                "[1, 2]", "{\"a\": 1}", "-0.5", "\"all-linear\"",
            ]),
        ) {
            let p = Path::new("a/adapter_config.json");
            if let Err(e) = LoraConfig::from_json(&garbage, p) {
                proptest::prop_assert!(e.to_string().contains("adapter_config.json"));
            }
            let mut v = serde_json::json!({
                "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM",
            });
            v[key] = serde_json::from_str(value).expect("json");
            let _ = LoraConfig::from_json(&v.to_string(), p);
        }
    }

    #[test]
    fn floats_print_as_python_repr() {
        for (f, want) in [
            (0.0, "0.0"),
            (0.05, "0.05"),
            (0.1, "0.1"),
            (16.0, "16.0"),
            (123.456, "123.456"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5, "-2.5"),
            (0.3333333333333333, "0.3333333333333333"),
        ] {
            assert_eq!(pyfiles::json::py_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn written_config_reads_back_equal() {
        let mut cfg = LoraConfig::new(16, 32.0, TargetModules::List(vec!["v_proj".into(), "q_proj".into()]));
        cfg.dropout = 0.05;
        cfg.use_rslora = true;
        cfg.init = LoraInit::Gaussian;
        cfg.modules_to_save = vec!["lm_head".into()];
        cfg.base_model_name_or_path = Some("Qwen/Qwen2.5-0.5B".into());
        let text = cfg.to_json();
        assert!(text.contains("\"target_modules\": [\n    \"q_proj\",\n    \"v_proj\"\n  ],"), "{text}");
        assert!(text.contains("\"lora_alpha\": 32,"), "{text}");
        assert!(text.contains("\"lora_dropout\": 0.05,"), "{text}");
        let mut want = cfg.clone();
        want.target_modules = TargetModules::List(vec!["q_proj".into(), "v_proj".into()]);
        assert_eq!(LoraConfig::from_json(&text, Path::new("x.json")).expect("read back"), want);
        for t in [TargetModules::AllLinear, TargetModules::Regex(r".*\.(q|v)_proj".into())] {
            cfg.target_modules = t;
            assert_eq!(LoraConfig::from_json(&cfg.to_json(), Path::new("x.json")).expect("read back"), cfg);
        }
    }

    #[test]
    fn written_config_has_every_peft_key_once_sorted() {
        let text = LoraConfig::new(8, 8.0, TargetModules::AllLinear).to_json();
        let v: Value = serde_json::from_str(&text).expect("JSON");
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(keys.len(), DEFAULTS.len());
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(v["peft_version"], PEFT_VERSION);
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["task_type"], "CAUSAL_LM");
        assert_eq!(v["target_modules"], "all-linear");
        assert!(!text.ends_with('\n'));
    }

    /// PEFT's rank and alpha patterns and `target_parameters` read, apply as PEFT matches them
    /// (a key ends the target's name after a dot, as a regex), and write back.
    #[test]
    fn patterns_and_target_parameters_round_trip_and_apply() {
        let mut v: Value =
            serde_json::from_str(&LoraConfig::new(4, 8.0, TargetModules::AllLinear).to_json()).expect("JSON");
        v["rank_pattern"] = serde_json::json!({".*\\.gate_up_proj": 8});
        v["alpha_pattern"] = serde_json::json!({".*\\.gate_up_proj": 16});
        v["target_parameters"] = serde_json::json!(["gate_up_proj", "gate.weight", "down_proj"]);
        let c = LoraConfig::from_json(&v.to_string(), Path::new("a.json")).expect("config");
        assert_eq!(c.target_parameters, ["gate_up_proj", "gate.weight", "down_proj"]);
        assert_eq!(c.rank_of("model.layers.0.mlp.experts.gate_up_proj"), (8, 16.0, 2.0));
        assert_eq!(c.rank_of("model.layers.0.mlp.experts.down_proj"), (4, 8.0, 2.0));
        assert_eq!(c.rank_of("model.layers.0.self_attn.q_proj"), (4, 8.0, 2.0));
        let back: Value = serde_json::from_str(&c.to_json()).expect("JSON");
        assert_eq!(back["rank_pattern"], v["rank_pattern"]);
        assert_eq!(back["alpha_pattern"], v["alpha_pattern"]);
        assert_eq!(
            back["target_parameters"],
            serde_json::json!(["down_proj", "gate.weight", "gate_up_proj"])
        );
        // PEFT's ParamWrapper has no dropout or DoRA.
        let mut d = c.clone();
        d.dropout = 0.1;
        assert!(d.validate().is_err());
    }

    #[test]
    fn unsupported_features_are_refused_with_the_key() {
        let base = LoraConfig::new(8, 8.0, TargetModules::AllLinear).to_json();
        for (key, value) in [
            ("fan_in_fan_out", "true"),
            ("layers_to_transform", "[0]"),
            ("lora_bias", "true"),
            ("init_lora_weights", "\"pissa\""),
            ("peft_type", "\"IA3\""),
            ("target_modules", "null"),
        ] {
            let mut v: Value = serde_json::from_str(&base).expect("JSON");
            v[key] = serde_json::from_str(value).expect("value");
            let err = LoraConfig::from_json(&v.to_string(), Path::new("a/adapter_config.json"))
                .expect_err(key)
                .to_string();
            assert!(
                err.contains("not supported yet") && err.contains("a/adapter_config.json"),
                "{key}: {err}"
            );
        }
        // Weight tying of modules_to_save copies is refused only where it would act.
        let mut v: Value = serde_json::from_str(&base).expect("JSON");
        v["ensure_weight_tying"] = true.into();
        assert!(LoraConfig::from_json(&v.to_string(), Path::new("c.json")).is_ok());
        v["modules_to_save"] = serde_json::json!(["lm_head"]);
        let err = LoraConfig::from_json(&v.to_string(), Path::new("c.json")).expect_err("tying").to_string();
        assert_eq!(err, "c.json: `ensure_weight_tying` = true with modules_to_save is not supported yet");
        let mut v: Value = serde_json::from_str(&base).expect("JSON");
        v["r"] = "eight".into();
        let err = LoraConfig::from_json(&v.to_string(), Path::new("c.json")).expect_err("bad r").to_string();
        assert!(err.contains("c.json") && err.contains("`r` must be a positive integer"), "{err}");
        // Empty lists and dicts are PEFT's "off" values: accepted.
        let mut v: Value = serde_json::from_str(&base).expect("JSON");
        v["layers_to_transform"] = serde_json::json!([]);
        v["some_future_key"] = serde_json::json!(1);
        assert!(LoraConfig::from_json(&v.to_string(), Path::new("c.json")).is_ok());
    }

    #[test]
    fn validate_refuses_bad_values() {
        let ok = LoraConfig::new(8, 16.0, TargetModules::AllLinear);
        assert!(ok.validate().is_ok());
        assert!(LoraConfig { use_dora: true, ..ok.clone() }.validate().is_ok());
        assert!(LoraConfig { modules_to_save: vec![String::new()], ..ok.clone() }.validate().is_err());
        assert!(LoraConfig { r: 0, ..ok.clone() }.validate().is_err());
        assert!(LoraConfig { dropout: 1.0, ..ok.clone() }.validate().is_err());
        assert!(LoraConfig { dtype: Kind::Int64, ..ok.clone() }.validate().is_err());
        assert!(LoraConfig { bias: "all".into(), ..ok }.validate().is_err());
    }

    #[test]
    fn scaling_is_alpha_over_r_or_sqrt_r() {
        let mut cfg = LoraConfig::new(16, 32.0, TargetModules::AllLinear);
        assert_eq!(cfg.scaling(), 2.0);
        cfg.use_rslora = true;
        assert_eq!(cfg.scaling(), 8.0);
    }
}
