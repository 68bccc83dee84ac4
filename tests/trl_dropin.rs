//! Drop-in for TRL: the same recipe and seed, nothing exchanged, give the same run. `sft` and TRL
//! 1.16's SFTTrainer (`scripts/golden_trl_dropin.py`, run as the alignment-handbook's `sft.py`
//! runs a recipe) train `tests/golden/trl_dropin/*.yaml`: LoRA and QLoRA on the shipped tiny model,
//! seed 42, `lora_dropout: 0`, the Trainer's shuffled order, from a plain dataset and from a
//! handbook mixture, on 1 and 2 ranks. The adapter's init (PEFT's draws from the seed), the order,
//! the bf16 adapters TRL trains on a 4-bit base, AdamW and clipping as torch computes them.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

use nibble_tests::repo;

/// LoRA on the f32 tiny model: TRL keeps the adapters in f32, and so does nibble.
#[test]
fn a_lora_recipe_trains_as_trl_trains_it_with_nothing_exchanged() {
    compare("lora", 1e-4, 1e-4, 0.0);
}

#[test]
fn a_mixture_recipe_trains_as_trl_trains_it_with_nothing_exchanged() {
    compare("mixture", 1e-4, 1e-4, 0.0);
}

/// On 2 ranks (Gloo on the CPU) against TRL under `torchrun --nproc-per-node 2`: accelerate's
/// sharding of the Trainer's order, the gradients averaged over ranks, the loss logged as the
/// ranks' mean.
#[test]
fn a_lora_recipe_on_2_ranks_trains_as_trl_on_2_ranks() {
    compare("lora@2", 1e-4, 1e-4, 0.0);
}

#[test]
fn a_mixture_recipe_on_2_ranks_trains_as_trl_on_2_ranks() {
    compare("mixture@2", 1e-4, 1e-4, 0.0);
}

/// QLoRA: TRL casts a 4-bit model's adapters to bf16 and trains them there (AdamW's moments,
/// clipping and the LoRA matmuls in bf16); `lora_dtype: auto` does the same. Each stack quantizes
/// the model itself, and bitsandbytes' CPU quantizer rounds a few double-quantization codes
/// differently from its CUDA kernel, which nibble follows: step 1 differs by ~1e-5 and bf16
/// rounding carries that forward (measured: 8.9e-5 over 30 steps). From the same codes (the
/// `prequantized` recipes below) the curves agree to 1e-7.
#[test]
fn a_qlora_recipe_trains_as_trl_trains_it_with_nothing_exchanged() {
    compare("qlora", 2e-4, 1e-2, 0.0);
}

/// DPO from a fresh adapter (the reference is the base with the adapter off), LoRA in f32: the
/// loss and the rewards agree within 1e-4 at every step (measured: 7e-8).
#[test]
fn a_dpo_recipe_trains_as_trl_trains_it_with_nothing_exchanged() {
    compare("dpo_lora", 1e-4, 1e-4, 1e-4);
}

/// DPO on the 4-bit base with DPOTrainer's bf16 adapters, each stack quantizing for itself: as for
/// SFT's QLoRA the quantizers' few different codes drift the curves apart slowly (measured: loss
/// 1.5e-4, rewards 3e-3 over 30 steps, 2.8e-4 with AVX2 kernels against this file made with AMX
/// ones; 1e-7 from the same codes).
#[test]
fn a_dpo_qlora_recipe_trains_as_trl_trains_it_with_nothing_exchanged() {
    compare("dpo_qlora", 5e-4, 1e-2, 5e-3);
}

/// DPO after SFT on the 4-bit base: DPOTrainer's reference is a frozen f32 copy of the starting
/// adapter (made before the trained one is cast to bf16), and so is nibble's. The quantizers'
/// different codes already move step 1's tiny margin (4e-5 in the loss) and the rewards are tiny
/// differences of log-probs (measured: loss 9.7e-4, rewards 1.3e-2 over 30 steps; 1e-7 from the
/// same codes, `dpo_qlora_prequantized`).
#[test]
fn a_dpo_qlora_recipe_from_a_starting_adapter_trains_as_trl_trains_it() {
    compare("dpo_qlora_init", 2e-3, 2e-2, 3e-2);
}

/// The QLoRA recipe on a checkpoint bitsandbytes quantized and saved (as hub `*-bnb-4bit`
/// models come): with the same 4-bit codes on both sides, the bf16 adapters train as TRL trains
/// them (measured: loss 1e-7 over 30 steps, bf16 gradient norms equal). TRL runs live: bf16
/// products round as the host's kernels do.
#[test]
fn a_qlora_recipe_on_a_prequantized_checkpoint_trains_as_trl_trains_it() {
    compare_live("qlora_prequantized", 1e-4, 1e-4, 0.0);
}

