//! The typed recipe: TRL's three argument groups (model / data / training) plus the handbook's
//! extras, each key with TRL's default and whether nibble acts on it.

use serde::{Deserialize, Serialize};

use crate::types::*;

/// How far nibble honours a key; keys a user sets that are not `Acted` are listed in a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// nibble acts on the key today.
    Acted,
    /// Understood and validated; nibble does not act on it yet, and means to.
    Planned,
    /// Understood and validated, but nibble has no equivalent (hub pushes, trackers, ...).
    Ignored,
}

/// Static facts about one typed key.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Key name as written in a recipe.
    pub name: &'static str,
    /// Whether nibble acts on it.
    pub support: Support,
    /// Whether a command-line or environment value is split on commas.
    pub list: bool,
}

/// Types that may appear as a recipe value; `LIST` marks those that take comma lists on the
/// command line.
pub(crate) trait RecipeValue {
    const LIST: bool = false;
}
impl RecipeValue for bool {}
impl RecipeValue for i64 {}
impl RecipeValue for u64 {}
impl RecipeValue for f64 {}
impl RecipeValue for String {}
impl RecipeValue for KwArgs {}
impl RecipeValue for DatasetMixture {}
impl RecipeValue for ReportTo {
    const LIST: bool = true;
}
impl RecipeValue for TargetModules {
    const LIST: bool = true;
}
impl RecipeValue for PadTo {}
impl RecipeValue for Vec<String> {
    const LIST: bool = true;
}
impl RecipeValue for Vec<f64> {
    const LIST: bool = true;
}
impl RecipeValue for Vec<DpoLoss> {
    const LIST: bool = true;
}
impl<T: RecipeValue> RecipeValue for Option<T> {
    const LIST: bool = T::LIST;
}
macro_rules! plain_values { ($($t:ty),*) => { $(impl RecipeValue for $t {})* } }
plain_values!(
    SamplingStrategy,
    CpuMatmul,
    LoraDtype,
    Dtype,
    QuantType,
    QuantStorage,
    Scheduler,
    Interval,
    SaveStrategy,
    PackingStrategy,
    TruncationMode,
    LossType,
    LogLevel,
    Optim,
    ResumeFrom,
    FDivergence
);

/// Reads one key from the merged layers, recording a diagnostic instead of failing.
pub(crate) trait Extract {
    fn get<T: serde::de::DeserializeOwned>(&mut self, key: &str, default: T) -> T;
}

macro_rules! section {
    (
        $(#[$m:meta])* $name:ident {
            $( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $default:expr, $support:ident; )*
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }
        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }
        impl $name {
            /// Every key of this section, in declaration order.
            pub const FIELDS: &'static [Field] = &[
                $( Field {
                    name: stringify!($field),
                    support: Support::$support,
                    list: <$ty as RecipeValue>::LIST,
                }, )*
            ];
            pub(crate) fn extract(x: &mut impl Extract) -> Self {
                let d = Self::default();
                Self { $( $field: x.get(stringify!($field), d.$field), )* }
            }
        }
    };
}

fn s(v: &str) -> String {
    v.to_owned()
}

section! {
    /// TRL's `ModelConfig`: what to load, how to quantize it, and the LoRA adapter.
    ModelArgs {
        /// Local directory or hub id of the base model (required).
        model_name_or_path: Option<String> = None, Acted;
        /// Hub revision (branch, tag or commit).
        model_revision: String = s("main"), Acted;
        /// Weight dtype; with 4-bit loading also the compute dtype.
        dtype: Dtype = Dtype::Float32, Acted;
        /// Attention kernel name (`eager`, `sdpa`, `flash_attention_2`, ...).
        attn_implementation: Option<String> = None, Ignored;
        /// Train a LoRA adapter instead of the full model.
        use_peft: bool = false, Acted;
        /// LoRA rank.
        lora_r: i64 = 16, Acted;
        /// LoRA alpha (scaling = alpha / r).
        lora_alpha: i64 = 32, Acted;
        /// Dropout on the adapter input.
        lora_dropout: f64 = 0.05, Acted;
        /// Which linear modules get adapters.
        lora_target_modules: Option<TargetModules> = None, Acted;
        /// Parameters (not modules) to adapt, for MoE experts.
        lora_target_parameters: Option<Vec<String>> = None, Acted;
        /// Modules trained in full and saved with the adapter.
        lora_modules_to_save: Option<Vec<String>> = None, Acted;
        /// PEFT task type written to adapter_config.json.
        lora_task_type: String = s("CAUSAL_LM"), Acted;
        /// rsLoRA scaling (alpha / sqrt(r)).
        use_rslora: bool = false, Acted;
        /// Weight-decomposed LoRA.
        use_dora: bool = false, Acted;
        /// LLM.int8 base weights.
        load_in_8bit: bool = false, Acted;
        /// 4-bit base weights (QLoRA).
        load_in_4bit: bool = false, Acted;
        /// 4-bit code book.
        bnb_4bit_quant_type: QuantType = QuantType::Nf4, Acted;
        /// Double quantization of the block scales.
        use_bnb_nested_quant: bool = false, Acted;
        /// Storage dtype of the packed 4-bit bytes.
        bnb_4bit_quant_storage: Option<QuantStorage> = None, Planned;
        /// Tokenizer location when it differs from the model (older handbook key).
        tokenizer_name_or_path: Option<String> = None, Acted;
        /// nibble extension: start the LoRA adapter from this PEFT adapter directory instead of a
        /// fresh init (to compare runs from one init, or to continue training an adapter).
        lora_init_adapter: Option<String> = None, Acted;
        /// nibble extension: the trained adapters' dtype: `auto` (TRL's SFT/DPO trainers: bf16 on a
        /// 4-/8-bit base, DoRA magnitudes excepted; float32 otherwise, PEFT's default), `float32`
        /// or `bfloat16`.
        lora_dtype: LoraDtype = LoraDtype::Auto, Acted;
    }
}

