//! sft's command line, on clap: `sft [train] RECIPE.yaml [--key value]...`, `launch`, `quantize`,
//! `merge`, `generate`, `env` and `completions`, each with `--help`. Recipe overrides (TRL's key
//! names as `--key value` or `--key=value`; a bare `--flag` is true) are taken out of a training
//! command line before clap reads the rest and handed to config, which knows every key; `--help`
//! lists them with their defaults.

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use model_loader::Sampling;
use model_loader::export::DEFAULT_MAX_SHARD_SIZE;
use quant::QuantType;
use quant::ops::QuantizeOptions;
use tch::Kind;

/// `sft`'s whole command line.
#[derive(Parser, Debug)]
#[command(
    name = "sft",
    version,
    about = "QLoRA fine-tuning from a TRL / alignment-handbook recipe: the model in 4 bits, LoRA adapters trained on top, PEFT's files out",
    override_usage = "sft [train] RECIPE.yaml [--key value | --key=value]... [--print-config | --estimate-memory | --measure-floor]\n       sft <COMMAND> [OPTIONS]",
    after_help = "Recipe keys follow TRL (ModelConfig, ScriptArguments, SFTConfig) and the alignment-handbook.\n\
                  Precedence: defaults < RECIPE.yaml < NIBBLE_<KEY> environment variables < --key flags.\n\
                  `sft --help` lists every key with its default.",
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true
)]
pub(crate) struct Cli {
    /// A subcommand; none is `train`.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The training command's arguments when no subcommand is named.
    #[command(flatten)]
    pub train: TrainArgs,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Train as the recipe says (what `sft RECIPE.yaml` does)
    Train(TrainArgs),
    /// Train a LoRA adapter with DPO on preference pairs, as TRL's DPOTrainer (DPOConfig's keys;
    /// the reference is a frozen copy of the starting adapter, or the base with the adapter off)
    Dpo(TrainArgs),
    /// Train with N data-parallel ranks on this machine (Gloo on CPU), as `torchrun
    /// --nproc-per-node N --no-python sft RECIPE.yaml` does
    Launch(LaunchArgs),
    /// Write MODEL (a directory or hub id) pre-quantized to 4 bits, as transformers +
    /// bitsandbytes save it
    Quantize(QuantizeCli),
    /// Merge a PEFT LoRA adapter into its base model (dense or 4-bit) and write a plain
    /// transformers model
    Merge(MergeCli),
    /// Generate from a model (KV-cached; greedy at temperature 0), optionally 4-bit and with a
    /// trained adapter
    Generate(GenerateCli),
    /// Show the libtorch build and the devices nibble sees
    Env,
    /// Print a shell completion script (e.g. `sft completions bash > ~/.local/share/bash-completion/completions/sft`)
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The training command's own arguments; recipe keys ride along in `overrides`.
#[derive(Args, Debug, Default, PartialEq, Clone)]
pub(crate) struct TrainArgs {
    /// The recipe: an alignment-handbook / TRL YAML
    #[arg(value_name = "RECIPE.yaml")]
    pub recipe: Option<PathBuf>,
    /// The recipe, as TRL's scripts take it
    #[arg(long = "config", value_name = "RECIPE.yaml", conflicts_with = "recipe")]
    pub config: Option<PathBuf>,
    /// Print the resolved recipe as JSON (each value and where it came from) and exit
    #[arg(long, alias = "print_config")]
    pub print_config: bool,
    /// Print the memory the run will need (per device for a device map) and exit
    #[arg(long, alias = "estimate_memory", conflicts_with = "print_config")]
    pub estimate_memory: bool,
    /// Time this machine's floor for one step (its matmuls alone, the 4-bit dequantize traffic at memcpy speed) and exit
    #[arg(long, alias = "measure_floor", conflicts_with_all = ["print_config", "estimate_memory"])]
    pub measure_floor: bool,
    /// Recipe keys given on the command line (`--key value`), in order
    #[arg(skip)]
    pub overrides: Vec<String>,
}

impl TrainArgs {
    /// The recipe file, however it was given.
    pub fn recipe_file(&self) -> Option<PathBuf> {
        self.recipe.clone().or_else(|| self.config.clone())
    }
}

/// `sft launch`'s arguments.
#[derive(Args, Debug, PartialEq)]
pub(crate) struct LaunchArgs {
    /// Ranks to start
    #[arg(long, visible_alias = "nproc-per-node", alias = "nproc_per_node", value_name = "N", value_parser = nproc)]
    pub nproc: usize,
    /// The recipe and its flags, as every rank receives them
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "RECIPE.yaml [--key value]..."
    )]
    pub rest: Vec<String>,
}

