//! Value types of recipe keys: the closed sets TRL accepts, and the keys that take several shapes.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A JSON object, for TRL's free-form `*_kwargs` keys.
pub type KwArgs = BTreeMap<String, serde_json::Value>;

macro_rules! choice {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $text)] $variant,)+
        }
        impl $name {
            /// Every spelling the recipe accepts, as TRL names them.
            pub const ALL: &'static [&'static str] = &[$($text),+];
            /// Every value, in the order of [`Self::ALL`].
            pub const VALUES: &'static [$name] = &[$($name::$variant),+];
            /// The recipe spelling of this value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

choice! {
    /// Which trainer reads the recipe: it decides the keys, their defaults and the meaning of the
    /// keys both have (`loss_type`).
    #[derive(Default)]
    Trainer {
        /// TRL's SFTTrainer (`sft train`).
        #[default]
        Sft = "sft",
        /// TRL's DPOTrainer (`sft dpo`).
        Dpo = "dpo",
    }
}

impl Trainer {
    /// The TRL config class whose keys this trainer reads.
    pub fn config_class(self) -> &'static str {
        match self {
            Trainer::Sft => "SFTConfig",
            Trainer::Dpo => "DPOConfig",
        }
    }

    /// The group of `trl_fields.json` holding that class's keys.
    pub fn group(self) -> &'static str {
        match self {
            Trainer::Sft => "training",
            Trainer::Dpo => "dpo",
        }
    }

    /// The `sft` command that runs this trainer.
    pub fn command(self) -> &'static str {
        match self {
            Trainer::Sft => "sft train",
            Trainer::Dpo => "sft dpo",
        }
    }
}

choice! {
    /// How each epoch orders the training rows (`train_sampling_strategy`, transformers' set).
    SamplingStrategy {
        /// Shuffled by a generator seeded with `data_seed` (or `seed`) and the epoch.
        Random = "random",
        /// In dataset order.
        Sequential = "sequential",
        /// Batches of rows of similar length.
        GroupByLength = "group_by_length",
        /// Batches rebalanced by token count.
        BatchRebalance = "batch_rebalance",
    }
}

choice! {
    /// The trained adapters' dtype (`lora_dtype`, nibble's own key): TRL casts a quantized model's
    /// adapters to bf16, PEFT alone keeps them in float32.
    LoraDtype {
        /// As TRL's trainers: bfloat16 on a 4-/8-bit base (DoRA magnitudes stay float32), else float32.
        Auto = "auto",
        /// float32 (PEFT's default).
        Float32 = "float32",
        /// bfloat16.
        Bfloat16 = "bfloat16",
    }
}

choice! {
    /// How a bf16/f16 recipe's matmuls run on a CPU (`cpu_matmul`, nibble's own key).
    CpuMatmul {
        /// In f32 where the CPU has no native 16-bit GEMMs (AVX2 hosts), else natively.
        Auto = "auto",
        /// Always torch's own 16-bit kernels, and the output head's gradient in f32 as TRL's
        /// chunked head computes it on a CPU: the reference's arithmetic, bit for bit.
        Native = "native",
        /// Always in f32, rounded back.
        F32 = "f32",
    }
}

choice! {
    /// Model weight / compute dtype (`dtype`, formerly `torch_dtype`).
    Dtype {
        /// Take the dtype recorded in the checkpoint's config.json.
        Auto = "auto",
        /// bfloat16.
        Bfloat16 = "bfloat16",
        /// float16.
        Float16 = "float16",
        /// float32.
        Float32 = "float32",
    }
}

choice! {
    /// 4-bit code book (`bnb_4bit_quant_type`).
    QuantType {
        /// NormalFloat4, the QLoRA default.
        Nf4 = "nf4",
        /// 4-bit float (e2m1).
        Fp4 = "fp4",
    }
}