section! {
    /// TRL's `ScriptArguments` plus the handbook's `dataset_mixture`: which data to train on.
    DataArgs {
        /// One dataset: hub id or local file/directory.
        dataset_name: Option<String> = None, Acted;
        /// Configuration name of `dataset_name`.
        dataset_config: Option<String> = None, Acted;
        /// Split used for training.
        dataset_train_split: String = s("train"), Acted;
        /// Split used for evaluation.
        dataset_test_split: String = s("test"), Acted;
        /// Stream the dataset instead of loading it.
        dataset_streaming: bool = false, Ignored;
        /// Ignore bias buffers (a distributed-training workaround).
        ignore_bias_buffers: bool = false, Ignored;
        /// Several datasets mixed by weight (alignment-handbook).
        dataset_mixture: Option<DatasetMixture> = None, Acted;
    }
}

section! {
    /// TRL's `SFTConfig` (with the Trainer's arguments nibble understands) and the handbook's
    /// `chat_template`.
    TrainingArgs {
        /// Where checkpoints and the final adapter go.
        output_dir: Option<String> = None, Acted;
        /// Allow writing into a non-empty `output_dir` (older transformers key, kept by nibble).
        overwrite_output_dir: bool = false, Acted;
        /// Sequences per device per micro-batch.
        per_device_train_batch_size: i64 = 8, Acted;
        /// Sequences per device per eval batch.
        per_device_eval_batch_size: i64 = 8, Acted;
        /// Micro-batches per optimizer step.
        gradient_accumulation_steps: i64 = 1, Acted;
        /// Epochs (fractions allowed) when `max_steps` is -1.
        num_train_epochs: f64 = 3.0, Acted;
        /// Total optimizer steps; -1 means use `num_train_epochs`.
        max_steps: i64 = -1, Acted;
        /// Peak learning rate.
        learning_rate: f64 = 2e-5, Acted;
        /// Learning-rate schedule.
        lr_scheduler_type: Scheduler = Scheduler::Linear, Acted;
        /// Extra schedule parameters (`min_lr`, `num_cycles`, ...).
        lr_scheduler_kwargs: Option<KwArgs> = None, Acted;
        /// Warmup steps; a value below 1 is a fraction of the total steps (transformers 5).
        warmup_steps: f64 = 0.0, Acted;
        /// Optimizer name.
        optim: Optim = Optim::AdamwTorchFused, Acted;
        /// Decoupled weight decay.
        weight_decay: f64 = 0.0, Acted;
        /// AdamW beta1.
        adam_beta1: f64 = 0.9, Acted;
        /// AdamW beta2.
        adam_beta2: f64 = 0.999, Acted;
        /// AdamW epsilon.
        adam_epsilon: f64 = 1e-8, Acted;
        /// Gradient clipping norm (0 disables).
        max_grad_norm: f64 = 1.0, Acted;
        /// Normalise the loss by the token count across devices.
        average_tokens_across_devices: bool = true, Planned;
        /// bf16 compute; unset means true unless fp16 is set (TRL's rule).
        bf16: Option<bool> = None, Acted;
        /// fp16 compute.
        fp16: bool = false, Acted;
        /// TF32 matmuls on Ampere+ GPUs.
        tf32: Option<bool> = None, Planned;
        /// Recompute each decoder layer in backward to save memory.
        gradient_checkpointing: bool = true, Acted;
        /// Checkpointing options (`use_reentrant`): nibble recomputes each decoder layer in backward
        /// its own way, which none of torch's checkpoint options changes.
        gradient_checkpointing_kwargs: Option<KwArgs> = None, Ignored;
        /// Offload activations to CPU.
        activation_offloading: bool = false, Ignored;
        /// Use the KV cache in training forward passes.
        use_cache: bool = false, Ignored;
        /// Label smoothing of the loss.
        label_smoothing_factor: f64 = 0.0, Planned;
        /// NEFTune embedding noise.
        neftune_noise_alpha: Option<f64> = None, Acted;
        /// Weight of a mixture of experts' load-balancing loss (unset: the model config's).
        router_aux_loss_coef: Option<f64> = None, Acted;
        /// Log by steps or epochs.
        logging_strategy: Interval = Interval::Steps, Acted;
        /// Log every N steps (below 1: a fraction of total steps).
        logging_steps: f64 = 10.0, Acted;
        /// Log the first step too.
        logging_first_step: bool = false, Acted;
        /// Verbosity of the log (`passive`: info; `NIBBLE_LOG` wins).
        log_level: LogLevel = LogLevel::Passive, Acted;
        /// Experiment trackers.
        report_to: ReportTo = ReportTo::One(s("none")), Acted;
        /// Run name for trackers and logs.
        run_name: Option<String> = None, Acted;
        /// When to evaluate.
        eval_strategy: Interval = Interval::No, Acted;
        /// Evaluate every N steps (below 1: a fraction of total steps).
        eval_steps: Option<f64> = None, Acted;
        /// Evaluate before the first step.
        eval_on_start: bool = false, Acted;
        /// When to checkpoint.
        save_strategy: SaveStrategy = SaveStrategy::Steps, Acted;
        /// Checkpoint every N steps (below 1: a fraction of total steps).
        save_steps: f64 = 500.0, Acted;
        /// Keep at most this many checkpoints.
        save_total_limit: Option<i64> = None, Acted;
        /// At the end, load the adapter of the checkpoint with the best `metric_for_best_model`.
        load_best_model_at_end: bool = false, Acted;
        /// The eval metric that ranks checkpoints (`eval_` prepended when missing); `loss` when
        /// `load_best_model_at_end` is set without it.
        metric_for_best_model: Option<String> = None, Acted;
        /// Higher is better; unset: true unless the metric's name ends with `loss`.
        greater_is_better: Option<bool> = None, Acted;
        /// Save only the adapter, not optimizer and scheduler state.
        save_only_model: bool = false, Planned;
        /// Resume from this checkpoint directory.
        resume_from_checkpoint: Option<ResumeFrom> = None, Acted;
        /// Push to the hub.
        push_to_hub: bool = false, Ignored;
        /// Hub repository to push to.
        hub_model_id: Option<String> = None, Ignored;
        /// When to push.
        hub_strategy: String = s("every_save"), Ignored;
        /// Train (informational in TRL scripts).
        do_train: bool = false, Ignored;
        /// Evaluate (informational in TRL scripts).
        do_eval: bool = false, Ignored;
        /// Seed of initialisation, dropout and data order.
        seed: u64 = 42, Acted;
        /// Separate seed for data order.
        data_seed: Option<u64> = None, Acted;
        /// Train on CPU even if a GPU is present.
        use_cpu: bool = false, Acted;
        /// Drop the last incomplete batch.
        dataloader_drop_last: bool = false, Acted;
        /// nibble extension: drop (and count) rows that fit no TRL format instead of failing.
        skip_invalid_rows: bool = false, Acted;
        /// Sample order: `random` (each epoch's permutation as transformers' sampler draws it) or
        /// `sequential` (dataset order).
        train_sampling_strategy: SamplingStrategy = SamplingStrategy::Random, Acted;
        /// nibble extension: 16-bit matmuls on the CPU: `auto` (f32 where the CPU lacks native
        /// bf16/f16 GEMMs, which run there 4-100x slower), `native` (torch's 16-bit kernels) or `f32`.
        cpu_matmul: CpuMatmul = CpuMatmul::Auto, Acted;
        /// Process-group timeout in seconds.
        ddp_timeout: i64 = 1800, Acted;
        /// Run model code from the hub (never: nibble has no Python).
        trust_remote_code: bool = false, Ignored;
        /// Extra model-loading arguments: nibble acts on `device_map` and `max_memory` (and warns
        /// about the others).
        model_init_kwargs: Option<KwArgs> = None, Acted;
        /// Chat template (jinja) overriding the tokenizer's (handbook key).
        chat_template: Option<String> = None, Acted;
        /// File or directory holding a chat template.
        chat_template_path: Option<String> = None, Acted;
        /// Text column of plain-text datasets.
        dataset_text_field: String = s("text"), Acted;
        /// Extra dataset-preparation options (`skip_prepare_dataset`, ...).
        dataset_kwargs: Option<KwArgs> = None, Planned;
        /// Worker count for tokenization.
        dataset_num_proc: Option<i64> = None, Acted;
        /// End-of-sequence token override.
        eos_token: Option<String> = None, Acted;
        /// Padding token override.
        pad_token: Option<String> = None, Acted;
        /// Truncate (or pack) sequences to this many tokens.
        max_length: Option<i64> = Some(1024), Acted;
        /// Which end of a long sequence is kept.
        truncation_mode: TruncationMode = TruncationMode::KeepStart, Acted;
        /// Shuffle the dataset before packing.
        shuffle_dataset: bool = false, Acted;
        /// Pack several sequences into each row.
        packing: bool = false, Acted;
        /// How to pack.
        packing_strategy: PackingStrategy = PackingStrategy::Bfd, Acted;
        /// Batches without padding (flattened sequences).
        padding_free: bool = false, Acted;
        /// Pad lengths to a multiple of this.
        pad_to_multiple_of: Option<PadTo> = Some(PadTo::Word(s("auto"))), Acted;
        /// Pack the eval set too (default: as `packing`).
        eval_packing: Option<bool> = None, Acted;
        /// Loss on completion tokens only (default: when the data has prompt/completion).
        completion_only_loss: Option<bool> = None, Acted;
        /// Loss on assistant tokens only (needs `{% generation %}` in the template).
        assistant_only_loss: bool = false, Acted;
        /// Loss function.
        loss_type: LossType = LossType::Nll, Planned;
        /// Liger kernels (Triton; no equivalent in nibble).
        use_liger_kernel: bool = false, Ignored;
    }
}