/// `sft quantize`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct QuantizeCli {
    /// The model: a local directory or a hub id (read from the hub cache)
    pub model: String,
    /// Where to write the 4-bit model (must be empty unless --overwrite)
    pub out: PathBuf,
    /// The 4-bit code
    #[arg(long, alias = "quant_type", default_value = "nf4", value_parser = quant::values::quant_type)]
    pub quant_type: QuantType,
    /// Quantize the block scales too (bitsandbytes' nested quantization)
    #[arg(long, alias = "double_quant")]
    pub double_quant: bool,
    /// Elements per block (a power of two, 32..4096)
    #[arg(long, default_value_t = 64, value_parser = quant::values::blocksize)]
    pub blocksize: usize,
    /// The compute dtype recorded in config.json (`bnb_4bit_compute_dtype`)
    #[arg(long, alias = "compute_dtype", default_value = "fp32", value_parser = dtype)]
    pub compute_dtype: Kind,
    /// Where the model comes from and how the output is written
    #[command(flatten)]
    pub io: ModelIo,
}

impl QuantizeCli {
    /// The quantizer's options.
    pub fn quant(&self) -> QuantizeOptions {
        QuantizeOptions {
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            double_quant: self.double_quant,
        }
    }
}

/// `sft merge`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct MergeCli {
    /// The base model: a local directory or a hub id (dense or 4-bit); default: the one the
    /// adapter's run trained on (its adapter_config.json, else recipe.yaml)
    #[arg(long, alias = "base")]
    pub model: Option<String>,
    /// The PEFT adapter folder
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged model
    #[arg(long, alias = "output")]
    pub out: PathBuf,
    /// The merged model's dtype (default: the base's)
    #[arg(long, value_parser = dtype)]
    pub dtype: Option<Kind>,
    /// Where the base comes from and how the output is written
    #[command(flatten)]
    pub io: ModelIo,
}

/// The base model a run folder (an adapter `sft` or PEFT wrote) was trained on, as axolotl's
/// commands take it from their config: `base_model_name_or_path` in `adapter_config.json`, else
/// `model_name_or_path` in the `recipe.yaml` `sft` leaves beside it.
pub(crate) fn model_of_run(dir: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let cfg = dir.join(lora::CONFIG_FILE);
    if let Ok(text) = std::fs::read_to_string(&cfg) {
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", cfg.display()))?;
        if let Some(m) = v.get("base_model_name_or_path").and_then(|m| m.as_str()).filter(|m| !m.is_empty()) {
            tracing::info!("base model {m} (from {})", cfg.display());
            return Ok(m.to_owned());
        }
    }
    let recipe = dir.join("recipe.yaml");
    if let Ok(text) = std::fs::read_to_string(&recipe) {
        for line in text.lines() {
            if let Some(m) = line.strip_prefix("model_name_or_path:") {
                let m = m.trim().trim_matches(|c| c == '"' || c == '\'');
                if !m.is_empty() {
                    tracing::info!("base model {m} (from {})", recipe.display());
                    return Ok(m.to_owned());
                }
            }
        }
    }
    anyhow::bail!(
        "no --model given, and {} names no base model (neither `base_model_name_or_path` in {} nor `model_name_or_path` in recipe.yaml)",
        dir.display(),
        lora::CONFIG_FILE
    )
}

