//! `sft`: nibble's user entry point. `sft RECIPE.yaml [--key value ...]` fine-tunes a model as
//! the recipe says; `--print-config` prints the resolved plan instead.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

mod estimate;
mod prepare;
mod run;

/// Exit code of a recipe error (bad key, type, value), as argparse-style tools use.
const EXIT_RECIPE: u8 = 2;

const USAGE: &str = "\
usage: sft RECIPE.yaml [--key value | --key=value]... [--print-config | --estimate-memory]
       sft --config RECIPE.yaml [...]
       sft env                      show the libtorch build and devices nibble sees

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
}

fn parse_args(args: Vec<String>) -> Result<Command> {
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some("env") => return Ok(Command::Env),
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
            "--config" => recipe = Some(PathBuf::from(it.next().context("--config needs a file")?)),
            _ if a.starts_with("--config=") => recipe = Some(PathBuf::from(&a["--config=".len()..])),
            _ if a.starts_with("--") => {
                overrides.push(a);
                if it.peek().is_some_and(|n| !n.starts_with("--")) {
                    overrides.extend(it.next());
                }
            }
            _ if recipe.is_none() => recipe = Some(PathBuf::from(a)),
            _ => anyhow::bail!("unexpected argument `{a}` (a recipe was already given)\n\n{USAGE}"),
        }
    }
    Ok(Command::Run { recipe, mode, overrides })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIBBLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    init_logging();
    if !recipe.env.is_empty() {
        let names: Vec<&str> = recipe.env.keys().map(String::as_str).collect();
        tracing::debug!("exported from the recipe's env: {}", names.join(", "));
    }
    for w in &recipe.warnings {
        tracing::warn!("{w}");
    }
    if mode == Mode::EstimateMemory {
        let device = if recipe.training.use_cpu || !tch::Cuda::is_available() {
            device_map::Device::Cpu
        } else {
            device_map::Device::Cuda(0)
        };
        estimate::print(&recipe, device)?;
        return Ok(ExitCode::SUCCESS);
    }
    if mode == Mode::PrintConfig {
        #[allow(clippy::print_stdout)]
        {
            println!("{}", serde_json::to_string_pretty(&recipe.to_json())?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let device = if recipe.training.use_cpu || !tch::Cuda::is_available() { "cpu" } else { "cuda:0" };
    tracing::info!(
        model = recipe.model.model_name_or_path.as_deref().unwrap_or(""),
        device,
        "recipe resolved"
    );
    run::train(&recipe)?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_args(args)? {
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
    fn libtorch_links_and_computes() {
        let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.5]);
        let m = t.matmul(&t);
        assert_eq!(m.double_value(&[]), 1.0 + 4.0 + 12.25);
    }
}
