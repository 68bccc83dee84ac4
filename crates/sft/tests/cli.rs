//! The `sft` binary as a user runs it: `--print-config`, exit codes, layering, `env:` export.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sft(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sft"))
        .args(args)
        .current_dir(cwd)
        .env_remove("NIBBLE_LOG")
        .output()
        .expect("run sft")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn print_config_on_the_handbook_qlora_recipe() {
    let recipe = repo().join("recipes/zephyr-7b-beta/sft/config_qlora.yaml");
    let out = sft(&[recipe.to_str().expect("utf-8"), "--print-config", "--lora_r", "64"], &repo());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON plan");
    assert_eq!(plan["model"]["lora_alpha"], 16);
    assert_eq!(plan["model"]["lora_dropout"], 0.05);
    assert_eq!(plan["model"]["bnb_4bit_quant_type"], "nf4");
    assert_eq!(plan["model"]["use_bnb_nested_quant"], false);
    assert_eq!(plan["training"]["max_length"], 2048);
    assert_eq!(plan["model"]["lora_r"], 64);
    assert_eq!(plan["sources"]["lora_r"], "cli");
    assert_eq!(plan["sources"]["lora_alpha"], "file");
    assert_eq!(plan["sources"]["bnb_4bit_quant_type"], "default");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_seq_length: older spelling"), "{stderr}");
    // The model is not here: the plan part says so instead of failing the print.
    let problems = plan["plan"]["problems"].as_array().expect("plan problems");
    assert!(problems.iter().any(|p| p.as_str().is_some_and(|p| p.contains("mistralai/Mistral-7B-v0.1"))));
}

