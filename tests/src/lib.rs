//! What the end-to-end tests share: the repository root and the `sft` binary they run. A test
//! in this crate cannot name another package's binary (`CARGO_BIN_EXE_*` is per package), so the
//! binary is built, or found fresh, by the same cargo with the same profile, once per test process.

#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The `log_history` of the `trainer_state.json` a run left in `out` (panics with the file's
/// name when it is missing or not a state file: these are tests).
pub fn log_history(out: &Path) -> Vec<serde_json::Value> {
    let path = out.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let state: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match state.get("log_history") {
        Some(serde_json::Value::Array(h)) => h.clone(),
        _ => panic!("{}: no log_history list", path.display()),
    }
}

/// Two training curves compared step by step (nibble's and TRL's `log_history` entries).
#[derive(Debug, Default)]
pub struct CurveDiff {
    /// Per metric, the largest difference relative to the reference value (or its floor).
    pub worst: std::collections::BTreeMap<String, f64>,
    /// One line per step with each metric's pair of values, for assertion messages.
    pub report: String,
}

impl CurveDiff {
    /// The largest relative difference seen for `metric` (0 when it was not compared).
    pub fn of(&self, metric: &str) -> f64 {
        self.worst.get(metric).copied().unwrap_or(0.0)
    }
}

/// Compare `ours` with `theirs` entry by entry: the same steps in the same order (panics
/// otherwise), learning rates equal to 1e-9, and for each `(metric, floor)` the difference
/// relative to `max(|theirs|, floor)`.
pub fn compare_curves(
    ours: &[&serde_json::Value],
    theirs: &[&serde_json::Value],
    metrics: &[(&str, f64)],
) -> CurveDiff {
    assert_eq!(ours.len(), theirs.len(), "logged steps");
    let f =
        |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("no numeric `{k}` in {v}"));
    let mut diff = CurveDiff::default();
    for (a, b) in ours.iter().zip(theirs) {
        assert_eq!(a["step"], b["step"], "steps out of line");
        let (x, y) = (f(a, "learning_rate"), f(b, "learning_rate"));
        assert!((x - y).abs() <= 1e-12 + 1e-9 * y, "learning rate at step {}: {x} vs {y}", b["step"]);
        diff.report += &format!("step {:>2}:", b["step"]);
        for (k, floor) in metrics {
            let (x, y) = (f(a, k), f(b, k));
            let d = (x - y).abs() / y.abs().max(*floor);
            let w = diff.worst.entry((*k).to_owned()).or_insert(0.0);
            *w = w.max(d);
            diff.report += &format!(" {k} {x:.6} vs TRL {y:.6} ({d:.1e})");
        }
        diff.report += "\n";
    }
    diff
}

/// `sft` as the tests run it: from the repository root, tokenizing into `cache` (not the user's
/// cache), with the recipe's own log level (`NIBBLE_LOG` unset).
pub fn sft_in(cache: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(sft());
    c.current_dir(repo()).env("NIBBLE_CACHE", cache).env_remove("NIBBLE_LOG");
    c
}

/// The repository root (models/, recipes/, data/, scripts/).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cargo profile the running test was built with, from its path
/// (`target/<profile dir>/deps/<test>`): `debug` is cargo's `dev`.
fn profile() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().and_then(Path::parent).and_then(Path::file_name);
    match dir.and_then(|d| d.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    }
}

/// The `executable` of the last compiler-artifact line naming one in cargo's JSON messages.
fn executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|m| m.get("executable").and_then(|e| e.as_str()).map(PathBuf::from))
}

/// The `sft` binary of this workspace, built with the test's profile and default features (a
/// no-op when `cargo test --workspace` already built it). Panics with cargo's output when the
/// build fails: nothing else can run then.
pub fn sft() -> &'static Path {
    static SFT: OnceLock<PathBuf> = OnceLock::new();
    SFT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
        let out = std::process::Command::new(cargo)
            .args(["build", "-p", "sft", "--bin", "sft", "--message-format=json-render-diagnostics"])
            .args(["--profile", &profile()])
            .current_dir(repo())
            .output()
            .unwrap_or_else(|e| panic!("running cargo to build sft: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        match executable(&stdout) {
            Some(exe) if out.status.success() => exe,
            _ => panic!("building sft failed:\n{}", String::from_utf8_lossy(&out.stderr)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_comes_from_cargo_s_artifact_messages() {
        let messages = "{\"reason\":\"compiler-artifact\",\"executable\":null}\n\
                        {\"reason\":\"compiler-artifact\",\"executable\":\"/t/debug/sft\"}\n\
                        {\"reason\":\"build-finished\",\"success\":true}\n";
        assert_eq!(executable(messages), Some(PathBuf::from("/t/debug/sft")));
        assert_eq!(executable("not json\n"), None);
    }
}
