//! DPO parity with TRL: the recipe `tests/golden/dpo_trl/recipe.yaml` trained by `sft dpo` and by
//! TRL 1.16's DPOTrainer (`scripts/golden_dpo_trl.py`), from the same 4-bit base (bitsandbytes'
//! codes, saved) and initial adapter (so the reference is TRL's frozen "ref" copy of it) and in
//! dataset order, gives the same loss, reward margin, gradient norm and learning rate at every
//! one of 20 steps, for the sigmoid and IPO losses, with the reference computed each step or
//! precomputed, in fp32 and bf16; and the same log-probs at step 1.
//!
//! Both stacks run the same kernels in the same order (transformers' grouped-query attention
//! under a padding mask, TRL's chunked log-prob head), so the curves agree to float noise:
//! measured 1.3e-7 on an AVX-512/AMX host, 1.5e-5 in fp32 with AVX2 kernels
//! (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`) against files made with AVX-512 ones. A
//! bf16 product rounds as the host's kernels round, so the bf16 variants run TRL live on the
//! test's host (with `cpu_matmul: native`, torch's own bf16 kernels on any CPU) instead of
//! reading a committed file. On a mixture of experts (the tiny Mixtral), the same comparison with
//! the router's load-balancing loss (`scripts/golden_dpo_families.py`).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use nibble_tests::repo;
use serde_json::Value;

/// How close a variant must come to TRL (the issue asks for 1e-3 on the curve and 1e-5 on the
/// step-1 log-probs; measured: 1.5e-5 and 5e-8 at worst, see above).
struct Tol {
    /// Loss, reward margin and gradient norm, relative (with floors near zero), the worst.
    curve: f64,
    /// `logits/*` and `entropy`, relative.
    stats: f64,
    /// `mean_token_accuracy`, absolute (a top-1 prediction can flip on a near tie).
    accuracy: f64,
    /// The step-1 summed log-probs, relative.
    logps: f64,
}

const TOL: Tol = Tol { curve: 1e-4, stats: 1e-4, accuracy: 0.01, logps: 1e-6 };

/// The variants `scripts/golden_dpo_trl.py` runs live (`--live`), in one process for all tests.
const LIVE: [&str; 2] = ["sigmoid_bf16", "ipo_precompute_bf16"];

