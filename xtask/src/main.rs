//! `cargo xtask`: nibble's developer commands (Python/libtorch setup, tests, CI, benchmarks), written in Rust
//! so that a fresh clone needs nothing but cargo and python3 to get going.
#![allow(clippy::print_stdout, reason = "a command-line tool reports to its user on stdout")]

mod bench;
mod ci;
mod cuda;
mod fnv;
mod json;
mod setup;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup [--force]    create or refresh the Python venv (pinned by xtask/python/requirements.lock)
                     and point cargo at its libtorch; a no-op when already done.
                     --force recreates the venv from scratch.
  test [--ref-cpu MODE] [ARGS...]
                     setup, then `cargo test --workspace [ARGS...]`. --ref-cpu pins the CPU
                     paths of the Python reference processes the tests start: avx2 (the
                     default: the same on every x86-64 host), avx512bf16 (an Intel
                     AVX512-BF16/AMX host's, forced on any host) or native
                     (docs/reference-cpu-paths.md)
  ci                 setup, then fmt, clippy, test, doc, and the check that `config`,
                     `device-map`, `pyfiles`, `data`, `report` and `quant` without its torch
                     feature never link libtorch (what CI runs, through .ci/run)
  bench [--quick] [--only codec,load,train] [--repeats N] [--env KEY=VALUE]... [--write|--no-write]
                     setup, build sft in release, then measure nibble against the Python
                     reference stack on the same inputs (4-bit codec, loading + quantizing a
                     generated ~1B model, QLoRA SFT steps on the tiny and a ~150M model) and
                     print a markdown report of the ratios (also target/bench/report.md).
                     A full run adds it to docs/benchmarks.md as a dated section (--write /
                     --no-write decide). --quick (a few minutes): one codec shape, a ~150M
                     model to load, training on the tiny model only. --env sets a variable
                     for every measured process of both stacks. Generated models are kept in
                     $NIBBLE_HOME/bench.
  cuda [--check]     pip-install the pinned nvcc 13.0 into the venv (no GPU needed to compile);
                     --check builds and lints quant's `cuda` feature (minutes of nvcc)
  help               print this text

environment:
  NIBBLE_HOME        cache folder holding the venv (default: $XDG_CACHE_HOME/nibble,
                     else $HOME/.cache/nibble)";

fn main() -> ExitCode {
    match run(std::env::args_os().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line (by hand: std only) and runs the chosen command.
fn run(args: Vec<OsString>) -> Result<()> {
    let args = args
        .into_iter()
        .map(|a| a.into_string().map_err(|a| anyhow::anyhow!("argument {a:?} is not valid UTF-8")))
        .collect::<Result<Vec<String>>>()?;
    let root = workspace_root()?;
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        bail!("missing command");
    };
    match command.as_str() {
        "setup" => {
            let force = match rest {
                [] => false,
                [flag] if flag == "--force" => true,
                _ => bail!("`setup` takes only `--force`, got {rest:?}\n\n{USAGE}"),
            };
            setup::setup(&root, force)?;
        }
        "test" => {
            let (ref_cpu, rest) = take_ref_cpu(rest)?;
            let env = setup::setup(&root, false)?;
            let mut cmd = cargo(&root, &env);
            cmd.args(["test", "--workspace"]).args(&rest);
            if let Some(mode) = ref_cpu {
                cmd.env(REF_CPU_VAR, mode);
            }
            check_status(cmd.status(), "cargo test --workspace")?;
        }
        "ci" => {
            if !rest.is_empty() {
                bail!("`ci` takes no arguments, got {rest:?}");
            }
            let env = setup::setup(&root, false)?;
            ci::ci(&root, &env)?;
        }
        "bench" => {
            let opts = bench::parse_args(rest)?;
            let env = setup::setup(&root, false)?;
            bench::bench(&root, &env, &opts)?;
        }
        "cuda" => {
            let check = match rest {
                [] => false,
                [flag] if flag == "--check" => true,
                _ => bail!("`cuda` takes only `--check`, got {rest:?}\n\n{USAGE}"),
            };
            let env = setup::setup(&root, false)?;
            cuda::cuda(&root, &env, check)?;
        }
        "help" | "-h" | "--help" => println!("{USAGE}"),
        other => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
    Ok(())
}

/// The variable scripts/refcpu/sitecustomize.py reads in every Python reference process.
pub const REF_CPU_VAR: &str = "NIBBLE_REF_CPU";

/// The CPU paths a reference process can be pinned to (scripts/refcpu/nibble_refcpu.py).
const REF_CPU_MODES: [&str; 3] = ["avx2", "avx512bf16", "native"];

/// Takes `--ref-cpu MODE` / `--ref-cpu=MODE` out of `test`'s arguments (before any `--`: what
/// follows belongs to the test binaries), checking the mode.
fn take_ref_cpu(args: &[String]) -> Result<(Option<String>, Vec<String>)> {
    let mut mode = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = if arg == "--" {
            rest.push(arg.clone());
            rest.extend(it.by_ref().cloned());
            break;
        } else if arg == "--ref-cpu" {
            it.next()
                .map(String::as_str)
                .with_context(|| format!("--ref-cpu needs a mode: {}", REF_CPU_MODES.join(", ")))?
        } else if let Some(v) = arg.strip_prefix("--ref-cpu=") {
            v
        } else {
            rest.push(arg.clone());
            continue;
        };
        if !REF_CPU_MODES.contains(&value) {
            bail!("--ref-cpu {value}: expected one of {}", REF_CPU_MODES.join(", "));
        }
        mode = Some(value.to_owned());
    }
    Ok((mode, rest))
}

/// The workspace root: the parent of this crate's manifest directory.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root =
        manifest_dir.parent().with_context(|| format!("{} has no parent folder", manifest_dir.display()))?;
    if !root.join("Cargo.toml").is_file() {
        bail!(
            "workspace root {} has no Cargo.toml (was the repository moved? rebuild xtask)",
            root.display()
        );
    }
    Ok(root.to_path_buf())
}

/// A `cargo` command run from the workspace root with the libtorch environment of `env`.
///
/// Cargo's `[env]` table never overrides variables already in the process environment, and
/// `cargo run` hands this process the values it saw when xtask started (the "not set up" stub
/// on a first run), so children get the fresh values explicitly.
fn cargo(root: &Path, env: &setup::Setup) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .env("LIBTORCH", &env.torch_dir)
        .env("NIBBLE_PYTHON", &env.python)
        .env("NIBBLE_VENV", &env.venv);
    cmd
}

