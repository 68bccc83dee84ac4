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