section! {
    /// TRL's `DPOConfig` keys beyond the training keys it shares with `SFTConfig` (read by
    /// `sft dpo`; an SFT recipe that sets one is refused).
    DpoArgs {
        /// Strength of the implicit KL penalty towards the reference (IPO's tau).
        beta: f64 = 0.1, Acted;
        /// The loss, or several summed with `loss_weights` (a single name is a list of one).
        loss_type: Vec<DpoLoss> = vec![DpoLoss::Sigmoid], Acted;
        /// Weights of the `loss_type` entries (1 each when unset).
        loss_weights: Option<Vec<f64>> = None, Acted;
        /// Label noise assumed by `robust`, `exo_pair` and the AOT losses.
        label_smoothing: f64 = 0.0, Acted;
        /// LD-DPO: weight of the longer completion's tokens past the shorter one's length.
        ld_alpha: Option<f64> = None, Acted;
        /// WPO: weigh each pair by its sequences' probability under the policy.
        use_weighting: bool = false, Acted;
        /// f-DPO: the divergence the log-ratios go through.
        f_divergence_type: FDivergence = FDivergence::ReverseKl, Acted;
        /// The alpha of `alpha_divergence`.
        f_alpha_divergence_coef: f64 = 0.5, Acted;
        /// DiscoPOP's temperature.
        discopop_tau: f64 = 0.05, Acted;
        /// Compute the reference log-probs once over the dataset before training.
        precompute_ref_log_probs: bool = false, Acted;
        /// Batch size of that pass (default: the train / eval batch size).
        precompute_ref_batch_size: Option<i64> = None, Acted;
        /// Turn dropout off in the policy (and so in the reference).
        disable_dropout: bool = true, Acted;
        /// TR-DPO: move the reference towards the policy during training.
        sync_ref_model: bool = false, Acted;
        /// TR-DPO's mixing weight.
        ref_model_mixup_alpha: f64 = 0.6, Ignored;
        /// TR-DPO's sync interval in steps.
        ref_model_sync_steps: i64 = 512, Ignored;
    }
}

impl TrainingArgs {
    /// The training keys' defaults as `trainer`'s TRL config class has them (DPOConfig lowers
    /// the learning rate).
    pub fn defaults_for(trainer: Trainer) -> Self {
        match trainer {
            Trainer::Sft => Self::default(),
            Trainer::Dpo => Self { learning_rate: 1e-6, ..Self::default() },
        }
    }
}
