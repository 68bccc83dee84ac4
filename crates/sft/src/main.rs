//! `sft`: nibble's user entry point. `sft RECIPE.yaml [--key value ...]` fine-tunes a model as
//! the recipe says; `--print-config` prints the resolved plan instead; `sft quantize` writes a
//! model pre-quantized to 4 bits; `sft merge` merges a trained adapter into its base model;
//! `sft launch --nproc N` runs N data-parallel ranks of the job (as torchrun does).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

/// jemalloc for the whole process (Rust and, through the unprefixed `malloc` it exports,
/// libtorch): glibc's heap keeps freed activations fragmented, which nearly doubles a training
/// step's peak RSS (docs/benchmarks.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's built-in options (the `MALLOC_CONF` variable still overrides them): never hand
/// freed pages back to the kernel. A training step frees and reallocates the same activation
/// sizes every step; purging them made every step fault its pages in again (3M page faults and
/// ~20% longer steps on the bench model), while jemalloc's reuse keeps the peak near the live peak.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "malloc_conf")]
pub static MALLOC_CONF: &u8 = &b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0"[0];

mod estimate;
mod generate;
mod launch;
mod place;
mod plan;
mod prepare;
mod quantize;
mod run;

/// Exit code of a recipe error (bad key, type, value), as argparse-style tools use.
const EXIT_RECIPE: u8 = 2;

/// Exit code of a command-line error (unknown flag, missing or bad value), as argparse uses.
const EXIT_USAGE: u8 = 2;

/// A problem with the command line itself: exit code 2 and the usage text.
#[derive(Debug, PartialEq)]
pub(crate) struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

const USAGE: &str = "\
usage: sft RECIPE.yaml [--key value | --key=value]... [--print-config | --estimate-memory]
       sft --config RECIPE.yaml [...]
       sft env                      show the libtorch build and devices nibble sees
       sft launch --nproc N RECIPE.yaml [--key value]...
                                    train with N data-parallel ranks on this machine (Gloo on
                                    CPU); `torchrun --nproc-per-node N --no-python sft RECIPE.yaml`
                                    works too
       sft quantize MODEL OUT_DIR [--quant-type nf4|fp4] [--double-quant] [--blocksize 64]
                    [--compute-dtype fp32|bf16|fp16] [--max-shard-size 50GB] [--revision REV]
                    [--overwrite]
                                    write MODEL (a directory or hub id) pre-quantized to 4 bits
                                    as transformers + bitsandbytes save it
       sft generate --model DIR [--adapter DIR] [--load-in-4bit] --prompt TEXT [--chat]
                    [--max-new-tokens N] [--temperature T --top-p P --seed S] [--logits-out FILE]
                                    KV-cached generation (greedy at temperature 0), optionally
                                    with a trained adapter; --logits-out writes the prompt's logits
       sft merge --model BASE --adapter DIR --out DIR [--dtype bf16|fp16|fp32]
                 [--max-shard-size 50GB] [--revision REV] [--overwrite]
                                    merge a PEFT LoRA adapter into BASE (dense or 4-bit) and
                                    write a plain transformers model (default dtype: BASE's)

Recipe keys follow TRL (ModelConfig, ScriptArguments, SFTConfig) and the alignment-handbook.
Precedence: defaults < RECIPE.yaml < NIBBLE_<KEY> environment variables < --key flags.";

/// What a run with a recipe does.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Mode {
    /// The main job.
    Train,
    /// Print the resolved plan as JSON and exit.
    PrintConfig,
    /// Print the memory estimate and exit.
    EstimateMemory,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Help,
    Env,
    Run { recipe: Option<PathBuf>, mode: Mode, overrides: Vec<String> },
    Quantize(quantize::QuantizeArgs),
    Generate(generate::GenerateArgs),
    Merge(MergeArgs),
    Launch(launch::LaunchArgs),
}

