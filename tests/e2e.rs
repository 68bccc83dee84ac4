//! The main job end to end: `sft recipes/tiny/config_qlora.yaml` trains a QLoRA adapter on the
//! shipped tiny model, a second run reuses the tokenization cache, and Python PEFT loads the
//! adapter on transformers + bitsandbytes' 4-bit model with the same logits as nibble's.
//!
//! The comparison quantizes without double quantization: bitsandbytes' CPU encoder of the 8-bit
//! absmax codes departs from its CUDA kernel by up to one bin (see the quant crate's docs), and
//! nibble follows the kernel, so with nested quantization the two 4-bit models differ slightly
//! before any adapter is involved.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::process::Command;

use model_loader::{CausalLm, LoadOptions};
use quant::QuantType;
use quant::ops::QuantizeOptions;
use tch::{Kind, Tensor};

use nibble_tests::repo;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn train(out: &Path, cache: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "recipes/tiny/config_qlora.yaml".to_owned(),
        "--output_dir".into(),
        out.to_str().unwrap().into(),
        "--max_steps".into(),
        "6".into(),
        "--logging_steps".into(),
        "2".into(),
        "--use_bnb_nested_quant".into(),
        "false".into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let o = nibble_tests::sft_in(cache).args(&args).output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "sft failed:\n{log}");
    log
}

