//! The files a run leaves and the logs it writes: `log.jsonl` parses back, the TensorBoard event
//! file decodes (own reader with CRC checks, checked again here bit by bit; Python's reader when
//! installed) to the scalars written, `loss.png` shows the curve, the card names the base model
//! and the final loss, and nothing is left half-written.

use std::path::{Path, PathBuf};

use report::tfevents::{self, ValueKind};
use report::{
    EVAL_COLOR, EvalLog, LossPlot, ReportError, ReportOptions, Reporter, RunSummary, TRAIN_COLOR, TrainLog,
};

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("nibble-report-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn train_log(step: u64) -> TrainLog {
    TrainLog {
        loss: 2.0 / (1.0 + step as f64 / 25.0),
        grad_norm: 0.75 + step as f64 / 1000.0,
        learning_rate: 2e-4 * (1.0 - step as f64 / 200.0),
        entropy: None,
        num_tokens: step * 512,
        mean_token_accuracy: Some(0.4 + step as f64 / 1000.0),
        epoch: step as f64 / 50.0,
        step,
        tokens_per_second: 1234.5,
        elapsed_s: step as f64 * 0.5,
        eta_s: (100 - step.min(100)) as f64 * 0.5,
        metrics: Default::default(),
    }
}

fn eval_log(step: u64) -> EvalLog {
    EvalLog {
        eval_loss: 2.2 / (1.0 + step as f64 / 30.0),
        eval_runtime: 3.5,
        eval_mean_token_accuracy: Some(0.5),
        epoch: step as f64 / 50.0,
        step,
        metrics: Default::default(),
    }
}

fn summary() -> RunSummary {
    RunSummary {
        base_model: "Qwen/Qwen2.5-0.5B-Instruct".into(),
        model_name: "qwen-sft-test".into(),
        datasets: vec!["HuggingFaceH4/ultrachat_200k".into()],
        hyperparameters: vec![("learning_rate".into(), "0.0002".into()), ("lora_r".into(), "16".into())],
        recipe_yaml: "learning_rate: 0.0002\nlora_r: 16\n".into(),
        max_steps: 100,
        num_train_samples: 800.0,
        train_rows: Some(400),
        total_flos: None,
        samples_per_step: Some(8.0),
        epochs: 3.0,
        trainer: config::Trainer::Sft,
    }
}

/// Bit-at-a-time CRC-32C, independent of the library's table-driven one.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

#[allow(clippy::manual_rotate)] // spelled as TensorFlow's crc32c.h spells it
fn masked(data: &[u8]) -> u32 {
    let c = crc32c_bitwise(data);
    ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
}

/// Walk the TFRecord framing by hand, checking both CRCs of every record; returns the count.
fn check_framing(bytes: &[u8]) -> usize {
    let (mut at, mut n) = (0usize, 0usize);
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        assert_eq!(len_crc, masked(len_bytes), "length CRC of record {n}");
        let data = &bytes[at + 12..at + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().expect("4 bytes"));
        assert_eq!(data_crc, masked(data), "data CRC of record {n}");
        at += 16 + len;
        n += 1;
    }
    assert_eq!(at, bytes.len());
    n
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn no_temp_files(dir: &Path) {
    for name in files_in(dir) {
        assert!(!name.starts_with('.') && !name.contains(".tmp"), "temporary file left behind: {name}");
    }
}

fn python() -> Option<PathBuf> {
    let from_env = std::env::var_os("NIBBLE_PYTHON").map(PathBuf::from);
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nibble/venv/bin/python"));
    from_env.into_iter().chain(home).find(|p| p.is_file())
}

