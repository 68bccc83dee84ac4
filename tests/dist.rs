//! Data-parallel training through `sft launch` (Gloo on CPU, 127.0.0.1): 2 ranks give the adapter
//! of 1 process with twice the gradient accumulation on the same data (and so do 2 ranks started
//! by the venv's `torchrun --no-python`), a 2-rank run resumes from
//! its checkpoint to the same adapter and refuses to resume on 1 process, and a rank killed
//! mid-run makes the launcher stop the other and exit non-zero within the timeout. The same holds
//! for DPO (`sft launch --nproc 2 dpo RECIPE.yaml`).

#![allow(clippy::unwrap_used, reason = "tests")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;

use nibble_tests::repo;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny recipe with dropout on (the ranks must replay one process's masks), small batches
/// and a short run; `extra` flags last.
fn args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "recipes/tiny/config_qlora.yaml",
        "--output_dir",
        out.to_str().unwrap(),
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--lora_dropout",
        "0.1",
        "--ddp_timeout",
        "20",
    ]
    .map(str::to_owned)
    .to_vec();
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    a
}

fn sft(args: &[String], cache: &Path) -> Output {
    nibble_tests::sft_in(cache).args(args).env_remove("WORLD_SIZE").env_remove("RANK").output().unwrap()
}

fn launch(nproc: usize, args: &[String], cache: &Path) -> Output {
    let mut all = vec!["launch".to_owned(), "--nproc".into(), nproc.to_string()];
    all.extend_from_slice(args);
    sft(&all, cache)
}

fn log(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn adapter(dir: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Largest difference between two adapters relative to each tensor's largest entry.
fn max_rel_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            let scale = x.abs().max().double_value(&[]).max(1e-12);
            (x - y).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(serde_json::Value::as_f64))
        .collect()
}

#[test]
fn two_ranks_train_the_adapter_of_one_process_with_twice_the_accumulation() {
    let cache = scratch("cache");
    let one = scratch("one");
    let o = sft(&args(&one, &["--gradient_accumulation_steps", "2"]), &cache);
    assert!(o.status.success(), "1 process:\n{}", log(&o));

    let two = scratch("two");
    let o = launch(2, &args(&two, &["--gradient_accumulation_steps", "1"]), &cache);
    let text = log(&o);
    assert!(o.status.success(), "2 ranks:\n{text}");
    assert!(text.contains("[rank 0]") && text.contains("on each of 2 ranks"), "{text}");
    // Rank 1 only warns: the log lines are rank 0's.
    assert!(!text.lines().any(|l| l.starts_with("[rank 1]") && l.contains(" INFO ")), "{text}");

    let d = max_rel_diff(&adapter(&one), &adapter(&two));
    assert!(d <= 1e-5, "2-rank adapter differs from the 1-process one by {d:e}");
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 4);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "losses {l1:?} vs {l2:?}");
    }

    // torchrun sets the same variables `sft launch` does.
    let Some(torchrun) = std::env::var_os("NIBBLE_PYTHON")
        .map(|p| PathBuf::from(p).with_file_name("torchrun"))
        .filter(|t| t.is_file())
    else {
        eprintln!("skipped the torchrun half: NIBBLE_PYTHON is not set (run `cargo xtask setup`)");
        return;
    };
    let three = scratch("torchrun");
    let o = Command::new(torchrun)
        .args(["--nproc-per-node", "2", "--no-python", nibble_tests::sft().to_str().expect("utf-8 path")])
        .args(args(&three, &["--gradient_accumulation_steps", "1"]))
        .current_dir(repo())
        .env("NIBBLE_CACHE", &cache)
        .env_remove("NIBBLE_LOG")
        .output()
        .unwrap();
    assert!(o.status.success(), "torchrun:\n{}", log(&o));
    let d = max_rel_diff(&adapter(&one), &adapter(&three));
    assert!(d <= 1e-5, "torchrun's 2-rank adapter differs from the 1-process one by {d:e}");
}