/// `sft merge`'s arguments.
#[derive(Debug, PartialEq)]
struct MergeArgs {
    model: String,
    revision: String,
    adapter: PathBuf,
    out: PathBuf,
    opts: sft::merge::MergeOptions,
}

fn parse_merge(args: Vec<String>) -> Result<MergeArgs, UsageError> {
    use quantize::{flag_value, parse_dtype, parse_size, split_flag};
    let (mut model, mut adapter, mut out) = (None, None, None);
    let mut revision = "main".to_owned();
    let mut opts = sft::merge::MergeOptions::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = split_flag(&arg);
        match flag {
            "--model" | "--base" => model = Some(flag_value(flag, inline, &mut it)?),
            "--adapter" => adapter = Some(flag_value(flag, inline, &mut it)?),
            "--out" | "--output" => out = Some(flag_value(flag, inline, &mut it)?),
            "--dtype" => opts.dtype = Some(parse_dtype(flag, &flag_value(flag, inline, &mut it)?)?),
            "--max-shard-size" | "--max_shard_size" => {
                opts.max_shard_size = parse_size(flag, &flag_value(flag, inline, &mut it)?)?;
            }
            "--revision" => revision = flag_value(flag, inline, &mut it)?,
            "--overwrite" => opts.overwrite = true,
            _ => return Err(UsageError(format!("merge: unexpected argument `{arg}`"))),
        }
    }
    let need = |v: Option<_>, flag: &str| v.ok_or_else(|| UsageError(format!("merge needs {flag}")));
    Ok(MergeArgs {
        model: need(model, "--model BASE")?,
        adapter: need(adapter, "--adapter DIR")?.into(),
        out: need(out, "--out DIR")?.into(),
        revision,
        opts,
    })
}

fn parse_args(mut args: Vec<String>) -> Result<Command, UsageError> {
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some("env") => return Ok(Command::Env),
        Some("quantize") => return quantize::parse(args.split_off(1)).map(Command::Quantize),
        Some("merge") => return parse_merge(args.split_off(1)).map(Command::Merge),
        Some("generate") => return generate::parse(args.split_off(1)).map(Command::Generate),
        Some("launch") => return launch::parse(args.split_off(1)).map(Command::Launch),
        _ => {}
    }
    let mut recipe = None;
    let mut mode = Mode::Train;
    let mut overrides = Vec::new();
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--print-config" | "--print_config" => mode = Mode::PrintConfig,
            "--estimate-memory" | "--estimate_memory" => mode = Mode::EstimateMemory,
            "--config" => {
                recipe =
                    Some(PathBuf::from(it.next().ok_or_else(|| UsageError("--config needs a file".into()))?))
            }
            _ if a.starts_with("--config=") => recipe = Some(PathBuf::from(&a["--config=".len()..])),
            _ if a.starts_with("--") => {
                overrides.push(a);
                if it.peek().is_some_and(|n| !n.starts_with("--")) {
                    overrides.extend(it.next());
                }
            }
            _ if recipe.is_none() => recipe = Some(PathBuf::from(a)),
            _ => return Err(UsageError(format!("unexpected argument `{a}` (a recipe was already given)"))),
        }
    }
    Ok(Command::Run { recipe, mode, overrides })
}

/// The tracing level of the recipe's `log_level` (transformers' names; `passive` leaves the
/// default, info).
fn log_filter(level: config::types::LogLevel) -> &'static str {
    use config::types::LogLevel;
    match level {
        LogLevel::Detail => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info | LogLevel::Passive => "info",
        LogLevel::Warning => "warn",
        LogLevel::Error | LogLevel::Critical => "error",
    }
}