/// Turns a child's spawn result and exit status into an error that names `what`.
fn check_status(status: std::io::Result<ExitStatus>, what: &str) -> Result<()> {
    let status = status.with_context(|| format!("could not start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn ref_cpu_is_taken_out_of_test_arguments_before_a_double_dash() -> anyhow::Result<()> {
        let (mode, rest) = super::take_ref_cpu(&strings(&["-p", "quant", "--ref-cpu", "avx512bf16"]))?;
        assert_eq!((mode.as_deref(), rest), (Some("avx512bf16"), strings(&["-p", "quant"])));
        let (mode, rest) = super::take_ref_cpu(&strings(&["--ref-cpu=avx2", "--", "--ref-cpu", "x"]))?;
        assert_eq!((mode.as_deref(), rest), (Some("avx2"), strings(&["--", "--ref-cpu", "x"])));
        assert_eq!(super::take_ref_cpu(&strings(&["--release"]))?, (None, strings(&["--release"])));
        let Err(bad) = super::take_ref_cpu(&strings(&["--ref-cpu", "avx512"])) else {
            anyhow::bail!("an unknown mode was accepted");
        };
        assert!(bad.to_string().contains("avx2, avx512bf16, native"), "{bad}");
        assert!(super::take_ref_cpu(&strings(&["--ref-cpu"])).is_err());
        Ok(())
    }

    /// The hook's location as the committed cargo config gives it, and no mode there: cargo
    /// fingerprints `[env]` values, so a mode set there would make every other mode (`--ref-cpu`,
    /// CI's forced steps) rebuild the workspace. The hook itself defaults to avx2.
    #[test]
    fn cargo_config_puts_the_hook_on_pythonpath_without_a_mode() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let defaults = std::fs::read_to_string(root.join(".cargo/nibble-defaults.toml")).expect("defaults");
        assert!(
            defaults.contains(r#"PYTHONPATH = { value = "scripts/refcpu", relative = true, force = true }"#)
        );
        assert!(!defaults.lines().any(|l| l.starts_with(super::REF_CPU_VAR)), "{defaults}");
        let hook = std::fs::read_to_string(root.join("scripts/refcpu/sitecustomize.py")).expect("hook");
        assert!(hook.contains(r#"apply(default="avx2")"#));
    }

    #[test]
    fn unset_libtorch_points_at_the_setup_instruction() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let defaults = std::fs::read_to_string(root.join(".cargo/nibble-defaults.toml")).expect("defaults");
        assert!(defaults.contains(r#"LIBTORCH = { value = "xtask/libtorch-not-set-up", relative = true }"#));
        let config = std::fs::read_to_string(root.join(".cargo/config.toml")).expect("config");
        let include = config.find("include =").expect("include line");
        let first_table = config.find("\n[").expect("a table");
        assert!(include < first_table, "`include` must come before the first table or cargo ignores it");
        let stub =
            std::fs::read_to_string(root.join("xtask/libtorch-not-set-up/build-version")).expect("stub");
        assert!(
            stub.contains("cargo xtask setup") && !stub.contains('+') && stub.trim().lines().count() == 1
        );
    }
}