/// TRL's log of a variant: the committed golden file, or the live run's.
fn trl_log(name: &str) -> Option<PathBuf> {
    if !LIVE.contains(&name) {
        return Some(repo().join(format!("tests/golden/dpo_trl/trl_{name}.json")));
    }
    static LIVE_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let dir = LIVE_DIR.get_or_init(|| {
        let Ok(python) = std::env::var("NIBBLE_PYTHON") else {
            eprintln!("skipped the live bf16 runs: NIBBLE_PYTHON is not set (run `cargo xtask setup`)");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("nibble-dpo-trl-live-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let o = Command::new(python)
            .arg(repo().join("scripts/golden_dpo_trl.py"))
            .arg("--live")
            .args(LIVE)
            .arg("--out")
            .arg(&dir)
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(o.status.success(), "TRL's live run failed:\n{}", String::from_utf8_lossy(&o.stderr));
        Some(dir)
    });
    dir.as_ref().map(|d| d.join(format!("trl_{name}.json")))
}

/// `sft dpo RECIPE FLAGS` in a scratch folder named after `name`: the log history it wrote (the
/// folder is removed again).
fn train_dpo(name: &str, recipe: &std::path::Path, flags: &[&str]) -> Vec<Value> {
    // Tests comparing against the same TRL file run at once: one folder each.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = std::env::temp_dir().join(format!("nibble-dpo-trl-{name}-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = nibble_tests::sft_in(&out.join("cache"))
        .arg("dpo")
        .arg(recipe)
        .args(["--output_dir", out.to_str().unwrap()])
        .args(flags)
        .output()
        .unwrap();
    assert!(o.status.success(), "sft dpo ({name}) failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let history = nibble_tests::log_history(&out);
    let _ = std::fs::remove_dir_all(&out);
    history
}

fn run_variant(name: &str, flags: &[&str], tol: &Tol) {
    let Some(trl) = trl_log(name) else { return };
    let ours = train_dpo(name, &repo().join("tests/golden/dpo_trl/recipe.yaml"), flags);
    let theirs: Value = serde_json::from_str(&std::fs::read_to_string(trl).unwrap()).unwrap();
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
        curve = curve.max(dl).max(dm).max(dg);
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
}

#[test]
fn sigmoid_matches_trl() {
    run_variant("sigmoid", &[], &TOL);
}

#[test]
fn sigmoid_precomputed_reference_matches_trl() {
    run_variant("sigmoid_precompute", &["--precompute_ref_log_probs"], &TOL);
}

/// `padding_free: true` (nibble's: the layers skip each batch's padding, attention keeps the
/// padded layout) against the same TRL runs (TRL 1.16 turns `padding_free` off and pads): the
/// same maths, so the same curve to f32 rounding, with the reference scored each step or
/// precomputed (that pass skips the padding too).
#[test]
fn padding_free_matches_trl() {
    run_variant("sigmoid", &["--padding_free", "true"], &TOL);
    run_variant("sigmoid_precompute", &["--padding_free", "true", "--precompute_ref_log_probs"], &TOL);
}

#[test]
fn ipo_matches_trl() {
    run_variant("ipo", &["--loss_type", "ipo"], &TOL);
}

/// A bf16 model computing in bf16 (no autocast) on the bf16 copy of the base, on torch's own bf16
/// kernels as TRL's side runs.
const BF16_FLAGS: [&str; 6] = [
    "--dtype",
    "bfloat16",
    "--model_name_or_path",
    "tests/golden/dpo_trl/base-nf4-bf16",
    "--cpu_matmul",
    "native",
];

#[test]
fn sigmoid_bf16_matches_trl() {
    run_variant("sigmoid_bf16", &BF16_FLAGS, &TOL);
}

#[test]
fn ipo_precomputed_reference_bf16_matches_trl() {
    run_variant(
        "ipo_precompute_bf16",
        &[&BF16_FLAGS[..], &["--loss_type", "ipo", "--precompute_ref_log_probs"]].concat(),
        &TOL,
    );
}

#[test]
fn ld_dpo_matches_trl() {
    run_variant("sigmoid_ld", &["--ld_alpha", "0.5"], &TOL);
}

#[test]
fn ipo_precomputed_reference_matches_trl() {
    run_variant("ipo_precompute", &["--loss_type", "ipo", "--precompute_ref_log_probs"], &TOL);
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

/// DPO on a mixture of experts (the tiny Mixtral) with the router's load-balancing loss, from the
/// family's all-linear adapter (attention, router and expert banks): per-step loss, reward
/// margin, gradient norm and `aux_loss` equal TRL's (`scripts/golden_dpo_families.py`), with and
/// without gradient checkpointing (which adds each layer's share of the router loss where that
/// layer is recomputed), and with `padding_free`. Within the 1e-3 (measured 2.4e-5 on the AVX512-BF16 host the
/// golden was made on; the routing's top-k and the experts' gathers leave more room for a
/// kernel's rounding than the dense tiny model's curves do).
#[test]
fn mixture_of_experts_dpo_with_the_router_loss_matches_trl() {
    const CURVE: f64 = 1e-3;
    let golden = repo().join("tests/golden/families/mixtral");
    let theirs: Value =
        serde_json::from_str(&std::fs::read_to_string(golden.join("trl_dpo_log.json")).unwrap()).unwrap();
    let theirs = theirs.as_array().unwrap();
    // With `padding_free` the router sees the real tokens alone instead of masking the padding.
    for (name, flags) in [
        ("plain", &[][..]),
        ("checkpointed", &["--gradient_checkpointing", "true"][..]),
        ("padding-free", &["--padding_free", "true"][..]),
    ] {
        let ours = train_dpo(&format!("moe-{name}"), &golden.join("dpo_recipe.yaml"), flags);
        assert_eq!(ours.len(), 10, "{name}: logged steps");
        assert_eq!(ours.len(), theirs.len(), "{name}: logged steps");
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {v}"));
        let rel = |a: f64, b: f64, floor: f64| (a - b).abs() / b.abs().max(floor);
        let mut worst = 0.0f64;
        for (a, b) in ours.iter().zip(theirs) {
            assert_eq!(a["step"], b["step"]);
            for (k, floor) in
                [("loss", 1e-3), ("rewards/margins", 1e-2), ("grad_norm", 1e-3), ("aux_loss", 1e-3)]
            {
                let d = rel(f(a, k), f(b, k), floor);
                assert!(
                    d <= CURVE,
                    "{name} step {}: {k} {} vs TRL's {} ({d:.1e})",
                    b["step"],
                    f(a, k),
                    f(b, k)
                );
                worst = worst.max(d);
            }
            for k in ["logps/chosen", "logps/rejected"] {
                worst = worst.max(rel(f(a, k), f(b, k), 1.0));
                assert!(rel(f(a, k), f(b, k), 1.0) <= CURVE, "{name} step {}: {k}", b["step"]);
            }
        }
        eprintln!("mixture-of-experts DPO ({name}): worst relative difference from TRL {worst:.1e}");
    }
}