/// The model-writing commands' shared flags (`quantize`, `merge`).
#[derive(Args, Debug)]
pub(crate) struct ModelIo {
    /// Largest shard, e.g. 5GB or 500MiB
    #[arg(long, alias = "max_shard_size", value_parser = size)]
    pub max_shard_size: Option<u64>,
    /// Hub revision of the model read (ignored for a local directory)
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Replace a non-empty OUT
    #[arg(long)]
    pub overwrite: bool,
}

impl ModelIo {
    /// The largest shard in bytes.
    pub fn max_shard_size(&self) -> u64 {
        self.max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_SIZE)
    }
}

/// `sft generate`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct GenerateCli {
    /// The model: a local directory or a hub id; default: the one --adapter's run trained on
    #[arg(long)]
    pub model: Option<String>,
    /// A trained PEFT adapter to apply
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Quantize the model to 4 bits (NF4) while loading, as training does
    #[arg(long, alias = "load_in_4bit")]
    pub load_in_4bit: bool,
    /// The prompt
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn in the chat template
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate at most
    #[arg(long, alias = "max_new_tokens", default_value_t = Sampling::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy)
    #[arg(long, default_value_t = Sampling::default().temperature, value_parser = non_negative)]
    pub temperature: f64,
    /// Nucleus sampling mass, in (0, 1]
    #[arg(long, alias = "top_p", default_value_t = Sampling::default().top_p, value_parser = probability)]
    pub top_p: f64,
    /// Sampling seed
    #[arg(long, default_value_t = Sampling::default().seed)]
    pub seed: u64,
    /// Write the prompt's logits to this safetensors file
    #[arg(long, alias = "logits_out")]
    pub logits_out: Option<PathBuf>,
}

impl GenerateCli {
    /// The sampling settings.
    pub fn sampling(&self) -> Sampling {
        Sampling {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            ..Sampling::default()
        }
    }
}