choice! {
    /// Dtype whose storage holds the packed 4-bit bytes (`bnb_4bit_quant_storage`).
    QuantStorage {
        /// uint8, bitsandbytes' default.
        Uint8 = "uint8",
        /// float16 reinterpretation of the same bytes.
        Float16 = "float16",
        /// bfloat16 reinterpretation of the same bytes.
        Bfloat16 = "bfloat16",
        /// float32 reinterpretation of the same bytes.
        Float32 = "float32",
    }
}

choice! {
    /// The optimizer (`optim`), as transformers names its choices; nibble runs the AdamW ones
    /// ([`Optim::runs_as_adamw`]) and refuses the rest when a run is planned.
    Optim {
        /// Not AdamW: refused by the run plan.
        Adafactor = "adafactor",
        /// Not AdamW: refused by the run plan.
        Adagrad = "adagrad",
        /// Not AdamW: refused by the run plan.
        Adalomo = "adalomo",
        /// AdamW with 8- or 4-bit states (nibble keeps 32-bit ones).
        Adamw8bit = "adamw_8bit",
        /// AdamW with 32-bit states.
        AdamwAnyprecision = "adamw_anyprecision",
        /// AdamW with 8- or 4-bit states (nibble keeps 32-bit ones).
        AdamwBnb8bit = "adamw_bnb_8bit",
        /// AdamW with 32-bit states.
        AdamwTorch = "adamw_torch",
        /// AdamW with 8- or 4-bit states (nibble keeps 32-bit ones).
        AdamwTorch4bit = "adamw_torch_4bit",
        /// AdamW with 8- or 4-bit states (nibble keeps 32-bit ones).
        AdamwTorch8bit = "adamw_torch_8bit",
        /// AdamW with 32-bit states.
        AdamwTorchFused = "adamw_torch_fused",
        /// AdamW with 32-bit states.
        AdamwTorchNpuFused = "adamw_torch_npu_fused",
        /// AdamW with 32-bit states.
        AdamwTorchXla = "adamw_torch_xla",
        /// Not AdamW: refused by the run plan.
        Ademamix = "ademamix",
        /// Not AdamW: refused by the run plan.
        Ademamix8bit = "ademamix_8bit",
        /// Not AdamW: refused by the run plan.
        ApolloAdamw = "apollo_adamw",
        /// Not AdamW: refused by the run plan.
        ApolloAdamwLayerwise = "apollo_adamw_layerwise",
        /// Not AdamW: refused by the run plan.
        GaloreAdafactor = "galore_adafactor",
        /// Not AdamW: refused by the run plan.
        GaloreAdafactorLayerwise = "galore_adafactor_layerwise",
        /// Not AdamW: refused by the run plan.
        GaloreAdamw = "galore_adamw",
        /// Not AdamW: refused by the run plan.
        GaloreAdamw8bit = "galore_adamw_8bit",
        /// Not AdamW: refused by the run plan.
        GaloreAdamw8bitLayerwise = "galore_adamw_8bit_layerwise",
        /// Not AdamW: refused by the run plan.
        GaloreAdamwLayerwise = "galore_adamw_layerwise",
        /// Not AdamW: refused by the run plan.
        Grokadamw = "grokadamw",
        /// Not AdamW: refused by the run plan.
        Lion32bit = "lion_32bit",
        /// Not AdamW: refused by the run plan.
        Lion8bit = "lion_8bit",
        /// Not AdamW: refused by the run plan.
        Lomo = "lomo",
        /// AdamW with 32-bit states.
        PagedAdamw32bit = "paged_adamw_32bit",
        /// AdamW with 8- or 4-bit states (nibble keeps 32-bit ones).
        PagedAdamw8bit = "paged_adamw_8bit",
        /// Not AdamW: refused by the run plan.
        PagedAdemamix32bit = "paged_ademamix_32bit",
        /// Not AdamW: refused by the run plan.
        PagedAdemamix8bit = "paged_ademamix_8bit",
        /// Not AdamW: refused by the run plan.
        PagedLion32bit = "paged_lion_32bit",
        /// Not AdamW: refused by the run plan.
        PagedLion8bit = "paged_lion_8bit",
        /// Not AdamW: refused by the run plan.
        Rmsprop = "rmsprop",
        /// Not AdamW: refused by the run plan.
        RmspropBnb = "rmsprop_bnb",
        /// Not AdamW: refused by the run plan.
        RmspropBnb32bit = "rmsprop_bnb_32bit",
        /// Not AdamW: refused by the run plan.
        RmspropBnb8bit = "rmsprop_bnb_8bit",
        /// Not AdamW: refused by the run plan.
        ScheduleFreeAdamw = "schedule_free_adamw",
        /// Not AdamW: refused by the run plan.
        ScheduleFreeRadam = "schedule_free_radam",
        /// Not AdamW: refused by the run plan.
        ScheduleFreeSgd = "schedule_free_sgd",
        /// Not AdamW: refused by the run plan.
        Sgd = "sgd",
        /// Not AdamW: refused by the run plan.
        StableAdamw = "stable_adamw",
    }
}