#[test]
fn jsonl_lines_parse_back_and_tensorboard_decodes_to_the_scalars() {
    let tmp = TempDir::new("tb");
    let out = tmp.0.join("out");
    let opts =
        ReportOptions { tensorboard: true, run_name: Some("tb-run".into()), ..ReportOptions::default() };
    let mut rep = Reporter::new(&out, opts).expect("reporter");
    let logdir = rep.logging_dir().expect("tensorboard on").to_owned();
    let runs = out.join("runs");
    assert!(logdir.starts_with(&runs), "default logging_dir {} is under output_dir/runs", logdir.display());
    let stamp = logdir.file_name().expect("name").to_string_lossy().into_owned();
    assert!(stamp.len() > 15 && stamp.as_bytes()[5] == b'_', "runs/<%b%d_%H-%M-%S>_<host>: {stamp}");

    let train: Vec<TrainLog> = [10, 20, 30].into_iter().map(train_log).collect();
    for l in &train {
        rep.log_train(l).expect("log_train");
    }
    rep.log_eval(&eval_log(30)).expect("log_eval");
    rep.log_text("args", "{\"learning_rate\": 0.0002}").expect("log_text");

    // log.jsonl: one line per call, already on disk (flushed), each parsing back to what was logged.
    let text = std::fs::read_to_string(out.join("log.jsonl")).expect("log.jsonl");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    for (line, want) in lines.iter().zip(&train) {
        let got: TrainLog = serde_json::from_str(line).expect("train line parses");
        assert_eq!(got.step, want.step);
        assert_eq!(got.num_tokens, want.num_tokens);
        for (a, b) in
            [(got.loss, want.loss), (got.learning_rate, want.learning_rate), (got.grad_norm, want.grad_norm)]
        {
            assert!((a - b).abs() <= 1e-15 * b.abs(), "{a} != {b}");
        }
        let raw: serde_json::Value = serde_json::from_str(line).expect("json");
        for key in
            ["loss", "grad_norm", "learning_rate", "num_tokens", "mean_token_accuracy", "epoch", "step"]
        {
            assert!(raw.get(key).is_some(), "transformers' key {key} missing from {line}");
        }
    }
    let got: EvalLog = serde_json::from_str(lines[3]).expect("eval line parses");
    assert_eq!(got, eval_log(30));

    // The event file: hand-checked framing, then the library's reader.
    let path = rep.event_file().expect("event file").to_owned();
    let name = path.file_name().expect("name").to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let bytes = std::fs::read(&path).expect("event file");
    let records = check_framing(&bytes);
    let events = tfevents::read_events(&path).expect("decodes");
    assert_eq!(events.len(), records);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].wall_time > 1.6e9);

    let scalar = |tag: &str, step: i64| -> Option<f32> {
        events.iter().filter(|e| e.step == step).flat_map(|e| &e.values).find_map(|v| match &v.kind {
            ValueKind::Scalar(x) if v.tag == tag => Some(*x),
            _ => None,
        })
    };
    for l in &train {
        let s = l.step as i64;
        assert_eq!(scalar("train/loss", s), Some(l.loss as f32));
        assert_eq!(scalar("train/learning_rate", s), Some(l.learning_rate as f32));
        assert_eq!(scalar("train/grad_norm", s), Some(l.grad_norm as f32));
        assert_eq!(scalar("train/num_tokens", s), Some(l.num_tokens as f32));
        assert_eq!(scalar("train/mean_token_accuracy", s), l.mean_token_accuracy.map(|a| a as f32));
        assert_eq!(scalar("train/epoch", s), Some(l.epoch as f32));
        assert_eq!(scalar("train/step", s), None, "step is the event's step, not a scalar");
        assert_eq!(scalar("train/eta_s", s), None);
    }
    assert_eq!(scalar("eval/loss", 30), Some(eval_log(30).eval_loss as f32));
    assert_eq!(scalar("eval/runtime", 30), Some(3.5));
    assert_eq!(scalar("eval/mean_token_accuracy", 30), Some(0.5));
    let text_ev = events.iter().flat_map(|e| &e.values).find(|v| v.tag == "args").expect("args text");
    assert_eq!(text_ev.kind, ValueKind::Text("{\"learning_rate\": 0.0002}".into()));

    // Python's TensorBoard reader, when the venv has it (the pinned stack does not include it).
    if let Some(py) = python() {
        let has_tb = std::process::Command::new(&py)
            .args(["-c", "import tensorboard"])
            .output()
            .is_ok_and(|o| o.status.success());
        if has_tb {
            let script = "import sys\n\
                from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
                ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
                for tag in sorted(ea.Tags()['scalars']):\n\
                \x20   for e in ea.Scalars(tag): print(tag, e.step, repr(e.value))\n";
            let o = std::process::Command::new(&py)
                .args(["-c", script])
                .arg(&logdir)
                .output()
                .expect("python runs");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let out = String::from_utf8_lossy(&o.stdout);
            for l in &train {
                let want = format!("train/loss {} ", l.step);
                let line =
                    out.lines().find(|x| x.starts_with(&want)).unwrap_or_else(|| panic!("{want} in {out}"));
                let v: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("value");
                assert_eq!(v as f32, l.loss as f32);
            }
            assert!(out.contains("eval/loss 30 "));
        } else {
            eprintln!(
                "note: `import tensorboard` fails in {}; checked with nibble's reader only",
                py.display()
            );
        }
    }
}