#[test]
fn a_two_rank_run_resumes_with_two_ranks_only() {
    let cache = scratch("resume-cache");
    let full = scratch("resume-full");
    let save = ["--gradient_accumulation_steps", "1", "--save_strategy", "steps", "--save_steps", "2"];
    let o = launch(2, &args(&full, &save), &cache);
    assert!(o.status.success(), "{}", log(&o));
    let ck = full.join("checkpoint-2");
    assert!(ck.join("adapter_model.safetensors").is_file(), "{}", log(&o));

    let resumed = scratch("resume-2");
    let from = ["--gradient_accumulation_steps", "1", "--resume_from_checkpoint", ck.to_str().unwrap()];
    let o = launch(2, &args(&resumed, &from), &cache);
    assert!(o.status.success(), "{}", log(&o));
    let d = max_rel_diff(&adapter(&full), &adapter(&resumed));
    assert!(d <= 1e-6, "resumed 2-rank adapter differs by {d:e}");

    let single = scratch("resume-1");
    let o = sft(&args(&single, &from), &cache);
    assert!(!o.status.success());
    assert!(log(&o).contains("written by a run of 2 process(es) and this run has 1"), "{}", log(&o));
}

#[test]
fn a_killed_rank_stops_the_launch_with_an_error() {
    let cache = scratch("kill-cache");
    let out = scratch("kill");
    let mut a = vec!["launch".to_owned(), "--nproc".into(), "2".into()];
    a.extend(args(&out, &["--max_steps", "100000", "--gradient_accumulation_steps", "1"]));
    let mut child =
        nibble_tests::sft_in(&cache).args(&a).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Wait for rank 1's pid and for training to be under way, then kill rank 1.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut pid, mut training, mut seen) = (None, false, String::new());
    while pid.is_none() || !training {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("no training started:\n{seen}")
        });
        if let Some(p) = line.split("rank 1: pid ").nth(1) {
            pid = p.trim().parse::<u32>().ok();
        }
        training |= line.contains("| loss");
        seen.push_str(&line);
        seen.push('\n');
    }
    let killed = Instant::now();
    let st = Command::new("kill").args(["-9", &pid.unwrap().to_string()]).status().unwrap();
    assert!(st.success());
    // The launcher must notice, stop rank 0 and exit non-zero well within the timeout.
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the launcher still runs 20 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    for line in rx.try_iter() {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(!status.success(), "the launcher exited 0 after a rank was killed:\n{seen}");
    assert!(seen.contains("rank 1 failed") && seen.contains("signal"), "{seen}");
    assert!(seen.contains("stopping the other ranks"), "{seen}");
}

#[test]
fn two_dpo_ranks_train_the_adapter_of_one_process_with_twice_the_accumulation() {
    let cache = scratch("dpo-cache");
    let dpo_args = |out: &Path, accumulation: &str| -> Vec<String> {
        [
            "dpo",
            "tests/golden/dpo_trl/recipe.yaml",
            "--output_dir",
            out.to_str().unwrap(),
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "4",
            "--gradient_accumulation_steps",
            accumulation,
            // Dropout on: the ranks must replay one process's masks.
            "--disable_dropout",
            "false",
            "--lora_dropout",
            "0.1",
            "--ddp_timeout",
            "20",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let one = scratch("dpo-one");
    let o = sft(&dpo_args(&one, "2"), &cache);
    assert!(o.status.success(), "1 process:\n{}", log(&o));
    let two = scratch("dpo-two");
    let o = launch(2, &dpo_args(&two, "1"), &cache);
    let text = log(&o);
    assert!(o.status.success(), "2 ranks:\n{text}");
    assert!(text.contains("on each of 2 ranks"), "{text}");
    let d = max_rel_diff(&adapter(&one), &adapter(&two));
    assert!(d <= 1e-5, "2-rank DPO adapter differs from the 1-process one by {d:e}");
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 4);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "losses {l1:?} vs {l2:?}");
    }
}