/// DPO after SFT on a checkpoint bitsandbytes quantized and saved: the f32 reference adapter
/// beside the bf16 trained one, the same codes on both sides (measured: loss and rewards 1e-7).
/// TRL runs live, as above.
#[test]
fn a_dpo_qlora_recipe_on_a_prequantized_checkpoint_trains_as_trl_trains_it() {
    compare_live("dpo_qlora_prequantized", 1e-4, 1e-4, 1e-4);
}

/// `name` against TRL's committed log of it.
fn compare(name: &str, loss_tol: f64, norm_tol: f64, reward_tol: f64) {
    let golden = repo().join("tests/golden/trl_dropin");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden.join("trl_log.json")).unwrap()).unwrap();
    let theirs = all[name].as_array().unwrap();
    compare_to(name, theirs, &[], loss_tol, norm_tol, reward_tol);
}

/// `recipe` against TRL training it now, on this host: its bf16 products then round on the same
/// kernels as nibble's (`cpu_matmul: native`, torch's own bf16 kernels on any CPU), where a
/// committed log would carry the rounding of the CPU that made it.
fn compare_live(recipe: &str, loss_tol: f64, norm_tol: f64, reward_tol: f64) {
    let Ok(python) = std::env::var("NIBBLE_PYTHON") else {
        panic!("NIBBLE_PYTHON is unset: run `cargo xtask setup` (it installs the pinned TRL and sets it)");
    };
    let dir = std::env::temp_dir().join(format!("nibble-trl-dropin-live-{}-{recipe}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = Command::new(python)
        .arg(repo().join("scripts/golden_trl_dropin.py"))
        .args(["live", recipe])
        .arg(&dir)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(o.status.success(), "TRL's live run failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trl_log.json")).unwrap()).unwrap();
    compare_to(
        recipe,
        theirs.as_array().unwrap(),
        &["--cpu_matmul", "native"],
        loss_tol,
        norm_tol,
        reward_tol,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sft` trains `name` (`recipe@ranks`) with `flags`; its per-step log against TRL's `theirs`.
fn compare_to(
    name: &str,
    theirs: &[serde_json::Value],
    flags: &[&str],
    loss_tol: f64,
    norm_tol: f64,
    reward_tol: f64,
) {
    let golden = repo().join("tests/golden/trl_dropin");
    let out = std::env::temp_dir().join(format!("nibble-trl-dropin-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let dpo = name.starts_with("dpo");
    // `lora@2`: the `lora` recipe on 2 ranks (`sft launch --nproc 2`, as `torchrun` for TRL).
    let (recipe, ranks) = name.split_once('@').map_or((name, None), |(r, n)| (r, Some(n)));
    let o = nibble_tests::sft_in(&out.join("cache"))
        .args(ranks.map(|n| ["launch".to_owned(), "--nproc".to_owned(), n.to_owned()]).into_iter().flatten())
        .args(dpo.then_some("dpo"))
        .arg(golden.join(format!("{recipe}.yaml")))
        .args(["--output_dir", out.to_str().unwrap()])
        .args(flags)
        .output()
        .unwrap();
    assert!(o.status.success(), "sft failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let ours = nibble_tests::log_history(&out);
    assert_eq!(theirs.len(), 30, "the comparison covers 30 steps");
    let mut metrics = vec![("loss", 0.0), ("grad_norm", 0.0)];
    if dpo {
        // The rewards start at 0 (a fresh adapter is the reference): relative with a floor.
        metrics.extend([("rewards/chosen", 0.1), ("rewards/rejected", 0.1), ("rewards/margins", 0.1)]);
    }
    let d = nibble_tests::compare_curves(
        &ours.iter().collect::<Vec<_>>(),
        &theirs.iter().collect::<Vec<_>>(),
        &metrics,
    );
    let report = &d.report;
    eprintln!("{name}:\n{report}");
    let worst_reward = ["rewards/chosen", "rewards/rejected", "rewards/margins"]
        .map(|k| d.of(k))
        .into_iter()
        .fold(0.0, f64::max);
    assert!(
        d.of("loss") <= loss_tol,
        "{name}: nibble's loss departs from TRL's by {:e}:\n{report}",
        d.of("loss")
    );
    assert!(worst_reward <= reward_tol, "{name}: rewards depart by {worst_reward:e}:\n{report}");
    assert!(
        d.of("grad_norm") <= norm_tol,
        "{name}: gradient norms depart by {:e}:\n{report}",
        d.of("grad_norm")
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// A checkpoint TRL's Trainer wrote resumes in nibble: the adapter, the step, the schedule, the
/// data position (the Trainer's order, whole epochs then micro-batches) and AdamW's moments (from
/// its `optimizer.pt`, torch's pickle): steps 21-30 give TRL's uninterrupted losses.
#[test]
fn a_trl_checkpoint_resumes_in_nibble_where_trl_would_go_on() {
    for (recipe, tol) in [("lora", 1e-4), ("qlora", 1e-3)] {
        let Ok(python) = std::env::var("NIBBLE_PYTHON") else {
            panic!(
                "NIBBLE_PYTHON is unset: run `cargo xtask setup` (it installs the pinned TRL and sets it)"
            );
        };
        let trl = std::env::temp_dir().join(format!("nibble-trl-ck-{}-{recipe}", std::process::id()));
        let _ = std::fs::remove_dir_all(&trl);
        let o = Command::new(python)
            .arg(repo().join("scripts/golden_trl_dropin.py"))
            .args(["checkpoint", recipe, trl.to_str().unwrap()])
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(o.status.success(), "TRL failed:\n{}", String::from_utf8_lossy(&o.stderr));
        let ck = trl.join("checkpoint-20");
        assert!(ck.join("optimizer.pt").is_file(), "TRL wrote no optimizer.pt in {}", ck.display());
        let out = trl.join("nibble");
        let o = nibble_tests::sft_in(&out.join("cache"))
            .arg(repo().join(format!("tests/golden/trl_dropin/{recipe}.yaml")))
            .args(["--output_dir", out.to_str().unwrap(), "--resume_from_checkpoint", ck.to_str().unwrap()])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "sft failed:\n{log}");
        assert!(!log.contains("fresh optimizer"), "the Trainer's optimizer state was not used:\n{log}");
        let ours = nibble_tests::log_history(&out);
        let theirs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(trl.join("trl_log.json")).unwrap()).unwrap();
        let theirs: Vec<&serde_json::Value> =
            theirs.as_array().unwrap().iter().filter(|e| e["step"].as_u64() > Some(20)).collect();
        let ours: Vec<&serde_json::Value> = ours.iter().filter(|e| e["step"].as_u64() > Some(20)).collect();
        assert_eq!(ours.len(), 10, "{recipe}: steps 21-30 logged:\n{log}");
        let d = nibble_tests::compare_curves(&ours, &theirs, &[("loss", 0.0)]);
        assert!(d.of("loss") <= tol, "{recipe}: resumed losses depart from TRL's:\n{}", d.report);
        // Without its optimizer.pt the checkpoint still resumes, with fresh moments and a warning.
        std::fs::remove_file(ck.join("optimizer.pt")).unwrap();
        let again = trl.join("nibble-fresh");
        let o = nibble_tests::sft_in(&again.join("cache"))
            .arg(repo().join(format!("tests/golden/trl_dropin/{recipe}.yaml")))
            .args(["--output_dir", again.to_str().unwrap(), "--resume_from_checkpoint", ck.to_str().unwrap()])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && log.contains("fresh optimizer"), "{log}");
        let _ = std::fs::remove_dir_all(&trl);
    }
}

/// The other way: a checkpoint `sft` wrote (the Trainer's layout: adapter, `optimizer.pt`,
/// `scheduler.pt`, `trainer_state.json`) resumes in TRL's Trainer, whose steps 21-30 then give
/// nibble's uninterrupted losses and learning rates.
#[test]
fn a_nibble_checkpoint_resumes_in_trl_where_nibble_would_go_on() {
    let Ok(python) = std::env::var("NIBBLE_PYTHON") else {
        panic!("NIBBLE_PYTHON is unset: run `cargo xtask setup` (it installs the pinned TRL and sets it)");
    };
    let root = std::env::temp_dir().join(format!("nibble-ck-in-trl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let ours = root.join("nibble");
    let o = nibble_tests::sft_in(&root.join("cache"))
        .arg(repo().join("tests/golden/trl_dropin/lora.yaml"))
        .args(["--output_dir", ours.to_str().unwrap(), "--save_strategy", "steps", "--save_steps", "20"])
        .output()
        .unwrap();
    assert!(o.status.success(), "sft failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let ck = ours.join("checkpoint-20");
    for f in ["optimizer.pt", "scheduler.pt", "trainer_state.json", "adapter_model.safetensors"] {
        assert!(ck.join(f).is_file(), "checkpoint-20 has no {f}");
    }
    let trl = root.join("trl");
    let o = Command::new(python)
        .arg(repo().join("scripts/golden_trl_dropin.py"))
        .args(["resume", "lora", ck.to_str().unwrap(), trl.to_str().unwrap()])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(o.status.success(), "TRL failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trl.join("trl_log.json")).unwrap()).unwrap();
    // TRL's log starts with the history it read from nibble's trainer_state.json.
    let theirs: Vec<&serde_json::Value> =
        theirs.as_array().unwrap().iter().filter(|e| e["step"].as_u64() > Some(20)).collect();
    let ours = nibble_tests::log_history(&ours);
    let ours: Vec<&serde_json::Value> = ours.iter().filter(|e| e["step"].as_u64() > Some(20)).collect();
    assert_eq!(theirs.len(), 10, "TRL trained steps 21-30: {theirs:?}");
    let d = nibble_tests::compare_curves(&ours, &theirs, &[("loss", 0.0)]);
    assert!(d.of("loss") <= 1e-4, "TRL's resumed losses depart from nibble's:\n{}", d.report);
    let _ = std::fs::remove_dir_all(&root);
}