#[test]
fn a_corrupted_event_file_is_refused_naming_it() {
    let tmp = TempDir::new("corrupt");
    let opts =
        ReportOptions { tensorboard: true, logging_dir: Some(tmp.0.join("tb")), ..ReportOptions::default() };
    let mut rep = Reporter::new(&tmp.0, opts).expect("reporter");
    rep.log_train(&train_log(1)).expect("log");
    let path = rep.event_file().expect("file").to_owned();
    assert!(path.starts_with(tmp.0.join("tb")), "explicit logging_dir is used");
    let mut bytes = std::fs::read(&path).expect("read");
    let n = bytes.len();
    bytes[n - 10] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    match tfevents::read_events(&path) {
        Err(e @ ReportError::Corrupt { .. }) => assert!(e.to_string().contains("events.out.tfevents.")),
        other => panic!("expected a CRC error, got {other:?}"),
    }
}

/// Some pixel within `r` of (x, y) has a colour close to `c`.
fn colour_near(rgb: &[u8], w: u32, (x, y): (u32, u32), r: i64, c: [u8; 3]) -> bool {
    (-r..=r).any(|dy| {
        (-r..=r).any(|dx| {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            let i = ((py as u32 * w + px as u32) * 3) as usize;
            let d: i64 = (0..3).map(|k| (i64::from(rgb[i + k]) - i64::from(c[k])).abs()).sum();
            d < 40
        })
    })
}

