//! DPO parity with TRL: the recipe `tests/golden/dpo_trl/recipe.yaml` trained by `sft dpo` and by
//! TRL 1.16's DPOTrainer (`scripts/golden_dpo_trl.py`), from the same initial adapter (so the
//! reference is TRL's frozen "ref" copy of it) and in dataset order, gives the same loss, reward
//! margin, gradient norm and learning rate at every one of 20 steps, for the sigmoid and IPO
//! losses, with the reference computed each step or precomputed; and the same log-probs at step 1.
//! Tolerances (`Tol`): in fp32, loss 1e-3 relative; margins 2e-3 and gradient norms 5e-3
//! (relative, with floors for values near zero); step-1 log-prob sums 3e-5; `logits/*` and
//! `entropy` 1e-3 relative, `mean_token_accuracy` 0.03. bf16 (a bf16 model computing in bf16 in
//! both stacks) is looser, see `BF16`.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

use nibble_tests::repo;
use serde_json::Value;

/// How close a variant must come to TRL.
struct Tol {
    /// Loss (relative), reward margin (relative / 2) and gradient norm (relative / 5), the worst.
    curve: f64,
    /// `logits/*` and `entropy`, relative.
    stats: f64,
    /// `mean_token_accuracy`, absolute (a top-1 prediction can flip on a near tie).
    accuracy: f64,
    /// The step-1 summed log-probs, relative.
    logps: f64,
}

/// fp32: kernel summation order alone.
const FP32: Tol = Tol { curve: 1e-3, stats: 1e-3, accuracy: 0.03, logps: 3e-5 };
/// bf16: bf16 rounding where the two stacks' kernels round differently (measured: loss within
/// 7e-3 relative, margins within 2e-2 absolute (0.2 relative where they are near 0), token
/// statistics 5e-3, step-1 log-prob sums 5e-4); the 1e-3 is not reached in bf16 yet.
const BF16: Tol = Tol { curve: 0.15, stats: 1e-2, accuracy: 0.03, logps: 1e-3 };

