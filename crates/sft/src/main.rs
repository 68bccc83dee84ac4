//! `sft`: nibble's user entry point. `sft RECIPE.yaml [--key value ...]` fine-tunes a model as
//! the recipe says; `--print-config` prints the resolved recipe instead; `sft quantize` writes a
//! model pre-quantized to 4 bits; `sft merge` merges a trained adapter into its base model;
//! `sft launch --nproc N` runs N data-parallel ranks of the job (as torchrun does); `sft
//! generate` samples; `sft env` shows the devices; `sft completions SHELL`. The command line is
//! `cli.rs` (clap); every subcommand answers `--help`.

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

mod cli;
mod estimate;
mod floor;
mod generate;
mod launch;
mod place;
mod plan;
mod prefs;
mod prepare;
mod quantize;
mod run;
mod training;

/// Exit code of a recipe error (bad key, type, value), as argparse-style tools use.
const EXIT_RECIPE: u8 = 2;

/// Exit code of a command-line error (unknown flag, missing or bad value), as argparse uses.
const EXIT_USAGE: u8 = 2;

/// Exit code of a run stopped by SIGINT or SIGTERM after it saved a checkpoint (128 + SIGINT,
/// as shells report an interrupted command), so a scheduler can tell it from a finished run.
const EXIT_INTERRUPTED: u8 = 130;

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

/// The recipe with config's problems beside it (see [`config::Loader::load_checked`]).
fn load_recipe(
    trainer: config::Trainer,
    recipe: Option<PathBuf>,
    overrides: &[String],
) -> Result<(config::Recipe, Vec<config::Diagnostic>), config::Error> {
    let pairs = config::split_flags(overrides)?;
    let mut loader = config::Loader::new().trainer(trainer).env(std::env::vars()).cli(pairs);
    if let Some(path) = recipe {
        loader = loader.file(path);
    }
    loader.load_checked()
}

/// Config's problems and the plan's, in one report in file order: the plan is resolved even when
/// config found problems (keys that failed keep their defaults), and a plan problem on a key
/// config already reported is left out.
fn all_problems(
    recipe: config::Recipe,
    config_problems: Vec<config::Diagnostic>,
    machine: &plan::Machine,
    purpose: plan::Purpose,
) -> config::Error {
    let reported: std::collections::BTreeSet<String> =
        config_problems.iter().map(|d| d.key.clone()).collect();
    let mut all = config_problems;
    if let Err(e) = plan::RunPlan::resolve(recipe, machine, purpose) {
        all.extend(e.diagnostics().iter().filter(|d| !reported.contains(&d.key)).cloned());
    }
    config::Error::invalid(all)
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
        println!("built with cuda: {}", cfg!(feature = "cuda"));
        if let Some(why) = plan::unused_gpu(std::path::Path::new("/"), cfg!(feature = "cuda"), cuda) {
            println!("note: {why}");
        }
    }
}

/// The training command: resolve the recipe, plan the run, then train (or print the recipe or
/// the estimate).
fn run(args: cli::TrainArgs, trainer: config::Trainer) -> Result<ExitCode> {
    let (recipe, config_problems) = match load_recipe(trainer, args.recipe_file(), &args.overrides) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_RECIPE));
        }
    };
    // OpenMP read OMP_NUM_THREADS when libtorch was loaded, before `main`. Set then (a shell,
    // `sft launch` or torchrun splitting the cores between ranks), it stands, as the environment
    // stands over a recipe's keys; unset, the recipe's value sizes libtorch's intra-op pool below.
    let threads_from_env = std::env::var_os("OMP_NUM_THREADS").is_some();
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
    if !threads_from_env
        && let Some(n) =
            recipe.env.get("OMP_NUM_THREADS").and_then(|v| v.trim().parse::<i32>().ok()).filter(|&n| n > 0)
    {
        tch::set_num_threads(n);
        tracing::debug!("intra-op threads from the recipe's env: {}", tch::get_num_threads());
    }
    for w in &recipe.warnings {
        tracing::warn!("{w}");
    }
    let purpose = if args.estimate_memory || args.measure_floor {
        plan::Purpose::Estimate
    } else {
        plan::Purpose::Train
    };
    if !config_problems.is_empty() {
        let machine = plan::Machine::probe().unwrap_or_else(|_| plan::Machine::alone());
        eprintln!("error: {}", all_problems(recipe, config_problems, &machine, purpose));
        return Ok(ExitCode::from(EXIT_RECIPE));
    }
    if args.print_config {
        let machine = plan::Machine::alone();
        // The recipe, and the plan a run would make of it here (or what stands in its way).
        let mut out = recipe.to_json();
        out["plan"] = match plan::RunPlan::resolve(recipe, &machine, plan::Purpose::Train) {
            Ok(p) => p.to_json(),
            Err(e) => serde_json::json!({
                "problems": e.diagnostics().iter().map(ToString::to_string).collect::<Vec<_>>()
            }),
        };
        #[allow(clippy::print_stdout)]
        {
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let machine = if args.estimate_memory || args.measure_floor {
        plan::Machine::alone()
    } else {
        plan::Machine::probe().context("reading torchrun's variables")?
    };
    let plan = match plan::RunPlan::resolve(recipe, &machine, purpose) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_RECIPE));
        }
    };
    if args.estimate_memory {
        estimate::print(&plan, plan.map_device(), machine.cuda_devices)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.measure_floor {
        plan.cpu_matmul.set();
        floor::print(&plan)?;
        return Ok(ExitCode::SUCCESS);
    }
    tracing::info!(model = plan.model_id.as_str(), "recipe resolved");
    Ok(match run::train(&plan, &machine)? {
        run::Ended::Done => ExitCode::SUCCESS,
        run::Ended::Interrupted => ExitCode::from(EXIT_INTERRUPTED),
    })
}