#[test]
fn finish_writes_every_file_atomically_with_the_runs_numbers() {
    let tmp = TempDir::new("finish");
    let out = tmp.0.join("adapter");
    let mut rep = Reporter::new(&out, ReportOptions::default()).expect("reporter");
    assert!(rep.logging_dir().is_none(), "no TensorBoard unless asked");
    let train: Vec<TrainLog> = (1..=10).map(|i| train_log(i * 10)).collect();
    for l in &train {
        rep.log_train(l).expect("log");
        if l.step % 50 == 0 {
            rep.log_eval(&eval_log(l.step)).expect("eval");
        }
    }
    // Each log covers 10 steps, so the mean per step is the mean of the logged losses.
    let want_loss = train.iter().map(|l| l.loss).sum::<f64>() / 10.0;
    assert!((rep.train_loss().expect("loss") - want_loss).abs() < 1e-12);
    let done = rep.finish(&summary()).expect("finish");

    let names = files_in(&out);
    for f in [
        "README.md",
        "all_results.json",
        "eval_results.json",
        "log.jsonl",
        "loss.png",
        "recipe.yaml",
        "train_results.json",
    ] {
        assert!(names.contains(&f.to_owned()), "{f} missing from {names:?}");
    }
    no_temp_files(&out);
    assert!(done.files.iter().all(|f| f.is_file()));

    // Metrics as transformers' Trainer writes them.
    let text = std::fs::read_to_string(out.join("train_results.json")).expect("train_results");
    assert!(text.starts_with("{\n    \""), "4-space indent: {text}");
    let m: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).expect("json");
    let keys: Vec<&String> = m.keys().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "keys sorted as json.dump(sort_keys=True)");
    let num =
        |k: &str| m.get(k).and_then(serde_json::Value::as_f64).unwrap_or_else(|| panic!("{k} in {text}"));
    assert!((num("train_loss") - want_loss).abs() < 1e-12);
    assert_eq!(num("train_runtime"), 50.0);
    assert_eq!(num("train_steps_per_second"), 2.0);
    assert_eq!(num("train_samples_per_second"), 16.0);
    assert_eq!(num("epoch"), 2.0);
    assert_eq!(num("train_samples"), 400.0);
    let all: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("all_results.json")).expect("all")).expect("json");
    assert_eq!(all["train_loss"], m["train_loss"]);
    assert_eq!(all["eval_loss"].as_f64(), Some(eval_log(100).eval_loss));
    assert_eq!(done.metrics.get("train_loss").copied(), m["train_loss"].as_f64());

    // The final metrics are the last log line, as Trainer.log(metrics) leaves them.
    let log = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
    let last: serde_json::Value = serde_json::from_str(log.lines().last().expect("line")).expect("json");
    assert_eq!(last["step"], 100);
    assert_eq!(last["train_runtime"].as_f64(), Some(50.0));
    assert_eq!(log.lines().count(), 10 + 2 + 1);

    assert_eq!(std::fs::read_to_string(out.join("recipe.yaml")).expect("recipe"), summary().recipe_yaml);

    // The card.
    let card = std::fs::read_to_string(out.join("README.md")).expect("card");
    assert!(card.starts_with("---\nbase_model: Qwen/Qwen2.5-0.5B-Instruct\n"), "{card}");
    for want in [
        "library_name: peft",
        "- nibble\n- sft\n- lora\n- trl-compatible",
        "datasets:\n- HuggingFaceH4/ultrachat_200k",
        "[Qwen/Qwen2.5-0.5B-Instruct](https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct)",
        "- learning_rate: 0.0002",
        "- lora_r: 16",
        "- libtorch: 2.11.0",
        concat!("- nibble: ", env!("CARGO_PKG_VERSION")),
        "![training loss](loss.png)",
    ] {
        assert!(card.contains(want), "{want:?} missing from the card:\n{card}");
    }
    let final_train = format!("| {:.4} |", train.last().expect("log").loss);
    assert!(card.contains(&final_train), "final train loss {final_train} missing:\n{card}");
    let final_eval = format!("| {:.4} |", eval_log(100).eval_loss);
    assert!(card.contains(&final_eval), "final eval loss {final_eval} missing:\n{card}");
    assert!(card.contains(&format!("| train_loss (mean over the run's steps) | {want_loss:.4} |")));

    // The plot: right size, the curves where the layout puts them, nothing of theirs elsewhere.
    let file = std::fs::File::open(out.join("loss.png")).expect("png");
    let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().expect("png header");
    let mut buf = vec![0u8; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png data");
    assert_eq!((info.width, info.height), (LossPlot::WIDTH, LossPlot::HEIGHT));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let rgb = &buf[..info.buffer_size()];
    let train_pts: Vec<(f64, f64)> = train.iter().map(|l| (l.step as f64, l.loss)).collect();
    let eval_pts: Vec<(f64, f64)> = [50, 100].map(|s| (s as f64, eval_log(s).eval_loss)).to_vec();
    let layout = LossPlot::render("qwen-sft-test: loss", &train_pts, &eval_pts);
    for &(x, y) in &train_pts {
        let p = layout.pixel(x, y).expect("inside the plot");
        assert!(colour_near(rgb, info.width, p, 2, TRAIN_COLOR), "no train curve at step {x} ({p:?})");
    }
    // Between logged points the line continues.
    let (a, b) = (train_pts[3], train_pts[4]);
    let mid = layout.pixel((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0).expect("inside");
    assert!(colour_near(rgb, info.width, mid, 2, TRAIN_COLOR), "train segment missing at {mid:?}");
    for &(x, y) in &eval_pts {
        let p = layout.pixel(x, y).expect("inside the plot");
        assert!(colour_near(rgb, info.width, p, 2, EVAL_COLOR), "no eval marker at step {x} ({p:?})");
    }
    // Below both curves (low loss at early steps) there is no curve colour.
    let empty = layout.pixel(20.0, 0.7).expect("inside");
    assert!(!colour_near(rgb, info.width, empty, 6, TRAIN_COLOR));
    assert!(!colour_near(rgb, info.width, empty, 6, EVAL_COLOR));
    // The file is exactly the image the layout describes.
    assert!(rgb == layout.rgb(), "loss.png differs from the rendered layout");
    // Not all one colour: axes and labels are drawn (dark pixels outside the plot area).
    let dark = rgb.chunks(3).filter(|p| p.iter().all(|&c| c < 80)).count();
    assert!(dark > 2000, "only {dark} dark pixels: axes/labels missing");
}

#[test]
fn resume_keeps_the_log_up_to_the_checkpoint() {
    let tmp = TempDir::new("resume");
    let mut rep = Reporter::new(&tmp.0, ReportOptions::default()).expect("reporter");
    for s in [10, 20, 30] {
        rep.log_train(&train_log(s)).expect("log");
    }
    rep.log_eval(&eval_log(20)).expect("eval");
    drop(rep);
    // Crash after step 30, resume from the checkpoint at 20: step 30 is redone.
    let opts = ReportOptions { resume_from_step: Some(20), ..ReportOptions::default() };
    let mut rep = Reporter::new(&tmp.0, opts).expect("reporter");
    assert_eq!(rep.train_history().iter().map(|l| l.step).collect::<Vec<_>>(), vec![10, 20]);
    assert_eq!(rep.eval_history().len(), 1);
    assert_eq!(rep.train_loss(), None, "nothing trained in this process yet");
    rep.log_train(&train_log(30)).expect("log");
    let mean = rep.train_loss().expect("one log in this process");
    assert!((mean - train_log(30).loss).abs() < 1e-12, "{mean}");
    let text = std::fs::read_to_string(tmp.0.join("log.jsonl")).expect("log");
    let steps: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, vec![10, 20, 20, 30]);
    no_temp_files(&tmp.0);

    // A fresh run starts the log over.
    let rep = Reporter::new(&tmp.0, ReportOptions::default()).expect("reporter");
    assert!(rep.train_history().is_empty());
    assert_eq!(std::fs::read_to_string(tmp.0.join("log.jsonl")).expect("log"), "");
}