fn nproc(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{v}` is not a number of processes")),
    }
}

/// `bf16` / `fp16` / `fp32` (or torch's names) as a kind.
fn dtype(v: &str) -> Result<Kind, String> {
    Ok(match quant::values::float_dtype(v)? {
        "bfloat16" => Kind::BFloat16,
        "float16" => Kind::Half,
        _ => Kind::Float,
    })
}

/// `5GB`, `500MiB`, `1000000` as bytes.
fn size(v: &str) -> Result<u64, String> {
    match device_map::parse_bytes(v) {
        Ok(0) => Err("must be more than 0 bytes".into()),
        Ok(b) => Ok(b),
        Err(e) => Err(e.to_string()),
    }
}

fn non_negative(v: &str) -> Result<f64, String> {
    let x: f64 = v.parse().map_err(|_| format!("`{v}` is not a number"))?;
    if x >= 0.0 { Ok(x) } else { Err("must be >= 0".into()) }
}

fn probability(v: &str) -> Result<f64, String> {
    let x: f64 = v.parse().map_err(|_| format!("`{v}` is not a number"))?;
    if x > 0.0 && x <= 1.0 { Ok(x) } else { Err("must be in (0, 1]".into()) }
}

/// Subcommand names: a first argument that is none of them starts the training form.
const COMMANDS: [&str; 9] =
    ["train", "dpo", "launch", "quantize", "merge", "generate", "env", "completions", "help"];

/// The training command's own flags (clap's); every other `--flag` is a recipe key.
fn is_train_flag(flag: &str) -> bool {
    matches!(
        flag,
        "--config"
            | "--print-config"
            | "--print_config"
            | "--estimate-memory"
            | "--estimate_memory"
            | "--measure-floor"
            | "--measure_floor"
            | "--help"
            | "--version"
    ) || !flag.starts_with("--")
}

/// Splits a training command line into what clap reads (the recipe, the training command's flags)
/// and the recipe overrides: every other `--key [value]` (a value is the next argument unless it
/// starts with `--`).
fn split_overrides(args: Vec<String>) -> (Vec<String>, Vec<String>) {
    let (mut ours, mut overrides) = (Vec::new(), Vec::new());
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        let flag = a.split_once('=').map_or(a.as_str(), |(f, _)| f);
        if is_train_flag(flag) {
            let takes_value = flag == "--config" && !a.contains('=');
            ours.push(a);
            if takes_value {
                ours.extend(it.next());
            }
        } else {
            let bare = !a.contains('=');
            overrides.push(a);
            if bare && it.peek().is_some_and(|n| !n.starts_with("--")) {
                overrides.extend(it.next());
            }
        }
    }
    (ours, overrides)
}

/// The recipe keys and their defaults, for `sft --help`.
fn recipe_keys() -> String {
    let sections: [(&str, &[config::Field], serde_json::Value); 3] = [
        ("model (TRL's ModelConfig)", config::ModelArgs::FIELDS, json(&config::ModelArgs::default())),
        (
            "data (ScriptArguments, the handbook's)",
            config::DataArgs::FIELDS,
            json(&config::DataArgs::default()),
        ),
        ("training (SFTConfig)", config::TrainingArgs::FIELDS, json(&config::TrainingArgs::default())),
    ];
    let mut out =
        String::from("Recipe keys (--key value; defaults as the pinned TRL's unless nibble's own):\n");
    for (title, fields, defaults) in sections {
        out.push_str(&format!("\n  {title}:\n"));
        for f in fields {
            let default = match defaults.get(f.name) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(v) => format!(" = {v}"),
            };
            let note = match f.support {
                config::Support::Acted => "",
                config::Support::Planned => "  (not acted on yet)",
                config::Support::Ignored => "  (no effect in nibble)",
            };
            out.push_str(&format!("    --{}{default}{note}\n", f.name));
        }
    }
    out
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// The clap command, with the recipe keys in its long help.
pub(crate) fn command() -> clap::Command {
    Cli::command().after_long_help(recipe_keys())
}

/// Parse `args` (without the program name): clap's error (exit code 2, or 0 for `--help` and
/// `--version`) on a bad command line.
pub(crate) fn parse(args: Vec<String>) -> Result<Cli, clap::Error> {
    let train_form =
        args.first().is_none_or(|a| !COMMANDS.contains(&a.as_str()) || a == "train" || a == "dpo");
    let (ours, overrides) = if train_form { split_overrides(args) } else { (args, Vec::new()) };
    let matches = command().try_get_matches_from(std::iter::once("sft".to_owned()).chain(ours))?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    match &mut cli.command {
        Some(Command::Train(t) | Command::Dpo(t)) => t.overrides = overrides,
        None => cli.train.overrides = overrides,
        // `sft --seed 3 quantize ...`: recipe keys belong to a training command.
        Some(_) if !overrides.is_empty() => {
            return Err(command().error(
                clap::error::ErrorKind::UnknownArgument,
                format!(
                    "`{}` before a command: recipe keys go after `sft [train] RECIPE.yaml`",
                    overrides.join(" ")
                ),
            ));
        }
        Some(_) => {}
    }
    Ok(cli)
}

/// Write the completion script for `shell` to stdout.
pub(crate) fn completions(shell: clap_complete::Shell) {
    clap_complete::generate(shell, &mut command(), "sft", &mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn train(s: &str) -> TrainArgs {
        let cli = parse(args(s)).unwrap_or_else(|e| panic!("{s}: {e}"));
        match cli.command {
            None => cli.train,
            Some(Command::Train(t)) => t,
            Some(other) => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn recipe_flags_and_print_config_are_separated() {
        let t = train("r.yaml --lora_r 8 --bf16 --print-config --max_steps=-1");
        assert_eq!(t.recipe_file(), Some("r.yaml".into()));
        assert!(t.print_config && !t.estimate_memory);
        assert_eq!(t.overrides, args("--lora_r 8 --bf16 --max_steps=-1"));
        assert_eq!(train("train r.yaml --seed 3 --estimate_memory").overrides, args("--seed 3"));
    }

    #[test]
    fn config_flag_names_the_recipe() {
        let t = train("--config r.yaml --seed 1");
        assert_eq!((t.recipe_file(), t.overrides), (Some("r.yaml".into()), args("--seed 1")));
        assert_eq!(train("--config=r.yaml").recipe_file(), Some("r.yaml".into()));
    }

    #[test]
    fn bad_command_lines_are_usage_errors() {
        for bad in [
            "a.yaml b.yaml",
            "r.yaml --print-config --estimate-memory",
            "quantize m",
            "quantize m o extra",
            "quantize m o --quant-type int4",
            "quantize m o --blocksize 100",
            "quantize m o --bogus",
            "merge --model b --adapter a",
            "merge --model b --adapter a --out o --dtype fp8",
            "merge --model b --adapter a --out o --max-shard-size",
            "merge b",
            "generate --model m",
            "generate --model m --prompt p --top-p 0",
            "launch --nproc 0 r.yaml",
            "launch --nproc two r.yaml",
            "launch r.yaml",
            "launch --nproc 2",
            "completions tcsh",
            "--seed 3 quantize m o",
            "--overwrite quantize m o",
        ] {
            let e = parse(args(bad)).expect_err(bad);
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
    }

    #[test]
    fn subcommands_parse_their_flags_in_both_spellings() {
        let c = parse(args("quantize m out --quant_type fp4 --double-quant --blocksize=128 --overwrite"));
        let Ok(Cli { command: Some(Command::Quantize(q)), .. }) = c else { panic!("{c:?}") };
        assert_eq!((q.model.as_str(), q.out.as_path()), ("m", std::path::Path::new("out")));
        assert_eq!(q.quant().quant_type, QuantType::Fp4);
        assert_eq!((q.quant().blocksize, q.quant().double_quant, q.io.overwrite), (128, true, true));
        assert_eq!(q.io.max_shard_size(), DEFAULT_MAX_SHARD_SIZE);
        let c = parse(args("merge --model b --adapter a --out o --dtype bf16 --max_shard_size 2GB"));
        let Ok(Cli { command: Some(Command::Merge(m)), .. }) = c else { panic!("{c:?}") };
        assert_eq!(
            (m.dtype, m.io.max_shard_size(), m.io.overwrite),
            (Some(Kind::BFloat16), 2_000_000_000, false)
        );
        let c = parse(args("generate --model m --prompt hi --max_new_tokens 5 --temperature 0.5"));
        let Ok(Cli { command: Some(Command::Generate(g)), .. }) = c else { panic!("{c:?}") };
        assert_eq!((g.sampling().max_new_tokens, g.sampling().temperature), (5, 0.5));
        let c = parse(args("launch --nproc-per-node 2 r.yaml --lora_r 4 --print-config"));
        let Ok(Cli { command: Some(Command::Launch(l)), .. }) = c else { panic!("{c:?}") };
        assert_eq!((l.nproc, l.rest), (2, args("r.yaml --lora_r 4 --print-config")));
        let c = parse(args("launch --nproc=3 r.yaml"));
        let Ok(Cli { command: Some(Command::Launch(l)), .. }) = c else { panic!("{c:?}") };
        assert_eq!(l.nproc, 3);
    }

    #[test]
    fn help_and_version_exit_0_and_help_lists_recipe_keys() {
        for ok in
            ["--help", "-h", "--version", "quantize --help", "generate --help", "launch --help", "env --help"]
        {
            let e = parse(args(ok)).expect_err(ok);
            assert_eq!(e.exit_code(), 0, "{ok}");
        }
        let help = command().render_long_help().to_string();
        assert!(help.contains("--lora_r = 16") && help.contains("--learning_rate = 0.00002"), "{help}");
        command().debug_assert();
    }
}