/// Whether a failed command is the user's to fix by changing the arguments (exit code 2): an
/// output directory that is not empty without `--overwrite`.
fn is_usage_error(e: &anyhow::Error) -> bool {
    use model_loader::Error::OutputExists;
    e.chain().any(|c| {
        matches!(c.downcast_ref::<model_loader::Error>(), Some(OutputExists { .. }))
            || matches!(c.downcast_ref::<sft::Error>(), Some(sft::Error::Model(e)) if matches!(**e, OutputExists { .. }))
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

fn merge(a: &cli::MergeCli) -> Result<()> {
    let cache = pyfiles::HubCache::from_env(|k| std::env::var(k).ok());
    let model = match &a.model {
        Some(m) => m.clone(),
        None => cli::model_of_run(&a.adapter)?,
    };
    let base = model_loader::resolve_model(&model, &a.io.revision, &cache)?;
    tracing::info!(base = %base.display(), adapter = %a.adapter.display(), out = %a.out.display(), "merging");
    let opts = sft::merge::MergeOptions {
        dtype: a.dtype,
        max_shard_size: a.io.max_shard_size(),
        overwrite: a.io.overwrite,
    };
    let pb = quantize::progress_bar("merge");
    let result = sft::merge::merge(&base, &a.adapter, &a.out, &opts, &mut |done, total| {
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
    for var in plan::GEMM_KERNEL_CACHE_VARS.into_iter().filter(|v| std::env::var_os(v).is_none()) {
        // SAFETY: as above, before anything reads the environment on another thread (oneDNN and
        // ideep read these once, at their first GEMM).
        unsafe { std::env::set_var(var, plan::GEMM_KERNEL_CACHE_ENTRIES.to_string()) };
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
    let cli = match cli::parse(args) {
        Ok(c) => c,
        Err(e) => {
            // clap prints help and --version on stdout (exit 0), usage errors on stderr (exit 2).
            let _ = e.print();
            return Ok(ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE)));
        }
    };
    match cli.command {
        None => run(cli.train, config::Trainer::Sft),
        Some(cli::Command::Train(t)) => run(t, config::Trainer::Sft),
        Some(cli::Command::Dpo(t)) => run(t, config::Trainer::Dpo),
        Some(cli::Command::Env) => {
            show_env();
            Ok(ExitCode::SUCCESS)
        }
        Some(cli::Command::Completions { shell }) => {
            cli::completions(shell);
            Ok(ExitCode::SUCCESS)
        }
        Some(cli::Command::Quantize(a)) => {
            init_logging("info");
            finish(quantize::run(&a))
        }
        Some(cli::Command::Merge(a)) => {
            init_logging("info");
            finish(merge(&a))
        }
        Some(cli::Command::Generate(a)) => {
            init_logging("info");
            finish(generate::run(&a))
        }
        Some(cli::Command::Launch(a)) => {
            init_logging("info");
            launch::run(a)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn libtorch_links_and_computes() {
        let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.5]);
        let m = t.matmul(&t);
        assert_eq!(m.double_value(&[]), 1.0 + 4.0 + 12.25);
    }
}