#[test]
fn a_failed_write_names_the_file_and_leaves_no_temporary() {
    let tmp = TempDir::new("fail");
    let mut rep = Reporter::new(&tmp.0, ReportOptions::default()).expect("reporter");
    rep.log_train(&train_log(10)).expect("log");
    // A non-empty folder where README.md should go: the rename into place fails.
    std::fs::create_dir_all(tmp.0.join("README.md").join("x")).expect("blocker");
    let err = rep.finish(&summary()).expect_err("README.md cannot replace a folder");
    let msg = err.to_string();
    assert!(msg.contains("README.md"), "{msg}");
    assert!(matches!(err, ReportError::Io { .. }));
    no_temp_files(&tmp.0);
    // What was written before the failure is complete.
    assert!(tmp.0.join("loss.png").is_file() && tmp.0.join("train_results.json").is_file());
}

#[test]
fn tokenizer_files_are_copied_when_present() {
    let tmp = TempDir::new("tok");
    let (model, out) = (tmp.0.join("model"), tmp.0.join("out"));
    std::fs::create_dir_all(&model).expect("model dir");
    std::fs::write(model.join("tokenizer.json"), b"{\"version\": \"1.0\"}").expect("write");
    std::fs::write(model.join("chat_template.jinja"), b"{{ messages }}").expect("write");
    std::fs::write(model.join("config.json"), b"{}").expect("write");
    let copied = report::copy_tokenizer_files(&model, &out).expect("copy");
    assert_eq!(copied, vec![out.join("tokenizer.json"), out.join("chat_template.jinja")]);
    assert_eq!(files_in(&out), vec!["chat_template.jinja", "tokenizer.json"]);
    assert_eq!(std::fs::read(out.join("chat_template.jinja")).expect("read"), b"{{ messages }}");
}

#[test]
fn summary_from_a_recipe() {
    let yaml = "model_name_or_path: Qwen/Qwen2.5-0.5B\nuse_peft: true\nload_in_4bit: true\nlora_r: 8\n\
                dataset_name: HuggingFaceH4/no_robots\nlearning_rate: 2.0e-4\nmax_steps: 50\n\
                per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\noutput_dir: out/qwen-nr\n\
                report_to: [tensorboard]\n";
    let recipe = config::Loader::new().yaml("recipe.yaml", yaml).load().expect("recipe");
    let s = RunSummary::from_recipe(&recipe, 50, 1000);
    assert_eq!(s.base_model, "Qwen/Qwen2.5-0.5B");
    assert_eq!(s.model_name, "qwen-nr");
    assert_eq!(s.datasets, vec!["HuggingFaceH4/no_robots"]);
    assert_eq!(s.num_train_samples, 400.0, "max_steps * batch * accumulation");
    let hp = |k: &str| s.hyperparameters.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(hp("learning_rate"), Some("0.0002"));
    assert_eq!(hp("total_train_batch_size"), Some("8"));
    assert_eq!(hp("training_steps"), Some("50"));
    assert_eq!(hp("lora_r"), Some("8"));
    assert!(hp("quantization").is_some_and(|q| q.contains("nf4")));
    assert!(s.recipe_yaml.contains("model_name_or_path: Qwen/Qwen2.5-0.5B"));
    let opts = ReportOptions::from_recipe(&recipe);
    assert!(opts.tensorboard);
}