fn run_variant(name: &str, flags: &[&str], tol: &Tol) {
    let golden = repo().join("tests/golden/dpo_trl");
    let out = std::env::temp_dir().join(format!("nibble-dpo-trl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = nibble_tests::sft_in(&out.join("cache"))
        .arg("dpo")
        .arg(golden.join("recipe.yaml"))
        .args(["--output_dir", out.to_str().unwrap()])
        .args(flags)
        .output()
        .unwrap();
    assert!(o.status.success(), "sft dpo ({name}) failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let ours = nibble_tests::log_history(&out);
    let theirs: Value =
        serde_json::from_str(&std::fs::read_to_string(golden.join(format!("trl_{name}.json"))).unwrap())
            .unwrap();
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), 20, "{name}: logged steps");
    assert_eq!(ours.len(), theirs.len(), "{name}: logged steps");
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {v}"));
    // Relative to the value, with a floor for values that cross zero (margins at the start).
    let rel = |a: f64, b: f64, floor: f64| (a - b).abs() / b.abs().max(floor);
    let mut report = String::new();
    let (mut curve, mut stats, mut accuracy) = (0.0f64, 0.0f64, 0.0f64);
    for (a, b) in ours.iter().zip(theirs) {
        assert_eq!(a["step"], b["step"]);
        let lr = (f(a, "learning_rate") - f(b, "learning_rate")).abs();
        assert!(
            lr <= 1e-12 + 1e-9 * f(b, "learning_rate"),
            "{name}: learning rate at {}: {a} vs {b}",
            b["step"]
        );
        let dl = rel(f(a, "loss"), f(b, "loss"), 1e-3);
        let dm = rel(f(a, "rewards/margins"), f(b, "rewards/margins"), 1e-2);
        let dg = rel(f(a, "grad_norm"), f(b, "grad_norm"), 1e-3);
        // Margins are differences of differences of log-prob sums (fp32 noise of ~1e-5 relative
        // in each sum, see below): measured up to 1.5e-3 relative, gradient norms 3e-3.
        curve = curve.max(dl).max(dm / 2.0).max(dg / 5.0);
        // The token statistics TRL logs beside them.
        for k in ["logits/chosen", "logits/rejected", "entropy"] {
            stats = stats.max(rel(f(a, k), f(b, k), 1e-2));
        }
        accuracy = accuracy.max((f(a, "mean_token_accuracy") - f(b, "mean_token_accuracy")).abs());
        report += &format!(
            "{name} step {:>2}: loss {:.6} vs {:.6} ({dl:.1e}), margin {:.6} vs {:.6} ({dm:.1e}), grad_norm ({dg:.1e})\n",
            b["step"],
            f(a, "loss"),
            f(b, "loss"),
            f(a, "rewards/margins"),
            f(b, "rewards/margins"),
        );
    }
    // Same tokens in, same numbers out: the first step's summed log-probs.
    let logps = ["logps/chosen", "logps/rejected"]
        .iter()
        .map(|k| rel(f(&ours[0], k), f(&theirs[0], k), 1.0))
        .fold(0.0f64, f64::max);
    eprintln!(
        "{report}{name}: curve {curve:.1e}, stats {stats:.1e}, accuracy {accuracy:.3}, step-1 log-probs {logps:.1e}"
    );
    assert!(curve <= tol.curve, "{name}: nibble's DPO curve departs from TRL's by {curve:e}:\n{report}");
    assert!(stats <= tol.stats, "{name}: logits/entropy depart from TRL's by {stats:e}");
    assert!(accuracy <= tol.accuracy, "{name}: mean_token_accuracy departs from TRL's by {accuracy}");
    assert!(logps <= tol.logps, "{name}: step-1 log-probs depart from TRL's by {logps:e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn sigmoid_matches_trl() {
    run_variant("sigmoid", &[], &FP32);
}

#[test]
fn sigmoid_precomputed_reference_matches_trl() {
    run_variant("sigmoid_precompute", &["--precompute_ref_log_probs"], &FP32);
}

#[test]
fn ipo_matches_trl() {
    run_variant("ipo", &["--loss_type", "ipo"], &FP32);
}

#[test]
fn sigmoid_bf16_matches_trl() {
    run_variant("sigmoid_bf16", &["--dtype", "bfloat16"], &BF16);
}

#[test]
fn ipo_precomputed_reference_bf16_matches_trl() {
    run_variant(
        "ipo_precompute_bf16",
        &["--dtype", "bfloat16", "--loss_type", "ipo", "--precompute_ref_log_probs"],
        &BF16,
    );
}

#[test]
fn ld_dpo_matches_trl() {
    run_variant("sigmoid_ld", &["--ld_alpha", "0.5"], &FP32);
}

#[test]
fn ipo_precomputed_reference_matches_trl() {
    run_variant("ipo_precompute", &["--loss_type", "ipo", "--precompute_ref_log_probs"], &FP32);
}

/// A second run with a precomputed reference reads the tokenized pairs and the reference's
/// log-probs from the cache, and trains the same steps.
#[test]
fn a_second_precomputing_run_reads_its_reference_from_the_cache() {
    let golden = repo().join("tests/golden/dpo_trl");
    let base = std::env::temp_dir().join(format!("nibble-dpo-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let run = |name: &str| {
        let out = base.join(name);
        let o = Command::new(nibble_tests::sft())
            .arg("dpo")
            .arg(golden.join("recipe.yaml"))
            .args(["--output_dir", out.to_str().unwrap(), "--precompute_ref_log_probs", "--max_steps", "3"])
            .current_dir(repo())
            .env("NIBBLE_CACHE", base.join("cache"))
            .env("NIBBLE_LOG", "info")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let losses: Vec<f64> =
            nibble_tests::log_history(&out).iter().map(|e| e["loss"].as_f64().unwrap()).collect();
        (String::from_utf8_lossy(&o.stderr).into_owned(), losses)
    };
    let (first, l1) = run("one");
    assert!(!first.contains("read from"), "{first}");
    let (second, l2) = run("two");
    assert!(second.contains("tokenized preference pairs from"), "{second}");
    assert!(second.contains("reference log-probs of 240 pairs read from"), "{second}");
    assert_eq!(l1, l2);
    let _ = std::fs::remove_dir_all(&base);
}
