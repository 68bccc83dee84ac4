//! `cargo xtask ci`: every check CI runs, in order, failing fast with the name of the failed step;
//! .ci/run calls it on a fresh clone, and developers can run the same thing locally.

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::setup::Setup;
use crate::{cargo, check_status};

/// Packages that must never appear among `config`'s normal and build dependencies.
const TORCH_PACKAGES: [&str; 2] = ["tch", "torch-sys"];

/// One `cargo` invocation of the CI sequence.
struct Step {
    /// The cargo arguments.
    args: &'static [&'static str],
    /// Extra environment for that invocation.
    env: &'static [(&'static str, &'static str)],
}

/// The Python reference processes on an Intel AVX512-BF16/AMX host's CPU paths, forced on any
/// host (scripts/refcpu/nibble_refcpu.py); the whole suite runs with the default pin, avx2.
const FORCED_AVX512BF16: &[(&str, &str)] = &[(crate::REF_CPU_VAR, "avx512bf16")];

/// The cargo steps, in order (the libtorch-free dependency checks run after them). The test
/// targets whose reference processes run bitsandbytes run a second time with its AVX512-BF16
/// paths forced, so that a test depending on the path bitsandbytes picks fails on every host;
/// the int8 layer's golden comparison runs again on MKL kernels other than the host's, as on
/// another kind of CPU than the one that made the goldens.
const STEPS: [Step; 8] = [
    Step { args: &["fmt", "--all", "--", "--check"], env: &[] },
    Step { args: &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], env: &[] },
    Step { args: &["test", "--workspace"], env: &[] },
    Step { args: &["test", "-p", "lora", "--test", "peft"], env: FORCED_AVX512BF16 },
    Step {
        args: &["test", "-p", "quant", "--test", "state", "--test", "cli", "--test", "reference_cpu"],
        env: FORCED_AVX512BF16,
    },
    Step {
        args: &["test", "-p", "nibble-tests", "--test", "e2e", "--test", "quantize_merge"],
        env: FORCED_AVX512BF16,
    },
    Step {
        args: &["test", "-p", "quant", "--test", "linear"],
        env: &[("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")],
    },
    Step { args: &["doc", "--workspace", "--no-deps"], env: &[("RUSTDOCFLAGS", "-D warnings")] },
];

/// Runs the CI sequence against the environment `env` prepared by setup.
pub fn ci(root: &Path, env: &Setup) -> Result<()> {
    let started = Instant::now();
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        if std::env::var_os(var).is_some() {
            eprintln!(
                "warning: {var} is set; it replaces `build.rustflags` from \
                 .cargo/nibble-local.toml, so test binaries lose the rpath to libtorch"
            );
        }
    }
    let total = STEPS.len() + 1;
    for (i, step) in STEPS.iter().enumerate() {
        let shown = shown(step);
        println!("\n==> [{}/{total}] {shown}", i + 1);
        let mut cmd = cargo(root, env);
        cmd.args(step.args).envs(step.env.iter().copied());
        check_status(cmd.status(), &shown).with_context(|| format!("CI step `{shown}` failed"))?;
    }

    let shown = "cargo tree -e normal,build for config, device-map, pyfiles, data, report and quant without \
                 its torch feature (must not contain tch or torch-sys)";
    println!("\n==> [{total}/{total}] {shown}");
    for args in LIBTORCH_FREE {
        never_links_libtorch(root, env, args).with_context(|| format!("CI step `{shown}` failed"))?;
    }

    println!("\nCI passed: {total} steps in {:.0?}", started.elapsed());
    Ok(())
}

/// How a step is shown in headers and errors.
fn shown(step: &Step) -> String {
    let env: String = step.env.iter().map(|(k, v)| format!("{k}={v:?} ")).collect();
    format!("{env}cargo {}", step.args.join(" "))
}

/// Crates (with the cargo flags selecting them) that must build without libtorch.
const LIBTORCH_FREE: [&[&str]; 6] = [
    &["-p", "config"],
    &["-p", "device-map"],
    &["-p", "pyfiles"],
    &["-p", "data"],
    &["-p", "report"],
    &["-p", "quant", "--no-default-features"],
];

/// Fails when a crate's normal/build dependency tree contains a torch package.
fn never_links_libtorch(root: &Path, env: &Setup, select: &[&str]) -> Result<()> {
    let what = select.join(" ");
    let out = cargo(root, env)
        .arg("tree")
        .args(select)
        .args(["-e", "normal,build", "--prefix", "none"])
        .stderr(Stdio::inherit())
        .output()
        .context("could not run `cargo tree`")?;
    if !out.status.success() {
        bail!("`cargo tree {what}` failed ({})", out.status);
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let found = torch_packages_in(&tree);
    if !found.is_empty() {
        bail!(
            "`{what}` depends on {} (it must never link libtorch); see why with \
             `cargo tree {what} -e normal,build -i {}`",
            found.join(" and "),
            found.first().copied().unwrap_or("tch")
        );
    }
    println!("ok: `{what}` depends on neither {}", TORCH_PACKAGES.join(" nor "));
    Ok(())
}

/// The torch packages named in `cargo tree --prefix none` output (package name = first word, so
/// that e.g. `matchers` or `patch` do not count as `tch`).
fn torch_packages_in(tree: &str) -> Vec<&'static str> {
    TORCH_PACKAGES
        .into_iter()
        .filter(|pkg| tree.lines().any(|line| line.split_whitespace().next() == Some(*pkg)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spots_torch_packages_by_name_only() {
        let clean = "config v0.1.0 (/w/crates/config)\nmatchers v0.2.0\npatch v0.7.0\n";
        assert!(torch_packages_in(clean).is_empty());
        let dirty = "config v0.1.0\ntch v0.24.0\ntorch-sys v0.24.0\n";
        assert_eq!(torch_packages_in(dirty), ["tch", "torch-sys"]);
    }

    #[test]
    fn shows_env_before_the_command() {
        assert_eq!(shown(&STEPS[3]), "NIBBLE_REF_CPU=\"avx512bf16\" cargo test -p lora --test peft");
        assert_eq!(shown(&STEPS[7]), "RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --no-deps");
    }
}