/// Logs to stderr at `level` (`NIBBLE_LOG` wins, as an `EnvFilter` directive).
fn init_logging(level: &str) {
    // Under torchrun or `sft launch`, rank 0 speaks for the group: the others warn only.
    let quiet = std::env::var("WORLD_SIZE").is_ok_and(|w| w.trim() != "1")
        && std::env::var("RANK").is_ok_and(|r| r.trim() != "0");
    let level = if quiet && matches!(level, "trace" | "debug" | "info") { "warn" } else { level };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIBBLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn load_recipe(recipe: Option<PathBuf>, overrides: &[String]) -> Result<config::Recipe, config::Error> {
    let pairs = config::split_flags(overrides)?;
    let mut loader = config::Loader::new().env(std::env::vars()).cli(pairs);
    if let Some(path) = recipe {
        loader = loader.file(path);
    }
    loader.load()
}

fn show_env() {
    let cuda = tch::Cuda::is_available();
    let devices = if cuda { tch::Cuda::device_count() } else { 0 };
    #[allow(clippy::print_stdout)]
    {
        println!(
            "libtorch: {}",
            std::env::var("LIBTORCH").unwrap_or_else(|_| "(linked at build time)".into())
        );
        println!("cpu threads: {}", tch::get_num_threads());
        println!("cuda: {cuda} ({devices} device(s)), cudnn: {}", tch::Cuda::cudnn_is_available());
    }
}

fn run(recipe: Option<PathBuf>, mode: Mode, overrides: Vec<String>) -> Result<ExitCode> {
    let recipe = match load_recipe(recipe, &overrides) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_RECIPE));
        }
    };
    // The recipe's `env:` map goes into the environment before anything else runs.
    for (k, v) in &recipe.env {
        // SAFETY: single-threaded here: nothing (logging, libtorch thread pools) has started.
        unsafe { std::env::set_var(k, v) };
    }
    init_logging(log_filter(recipe.training.log_level));
    if !recipe.env.is_empty() {
        let names: Vec<&str> = recipe.env.keys().map(String::as_str).collect();
        tracing::debug!("exported from the recipe's env: {}", names.join(", "));
    }
    for w in &recipe.warnings {
        tracing::warn!("{w}");
    }
    if mode == Mode::PrintConfig {
        #[allow(clippy::print_stdout)]
        {
            println!("{}", serde_json::to_string_pretty(&recipe.to_json())?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    // One plan for the run: every problem the recipe still has on this machine, reported at once
    // before anything is tokenized, loaded or written.
    let machine = plan::Machine::probe().context("reading torchrun's variables")?;
    let purpose = if mode == Mode::EstimateMemory { plan::Purpose::Estimate } else { plan::Purpose::Train };
    let plan = match plan::RunPlan::resolve(recipe, &machine, purpose) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_RECIPE));
        }
    };
    if mode == Mode::EstimateMemory {
        let device = match plan.device {
            tch::Device::Cuda(i) => device_map::Device::Cuda(u32::try_from(i).unwrap_or(0)),
            _ => device_map::Device::Cpu,
        };
        estimate::print(&plan, device, machine.cuda_devices)?;
        return Ok(ExitCode::SUCCESS);
    }
    tracing::info!(model = plan.model_id.as_str(), "recipe resolved");
    run::train(&plan, &machine)?;
    Ok(ExitCode::SUCCESS)
}

/// Whether a failed command is the user's to fix by changing the arguments (exit code 2): an
/// output directory that is not empty without `--overwrite`.
fn is_usage_error(e: &anyhow::Error) -> bool {
    use model_loader::Error::OutputExists;
    e.chain().any(|c| {
        matches!(c.downcast_ref::<model_loader::Error>(), Some(OutputExists { .. }))
            || matches!(
                c.downcast_ref::<sft::merge::MergeError>(),
                Some(sft::merge::MergeError::Model(OutputExists { .. }))
            )
    })
}

/// Exit 0, 2 for an error in the arguments, or hand the error to `main` (exit 1).
fn finish(result: Result<()>) -> Result<ExitCode> {
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if is_usage_error(&e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(EXIT_USAGE))
        }
        Err(e) => Err(e),
    }
}