#[test]
fn a_dpo_run_leaves_its_reward_plot_and_says_dpo() {
    let tmp = TempDir::new("dpo");
    let out = tmp.0.join("adapter");
    let mut rep = Reporter::new(&out, ReportOptions::default()).expect("reporter");
    for i in 1..=5u64 {
        let mut l = train_log(i);
        l.metrics.insert("rewards/margins".into(), 0.1 * i as f64);
        l.metrics.insert("rewards/chosen".into(), 0.05 * i as f64);
        rep.log_train(&l).expect("log");
    }
    let mut eval = eval_log(5);
    eval.metrics.insert("eval_rewards/margins".into(), 0.4);
    rep.log_eval(&eval).expect("eval");
    let done = rep.finish(&RunSummary { trainer: config::Trainer::Dpo, ..summary() }).expect("finish");
    let names = files_in(&out);
    assert!(names.contains(&"rewards.png".to_owned()) && names.contains(&"loss.png".to_owned()), "{names:?}");
    assert!(done.files.iter().any(|f| f.ends_with("rewards.png")));
    let card = std::fs::read_to_string(out.join("README.md")).expect("card");
    assert!(card.contains("- dpo") && !card.contains("- sft"), "{card}");
    assert!(card.contains("DPOTrainer") && card.contains("trained with DPO"), "{card}");
    assert!(card.contains("![reward margin](rewards.png)"), "{card}");
    // The metrics ride along in the JSON lines, eval ones under their eval_ names.
    let log = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
    assert!(log.contains("\"rewards/margins\":0.5") && log.contains("\"eval_rewards/margins\":0.4"), "{log}");
    // An SFT run has no reward plot.
    let sft_out = tmp.0.join("sft");
    let mut rep = Reporter::new(&sft_out, ReportOptions::default()).expect("reporter");
    rep.log_train(&train_log(1)).expect("log");
    rep.finish(&summary()).expect("finish");
    assert!(!files_in(&sft_out).contains(&"rewards.png".to_owned()));
    let card = std::fs::read_to_string(sft_out.join("README.md")).expect("card");
    assert!(card.contains("- sft") && card.contains("trained with SFT"), "{card}");
}

/// A run on a local model and a local data file: the card links neither to the hub, names no
/// local path as `base_model` or a dataset in its front matter, and its quick start shows no
/// absolute path.
#[test]
fn a_local_run_card_links_nothing_to_the_hub() {
    let tmp = TempDir::new("local-card");
    let out = tmp.0.join("tiny-run");
    let mut rep = Reporter::new(&out, ReportOptions::default()).expect("reporter");
    rep.log_train(&train_log(1)).expect("log");
    // (`src` exists beside this test's working directory: a local model folder's stand-in.)
    let summary =
        RunSummary { base_model: "src".into(), datasets: vec!["data/tiny-chat.jsonl".into()], ..summary() };
    rep.finish(&summary).expect("finish");
    let card = std::fs::read_to_string(out.join("README.md")).expect("card");
    let front = card.split("---").nth(1).expect("front matter");
    assert!(!front.contains("base_model") && !front.contains("datasets"), "{front}");
    assert!(!card.contains("huggingface.co/datasets/data"), "{card}");
    assert!(card.contains("`src`") && card.contains("`data/tiny-chat.jsonl`"), "{card}");
    let abs = out.to_string_lossy().into_owned();
    assert!(std::path::Path::new(&abs).is_absolute() && !card.contains(&abs), "{card}");
    assert!(card.contains("from_pretrained(\"tiny-run\")"), "{card}");
}