impl Optim {
    /// Whether nibble's AdamW (torch's update rule, 32-bit states) is this optimizer's update.
    pub fn runs_as_adamw(self) -> bool {
        matches!(
            self,
            Optim::Adamw8bit
                | Optim::AdamwAnyprecision
                | Optim::AdamwBnb8bit
                | Optim::AdamwTorch
                | Optim::AdamwTorch4bit
                | Optim::AdamwTorch8bit
                | Optim::AdamwTorchFused
                | Optim::AdamwTorchNpuFused
                | Optim::AdamwTorchXla
                | Optim::PagedAdamw32bit
                | Optim::PagedAdamw8bit
        )
    }

    /// AdamW whose moments the Python stack keeps in 8 or 4 bits: nibble keeps them in 32 bits
    /// (the same update, more optimizer memory).
    pub fn low_bit_states(self) -> bool {
        matches!(
            self,
            Optim::Adamw8bit
                | Optim::AdamwBnb8bit
                | Optim::AdamwTorch4bit
                | Optim::AdamwTorch8bit
                | Optim::PagedAdamw8bit
        )
    }
}

choice! {
    /// A DPO loss (`loss_type`, one or several with `loss_weights`), as TRL 1.16's DPOTrainer names them.
    DpoLoss {
        /// `-log sigmoid(beta * margin)`: the original DPO loss.
        Sigmoid = "sigmoid",
        /// `relu(1 - beta * margin)` (SLiC).
        Hinge = "hinge",
        /// IPO on length-averaged log-ratios.
        Ipo = "ipo",
        /// EXO (needs `label_smoothing` > 0).
        ExoPair = "exo_pair",
        /// NCA.
        NcaPair = "nca_pair",
        /// Robust DPO (with `label_smoothing`).
        Robust = "robust",
        /// BCO on the pair.
        BcoPair = "bco_pair",
        /// SPPO with hard labels.
        SppoHard = "sppo_hard",
        /// AOT, paired: margins sorted over the batch.
        Aot = "aot",
        /// AOT, unpaired: log-ratios sorted over the batch.
        AotUnpaired = "aot_unpaired",
        /// APO-zero.
        ApoZero = "apo_zero",
        /// APO-down.
        ApoDown = "apo_down",
        /// DiscoPOP (`discopop_tau`).
        Discopop = "discopop",
        /// Negative log-likelihood of the chosen completions (RPO with `sigmoid`).
        Sft = "sft",
        /// The sigmoid loss on length-averaged log-ratios.
        SigmoidNorm = "sigmoid_norm",
    }
}

choice! {
    /// The f-divergence DPO's log-ratios go through (`f_divergence_type`).
    FDivergence {
        /// The log-ratio itself (standard DPO).
        ReverseKl = "reverse_kl",
        /// `1 - exp(-x)`.
        ForwardKl = "forward_kl",
        /// `ln 2 + log sigmoid(x)`.
        JsDivergence = "js_divergence",
        /// `(exp((a - 1) x) - 1) / (a - 1)`, `a = f_alpha_divergence_coef`.
        AlphaDivergence = "alpha_divergence",
    }
}