fn merge(a: MergeArgs) -> Result<()> {
    let cache = model_loader::HubCache::from_env(|k| std::env::var(k).ok());
    let base = model_loader::resolve_model(&a.model, &a.revision, &cache)?;
    tracing::info!(base = %base.display(), adapter = %a.adapter.display(), out = %a.out.display(), "merging");
    let pb = quantize::progress_bar("merge");
    let result = sft::merge::merge(&base, &a.adapter, &a.out, &a.opts, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    });
    pb.finish_and_clear();
    result?;
    Ok(())
}

/// Runs the command; an error prints as `error: ...` with its causes (a backtrace only when
/// `NIBBLE_BACKTRACE` asks for one) and exits 1.
fn main() -> ExitCode {
    let backtrace = std::env::var_os("NIBBLE_BACKTRACE").is_some_and(|v| !v.is_empty() && v != "0");
    if backtrace {
        // SAFETY: the first thing the process does, single-threaded: anyhow captures from now on.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "1") };
    }
    match command() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if backtrace {
                eprintln!("{}", e.backtrace());
            }
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line and runs what it asks for.
fn command() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    match command {
        Command::Help => {
            #[allow(clippy::print_stdout)]
            {
                println!("{USAGE}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Env => {
            show_env();
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { recipe, mode, overrides } => run(recipe, mode, overrides),
        Command::Quantize(a) => {
            init_logging("info");
            finish(quantize::run(a))
        }
        Command::Merge(a) => {
            init_logging("info");
            finish(merge(a))
        }
        Command::Generate(a) => {
            init_logging("info");
            finish(generate::run(a))
        }
        Command::Launch(a) => {
            init_logging("info");
            launch::run(a)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn recipe_flags_and_print_config_are_separated() {
        let c = parse_args(args("r.yaml --lora_r 8 --bf16 --print-config --max_steps=-1")).ok();
        assert_eq!(
            c,
            Some(Command::Run {
                recipe: Some("r.yaml".into()),
                mode: Mode::PrintConfig,
                overrides: args("--lora_r 8 --bf16 --max_steps=-1"),
            })
        );
    }

    #[test]
    fn config_flag_names_the_recipe() {
        let c = parse_args(args("--config r.yaml --seed 1")).ok();
        assert_eq!(
            c,
            Some(Command::Run {
                recipe: Some("r.yaml".into()),
                mode: Mode::Train,
                overrides: args("--seed 1")
            })
        );
    }

    #[test]
    fn second_positional_is_an_error() {
        assert!(parse_args(args("a.yaml b.yaml")).is_err());
    }

    #[test]
    fn quantize_and_merge_parse_their_flags() {
        let c =
            parse_args(args("quantize m out --quant-type fp4 --double-quant --blocksize=128 --overwrite"));
        let Ok(Command::Quantize(q)) = c else { panic!("{c:?}") };
        assert_eq!((q.model.as_str(), q.out.as_path()), ("m", std::path::Path::new("out")));
        assert_eq!(q.quant.quant_type, quant::QuantType::Fp4);
        assert_eq!((q.quant.blocksize, q.quant.double_quant, q.overwrite), (128, true, true));
        let c = parse_args(args("merge --model b --adapter a --out o --dtype bf16 --max-shard-size 2GB"));
        let Ok(Command::Merge(m)) = c else { panic!("{c:?}") };
        assert_eq!(m.opts.dtype, Some(tch::Kind::BFloat16));
        assert_eq!(m.opts.max_shard_size, 2_000_000_000);
        assert!(!m.opts.overwrite);
        for bad in [
            "quantize m",
            "quantize m o extra",
            "quantize m o --quant-type int4",
            "quantize m o --blocksize 100",
            "quantize m o --bogus",
            "merge --model b --adapter a",
            "merge --model b --adapter a --out o --dtype fp8",
            "merge --model b --adapter a --out o --max-shard-size",
            "merge b",
        ] {
            assert!(parse_args(args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn libtorch_links_and_computes() {
        let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.5]);
        let m = t.matmul(&t);
        assert_eq!(m.double_value(&[]), 1.0 + 4.0 + 12.25);
    }
}