/// `--print-config` shows the run plan beside the recipe: the model found, how it loads, the
/// adapter's targets as resolved on the model (PEFT's default when the recipe names none).
#[test]
fn print_config_shows_the_plan_with_resolved_targets() {
    // (One name alone would be a regex: TRL collapses a one-element list, PEFT full-matches it.)
    let out = sft(
        &["recipes/tiny/config_qlora.yaml", "--print-config", "--lora_target_modules", "v_proj,q_proj"],
        &repo(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let plan = &printed["plan"];
    assert_eq!(plan["model"]["architecture"], "Llama");
    assert_eq!(plan["load"]["quantize_4bit"]["quant_type"], "nf4");
    assert_eq!(plan["load"]["dtype"], "float32");
    assert_eq!(plan["lora"]["targets_per_layer"], serde_json::json!(["q_proj", "v_proj"]));
    assert_eq!(plan["device"], "cpu");
}

#[test]
fn three_mistakes_exit_2_and_write_nothing() {
    let dir = scratch("bad");
    let recipe = dir.join("recipe.yaml");
    std::fs::write(
        &recipe,
        "model_name_or_path: m\ndataset_name: d\noutput_dir: out\nlora_r: 0\nlearnin_rate: 1e-4\nbf16: maybe\n",
    )
    .expect("write recipe");
    let out = sft(&["recipe.yaml"], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in ["recipe.yaml:4:1: lora_r", "recipe.yaml:5:1: learnin_rate", "recipe.yaml:6:1: bf16"] {
        assert!(stderr.contains(line), "missing `{line}` in:\n{stderr}");
    }
    let left: Vec<_> =
        std::fs::read_dir(&dir).expect("read dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("recipe.yaml")], "nothing else may be written");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The 1-based line of `key:` in `text`.
fn line_of(text: &str, key: &str) -> usize {
    text.lines().position(|l| l.starts_with(&format!("{key}:"))).map(|i| i + 1).expect(key)
}

/// Problems only the run plan finds (they need the model, this machine or the output folder)
/// join config's report: all at once, each at its place in the file, exit 2, before anything is
/// tokenized, loaded or written.
#[test]
fn problems_found_while_planning_are_reported_at_once_before_anything_is_written() {
    let dir = scratch("plan");
    let cache = scratch("plan-cache");
    std::fs::create_dir_all(dir.join("out")).expect("out");
    std::fs::write(dir.join("out").join("adapter_model.safetensors"), b"a previous run").expect("previous");
    let abs = |p: &str| repo().join(p).display().to_string();
    let text = std::fs::read_to_string(repo().join("recipes/tiny/config_qlora.yaml"))
        .expect("tiny recipe")
        .replace("models/tiny-llama", &abs("models/tiny-llama"))
        .replace("data/tiny-chat.jsonl", &abs("data/tiny-chat.jsonl"))
        .replace("output_dir: runs/tiny-qlora", "output_dir: out")
        .replace("overwrite_output_dir: true", "overwrite_output_dir: false")
        .replace("load_in_4bit: true", "load_in_4bit: false")
        .replace("use_peft: true", "use_peft: false")
        .replace("lora_target_modules: all-linear", "lora_target_modules: [q_proj, q_prj]")
        .replace("save_strategy: \"no\"", "save_strategy: best\neval_strategy: steps")
        .replace("lr_scheduler_type: cosine", "lr_scheduler_type: cosine_with_min_lr")
        + "optim: adafactor\ntrain_sampling_strategy: group_by_length\nweight_decay: -0.1\n";
    std::fs::write(dir.join("recipe.yaml"), &text).expect("recipe");
    let out = Command::new(env!("CARGO_BIN_EXE_sft"))
        .arg("recipe.yaml")
        .current_dir(&dir)
        .env("NIBBLE_CACHE", &cache)
        .env_remove("NIBBLE_LOG")
        .output()
        .expect("run sft");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // Config's own check (weight_decay) and the plan's in one report.
    assert!(stderr.contains("recipe has 9 problems"), "{stderr}");
    for key in [
        "weight_decay",
        "use_peft",
        "lora_target_modules",
        // The data is found while planning: eval_strategy asks for a split the file does not have.
        "dataset_name",
        "lr_scheduler_type",
        "save_strategy",
        "output_dir",
        "optim",
        "train_sampling_strategy",
    ] {
        let at = format!("recipe.yaml:{}:1: {key}: ", line_of(&text, key));
        assert!(stderr.contains(&at), "`{at}` missing from:\n{stderr}");
    }
    let previous = std::fs::read(dir.join("out").join("adapter_model.safetensors")).expect("previous");
    assert_eq!(previous, b"a previous run");
    assert_eq!(std::fs::read_dir(dir.join("out")).expect("out").count(), 1, "nothing written to output_dir");
    assert_eq!(std::fs::read_dir(&cache).expect("cache").count(), 0, "nothing tokenized");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&cache);
}

/// Without `lora_target_modules` the estimate counts the adapters the run will train: PEFT's
/// default for a Llama, q_proj and v_proj (r 8: 8 x (64 + 64) + 8 x (64 + 32) per layer, 2 layers).
#[test]
fn the_estimate_counts_the_default_targets_the_run_trains() {
    let dir = scratch("default-targets");
    let text = std::fs::read_to_string(repo().join("recipes/tiny/config_qlora.yaml"))
        .expect("tiny recipe")
        .replace("lora_target_modules: all-linear\n", "");
    let recipe = dir.join("recipe.yaml");
    std::fs::write(&recipe, text).expect("recipe");
    let out = sft(&[recipe.to_str().expect("utf-8"), "--estimate-memory"], &repo());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(r#"on ["q_proj", "v_proj"] (3584 trainable)"#), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A failure after planning (here a row of no TRL format, found while tokenizing) prints `error:`
/// and its causes, exit 1, and no backtrace even where RUST_BACKTRACE is set; NIBBLE_BACKTRACE
/// asks for one.
#[test]
fn runtime_errors_print_as_errors_without_a_backtrace_unless_asked() {
    let dir = scratch("runtime-error");
    let rows = dir.join("odd-rows.jsonl");
    std::fs::write(&rows, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"body\": 1}\n")
        .expect("rows");
    let run = |extra: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_sft"))
            .args(["recipes/tiny/config_qlora.yaml", "--dataset_name"])
            .arg(&rows)
            .arg("--output_dir")
            .arg(dir.join("out"))
            .current_dir(repo())
            .env("NIBBLE_CACHE", &dir)
            .env("RUST_BACKTRACE", "1")
            .envs(extra.iter().copied())
            .env_remove("NIBBLE_LOG")
            .output()
            .expect("run sft")
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>();
    assert!(last.iter().any(|l| l.starts_with("error: ") && !l.starts_with("error: recipe")), "{stderr}");
    assert!(stderr.contains("odd-rows.jsonl"), "{stderr}");
    assert!(!stderr.contains("Error:") && !stderr.to_lowercase().contains("backtrace"), "{stderr}");
    let traced = run(&[("NIBBLE_BACKTRACE", "1")]);
    let stderr = String::from_utf8_lossy(&traced.stderr);
    assert!(stderr.contains("main"), "NIBBLE_BACKTRACE=1 should print a backtrace:\n{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A dataset that is not there is a recipe problem found while planning: exit 2, named with its
/// key and place, before the model is loaded or anything written.
#[test]
fn a_missing_dataset_is_reported_with_the_recipe_before_any_work() {
    let dir = scratch("missing-data");
    let out = Command::new(env!("CARGO_BIN_EXE_sft"))
        .args(["recipes/tiny/config_qlora.yaml", "--dataset_name", "no/such-data.jsonl", "--output_dir"])
        .arg(dir.join("out"))
        .current_dir(repo())
        .env("NIBBLE_CACHE", &dir)
        .env_remove("NIBBLE_LOG")
        .output()
        .expect("run sft");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("dataset_name: ") && stderr.contains("no/such-data.jsonl"), "{stderr}");
    assert!(!dir.join("out").exists(), "nothing written");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `log_level` sets the log's verbosity (transformers' names), and `NIBBLE_LOG` wins over it.
#[test]
fn log_level_sets_the_verbosity() {
    let debug_line = "exported from the recipe's env: OMP_NUM_THREADS";
    let estimate = |extra: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sft"));
        cmd.args(["recipes/tiny/config_qlora.yaml", "--estimate-memory"]).args(extra).current_dir(repo());
        match env {
            Some(v) => cmd.env("NIBBLE_LOG", v),
            None => cmd.env_remove("NIBBLE_LOG"),
        };
        let out = cmd.output().expect("run sft");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(!estimate(&[], None).contains(debug_line));
    assert!(estimate(&["--log_level", "debug"], None).contains(debug_line));
    assert!(!estimate(&["--log_level", "debug"], Some("warn")).contains(debug_line));
}

/// Every subcommand answers `--help` on stdout with exit 0, `--version` names the version, and
/// `completions` writes a script.
#[test]
fn every_subcommand_answers_help_on_stdout() {
    for cmd in ["", "train", "launch", "quantize", "merge", "generate", "env", "completions"] {
        let mut args: Vec<&str> = cmd.split_whitespace().collect();
        args.push("--help");
        let out = sft(&args, &repo());
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: sft") && out.stderr.is_empty(), "{args:?}:\n{text}");
    }
    let version = sft(&["--version"], &repo());
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("sft {}", env!("CARGO_PKG_VERSION")));
    let bash = sft(&["completions", "bash"], &repo());
    assert!(bash.status.success() && String::from_utf8_lossy(&bash.stdout).contains("_sft()"));
}

#[test]
fn environment_overrides_the_file_and_flags_override_the_environment() {
    let recipe = repo().join("recipes/tiny/config_qlora.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_sft"))
        .args([recipe.to_str().expect("utf-8"), "--print-config", "--seed=7"])
        .env("NIBBLE_LORA_R", "4")
        .env("NIBBLE_SEED", "3")
        .output()
        .expect("run sft");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (plan["model"]["lora_r"].clone(), plan["sources"]["lora_r"].clone()),
        (4.into(), "env".into())
    );
    assert_eq!((plan["training"]["seed"].clone(), plan["sources"]["seed"].clone()), (7.into(), "cli".into()));
}

#[test]
fn recipe_env_is_exported_before_logging_starts() {
    let dir = scratch("env");
    std::fs::write(
        dir.join("r.yaml"),
        "env:\n  NIBBLE_LOG: debug\n  OMP_NUM_THREADS: \"1\"\nmodel_name_or_path: m\ndataset_name: d\n",
    )
    .expect("write");
    let run = |omp: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sft"));
        cmd.args(["r.yaml", "--print-config"]).current_dir(&dir).env_remove("NIBBLE_LOG");
        match omp {
            Some(n) => cmd.env("OMP_NUM_THREADS", n),
            None => cmd.env_remove("OMP_NUM_THREADS"),
        };
        let out = cmd.output().expect("run sft");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(None);
    assert!(stderr.contains("exported from the recipe's env: NIBBLE_LOG, OMP_NUM_THREADS"), "{stderr}");
    // OpenMP had read its thread count before the recipe was; the pool is resized to it.
    assert!(stderr.contains("intra-op threads from the recipe's env: 1"), "{stderr}");
    // Set in the environment (a shell, `sft launch`), it stands.
    let stderr = run(Some("2"));
    assert!(!stderr.contains("intra-op threads from the recipe's env"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_recipe_file_exits_2_naming_it() {
    let out = sft(&["no/such/recipe.yaml"], &repo());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/recipe.yaml"));
}

#[test]
fn estimate_memory_reads_the_model_config() {
    let out = sft(&["recipes/tiny/config_qlora.yaml", "--estimate-memory"], &repo());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["115264 parameters", "LoRA r=8", "17920 trainable", "total"] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
}

#[test]
fn measure_floor_times_the_steps_matmuls_for_sft_and_dpo() {
    for (args, passes) in [
        (
            vec!["recipes/tiny/config_qlora.yaml"],
            &["base/forward", "base/backward", "head/backward", "lora/backward"][..],
        ),
        (
            vec!["dpo", "recipes/bench/tiny-dpo.yaml", "--gradient_checkpointing", "true"],
            &["base/reference", "base/recompute", "attention/backward"][..],
        ),
    ] {
        let mut all = args.clone();
        all.push("--measure-floor");
        let out = sft(&all, &repo());
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line");
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let f = &v["floor"];
        let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
        assert!(num("matmul_s") > 0.0 && num("dequant_s") > 0.0, "{line}");
        assert!((num("floor_s") - num("matmul_s") - num("dequant_s")).abs() < 1e-9, "{line}");
        assert!(num("flops") >= num("model_flops") && num("model_flops") > 0.0, "{line}");
        for p in passes {
            assert!(f["by"][*p].as_f64().is_some_and(|s| s > 0.0), "{args:?}: no `{p}` in {line}");
        }
        // No initial adapter: the reference is the base with the adapters off.
        assert!(f["by"].get("lora/reference").is_none(), "{line}");
        let parts: f64 =
            f["by"].as_object().expect("by").values().filter_map(serde_json::Value::as_f64).sum();
        assert!((parts - num("matmul_s")).abs() <= 1e-6 * num("matmul_s"), "{line}");
    }
}

#[test]
fn estimate_memory_for_a_model_not_in_the_cache_names_it() {
    let dir = scratch("hub");
    let out = Command::new(env!("CARGO_BIN_EXE_sft"))
        .args([repo().join("recipes/tiny/config_qlora.yaml").to_str().expect("utf-8"), "--estimate-memory"])
        .args(["--model_name_or_path", "org/absent-model"])
        .env("HF_HUB_CACHE", &dir)
        .output()
        .expect("run sft");
    assert_eq!(out.status.code(), Some(2), "a model that is not there is a recipe problem");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("org/absent-model") && stderr.contains("models--org--absent-model"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_row_that_fits_no_format_is_named_or_skipped_when_asked() {
    let dir = scratch("badrow");
    let good: Vec<String> = std::fs::read_to_string(repo().join("data/tiny-chat.jsonl"))
        .expect("data")
        .lines()
        .take(8)
        .map(str::to_owned)
        .collect();
    let mut rows = good.clone();
    rows.insert(3, r#"{"question": "no known column"}"#.to_owned());
    std::fs::write(dir.join("rows.jsonl"), rows.join("\n") + "\n").expect("write");
    let model = repo().join("models/tiny-llama");
    let recipe = format!(
        "model_name_or_path: {}\nload_in_4bit: true\nuse_peft: true\nlora_target_modules: all-linear\n\
         dataset_name: rows.jsonl\nper_device_train_batch_size: 2\nmax_steps: 2\nsave_strategy: \"no\"\n\
         output_dir: out\n",
        model.display()
    );
    std::fs::write(dir.join("r.yaml"), recipe).expect("write");
    let cache = dir.join("cache");
    let run = |extra: &[&str]| {
        let mut args = vec!["r.yaml"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_sft"))
            .args(&args)
            .current_dir(&dir)
            .env("NIBBLE_CACHE", &cache)
            .env_remove("NIBBLE_LOG")
            .output()
            .expect("run sft")
    };
    let out = run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rows.jsonl") && err.contains("row 4"), "{err}");
    let out = run(&["--skip_invalid_rows"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("skipped 1 of 9 rows"), "{log}");
    assert!(dir.join("out/adapter_model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_samples_and_writes_prompt_logits() {
    let dir = scratch("generate");
    let logits = dir.join("logits.safetensors");
    let args = [
        "generate",
        "--model",
        "models/tiny-llama",
        "--load-in-4bit",
        "--chat",
        "--prompt",
        "What is 2 plus 3?",
        "--max-new-tokens",
        "6",
        "--logits-out",
        logits.to_str().expect("utf-8"),
    ];
    let a = sft(&args, &repo());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = sft(&args, &repo());
    assert_eq!(a.stdout, b.stdout, "greedy generation is deterministic");
    let t = tch::Tensor::read_safetensors(&logits).expect("logits file");
    assert_eq!(t[0].0, "logits");
    let size = t[0].1.size();
    assert_eq!(size.len(), 2);
    assert_eq!(size[1], 226, "[prompt tokens, vocab]");
    assert!(size[0] > 5);
    let bad = sft(&["generate", "--model", "models/tiny-llama"], &repo());
    assert_eq!(bad.status.code(), Some(2), "a missing --prompt is a usage error");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_device_map_is_planned_and_estimated_per_device() {
    // GPUs need not be present to plan for them: the budgets come from max_memory.
    let kw = r#"{"device_map": "sequential", "max_memory": {"0": "150KiB", "cpu": "1GiB"}}"#;
    let out =
        sft(&["recipes/tiny/config_qlora.yaml", "--estimate-memory", "--model_init_kwargs", kw], &repo());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let per_device =
        text.split("per device").nth(1).unwrap_or_else(|| panic!("no per-device part in:\n{text}"));
    for want in ["cuda:0", "cpu"] {
        assert!(per_device.contains(want), "`{want}` missing from:\n{text}");
    }
    // A budget that cannot hold the model names the shortfall in bytes.
    let kw = r#"{"device_map": "auto", "max_memory": {"cpu": "100KiB"}}"#;
    let out =
        sft(&["recipes/tiny/config_qlora.yaml", "--estimate-memory", "--model_init_kwargs", kw], &repo());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("model_init_kwargs.device_map") && stderr.contains("short by"), "{stderr}");
}

#[test]
fn a_device_map_trains_like_the_default_and_gpus_it_names_must_exist() {
    let dir = scratch("device-map");
    let recipe = repo().join("recipes/tiny/config_qlora.yaml");
    let run = |name: &str, extra: &[&str]| -> (Output, PathBuf) {
        let out_dir = dir.join(name);
        let mut args = vec![recipe.to_str().expect("utf-8"), "--max_steps", "3", "--logging_steps", "1"];
        args.push("--output_dir");
        args.push(out_dir.to_str().expect("utf-8"));
        args.extend_from_slice(extra);
        (sft(&args, &repo()), out_dir)
    };
    let losses = |d: &Path| -> Vec<f64> {
        std::fs::read_to_string(d.join("log.jsonl"))
            .expect("log.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
            .collect()
    };
    let (plain, plain_dir) = run("plain", &[]);
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let (mapped, mapped_dir) = run("mapped", &["--model_init_kwargs", r#"{"device_map": "auto"}"#]);
    assert!(mapped.status.success(), "{}", String::from_utf8_lossy(&mapped.stderr));
    assert!(String::from_utf8_lossy(&mapped.stderr).contains("placement: embed cpu"));
    let (a, b) = (losses(&plain_dir), losses(&mapped_dir));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "the same run placed by a device map");
    if !tch::Cuda::is_available() {
        let (gpu, _) = run("gpu", &["--model_init_kwargs", r#"{"device_map": {"": 0}}"#]);
        assert!(!gpu.status.success());
        let stderr = String::from_utf8_lossy(&gpu.stderr);
        assert!(stderr.contains("cuda:0") && stderr.contains("0 GPU"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dpo_reads_dpoconfig_keys_and_refuses_sft_ones() {
    let dir = scratch("dpo");
    std::fs::write(
        dir.join("recipe.yaml"),
        "model_name_or_path: m\ndataset_name: d\nuse_peft: true\nbeta: 0.2\npacking: true\nloss_type: [sigmod]\n",
    )
    .expect("write recipe");
    let out = sft(&["dpo", "recipe.yaml"], &dir);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in ["recipe.yaml:5:1: packing", "SFTConfig", "loss_type", "sigmoid"] {
        assert!(stderr.contains(part), "missing `{part}` in:\n{stderr}");
    }
    assert!(!stderr.contains("beta"), "beta is a DPO key:\n{stderr}");
    // The same recipe for SFT: beta is the other trainer's.
    let out = sft(&["recipe.yaml"], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sft dpo"));
    // The handbook's DPO recipe resolves (model and data are not needed for the recipe's part).
    let recipe = repo().join("recipes/zephyr-7b-beta/dpo/config_qlora.yaml");
    let out = sft(&["dpo", recipe.to_str().expect("utf-8"), "--print-config"], &repo());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(j["trainer"], "dpo");
    assert_eq!(j["dpo"]["beta"], 0.01);
    let _ = std::fs::remove_dir_all(&dir);
}