choice! {
    /// Learning-rate schedule (`lr_scheduler_type`), as transformers names them.
    Scheduler {
        /// Linear decay to zero.
        Linear = "linear",
        /// Cosine decay to zero.
        Cosine = "cosine",
        /// Cosine with hard restarts.
        CosineWithRestarts = "cosine_with_restarts",
        /// Polynomial decay.
        Polynomial = "polynomial",
        /// Constant.
        Constant = "constant",
        /// Constant after a linear warmup.
        ConstantWithWarmup = "constant_with_warmup",
        /// Inverse square root.
        InverseSqrt = "inverse_sqrt",
        /// Reduce on plateau of the eval metric.
        ReduceLrOnPlateau = "reduce_lr_on_plateau",
        /// Cosine decaying to a minimum learning rate.
        CosineWithMinLr = "cosine_with_min_lr",
        /// Cosine with warmup decaying to a minimum learning rate.
        CosineWarmupWithMinLr = "cosine_warmup_with_min_lr",
        /// Warmup, stable, decay.
        WarmupStableDecay = "warmup_stable_decay",
        /// Greedy schedule.
        Greedy = "greedy",
    }
}

choice! {
    /// When logging or evaluation happens (`logging_strategy`, `eval_strategy`).
    Interval {
        /// Never.
        No = "no",
        /// Every N steps.
        Steps = "steps",
        /// At the end of each epoch.
        Epoch = "epoch",
    }
}

choice! {
    /// When checkpoints are written (`save_strategy`).
    SaveStrategy {
        /// Never.
        No = "no",
        /// Every `save_steps` steps.
        Steps = "steps",
        /// At the end of each epoch.
        Epoch = "epoch",
        /// Whenever the tracked metric improves.
        Best = "best",
    }
}

choice! {
    /// How sequences are packed into `max_length` bins (`packing_strategy`).
    PackingStrategy {
        /// Best-fit decreasing of whole sequences (formerly `ffd`).
        Bfd = "bfd",
        /// Best-fit decreasing, splitting sequences longer than a bin.
        BfdSplit = "bfd_split",
        /// Concatenate everything and cut.
        Wrapped = "wrapped",
    }
}

choice! {
    /// Which end of a too-long sequence survives truncation (`truncation_mode`).
    TruncationMode {
        /// Keep the beginning.
        KeepStart = "keep_start",
        /// Keep the end.
        KeepEnd = "keep_end",
    }
}

choice! {
    /// Training loss (`loss_type`).
    LossType {
        /// Negative log-likelihood.
        Nll = "nll",
        /// Dynamic fine-tuning loss.
        Dft = "dft",
        /// NLL computed in chunks to save memory.
        ChunkedNll = "chunked_nll",
    }
}

choice! {
    /// Verbosity of the main process (`log_level`).
    LogLevel {
        /// Most verbose.
        Detail = "detail",
        /// Debug.
        Debug = "debug",
        /// Info.
        Info = "info",
        /// Warning.
        Warning = "warning",
        /// Error.
        Error = "error",
        /// Critical.
        Critical = "critical",
        /// Leave the library default.
        Passive = "passive",
    }
}

/// `lora_target_modules`: a list of names (exact or `.suffix` match), or one string (a regex,
/// or `all-linear`), exactly as PEFT takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names matched exactly or by `.suffix`.
    List(Vec<String>),
    /// A regex full-match, or `all-linear`.
    Pattern(String),
}

/// `report_to`: one integration name or several (`none` for nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReportTo {
    /// One name (`none`, `all`, `tensorboard`, ...).
    One(String),
    /// Several names.
    Many(Vec<String>),
}

impl ReportTo {
    /// True when no integration is requested.
    pub fn is_none(&self) -> bool {
        match self {
            ReportTo::One(s) => s == "none",
            ReportTo::Many(v) => v.is_empty() || v.iter().all(|s| s == "none"),
        }
    }
}

/// `resume_from_checkpoint`: transformers takes a checkpoint folder or a boolean (`true`: the
/// newest `checkpoint-*` in `output_dir`); nibble also reads `last`. Written back as TRL spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// Start fresh (`false`).
    No,
    /// The newest checkpoint in `output_dir` (`true`, `last`).
    Latest,
    /// This checkpoint folder.
    Dir(String),
}

