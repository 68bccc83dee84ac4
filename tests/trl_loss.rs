//! Loss-curve parity with TRL: the same recipe (`tests/golden/trl_loss/recipe.yaml`) trained by
//! `sft` and by TRL 1.16's SFTTrainer (`scripts/golden_trl_loss.py`), from the same initial
//! adapter, in dataset order and in the Trainer's shuffled order, gives the same loss, gradient
//! norm and learning rate at every step; and the same for each model family beyond Llama's layout
//! (`tests/golden/families/<family>`: a tiny random model from `scripts/make_tiny_families.py`,
//! its recipe and TRL's curve from `scripts/golden_trl_loss.py <folder> --sequential-only`).
#![allow(clippy::unwrap_used, reason = "tests")]

use nibble_tests::repo;

#[test]
fn every_step_matches_trl() {
    compare("trl_loss", "trl_log.json", &[], 50);
}

/// Gemma 2: soft-capped attention scores and logits (TRL caps its head's f32 tiles, nibble too),
/// sandwich norms, GeGLU, alternating sliding layers.
#[test]
fn gemma2_steps_match_trl() {
    compare("families/gemma2", "trl_log.json", &[], 20);
}

/// Gemma 3: q/k norms, per-layer-type RoPE, scaled-dot-product attention with Gemma's scale.
#[test]
fn gemma3_steps_match_trl() {
    compare("families/gemma3", "trl_log.json", &[], 20);
}

/// Phi-3 / Phi-4-mini: fused `qkv_proj` and `gate_up_proj` adapted as PEFT adapts them, partial
/// rotary, LongRoPE switching factors by batch length.
#[test]
fn phi3_steps_match_trl() {
    compare("families/phi3", "trl_log.json", &[], 20);
}

/// Mixtral: top-2 routing renormalised, weighted in f32, 4-bit experts (the tiny model's experts
/// hold NF4 values, which transformers + bitsandbytes keep in full precision), attention adapters,
/// the router's load-balancing loss at 0.5; and the same with gradient checkpointing, where each
/// recomputed layer adds its share of the router loss's gradient.
#[test]
fn mixtral_steps_match_trl() {
    compare("families/mixtral", "trl_log.json", &[], 20);
    compare("families/mixtral", "trl_log.json", &["--gradient_checkpointing", "true"], 20);
}

/// Qwen3-MoE: raw top-2 probabilities rounded to the dtype, q/k norms, the router loss at
/// config.json's coefficient (TRL's default).
#[test]
fn qwen3moe_steps_match_trl() {
    compare("families/qwen3moe", "trl_log.json", &[], 20);
}

/// With the Trainer's default shuffled order, nothing exchanged but the initial adapter: nibble
/// draws each epoch's permutation as accelerate's seedable sampler does (`sampler_order`).
#[test]
fn every_step_matches_trl_in_the_trainers_shuffled_order() {
    compare("trl_loss", "trl_log_random.json", &["--train_sampling_strategy", "random"], 50);
}

fn compare(folder: &str, log: &str, flags: &[&str], steps: usize) {
    let golden = repo().join("tests/golden").join(folder);
    let tag = folder.replace('/', "-");
    let out = std::env::temp_dir().join(format!("nibble-trl-loss-{}-{tag}-{log}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = nibble_tests::sft_in(&out.join("cache"))
        .arg(golden.join("recipe.yaml"))
        .args(["--output_dir", out.to_str().unwrap()])
        .args(flags)
        .output()
        .unwrap();
    assert!(o.status.success(), "sft failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let ours = nibble_tests::log_history(&out);
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden.join(log)).unwrap()).unwrap();
    let theirs = theirs.as_array().unwrap();
    assert!(theirs.len() >= steps, "the comparison covers at least {steps} steps");
    let d = nibble_tests::compare_curves(
        &ours.iter().collect::<Vec<_>>(),
        &theirs.iter().collect::<Vec<_>>(),
        &[("loss", 0.0), ("grad_norm", 0.0)],
    );
    eprintln!("{}", d.report);
    let worst = d.of("loss").max(d.of("grad_norm"));
    // fp32 rounding (kernel summation order) drifts by ~1e-5 over 50 steps; the issue allows 2%.
    assert!(worst <= 1e-3, "{folder}: nibble's curve departs from TRL's by {worst:e}:\n{}", d.report);
    let _ = std::fs::remove_dir_all(&out);
}