const PEFT_LOGITS: &str = r#"
import os, sys
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import nibble_refcpu, torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
model_dir, adapter, inputs, out = sys.argv[1:5]
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                         bnb_4bit_compute_dtype=torch.float32)
base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32, device_map="cpu")
model = PeftModel.from_pretrained(base, adapter).eval()
nibble_refcpu.portable_4bit(model)  # the path every CPU takes (docs/reference-cpu-paths.md)
ids = load_file(inputs)["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().contiguous()
save_file({"logits": logits}, out)
"#;

#[test]
fn the_tiny_default_trains_an_adapter_that_peft_loads() {
    let out = scratch("run");
    let cache = scratch("cache");
    let log = train(&out, &cache, &[]);
    assert!(log.contains("trainable params: 17,920 || all params:"), "{log}");
    assert!(log.contains("cached 240 tokenized samples"), "{log}");
    for f in ["adapter_config.json", "adapter_model.safetensors", "trainer_state.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let history = nibble_tests::log_history(&out);
    assert_eq!(history.iter().map(|e| e["step"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 4, 6]);
    let losses: Vec<f64> = history.iter().map(|e| e["loss"].as_f64().unwrap()).collect();
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses[2] < losses[0], "the loss did not fall: {losses:?}");

    // A second run reads the tokenized data from the cache and, same seed, trains the same adapter.
    let out2 = scratch("run2");
    let log2 = train(&out2, &cache, &[]);
    assert!(log2.contains("loaded 240 tokenized samples from"), "{log2}");
    let a1 = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let a2 = std::fs::read(out2.join("adapter_model.safetensors")).unwrap();
    assert!(a1 == a2, "same recipe and seed gave a different adapter");

    // nibble's logits with the trained adapter.
    let opts = LoadOptions {
        quantize: Some(QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: false }),
        ..LoadOptions::default()
    };
    let mut model = CausalLm::load(&repo().join("models/tiny-llama"), &opts, &mut |_, _| {}).unwrap();
    let adapters = lora::inject_from(model.linears_mut(), &out).unwrap();
    let b_norm: f64 =
        adapters.modules().iter().map(|m| m.lora_b().abs().sum(Kind::Double).double_value(&[])).sum();
    assert!(b_norm > 0.0, "training left every B at zero");
    let ids = Tensor::from_slice(&[4i64, 17, 93, 120, 5, 4, 60, 61, 62, 200, 11, 5]).view([1, 12]);
    let ours = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();

    let Ok(python) = std::env::var("NIBBLE_PYTHON") else {
        eprintln!("skipped the PEFT half: NIBBLE_PYTHON is not set (run `cargo xtask setup`)");
        return;
    };
    let inputs = out.join("inputs.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids)], &inputs).unwrap();
    let theirs_path = out.join("peft_logits.safetensors");
    let o = Command::new(python)
        .env("HF_HUB_OFFLINE", "1")
        .arg("-c")
        .arg(PEFT_LOGITS)
        .arg(repo().join("models/tiny-llama"))
        .arg(&out)
        .arg(&inputs)
        .arg(&theirs_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "PEFT failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let theirs = Tensor::read_safetensors(&theirs_path).unwrap().remove(0).1;
    let err = (&ours - &theirs).abs().max().double_value(&[]) / theirs.abs().max().double_value(&[]);
    assert!(err <= 1e-4, "PEFT's logits with nibble's adapter differ by {err:e}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    a_signal_saves_a_checkpoint_that_resumes("INT");
}

/// A scheduler ending the job (SIGTERM) gets what Ctrl-C gets.
#[test]
fn sigterm_saves_a_checkpoint_that_resumes() {
    a_signal_saves_a_checkpoint_that_resumes("TERM");
}

fn a_signal_saves_a_checkpoint_that_resumes(signal: &str) {
    let out = scratch(&format!("sig{signal}"));
    let cache = scratch(&format!("sig{signal}-cache"));
    let mut child = nibble_tests::sft_in(&cache)
        .args(["recipes/tiny/config_qlora.yaml", "--output_dir", out.to_str().unwrap()])
        .args(["--max_steps", "100000", "--logging_steps", "1", "--save_strategy", "no"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training has logged a step, then interrupt as a terminal's Ctrl-C (or a job
    // scheduler) would.
    let log = out.join("log.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&log).map(|s| s.lines().count()).unwrap_or(0) < 2 {
        assert!(start.elapsed().as_secs() < 120, "no training step logged in 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let killed =
        Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    // 130: stopped after saving a checkpoint (not a failure, not a finished run).
    assert_eq!(status.code(), Some(130), "sft did not stop cleanly after SIG{signal}:\n{stderr}");
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    let saved = sft::train::checkpoint::latest(&out).unwrap().expect("a checkpoint after the signal");
    let step: u64 = saved.file_name().unwrap().to_str().unwrap()["checkpoint-".len()..].parse().unwrap();
    assert!((2..100_000).contains(&step));
    // Resuming continues from there (to a nearer end).
    let resumed = nibble_tests::sft_in(&cache)
        .args(["recipes/tiny/config_qlora.yaml", "--output_dir", out.to_str().unwrap()])
        .args(["--max_steps", &(step + 2).to_string(), "--resume_from_checkpoint", "true"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{log}");
    assert!(log.contains(&format!("resumed from {} at step {step}", saved.display())), "{log}");
    assert!(out.join("adapter_model.safetensors").is_file());
}

/// SHA-256 of `adapter_config.json` and `adapter_model.safetensors` after 6 steps of the tiny
/// default (as `the_tiny_recipe_trains_the_pinned_adapter` runs it). Regenerate only for a change
/// meant to change the numbers, and say so in its commit.
const TINY_ADAPTER_SHA256: [&str; 2] = [
    "28feff5a612eac441a7a93ccfbea69cf42085be1f28c99d606da173e7bafe64f",
    "3dd1c1f6a82127e967ebd53240e697a2bfffbf4a417c5dc9cdf15605b58bf0d2",
];

/// The tiny default (with f32 adapters) trains the pinned adapter bytes, on any x86-64 CPU: ATen's scalar kernels
/// (`ATEN_CPU_CAPABILITY=default`) and MKL's reproducible mode (`MKL_CBWR=COMPATIBLE`) take the
/// same float paths on every host (nibble's own kernels give the same bytes on every path), and
/// the recipe fixes the thread count. A refactoring that moves one number of the run fails here.
#[test]
fn the_tiny_recipe_trains_the_pinned_adapter() {
    use sha2::{Digest, Sha256};
    let out = scratch("pinned");
    let cache = scratch("pinned-cache");
    let o = Command::new(nibble_tests::sft())
        // f32 adapters: the default (`auto`) trains bf16 ones on the 4-bit base as TRL does, and
        // torch's bf16 GEMM takes a different path on CPUs with AVX512-BF16 (oneDNN) than without.
        .args([
            "recipes/tiny/config_qlora.yaml",
            "--max_steps",
            "6",
            "--lora_dtype",
            "float32",
            "--output_dir",
        ])
        .arg(&out)
        .current_dir(repo())
        .env("NIBBLE_CACHE", &cache)
        .env("ATEN_CPU_CAPABILITY", "default")
        .env("MKL_CBWR", "COMPATIBLE")
        .env_remove("NIBBLE_LOG")
        .output()
        .unwrap();
    assert!(o.status.success(), "sft failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let got: Vec<String> = [lora::CONFIG_FILE, lora::WEIGHTS_FILE]
        .iter()
        .map(|f| format!("{:x}", Sha256::digest(std::fs::read(out.join(f)).unwrap())))
        .collect();
    assert_eq!(got, TINY_ADAPTER_SHA256, "the tiny default's adapter changed");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&cache);
}

/// transformers' `TrainerState.load_from_json` reads the trainer_state.json of the output and of
/// every checkpoint (it refuses any key the dataclass lacks), and nibble resumes from it.
#[test]
fn trainer_state_files_load_in_transformers() {
    let out = scratch("state");
    let cache = scratch("state-cache");
    let log =
        train(&out, &cache, &["--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "5"]);
    let files: Vec<PathBuf> = ["checkpoint-2", "checkpoint-4", "."]
        .iter()
        .map(|d| out.join(d).join("trainer_state.json"))
        .collect();
    for f in &files {
        assert!(f.is_file(), "{} missing:\n{log}", f.display());
    }
    // nibble reads its own checkpoint back: a resumed run ends at the same step count.
    let resumed = scratch("state-resumed");
    let ck = out.join("checkpoint-4");
    let log2 = train(&resumed, &cache, &["--resume_from_checkpoint", ck.to_str().unwrap()]);
    assert!(log2.contains("resumed from") && log2.contains("at step 4"), "{log2}");
    let Ok(python) = std::env::var("NIBBLE_PYTHON") else {
        eprintln!("skipped the transformers half: NIBBLE_PYTHON is not set (run `cargo xtask setup`)");
        return;
    };
    let script = "import sys\nfrom transformers.trainer_callback import TrainerState\n\
                  for p in sys.argv[1:]:\n    s = TrainerState.load_from_json(p)\n    \
                  print(p, s.global_step, s.max_steps, len(s.log_history), sorted(s.stateful_callbacks))\n";
    let o = Command::new(python).arg("-c").arg(script).args(&files).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "TrainerState refused a file:\n{}", String::from_utf8_lossy(&o.stderr));
    for (line, step) in text.lines().zip([2, 4, 6]) {
        assert!(line.contains(&format!(" {step} 6 ")), "{line}");
        assert!(line.contains("NibbleProgress") && line.contains("TrainerControl"), "{line}");
    }
}

/// The eval metrics of a run's `log_history`, by step.
fn evals(out: &Path, metric: &str) -> Vec<(u64, f64)> {
    nibble_tests::log_history(out)
        .iter()
        .filter_map(|e| Some((e["step"].as_u64()?, e.get(metric)?.as_f64()?)))
        .collect()
}

fn state(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap()
}

/// `load_best_model_at_end` as the Trainer does it: every evaluation ranks the adapter by
/// `eval_loss`, the state records the best, rotation (`save_total_limit: 1`) keeps the best
/// checkpoint beside the newest, and the run's adapter is the best checkpoint's.
#[test]
fn load_best_model_at_end_ends_on_the_best_checkpoint() {
    let out = scratch("best");
    let cache = scratch("best-cache");
    let eval = ["--eval_strategy", "steps", "--eval_steps", "2", "--dataset_test_split", "train"];
    let flags = ["--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1"];
    // A learning rate that overshoots, so the last evaluation is not the best one.
    let best =
        ["--load_best_model_at_end", "true", "--learning_rate", "0.05", "--per_device_eval_batch_size", "32"];
    let log = train(&out, &cache, &[&eval[..], &flags[..], &best[..]].concat());
    let losses = evals(&out, "eval_loss");
    assert_eq!(losses.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 6], "{log}");
    let (step, value) = losses.iter().copied().fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    let s = state(&out);
    assert_eq!(s["best_metric"].as_f64(), Some(value), "{s}");
    assert_eq!(s["best_global_step"].as_u64(), Some(step), "{s}");
    let best_dir = out.join(format!("checkpoint-{step}"));
    assert_eq!(s["best_model_checkpoint"].as_str(), Some(best_dir.display().to_string().as_str()), "{s}");
    // Rotation to one checkpoint keeps the best one (and the newest, if it is another).
    let mut kept: Vec<u64> =
        sft::train::checkpoint::list(&out).unwrap().into_iter().map(|(s, _)| s).collect();
    kept.sort_unstable();
    let want: Vec<u64> = if step == 6 { vec![6] } else { vec![step, 6] };
    assert_eq!(kept, want, "{log}");
    let adapter = |d: &Path| std::fs::read(d.join(lora::WEIGHTS_FILE)).unwrap();
    assert!(adapter(&out) == adapter(&best_dir), "the run's adapter is checkpoint-{step}'s");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&cache);
}

/// `save_strategy: best` with a metric where higher is better: a checkpoint at each evaluation
/// that improves `eval_mean_token_accuracy`, and none at the others.
#[test]
fn save_strategy_best_saves_only_improvements() {
    let out = scratch("save-best");
    let cache = scratch("save-best-cache");
    let eval = ["--eval_strategy", "steps", "--eval_steps", "1", "--dataset_test_split", "train"];
    let flags = ["--save_strategy", "best", "--metric_for_best_model", "mean_token_accuracy"];
    let more = ["--learning_rate", "0.05", "--per_device_eval_batch_size", "32"];
    let log = train(&out, &cache, &[&eval[..], &flags[..], &more[..]].concat());
    let acc = evals(&out, "eval_mean_token_accuracy");
    assert_eq!(acc.len(), 6, "{log}");
    let mut best = f64::NEG_INFINITY;
    let mut improved = Vec::new();
    for (step, v) in acc {
        if v > best {
            best = v;
            improved.push(step);
        }
    }
    let saved: Vec<u64> = sft::train::checkpoint::list(&out).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(saved, improved, "{log}");
    assert_eq!(state(&out)["best_metric"].as_f64(), Some(best));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&cache);
}

/// `sft generate` and `sft merge` take the base model from the run folder when `--model` is not
/// given (its adapter_config.json, else its recipe.yaml), and say which they took.
#[test]
fn generate_and_merge_find_the_base_model_in_the_run_folder() {
    let out = scratch("run-folder");
    let cache = scratch("run-folder-cache");
    train(&out, &cache, &["--max_steps", "2"]);
    let run = |args: &[&str]| {
        let o = nibble_tests::sft_in(&cache).args(args).output().unwrap();
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "sft {args:?} failed:\n{log}");
        log
    };
    let adapter = out.to_str().unwrap();
    let log = run(&["generate", "--adapter", adapter, "--prompt", "What is", "--max_new_tokens", "3"]);
    assert!(log.contains("base model models/tiny-llama"), "{log}");
    let merged = cache.join("merged");
    let log = run(&["merge", "--adapter", adapter, "--out", merged.to_str().unwrap()]);
    assert!(log.contains("base model models/tiny-llama") && merged.join("config.json").is_file(), "{log}");
    // Without the adapter's record of it, the recipe beside it names the model.
    let bare = scratch("run-folder-bare");
    for f in [lora::CONFIG_FILE, lora::WEIGHTS_FILE, "recipe.yaml"] {
        std::fs::copy(out.join(f), bare.join(f)).unwrap();
    }
    let cfg = bare.join(lora::CONFIG_FILE);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["base_model_name_or_path"] = serde_json::Value::Null;
    std::fs::write(&cfg, v.to_string()).unwrap();
    let log =
        run(&["generate", "--adapter", bare.to_str().unwrap(), "--prompt", "Hi", "--max_new_tokens", "2"]);
    assert!(log.contains("recipe.yaml"), "{log}");
    for d in [&out, &cache, &bare] {
        let _ = std::fs::remove_dir_all(d);
    }
}