impl ResumeFrom {
    /// The value a recipe's text or boolean means.
    pub fn from_text(s: &str) -> ResumeFrom {
        match s.trim() {
            "" | "false" | "False" => ResumeFrom::No,
            "true" | "True" | "last" => ResumeFrom::Latest,
            dir => ResumeFrom::Dir(dir.to_owned()),
        }
    }
}

impl Serialize for ResumeFrom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ResumeFrom::No => s.serialize_bool(false),
            ResumeFrom::Latest => s.serialize_bool(true),
            ResumeFrom::Dir(d) => s.serialize_str(d),
        }
    }
}

impl<'de> Deserialize<'de> for ResumeFrom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Text(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Flag(true) => ResumeFrom::Latest,
            Raw::Flag(false) => ResumeFrom::No,
            Raw::Text(t) => ResumeFrom::from_text(&t),
        })
    }
}

/// `pad_to_multiple_of`: a number, or `auto` (TRL picks one from the hardware).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PadTo {
    /// Pad lengths to a multiple of this.
    Multiple(u64),
    /// Let the trainer choose (`auto`).
    Word(String),
}

/// One dataset of a `dataset_mixture`, as the alignment-handbook defines it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Hub id or local path.
    pub id: String,
    /// Dataset configuration name.
    #[serde(default)]
    pub config: Option<String>,
    /// Split to read.
    #[serde(default = "default_split")]
    pub split: String,
    /// Columns to keep (all when absent).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Fraction of the split kept after a seeded shuffle, in (0, 1].
    #[serde(default = "one")]
    pub weight: f64,
}

fn default_split() -> String {
    "train".to_owned()
}

fn one() -> f64 {
    1.0
}

/// `dataset_mixture`: several datasets mixed by weight, with an optional held-out split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetMixture {
    /// The datasets, concatenated after subsampling.
    pub datasets: Vec<DatasetSpec>,
    /// Seed of the shuffles.
    #[serde(default)]
    pub seed: u64,
    /// Held-out test split: a fraction in (0, 1) or a row count (>= 1).
    #[serde(default)]
    pub test_split_size: Option<f64>,
    /// nibble extension: datasets used only for evaluation. Filled when an older recipe's
    /// `dataset_splits` names test splits, so that they are not mixed into training.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval_datasets: Vec<DatasetSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_from_reads_booleans_words_and_folders_and_writes_them_back() {
        let read = |j: serde_json::Value| serde_json::from_value::<ResumeFrom>(j).expect("reads");
        assert_eq!(read(serde_json::json!(true)), ResumeFrom::Latest);
        assert_eq!(read(serde_json::json!(false)), ResumeFrom::No);
        assert_eq!(read(serde_json::json!("last")), ResumeFrom::Latest);
        assert_eq!(read(serde_json::json!("False")), ResumeFrom::No);
        assert_eq!(read(serde_json::json!("out/checkpoint-5")), ResumeFrom::Dir("out/checkpoint-5".into()));
        for v in [ResumeFrom::No, ResumeFrom::Latest, ResumeFrom::Dir("c".into())] {
            assert_eq!(read(serde_json::to_value(&v).expect("writes")), v);
        }
    }

    #[test]
    fn only_adamw_updates_run_as_adamw() {
        assert!(Optim::AdamwTorchFused.runs_as_adamw() && Optim::PagedAdamw32bit.runs_as_adamw());
        assert!(Optim::PagedAdamw8bit.runs_as_adamw() && Optim::PagedAdamw8bit.low_bit_states());
        // Named after AdamW, but another update: refused, not run as AdamW.
        for o in [
            Optim::GaloreAdamw,
            Optim::ScheduleFreeAdamw,
            Optim::ApolloAdamw,
            Optim::StableAdamw,
            Optim::Lion8bit,
        ] {
            assert!(!o.runs_as_adamw(), "{o}");
        }
    }
}
