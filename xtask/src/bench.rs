//! `cargo xtask bench`: nibble against the Python reference stack of the venv (transformers +
//! bitsandbytes + PEFT + TRL) on the same inputs, in one run, so that the ratios are comparable:
//!
//! - codec: the quant crate's criterion benches against `scripts/bench_bnb.py` (bitsandbytes'
//!   CPU functions) and a memcpy of the same bytes;
//! - load: `CausalLm::load` quantizing a generated ~1B-parameter bf16 model to NF4
//!   (`crates/model-loader/examples/load_bench.rs`) against transformers' `from_pretrained` with
//!   `BitsAndBytesConfig` (`scripts/bench_load_hf.py`): time and peak RSS;
//! - train: QLoRA SFT steps by `target/release/sft` and by TRL's SFTTrainer, and DPO steps by
//!   `sft dpo` and by TRL's DPOTrainer (`scripts/bench_trl.py`), from the same recipe
//!   (`recipes/bench/`) and initial adapter: median step time, tokens/s, peak RSS and both loss
//!   curves.
//!
//! Peak RSS is polled from `/proc/<pid>/status` (VmHWM, RssAnon, RssFile) every few milliseconds,
//! the same way for both stacks. Generated models live in `$NIBBLE_HOME/bench/`; each run's logs in
//! `target/bench/<UTC time>/`. The report is printed and written to `target/bench/report.md`;
//! full runs also add it to docs/benchmarks.md as a dated section (replacing that day's section).

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::json::{self, Value};
use crate::setup::{self, Setup};
use crate::{cargo, check_status, fnv};

/// Which parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    codec: bool,
    load: bool,
    train: bool,
}

/// `cargo xtask bench`'s command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    quick: bool,
    /// Add the report to docs/benchmarks.md (default: full runs only).
    write: bool,
    parts: Parts,
    /// Repeats of each load and training run (default: 1 quick, 3 full for load, 2 for training).
    repeats: Option<usize>,
    /// `KEY=VALUE` pairs set for every measured process of both stacks (`--env`).
    env: Vec<(String, String)>,
    /// The command as typed, for the report.
    command: String,
}

/// Parses the arguments after `bench`.
pub fn parse_args(rest: &[String]) -> Result<Options> {
    let mut o = Options {
        quick: false,
        write: false,
        parts: Parts { codec: true, load: true, train: true },
        repeats: None,
        env: Vec::new(),
        command: format!("cargo xtask bench {}", rest.join(" ")).trim_end().to_owned(),
    };
    let mut write = None;
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => o.quick = true,
            "--write" => write = Some(true),
            "--no-write" => write = Some(false),
            "--only" => {
                let list = it.next().context("--only needs a list: codec,load,train")?;
                o.parts = Parts { codec: false, load: false, train: false };
                for part in list.split(',') {
                    match part {
                        "codec" => o.parts.codec = true,
                        "load" => o.parts.load = true,
                        "train" => o.parts.train = true,
                        other => bail!("--only: unknown part `{other}` (codec, load, train)"),
                    }
                }
            }
            "--env" => {
                let kv = it.next().context("--env needs KEY=VALUE")?;
                let (k, v) = kv.split_once('=').with_context(|| format!("--env {kv}: expected KEY=VALUE"))?;
                o.env.push((k.to_owned(), v.to_owned()));
            }
            "--repeats" => {
                let n = it.next().context("--repeats needs a number")?;
                o.repeats = Some(n.parse().ok().filter(|&n| n > 0).context("--repeats must be >= 1")?);
            }
            other => bail!("`bench` does not take `{other}`\n\n{}", crate::USAGE),
        }
    }
    let all = o.parts == Parts { codec: true, load: true, train: true };
    o.write = write.unwrap_or(!o.quick && all);
    Ok(o)
}

/// A generated benchmark model (scripts/make_bench_model.py) or the shipped tiny one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    Tiny,
    Llama150m,
    Llama1b,
}

impl Model {
    fn name(self) -> &'static str {
        match self {
            Model::Tiny => "tiny-llama",
            Model::Llama150m => "llama-150m",
            Model::Llama1b => "llama-1b",
        }
    }

    /// How the report names it.
    fn label(self) -> &'static str {
        match self {
            Model::Tiny => "tiny (115k params)",
            Model::Llama150m => "Llama 134M",
            Model::Llama1b => "Llama 1.1B",
        }
    }

    fn preset(self) -> Option<&'static str> {
        match self {
            Model::Tiny => None,
            Model::Llama150m => Some("150m"),
            Model::Llama1b => Some("1b"),
        }
    }

    fn recipe(self, objective: Objective) -> &'static str {
        match (self, objective) {
            (Model::Tiny, Objective::Sft) => "recipes/bench/tiny.yaml",
            (Model::Llama150m, Objective::Sft) => "recipes/bench/llama-150m.yaml",
            (Model::Llama1b, Objective::Sft) => "recipes/bench/llama-1b.yaml",
            (Model::Tiny, Objective::Dpo) => "recipes/bench/tiny-dpo.yaml",
            (Model::Llama150m | Model::Llama1b, Objective::Dpo) => "recipes/bench/llama-150m-dpo.yaml",
        }
    }
}

/// What the training rows train: SFT, or DPO on preference pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Objective {
    Sft,
    Dpo,
}

impl Objective {
    fn label(self) -> &'static str {
        match self {
            Objective::Sft => "SFT",
            Objective::Dpo => "DPO",
        }
    }

    /// `sft`'s subcommand (before the recipe).
    fn sft_command(self) -> &'static [&'static str] {
        match self {
            Objective::Sft => &[],
            Objective::Dpo => &["dpo"],
        }
    }

    /// bench_trl.py's command.
    fn trl_command(self) -> &'static str {
        match self {
            Objective::Sft => "train",
            Objective::Dpo => "train-dpo",
        }
    }

    /// TRL's trainer class.
    fn trl_trainer(self) -> &'static str {
        match self {
            Objective::Sft => "SFTTrainer",
            Objective::Dpo => "DPOTrainer",
        }
    }
}

/// A training precision / checkpointing setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bf16,
    Bf16Gc,
    Fp32,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Bf16, Variant::Bf16Gc, Variant::Fp32];

    fn label(self) -> &'static str {
        match self {
            Variant::Bf16 => "bf16",
            Variant::Bf16Gc => "bf16 + grad. ckpt",
            Variant::Fp32 => "fp32",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Variant::Bf16 => "bf16",
            Variant::Bf16Gc => "bf16-gc",
            Variant::Fp32 => "fp32",
        }
    }

    /// The recipe overrides that select it (the same flags for `sft` and bench_trl.py).
    fn overrides(self) -> [&'static str; 4] {
        match self {
            Variant::Bf16 => ["--dtype", "bfloat16", "--gradient_checkpointing", "false"],
            Variant::Bf16Gc => ["--dtype", "bfloat16", "--gradient_checkpointing", "true"],
            Variant::Fp32 => ["--dtype", "float32", "--gradient_checkpointing", "false"],
        }
    }
}

/// What one mode measures.
struct Plan {
    codec_shapes: &'static [&'static str],
    criterion_quick: bool,
    bnb_repeats: usize,
    load_model: Model,
    load_repeats: usize,
    /// Per model, the variants to train with their steps and repeats.
    train: Vec<(Model, Objective, Vec<Case>)>,
}

/// One training setting of one model.
#[derive(Debug, Clone, Copy)]
struct Case {
    variant: Variant,
    /// Optimizer steps per run.
    steps: u64,
    repeats: usize,
}

impl Case {
    /// Steps left out of step-time statistics (first-step allocation, lazy init): two, or one
    /// when a run is short (slow settings, where one step's overhead is lost in the noise).
    fn warmup(&self) -> usize {
        if self.steps >= 6 { 2 } else { 1 }
    }
}

/// The same steps and repeats for each of `variants`.
fn cases(variants: &[Variant], steps: u64, repeats: usize) -> Vec<Case> {
    variants.iter().map(|&variant| Case { variant, steps, repeats }).collect()
}

impl Plan {
    fn new(o: &Options) -> Plan {
        if o.quick {
            Plan {
                codec_shapes: &["4096x4096"],
                criterion_quick: true,
                bnb_repeats: 3,
                load_model: Model::Llama150m,
                load_repeats: o.repeats.unwrap_or(1),
                train: vec![
                    (Model::Tiny, Objective::Sft, cases(&Variant::ALL, 8, o.repeats.unwrap_or(1))),
                    (Model::Tiny, Objective::Dpo, cases(&Variant::ALL, 8, o.repeats.unwrap_or(1))),
                ],
            }
        } else {
            Plan {
                codec_shapes: &["4096x4096", "11008x4096"],
                criterion_quick: false,
                bnb_repeats: 5,
                load_model: Model::Llama1b,
                load_repeats: o.repeats.unwrap_or(3),
                train: vec![
                    (Model::Tiny, Objective::Sft, cases(&Variant::ALL, 12, o.repeats.unwrap_or(2))),
                    (Model::Tiny, Objective::Dpo, cases(&Variant::ALL, 12, o.repeats.unwrap_or(2))),
                    // bf16 matmuls take minutes per step on CPUs without native bf16 (see
                    // docs/benchmarks.md): fewer steps, one repeat there.
                    (Model::Llama150m, Objective::Sft, llama_cases(o)),
                    (Model::Llama150m, Objective::Dpo, llama_cases(o)),
                    // The scale people train: 3 steps of 2 x 512 tokens, bf16 with checkpointing.
                    (Model::Llama1b, Objective::Sft, cases(&[Variant::Bf16Gc], 3, o.repeats.unwrap_or(1))),
                ],
            }
        }
    }
}

/// The 134M model's cases: fp32 with 8 steps and two repeats; bf16 the same on CPUs with native
/// bf16 GEMMs (a step takes about a second there), else 3 steps once (minutes per step).
fn llama_cases(o: &Options) -> Vec<Case> {
    let mut c = cases(&[Variant::Fp32], 8, o.repeats.unwrap_or(2));
    let (steps, repeats) = if native_bf16_cpu() { (8, 2) } else { (3, 1) };
    c.extend(cases(&[Variant::Bf16, Variant::Bf16Gc], steps, o.repeats.unwrap_or(repeats)));
    c
}

/// Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX), the CPUs where torch's
/// bf16 GEMMs are fast (`/proc/cpuinfo`'s flags).
fn native_bf16_cpu() -> bool {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu_flags(&cpuinfo).split_whitespace().any(|f| f == "avx512_bf16" || f == "amx_bf16")
}

/// The first `flags` line of a `/proc/cpuinfo` text (empty where there is none).
fn cpu_flags(cpuinfo: &str) -> &str {
    cpuinfo.lines().find_map(|l| l.strip_prefix("flags")).unwrap_or_default()
}

/// Everything a run needs to find.
struct Ctx<'a> {
    root: &'a Path,
    env: &'a Setup,
    /// `--env` pairs.
    extra_env: &'a [(String, String)],
    /// This run's log folder.
    work: PathBuf,
    /// `$NIBBLE_HOME/bench`: generated models and initial adapters.
    cache: PathBuf,
    target: PathBuf,
    cores: usize,
}

impl Ctx<'_> {
    fn model_dir(&self, m: Model) -> PathBuf {
        match m {
            Model::Tiny => self.root.join("models/tiny-llama"),
            other => self.cache.join(other.name()),
        }
    }

    /// A command with the environment every measured child gets.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(self.root)
            .env("NIBBLE_PYTHON", &self.env.python)
            .env("NIBBLE_CACHE", self.work.join("nibble-cache"))
            .env("HF_DATASETS_CACHE", self.work.join("hf-datasets"))
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_DATASETS_OFFLINE", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            // The reference stack on the host's own CPU paths (the tests pin them; docs/reference-cpu-paths.md).
            .env("NIBBLE_REF_CPU", "native")
            .env_remove("NIBBLE_LOG");
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            cmd.env("OMP_NUM_THREADS", self.cores.to_string());
        }
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn python(&self, script: &str) -> Command {
        let mut cmd = self.command(&self.env.python);
        cmd.arg(self.root.join("scripts").join(script));
        cmd
    }
}

/// Runs the benchmarks and writes the report.
pub fn bench(root: &Path, env: &Setup, o: &Options) -> Result<()> {
    let started = Instant::now();
    let plan = Plan::new(o);
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let now = utc_now();
    let work = target.join("bench").join(now.stamp());
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let cache = setup::cache_dir()?.join("bench");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ctx = Ctx { root, env, extra_env: &o.env, work, cache, target, cores };
    let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("bench: logs in {}", ctx.work.display());

    step("building sft and the load_bench example in release");
    check_status(
        cargo(root, env).args(["build", "--release", "-p", "sft", "--bin", "sft"]).status(),
        "cargo build --release -p sft",
    )?;
    check_status(
        cargo(root, env)
            .args(["build", "--release", "-p", "model-loader", "--example", "load_bench"])
            .status(),
        "cargo build --release -p model-loader --example load_bench",
    )?;

    let mut report = Report::default();
    if o.parts.codec {
        report.codec = Some(codec(&ctx, &plan)?);
    }
    if o.parts.load {
        report.load = Some(load(&ctx, &plan)?);
    }
    if o.parts.train {
        for (model, objective, cases) in &plan.train {
            report.train.push(train(&ctx, *model, *objective, cases)?);
        }
    }
    let load_after = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let header = Header {
        date: now.minute(),
        quick: o.quick,
        command: o.command.clone(),
        machine: machine(cores),
        versions: versions(&ctx)?,
        load: format!(
            "{} at the start, {} at the end",
            load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            load_after.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ),
        minutes: started.elapsed().as_secs_f64() / 60.0,

        logs: ctx.work.strip_prefix(root).unwrap_or(&ctx.work).display().to_string(),
        env: o.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
    };
    let (heading, body) = render(&header, &report);
    let text = format!("{heading}\n\n{body}");
    println!("\n{text}");
    fs::write(ctx.target.join("bench").join("report.md"), &text)?;
    fs::write(ctx.work.join("report.md"), &text)?;
    if o.write {
        let path = root.join("docs/benchmarks.md");
        let doc = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        fs::write(&path, upsert_section(&doc, &heading, &body))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("bench: wrote the section \"{heading}\" of {}", path.display());
    } else {
        println!(
            "bench: report in {} (add --write to put it in docs/benchmarks.md)",
            ctx.target.join("bench/report.md").display()
        );
    }
    Ok(())
}

fn step(what: &str) {
    println!("\n==> bench: {what}");
}

// ---------------------------------------------------------------------------------------------
// Running and measuring a process.

/// What a measured process did.
#[derive(Debug, Clone, Default)]
struct Proc {
    wall_s: f64,
    /// Highest VmHWM seen (peak resident set, KiB).
    peak_kib: u64,
    /// Highest anonymous / file-backed resident memory seen (KiB).
    peak_anon_kib: u64,
    peak_file_kib: u64,
    stdout: String,
}

impl Proc {
    /// The last stdout line that is a JSON object.
    fn json_line(&self) -> Result<Value> {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("no JSON line in the output: {:?}", self.stdout))?;
        json::parse(line)
    }
}

/// `VmHWM`, `RssAnon`, `RssFile` of a process, in KiB (`None` once it has exited).
fn proc_memory(pid: u32) -> Option<[u64; 3]> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok())
    };
    Some([field("VmHWM:")?, field("RssAnon:")?, field("RssFile:")?])
}

/// Runs `cmd` to completion, its stderr into `log` (stdout into `log` + `.out` too), polling its
/// memory; fails with the log's tail when it fails.
fn measure(cmd: &mut Command, log: &Path) -> Result<Proc> {
    measure_until(cmd, log, None)
}

/// [`measure`], but the process is killed (and counts as finished) once `done()` holds; it is
/// asked every 100 ms.
fn measure_until(cmd: &mut Command, log: &Path, done: Option<&dyn Fn() -> bool>) -> Result<Proc> {
    let shown = format!("{cmd:?}");
    let err = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .with_context(|| format!("could not start {shown}"))?;
    let pid = child.id();
    let mut out = child.stdout.take().context("no stdout pipe")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let mut p = Proc::default();
    let mut polls = 0u64;
    let mut stopped = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some([hwm, anon, file]) = proc_memory(pid) {
            p.peak_kib = p.peak_kib.max(hwm);
            p.peak_anon_kib = p.peak_anon_kib.max(anon);
            p.peak_file_kib = p.peak_file_kib.max(file);
        }
        polls += 1;
        if !stopped && polls.is_multiple_of(20) && done.is_some_and(|d| d()) {
            let _ = child.kill();
            stopped = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    p.wall_s = start.elapsed().as_secs_f64();
    p.stdout = reader.join().unwrap_or_default();
    let mut out_path = log.as_os_str().to_owned();
    out_path.push(".out");
    fs::write(PathBuf::from(out_path), &p.stdout)?;
    if !status.success() && !stopped {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{shown} failed ({status}); the end of {}:\n{}", log.display(), tail.join("\n"));
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// Codec.

/// One codec operation on one shape.
#[derive(Debug, Clone)]
struct CodecRow {
    shape: String,
    /// Elements of the weight.
    n: f64,
    /// Criterion medians and their 95% intervals, seconds: quantize, dequantize to a new bf16
    /// tensor, dequantize into an existing one, dequantize to a new f32 tensor, memcpy, memcpy
    /// into fresh memory.
    nibble: [(f64, f64, f64); 6],
    /// bitsandbytes medians (min, max): quantize, dequantize, torch copy.
    bnb: [(f64, f64, f64); 3],
}

const CRITERION_BENCHES: [&str; 6] = [
    "quantize_nf4_bf16",
    "dequantize_nf4_to_BFloat16",
    "dequantize_nf4_into_BFloat16",
    "dequantize_nf4_to_Float",
    "memcpy_bf16",
    "memcpy_bf16_new",
];

fn codec(ctx: &Ctx<'_>, plan: &Plan) -> Result<Vec<CodecRow>> {
    step("codec: cargo bench -p quant --bench codec");
    let started = SystemTime::now();
    let mut cmd = cargo(ctx.root, ctx.env);
    cmd.args(["bench", "-p", "quant", "--bench", "codec", "--"]);
    if plan.criterion_quick {
        cmd.arg("--quick");
    }
    if plan.codec_shapes.len() == 1 {
        cmd.arg(format!("codec/{}/", plan.codec_shapes[0]));
    }
    measure(&mut cmd, &ctx.work.join("codec-criterion.log"))?;

    step("codec: scripts/bench_bnb.py (bitsandbytes CPU)");
    let bnb = measure(
        ctx.python("bench_bnb.py").args([
            "--json",
            "--shapes",
            &plan.codec_shapes.join(","),
            "--repeats",
            &plan.bnb_repeats.to_string(),
        ]),
        &ctx.work.join("codec-bnb.log"),
    )?;
    let bnb_lines: Vec<Value> =
        bnb.stdout.lines().filter(|l| l.starts_with('{')).map(json::parse).collect::<Result<_>>()?;

    let mut rows = Vec::new();
    for &shape in plan.codec_shapes {
        let (r, c) = shape.split_once('x').context("shape")?;
        let n = r.parse::<f64>()? * c.parse::<f64>()?;
        let mut nibble = [(0.0, 0.0, 0.0); 6];
        for (slot, bench) in nibble.iter_mut().zip(CRITERION_BENCHES) {
            let path = ctx
                .target
                .join("criterion")
                .join(format!("codec_{shape}"))
                .join(bench)
                .join("new/estimates.json");
            let fresh = fs::metadata(&path).and_then(|m| m.modified()).is_ok_and(|t| t >= started);
            if !fresh {
                bail!("criterion did not write {} in this run", path.display());
            }
            let v = json::parse(&fs::read_to_string(&path)?)?;
            let get = |k: &[&str]| v.num(k).with_context(|| format!("{}: no {k:?}", path.display()));
            *slot = (
                get(&["median", "point_estimate"])? * 1e-9,
                get(&["median", "confidence_interval", "lower_bound"])? * 1e-9,
                get(&["median", "confidence_interval", "upper_bound"])? * 1e-9,
            );
        }
        let mut bnb = [(0.0, 0.0, 0.0); 3];
        for (slot, op) in bnb.iter_mut().zip(["quantize", "dequantize", "memcpy"]) {
            let v = bnb_lines
                .iter()
                .find(|v| {
                    v.get("op") == Some(&Value::Str(op.into()))
                        && v.get("shape") == Some(&Value::Str(shape.into()))
                })
                .with_context(|| format!("bench_bnb.py gave no {op} for {shape}"))?;
            let get = |k: &str| v.num(&[k]).with_context(|| format!("bench_bnb.py: no {k}"));
            *slot = (get("median_s")?, get("min_s")?, get("max_s")?);
        }
        rows.push(CodecRow { shape: shape.to_owned(), n, nibble, bnb });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Load.

/// Load measurements: per repeat, the in-process report and the outside view.
#[derive(Debug, Clone, Default)]
struct LoadResult {
    model: Option<Model>,
    nibble: Vec<(Value, Proc)>,
    hf: Vec<(Value, Proc)>,
}

/// Makes a generated model if it is missing.
fn ensure_model(ctx: &Ctx<'_>, m: Model) -> Result<PathBuf> {
    let dir = ctx.model_dir(m);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    let preset = m.preset().with_context(|| format!("{} is missing", dir.display()))?;
    step(&format!("generating {} ({}) with scripts/make_bench_model.py, once", dir.display(), m.label()));
    measure(
        ctx.python("make_bench_model.py").arg(preset).arg(&dir),
        &ctx.work.join(format!("make-{}.log", m.name())),
    )?;
    Ok(dir)
}

/// Reads every file of `dir` once so both stacks start from a warm page cache.
fn warm_page_cache(dir: &Path) -> Result<()> {
    let mut buf = vec![0u8; 1 << 22];
    for entry in fs::read_dir(dir)? {
        let mut f = fs::File::open(entry?.path())?;
        while f.read(&mut buf)? > 0 {}
    }
    Ok(())
}

fn load(ctx: &Ctx<'_>, plan: &Plan) -> Result<LoadResult> {
    let m = plan.load_model;
    let dir = ensure_model(ctx, m)?;
    let example = ctx.target.join("release/examples/load_bench");
    let mut res = LoadResult { model: Some(m), ..LoadResult::default() };
    for rep in 0..plan.load_repeats {
        warm_page_cache(&dir)?;
        step(&format!("load {} ({}/{}): nibble", m.label(), rep + 1, plan.load_repeats));
        let p = measure(
            ctx.command(&example).arg(&dir).arg("bf16"),
            &ctx.work.join(format!("load-nibble-{rep}.log")),
        )?;
        res.nibble.push((p.json_line()?, p));
        step(&format!("load {} ({}/{}): transformers + bitsandbytes", m.label(), rep + 1, plan.load_repeats));
        let p = measure(
            ctx.python("bench_load_hf.py").arg(&dir).arg("bf16"),
            &ctx.work.join(format!("load-hf-{rep}.log")),
        )?;
        res.hf.push((p.json_line()?, p));
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------------
// Training.

/// One logged optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StepLog {
    step: u64,
    loss: f64,
    num_tokens: f64,
    elapsed_s: f64,
}

/// Reads a log.jsonl (nibble's, or bench_trl.py's with the same keys).
fn read_steps(path: &Path) -> Result<Vec<StepLog>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v = json::parse(line)?;
        let Some(loss) = v.num(&["loss"]) else { continue };
        let get = |k: &str| v.num(&[k]).with_context(|| format!("{}: a line without `{k}`", path.display()));
        out.push(StepLog {
            step: get("step")? as u64,
            loss,
            num_tokens: get("num_tokens")?,
            elapsed_s: get("elapsed_s")?,
        });
    }
    Ok(out)
}

/// One training run of one stack.
#[derive(Debug, Clone)]
struct Run {
    steps: Vec<StepLog>,
    proc: Proc,
}

impl Run {
    /// (seconds, tokens) of each step.
    fn step_times(&self) -> Vec<(f64, f64)> {
        let mut prev = (0.0, 0.0);
        self.steps
            .iter()
            .map(|s| {
                let d = (s.elapsed_s - prev.0, s.num_tokens - prev.1);
                prev = (s.elapsed_s, s.num_tokens);
                d
            })
            .collect()
    }
}

/// Both stacks' runs of one variant.
#[derive(Debug, Clone)]
struct VariantResult {
    case: Case,
    nibble: Vec<Run>,
    trl: Vec<Run>,
    /// The tiny model's TRL run on bitsandbytes' portable (AVX2) paths, for the loss comparison:
    /// on the host's native paths an AVX-512 CPU dequantizes the tiny model's 160-wide rows
    /// wrongly (docs/reference-cpu-paths.md), so the timed runs' losses are not the reference's.
    trl_portable: Option<Run>,
    /// `sft --estimate-memory`'s total for this variant, MiB.
    estimate_mib: Option<f64>,
    /// `sft --measure-floor` on nibble's matmul path, and on torch's own (`cpu_matmul: native`,
    /// TRL's), for the tokens the steps trained.
    floor: Option<Floor>,
    trl_floor: Option<Floor>,
    /// nibble's time per step by phase (its log's `time per step by phase`), first repeat.
    phases: Vec<(String, f64)>,
}

impl VariantResult {
    /// The TRL run whose losses nibble's are compared with: the portable-path run where there is
    /// one, else the first timed run.
    fn loss_reference(&self) -> Option<&Run> {
        self.trl_portable.as_ref().or(self.trl.first())
    }
}

/// The flags both stacks' training runs take after the recipe: the variant's overrides, the
/// model, the shared initial adapter, the steps and the output folder.
fn run_args(v: Variant, model_arg: &str, init_arg: &str, steps: u64, out: &Path) -> Vec<String> {
    let mut a: Vec<String> = v.overrides().iter().map(|s| (*s).to_owned()).collect();
    a.extend([
        "--model_name_or_path".into(),
        model_arg.to_owned(),
        "--lora_init_adapter".into(),
        init_arg.to_owned(),
        "--max_steps".into(),
        steps.to_string(),
        "--output_dir".into(),
        out.display().to_string(),
    ]);
    a
}

/// A step's floor (`sft --measure-floor`), scaled to the tokens a measured step trained.
#[derive(Debug, Clone, Default)]
struct Floor {
    /// Matmuls + dequantize traffic, seconds.
    total_s: f64,
    matmul_s: f64,
    dequant_s: f64,
    /// Matmul FLOP the model needs per step (no recompute).
    model_flops: f64,
    /// Matmul seconds by `part/pass`.
    by: Vec<(String, f64)>,
}

impl Floor {
    /// From `--measure-floor`'s JSON line, times `scale` (measured tokens / the floor's tokens).
    fn from_json(v: &Value, scale: f64) -> Option<Floor> {
        let f = v.get("floor")?;
        let by =
            f.get("by").map_or_else(Vec::new, numbers).into_iter().map(|(k, x)| (k, x * scale)).collect();
        Some(Floor {
            total_s: f.num(&["floor_s"])? * scale,
            matmul_s: f.num(&["matmul_s"])? * scale,
            dequant_s: f.num(&["dequant_s"])? * scale,
            model_flops: f.num(&["model_flops"])? * scale,
            by,
        })
    }

    /// Matmul seconds of the parts whose `part/pass` name passes `keep`.
    fn sum(&self, keep: impl Fn(&str) -> bool) -> f64 {
        self.by.iter().filter(|(k, _)| keep(k)).map(|(_, s)| s).sum()
    }
}

/// The JSON object of the `time per step by phase (seconds): {...}` line of an `sft` log.
fn read_phases(log: &Path) -> Vec<(String, f64)> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().rev().find(|l| l.contains("time per step by phase")) else {
        return Vec::new();
    };
    let Some(start) = line.find('{') else { return Vec::new() };
    json::parse(&line[start..]).map_or_else(|_| Vec::new(), |v| numbers(&v))
}

/// The numeric members of a JSON object, in order (none for anything else).
fn numbers(v: &Value) -> Vec<(String, f64)> {
    match v {
        Value::Obj(m) => m.iter().filter_map(|(k, v)| v.num(&[]).map(|x| (k.clone(), x))).collect(),
        _ => Vec::new(),
    }
}

/// The `total` line of `sft RECIPE --estimate-memory` ("  total   447.46 MiB"), in MiB.
fn parse_estimate(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.trim_start().starts_with("total"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: f64 = words.next()?.parse().ok()?;
    let scale = match words.next()? {
        "B" => 1.0 / 1048576.0,
        "KiB" => 1.0 / 1024.0,
        "MiB" => 1.0,
        "GiB" => 1024.0,
        "TiB" => 1048576.0,
        _ => return None,
    };
    Some(value * scale)
}

#[derive(Debug, Clone)]
struct TrainResult {
    model: Model,
    objective: Objective,
    tokens_per_step: String,
    variants: Vec<VariantResult>,
}

fn train(ctx: &Ctx<'_>, model: Model, objective: Objective, cases: &[Case]) -> Result<TrainResult> {
    let dir = ensure_model(ctx, model)?;
    let recipe = ctx.root.join(model.recipe(objective));
    let recipe_text = fs::read_to_string(&recipe).with_context(|| format!("reading {}", recipe.display()))?;
    let model_arg = dir.to_str().context("model path is not UTF-8")?.to_owned();
    // The shared initial adapter, made once per model and recipe.
    let init = ctx.cache.join(format!(
        "init-{}-{:016x}",
        model.name(),
        fnv::hash_fields(&[recipe_text.as_bytes(), model_arg.as_bytes()])
    ));
    if !init.join("adapter_model.safetensors").is_file() {
        step(&format!("making the initial adapter {} (PEFT)", init.display()));
        let tmp = init.with_extension("tmp");
        let _ = fs::remove_dir_all(&tmp);
        measure(
            ctx.python("bench_trl.py")
                .arg("init")
                .arg(&recipe)
                .arg(&tmp)
                .args(["--model_name_or_path", &model_arg]),
            &ctx.work.join(format!("init-{}.log", model.name())),
        )?;
        fs::rename(&tmp, &init)?;
    }
    let init_arg = init.to_str().context("adapter path is not UTF-8")?.to_owned();
    let batch = yaml_number(&recipe_text, "per_device_train_batch_size").unwrap_or(0);
    let length = yaml_number(&recipe_text, "max_length").unwrap_or(0);
    let mut result = TrainResult {
        model,
        objective,
        tokens_per_step: format!("{batch} x {length} tokens"),
        variants: cases
            .iter()
            .map(|&case| VariantResult {
                case,
                nibble: vec![],
                trl: vec![],
                trl_portable: None,
                estimate_mib: None,
                floor: None,
                trl_floor: None,
                phases: Vec::new(),
            })
            .collect(),
    };
    let sft = ctx.target.join("release/sft");
    // What `--estimate-memory` predicts for each variant, to set beside the measured peak.
    for vr in &mut result.variants {
        let out = ctx
            .command(&sft)
            .args(objective.sft_command())
            .arg(&recipe)
            .args(vr.case.variant.overrides())
            .args(["--model_name_or_path", &model_arg, "--estimate-memory"])
            .stderr(Stdio::null())
            .output()
            .with_context(|| format!("running {} --estimate-memory", sft.display()))?;
        vr.estimate_mib = parse_estimate(&String::from_utf8_lossy(&out.stdout));
    }
    let most = cases.iter().map(|c| c.repeats).max().unwrap_or(0);
    for rep in 0..most {
        for vr in result.variants.iter_mut().filter(|vr| rep < vr.case.repeats) {
            let (v, steps) = (vr.case.variant, vr.case.steps);
            let tag = format!("{}-{}-{}-{rep}", model.name(), objective.label().to_lowercase(), v.slug());
            let args = |out: &Path| run_args(v, &model_arg, &init_arg, steps, out);
            // Alternate which stack goes first, so slow drifts in machine load hit both.
            for stack in if rep % 2 == 0 { ["nibble", "trl"] } else { ["trl", "nibble"] } {
                step(&format!(
                    "{} {} {} ({}/{}, {steps} steps): {}",
                    objective.label(),
                    model.label(),
                    v.label(),
                    rep + 1,
                    vr.case.repeats,
                    if stack == "nibble" {
                        "nibble (target/release/sft)".to_owned()
                    } else {
                        format!("TRL {}", objective.trl_trainer())
                    }
                ));
                let out = ctx.work.join(format!("train-{stack}-{tag}"));
                if stack == "nibble" {
                    // Stopped once the run's summary is logged: the greedy sample `sft` prints
                    // after training is not part of the measurement.
                    let log = out.join("log.jsonl");
                    let trained = || fs::read_to_string(&log).is_ok_and(|t| t.contains("\"train_runtime\""));
                    let proc = measure_until(
                        ctx.command(&sft).args(objective.sft_command()).arg(&recipe).args(args(&out)),
                        &ctx.work.join(format!("train-nibble-{tag}.log")),
                        Some(&trained),
                    )?;
                    if vr.nibble.is_empty() {
                        vr.phases = read_phases(&ctx.work.join(format!("train-nibble-{tag}.log")));
                    }
                    vr.nibble.push(Run { steps: read_steps(&log)?, proc });
                } else {
                    let log = ctx.work.join(format!("train-trl-{tag}.jsonl"));
                    let proc = measure(
                        ctx.python("bench_trl.py")
                            .arg(objective.trl_command())
                            .arg(&recipe)
                            .arg(&log)
                            .args(args(&out)),
                        &ctx.work.join(format!("train-trl-{tag}.log")),
                    )?;
                    vr.trl.push(Run { steps: read_steps(&log)?, proc });
                    let _ = fs::remove_dir_all(&out);
                }
            }
        }
    }
    // The tiny model's losses against TRL pinned to its portable paths (see `trl_portable`).
    if model == Model::Tiny {
        for vr in &mut result.variants {
            let v = vr.case.variant;
            let tag = format!("{}-{}-{}-portable", model.name(), objective.label().to_lowercase(), v.slug());
            step(&format!(
                "{} {} {}: TRL on its portable CPU paths (loss only)",
                objective.label(),
                model.label(),
                v.label()
            ));
            let out = ctx.work.join(format!("train-trl-{tag}"));
            let log = ctx.work.join(format!("train-trl-{tag}.jsonl"));
            let mut cmd = ctx.python("bench_trl.py");
            cmd.env("NIBBLE_REF_CPU", "avx2")
                .arg(objective.trl_command())
                .arg(&recipe)
                .arg(&log)
                .args(run_args(v, &model_arg, &init_arg, vr.case.steps, &out));
            let proc = measure(&mut cmd, &ctx.work.join(format!("train-trl-{tag}.log")))?;
            vr.trl_portable = Some(Run { steps: read_steps(&log)?, proc });
            let _ = fs::remove_dir_all(&out);
        }
    }
    // The floor of each variant, for the tokens its measured steps trained.
    for vr in &mut result.variants {
        let w = vr.case.warmup();
        let steps: Vec<(f64, f64)> =
            vr.nibble.iter().flat_map(|r| r.step_times().into_iter().skip(w)).collect();
        let tokens = steps.iter().map(|s| s.1).sum::<f64>() / steps.len().max(1) as f64;
        // Rows per step: DPO runs chosen and rejected together; the floor's sequences are the
        // steps' mean row length (pads left out: a floor counts only the work the tokens need).
        let rows = batch * if objective == Objective::Dpo { 2 } else { 1 };
        if tokens <= 0.0 || rows == 0 {
            continue;
        }
        let seq = ((tokens / rows as f64).round() as u64).max(1);
        let scale = tokens / (rows * seq) as f64;
        let measure_floor = |native: bool, round: u8| -> Result<Option<Floor>> {
            let tag = format!(
                "{}-{}-{}{}-{round}",
                model.name(),
                objective.label().to_lowercase(),
                vr.case.variant.slug(),
                if native { "-native" } else { "" }
            );
            step(&format!(
                "floor of {} {} {}{}",
                objective.label(),
                model.label(),
                vr.case.variant.label(),
                if native { " (torch's own matmul path, TRL's)" } else { "" }
            ));
            let mut cmd = ctx.command(&sft);
            cmd.args(objective.sft_command()).arg(&recipe).args(vr.case.variant.overrides()).args([
                "--model_name_or_path",
                &model_arg,
                "--max_length",
                &seq.to_string(),
            ]);
            if native {
                cmd.args(["--cpu_matmul", "native"]);
            }
            let p = measure(cmd.arg("--measure-floor"), &ctx.work.join(format!("floor-{tag}.log")))?;
            Ok(Floor::from_json(&p.json_line()?, scale))
        };
        // nibble's floor twice, before and after TRL's, keeping the faster (see `faster`).
        let first = measure_floor(false, 1)?;
        let trl = if vr.case.variant == Variant::Fp32 { None } else { measure_floor(true, 1)? };
        vr.floor = faster(first, measure_floor(false, 2)?);
        vr.trl_floor = if vr.case.variant == Variant::Fp32 { vr.floor.clone() } else { trl };
    }
    Ok(result)
}

/// The faster of two measurements of one floor: a floor is the machine at its best, so one
/// timed in a slower phase of a shared machine must not flatter a step / floor ratio (the same
/// code's 134M floor measured 645 ms and 821 ms in two runs, docs/benchmarks.md).
fn faster(a: Option<Floor>, b: Option<Floor>) -> Option<Floor> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.total_s < a.total_s { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// A top-level `key: <integer>` of a YAML file (enough for the bench recipes' shapes).
fn yaml_number(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split('#').next()?.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Statistics.

/// Median of `v` (NaN when empty).
fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// Linear-interpolated quantile `q` of `v` (NaN when empty).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// Step-time statistics of a stack's runs, warmup steps left out, pooled over repeats: median,
/// 25th and 75th percentiles of the step times, tokens/s over those steps, the median per repeat.
struct StepStats {
    median: f64,
    p25: f64,
    p75: f64,
    tokens_per_s: f64,
    per_repeat: Vec<f64>,
    peak_kib: f64,
}

fn step_stats(runs: &[Run], warmup: usize) -> StepStats {
    let mut all = Vec::new();
    let (mut secs, mut toks) = (0.0, 0.0);
    let mut per_repeat = Vec::new();
    for r in runs {
        let times: Vec<(f64, f64)> = r.step_times().into_iter().skip(warmup).collect();
        per_repeat.push(median(&times.iter().map(|t| t.0).collect::<Vec<_>>()));
        for (s, t) in times {
            all.push(s);
            secs += s;
            toks += t;
        }
    }
    StepStats {
        median: median(&all),
        p25: quantile(&all, 0.25),
        p75: quantile(&all, 0.75),
        tokens_per_s: toks / secs,
        per_repeat,
        peak_kib: median(&runs.iter().map(|r| r.proc.peak_kib as f64).collect::<Vec<_>>()),
    }
}

/// Largest `|a - b| / |b|` over the steps both curves have.
fn max_rel_diff(a: &[StepLog], b: &[StepLog]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x.loss - y.loss) / y.loss).abs()).fold(0.0, f64::max)
}

// ---------------------------------------------------------------------------------------------
// The report.

#[derive(Debug, Default)]
struct Report {
    codec: Option<Vec<CodecRow>>,
    load: Option<LoadResult>,
    train: Vec<TrainResult>,
}

struct Header {
    date: String,
    quick: bool,
    command: String,
    machine: String,
    versions: String,
    load: String,
    minutes: f64,
    logs: String,
    /// `--env` pairs, shown.
    env: String,
}

fn machine(cores: usize) -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let flags = cpu_flags(&cpuinfo);
    let simd: Vec<&str> = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .map_or_else(|| "?".into(), |k| format!("{:.0} GiB", k / 1048576.0));
    format!("{model}, {cores} cores ({}), {mem} RAM", simd.join(", "))
}

fn versions(ctx: &Ctx<'_>) -> Result<String> {
    let out = |cmd: &mut Command| -> String {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .map_or_else(String::new, |o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let python = out(Command::new(&ctx.env.python).args([
        "-c",
        "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in \
         ['torch', 'transformers', 'bitsandbytes', 'peft', 'trl', 'accelerate']))",
    ]));
    let rustc = out(Command::new("rustc").arg("-V"));
    let commit = out(Command::new("git").current_dir(ctx.root).args(["rev-parse", "--short", "HEAD"]));
    let dirty = !out(Command::new("git").current_dir(ctx.root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_empty();
    let commit = if commit.is_empty() { "(not a git checkout)".to_owned() } else { commit };
    Ok(format!(
        "nibble {commit}{}, {rustc}, libtorch {} (tch 0.24); reference: {python}",
        if dirty { " (with uncommitted changes)" } else { "" },
        ctx.env.torch_version
    ))
}

/// A codec time: milliseconds below a second.
fn ms(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.01 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

fn secs(s: f64) -> String {
    if s.is_nan() {
        "—".into()
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.01 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

fn mib(kib: f64) -> String {
    if kib >= 1048576.0 { format!("{:.2} GiB", kib / 1048576.0) } else { format!("{:.0} MiB", kib / 1024.0) }
}

fn ratio(a: f64, b: f64) -> String {
    if !(a.is_finite() && b.is_finite()) || b == 0.0 {
        return "—".into();
    }
    format!("{:.2}", a / b)
}

fn ok(met: bool) -> &'static str {
    if met { "met" } else { "**not met**" }
}

/// The section heading and its body.
fn render(h: &Header, r: &Report) -> (String, String) {
    let heading = format!("## `cargo xtask bench`{}, {}", if h.quick { " --quick" } else { "" }, h.date);
    let mut b = String::new();
    let _ = writeln!(b, "Machine: {}. Load average {}.", h.machine, h.load);
    let _ = writeln!(b, "Versions: {}.", h.versions);
    if !h.env.is_empty() {
        let _ = writeln!(b, "Environment of every measured process (both stacks): `{}`.", h.env);
    }
    let _ = writeln!(
        b,
        "Command: `{}` ({:.0} minutes; logs in `{}`). Ratios are nibble / reference, measured \
         in this run; below 1 is better for nibble.\n",
        h.command, h.minutes, h.logs
    );
    // Headline ratios.
    let _ = writeln!(b, "| measurement | nibble | reference | nibble / reference | target |");
    let _ = writeln!(b, "|---|---|---|---|---|");
    if let Some(rows) = &r.codec {
        for row in rows {
            let (q, bq) = (row.nibble[0].0, row.bnb[0].0);
            let _ = writeln!(
                b,
                "| quantize {} bf16 -> NF4 | {} | {} (bitsandbytes CPU) | {:.3} ({:.0}x faster) | <= 0.05 (>= 20x): {} |",
                row.shape,
                ms(q),
                ms(bq),
                q / bq,
                bq / q,
                ok(bq / q >= 20.0)
            );
            let qbw = quant_bandwidth(row);
            let _ = writeln!(
                b,
                "| quantize {} bf16 -> NF4, bandwidth vs memcpy | {:.0}% ({}) | (bitsandbytes: see the codec table) | — | >= 50%: {} |",
                row.shape,
                qbw * 100.0,
                ms(q),
                ok(qbw >= 0.5)
            );
            // Like against like: into existing memory against a memcpy into existing memory
            // (what the 4-bit layer does, into its reused buffer); a new tensor against a copy
            // into fresh memory (both pay the page faults of fresh memory).
            let bw = dequant_bandwidth(row);
            let _ = writeln!(
                b,
                "| dequantize {} NF4 -> bf16 in existing memory, bandwidth vs memcpy | {:.0}% ({}) | (bitsandbytes has no such call) | — | >= 60%: {} |",
                row.shape,
                bw.1 * 100.0,
                ms(row.nibble[2].0),
                ok(bw.1 >= 0.6)
            );
            let _ = writeln!(
                b,
                "| dequantize {} NF4 -> new bf16 tensor, bandwidth vs a copy into fresh memory | {:.0}% ({}) | {:.0}% ({}, bitsandbytes, vs its memcpy) | — | — |",
                row.shape,
                bw.3 * 100.0,
                ms(row.nibble[1].0),
                bw.2 * 100.0,
                ms(row.bnb[1].0),
            );
        }
    }
    if let Some(l) = &r.load {
        let label = l.model.map_or("", Model::label);
        let nt = median(&l.nibble.iter().filter_map(|(v, _)| v.num(&["load_s"])).collect::<Vec<_>>());
        let ht = median(&l.hf.iter().filter_map(|(v, _)| v.num(&["load_s"])).collect::<Vec<_>>());
        let nr = median(&l.nibble.iter().map(|(_, p)| p.peak_kib as f64).collect::<Vec<_>>());
        let hr = median(&l.hf.iter().map(|(_, p)| p.peak_kib as f64).collect::<Vec<_>>());
        let _ = writeln!(
            b,
            "| load + quantize {label}: time | {} | {} (transformers + bnb) | {} | <= 0.5: {} |",
            secs(nt),
            secs(ht),
            ratio(nt, ht),
            ok(nt / ht <= 0.5)
        );
        let _ = writeln!(
            b,
            "| load + quantize {label}: peak RSS | {} | {} | {} | <= 0.6: {} |",
            mib(nr),
            mib(hr),
            ratio(nr, hr),
            ok(nr / hr <= 0.6)
        );
    }
    for t in &r.train {
        for v in &t.variants {
            let w = v.case.warmup();
            let (n, p) = (step_stats(&v.nibble, w), step_stats(&v.trl, w));
            let loss = v
                .nibble
                .first()
                .zip(v.loss_reference())
                .map_or(f64::NAN, |(a, b)| max_rel_diff(&a.steps, &b.steps));
            let target = matches!(v.case.variant, Variant::Bf16 | Variant::Bf16Gc);
            let _ = writeln!(
                b,
                "| {} {} {}: median step | {} | {} (TRL) | {} | {} |",
                t.objective.label(),
                t.model.label(),
                v.case.variant.label(),
                secs(n.median),
                secs(p.median),
                ratio(n.median, p.median),
                if target {
                    format!("<= 0.5 at loss within 2%: {}", ok(n.median / p.median <= 0.5 && loss <= 0.02))
                } else {
                    "—".into()
                }
            );
            if let (Some(f), Some(tf)) = (&v.floor, &v.trl_floor) {
                let _ = writeln!(
                    b,
                    "| {} {} {}: step / floor (matmuls + dequantize traffic) | {:.2} | {:.2} (TRL) | — | {} |",
                    t.objective.label(),
                    t.model.label(),
                    v.case.variant.label(),
                    n.median / f.total_s,
                    p.median / tf.total_s,
                    if target && t.model != Model::Tiny {
                        format!("<= 1.4: {}", ok(n.median / f.total_s <= 1.4))
                    } else {
                        "—".into()
                    }
                );
            }
            let _ = writeln!(
                b,
                "| {} {} {}: peak RSS | {} | {} | {} | {} |",
                t.objective.label(),
                t.model.label(),
                v.case.variant.label(),
                mib(n.peak_kib),
                mib(p.peak_kib),
                ratio(n.peak_kib, p.peak_kib),
                if target { format!("<= 0.5: {}", ok(n.peak_kib / p.peak_kib <= 0.5)) } else { "—".into() }
            );
        }
    }
    if let Some(rows) = &r.codec {
        render_codec(&mut b, rows);
    }
    if let Some(l) = &r.load {
        render_load(&mut b, l);
    }
    for t in &r.train {
        render_train(&mut b, t);
    }
    (heading, b)
}

/// Quantize's bandwidth (bf16 read, codes and absmax written) as a fraction of the memcpy's.
fn quant_bandwidth(row: &CodecRow) -> f64 {
    let bytes = row.n * 2.0 + row.n / 2.0 + row.n / 64.0 * 4.0;
    bytes / row.nibble[0].0 / (row.n * 4.0 / row.nibble[4].0)
}

/// (nibble into a new tensor, nibble into an existing one, bitsandbytes, nibble into a new tensor
/// against a copy into fresh memory) dequantize bandwidth as a fraction of the memcpy bandwidth
/// measured beside each (bytes read + written per second).
fn dequant_bandwidth(row: &CodecRow) -> (f64, f64, f64, f64) {
    let bytes = row.n / 2.0 + row.n / 64.0 * 4.0 + row.n * 2.0;
    let memcpy = |t: f64| row.n * 4.0 / t;
    (
        bytes / row.nibble[1].0 / memcpy(row.nibble[4].0),
        bytes / row.nibble[2].0 / memcpy(row.nibble[4].0),
        bytes / row.bnb[1].0 / memcpy(row.bnb[2].0),
        bytes / row.nibble[1].0 / memcpy(row.nibble[5].0),
    )
}

fn render_codec(b: &mut String, rows: &[CodecRow]) {
    let _ = writeln!(b, "\n### Codec\n");
    let _ = writeln!(
        b,
        "Criterion medians with their 95% intervals (`cargo bench -p quant --bench codec`) against \
         `scripts/bench_bnb.py` (median, min-max of its repeats); NF4, blocksize 64, bf16 weights. \
         Bandwidth counts bytes read + written, against a copy of the bf16 weight into an existing \
         tensor measured in the same process (and, for ops that return a new tensor, against a \
         copy into fresh memory, whose page faults they pay too).\n"
    );
    let _ = writeln!(
        b,
        "| shape | operation | nibble | bitsandbytes CPU | nibble speed-up | nibble bandwidth / memcpy |"
    );
    let _ = writeln!(b, "|---|---|---|---|---|---|");
    let iv = |(m, lo, hi): (f64, f64, f64)| format!("{} ({}-{})", ms(m), ms(lo), ms(hi));
    for row in rows {
        let bw = dequant_bandwidth(row);
        let q_bw = quant_bandwidth(row);
        let ops: [(&str, usize, Option<usize>, String); 6] = [
            ("quantize (bf16 in)", 0, Some(0), format!("{:.0}%", q_bw * 100.0)),
            (
                "dequantize to a new bf16 tensor",
                1,
                Some(1),
                format!("{:.0}% ({:.0}% of a copy into fresh memory)", bw.0 * 100.0, bw.3 * 100.0),
            ),
            ("dequantize into an existing bf16 tensor", 2, None, format!("{:.0}%", bw.1 * 100.0)),
            ("dequantize to a new f32 tensor", 3, None, String::new()),
            ("copy of the bf16 weight (memcpy)", 4, Some(2), "100%".into()),
            ("copy of the bf16 weight into fresh memory", 5, None, String::new()),
        ];
        for (name, i, j, bandwidth) in ops {
            let (theirs, speedup) = match j {
                Some(j) => (iv(row.bnb[j]), format!("{:.1}x", row.bnb[j].0 / row.nibble[i].0)),
                None => ("(no such call)".into(), String::new()),
            };
            let _ = writeln!(
                b,
                "| {} | {name} | {} | {theirs} | {speedup} | {bandwidth} |",
                row.shape,
                iv(row.nibble[i])
            );
        }
    }
}

fn render_load(b: &mut String, l: &LoadResult) {
    let label = l.model.map_or("", Model::label);
    let _ = writeln!(b, "\n### Load + quantize to NF4 ({label}, bf16 sharded safetensors)\n");
    let _ = writeln!(
        b,
        "nibble: `CausalLm::load` with NF4 + double quantization \
         (`crates/model-loader/examples/load_bench.rs`); reference: `from_pretrained(..., \
         quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", \
         bnb_4bit_use_double_quant=True), device_map=\"cpu\")` (`scripts/bench_load_hf.py`). Page \
         cache warm for both. Medians of {} repeats (min-max); peak RSS is VmHWM, anon/file the \
         highest RssAnon/RssFile polled.\n",
        l.nibble.len()
    );
    let _ = writeln!(b, "| | nibble | transformers + bnb | ratio |");
    let _ = writeln!(b, "|---|---|---|---|");
    /// One row: its name, how to read it from a run, how to show it.
    struct Row(&'static str, fn(&Value, &Proc) -> f64, fn(f64) -> String);
    let col = |runs: &[(Value, Proc)], f: fn(&Value, &Proc) -> f64| -> (f64, f64, f64) {
        let v: Vec<f64> = runs.iter().map(|(v, p)| f(v, p)).collect();
        (median(&v), quantile(&v, 0.0), quantile(&v, 1.0))
    };
    let rows = [
        Row("load call (in process)", |v, _| v.num(&["load_s"]).unwrap_or(f64::NAN), secs),
        Row("whole process (start, imports, exit)", |_, p| p.wall_s, secs),
        Row("peak RSS", |_, p| p.peak_kib as f64, mib),
        Row("peak anonymous RSS", |_, p| p.peak_anon_kib as f64, mib),
        Row("peak file-backed RSS (mapped checkpoint, libraries)", |_, p| p.peak_file_kib as f64, mib),
        Row(
            "RSS before loading (runtime, imports)",
            |v, _| v.num(&["start_rss_kib"]).unwrap_or(f64::NAN),
            mib,
        ),
    ];
    for Row(name, f, fmt) in rows {
        let (n, h) = (col(&l.nibble, f), col(&l.hf, f));
        let spread = |x: (f64, f64, f64)| {
            if l.nibble.len() > 1 { format!("{} ({}-{})", fmt(x.0), fmt(x.1), fmt(x.2)) } else { fmt(x.0) }
        };
        let _ = writeln!(b, "| {name} | {} | {} | {} |", spread(n), spread(h), ratio(n.0, h.0));
    }
    if let Some((v, p)) = l.nibble.first() {
        let g = |k: &str| v.num(&[k]).unwrap_or(f64::NAN);
        let bound = g("model_4bit_bytes") + g("largest_linear_f32_bytes");
        let _ = writeln!(
            b,
            "\nIssue 4's bound: the 4-bit model is {} ({} of it NF4 linears; embeddings and head \
             stay bf16); its largest linear in f32 is {}, its largest tensor (embeddings) in f32 {}. \
             nibble's peak RSS {} is {:.2}x \"4-bit model + one linear in f32\" ({}); at the end of \
             loading it holds {} anonymous (the model) and {} file-backed.",
            mib(g("model_4bit_bytes") / 1024.0),
            mib(g("quantized_linear_bytes") / 1024.0),
            mib(g("largest_linear_f32_bytes") / 1024.0),
            mib(g("largest_tensor_f32_bytes") / 1024.0),
            mib(p.peak_kib as f64),
            p.peak_kib as f64 * 1024.0 / bound,
            mib(bound / 1024.0),
            mib(g("rss_anon_kib")),
            mib(g("rss_file_kib")),
        );
    }
    if let Some((v, _)) = l.hf.first() {
        let _ = writeln!(
            b,
            "transformers reports a memory footprint of {} for its 4-bit model.",
            mib(v.num(&["footprint_bytes"]).unwrap_or(f64::NAN) / 1024.0)
        );
    }
}

fn render_train(b: &mut String, t: &TrainResult) {
    let (what, trainer) = (t.objective.label(), t.objective.trl_trainer());
    let _ = writeln!(b, "\n### QLoRA {what}, {} ({} per step)\n", t.model.label(), t.tokens_per_step);
    let data = match t.objective {
        Objective::Sft => "wrapped packing",
        Objective::Dpo => "preference pairs (chosen and rejected in one batch, the reference each step)",
    };
    let _ = writeln!(
        b,
        "`target/release/sft {}{}` against TRL's {trainer} (`scripts/bench_trl.py`), same recipe \
         and initial adapter, dataset order, {data}, no autocast; `bf16` is a bf16 model \
         computing in bf16, `fp32` an f32 one. Step times from each stack's per-step log, the first \
         step(s) left out (warmup), pooled over the repeats: median (25th-75th percentile); \
         per-repeat medians in brackets. Tokens/s: input tokens (no padding) over those steps. Peak \
         RSS: whole process (load included), median over repeats; `--estimate-memory` is nibble's \
         estimate before loading for the same recipe (model, adapters, optimizer, activations; not \
         the runtime: libtorch, tokenizer, allocator slack). On CPUs without native bf16 GEMMs \
         nibble runs `bf16` matmuls in f32 (`cpu_matmul: auto`); TRL runs torch's bf16 kernels.\n",
        t.objective.sft_command().iter().map(|c| format!("{c} ")).collect::<String>(),
        t.model.recipe(t.objective)
    );
    if t.variants.iter().any(|v| v.trl_portable.is_some()) {
        let _ = writeln!(
            b,
            "Losses (the `loss max rel. diff` column and the loss table) are compared with one more \
             TRL run per variant on bitsandbytes' portable CPU paths (`NIBBLE_REF_CPU=avx2`, as the \
             tests pin them): on an AVX-512 host its native dequantize is wrong on this model's \
             160-wide rows (docs/reference-cpu-paths.md). Times and RSS are the native runs'.\n"
        );
    }
    let _ = writeln!(
        b,
        "| variant | steps (warmup) x repeats | nibble step | TRL step | ratio | nibble tok/s | TRL tok/s | nibble peak RSS | TRL peak RSS | ratio | nibble `--estimate-memory` | loss max rel. diff |"
    );
    let _ = writeln!(b, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let fmt = |s: &StepStats| {
        let reps: Vec<String> = s.per_repeat.iter().map(|&x| secs(x)).collect();
        format!("{} ({}-{}) [{}]", secs(s.median), secs(s.p25), secs(s.p75), reps.join(", "))
    };
    for v in &t.variants {
        let w = v.case.warmup();
        let (n, p) = (step_stats(&v.nibble, w), step_stats(&v.trl, w));
        let loss = v
            .nibble
            .first()
            .zip(v.loss_reference())
            .map_or(f64::NAN, |(a, b)| max_rel_diff(&a.steps, &b.steps));
        let _ = writeln!(
            b,
            "| {} | {} ({w}) x {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {:.1e} |",
            v.case.variant.label(),
            v.case.steps,
            v.nibble.len(),
            fmt(&n),
            fmt(&p),
            ratio(n.median, p.median),
            n.tokens_per_s,
            p.tokens_per_s,
            mib(n.peak_kib),
            mib(p.peak_kib),
            ratio(n.peak_kib, p.peak_kib),
            v.estimate_mib.map_or_else(|| "?".to_owned(), |e| mib(e * 1024.0)),
            loss
        );
    }
    render_floor(b, t);
    // Loss curves side by side (first repeat; both stacks are deterministic).
    let _ = write!(b, "\nLoss per step, nibble / TRL:\n\n| step |");
    for v in &t.variants {
        let _ = write!(b, " {} |", v.case.variant.label());
    }
    let _ = write!(b, "\n|---|");
    for _ in &t.variants {
        let _ = write!(b, "---|");
    }
    let _ = writeln!(b);
    let n_steps =
        t.variants.iter().filter_map(|v| v.nibble.first().map(|r| r.steps.len())).max().unwrap_or(0);
    for i in 0..n_steps {
        let _ = write!(b, "| {} |", i + 1);
        for v in &t.variants {
            let a = v.nibble.first().and_then(|r| r.steps.get(i)).map_or(f64::NAN, |s| s.loss);
            let c = v.loss_reference().and_then(|r| r.steps.get(i)).map_or(f64::NAN, |s| s.loss);
            if a.is_nan() && c.is_nan() {
                let _ = write!(b, " |");
            } else {
                let _ = write!(b, " {a:.4} / {c:.4} |");
            }
        }
        let _ = writeln!(b);
    }
}

/// Each variant against the machine's floor, and where nibble's step goes.
fn render_floor(b: &mut String, t: &TrainResult) {
    if t.variants.iter().all(|v| v.floor.is_none()) {
        return;
    }
    let _ = writeln!(
        b,
        "\nAgainst the floor (`sft --measure-floor` in this run, for the measured steps' tokens: the \
         step's matmuls, each shape timed alone through the same libtorch, forward, backward, \
         checkpointing's recompute and DPO's reference pass, on nibble's matmul path and on \
         torch's own (`--cpu_matmul native`, TRL's), plus the 4-bit weights' dequantize traffic at \
         memcpy bandwidth; nibble's floor is the faster of two measurements, before and after TRL's). \
         Model FLOP/s: the matmul FLOP the step needs (recompute left out) over \
         the median step.\n"
    );
    let _ = writeln!(
        b,
        "| variant | floor: matmuls + dequantize | nibble step / floor | TRL floor (torch's path) | TRL step / its floor | nibble model TFLOP/s | TRL model TFLOP/s | floor's TFLOP/s |"
    );
    let _ = writeln!(b, "|---|---|---|---|---|---|---|---|");
    for v in &t.variants {
        let (Some(f), Some(tf)) = (&v.floor, &v.trl_floor) else { continue };
        let w = v.case.warmup();
        let (n, p) = (step_stats(&v.nibble, w), step_stats(&v.trl, w));
        let _ = writeln!(
            b,
            "| {} | {} ({} + {}) | {:.2} | {} | {:.2} | {:.3} | {:.3} | {:.3} |",
            v.case.variant.label(),
            secs(f.total_s),
            secs(f.matmul_s),
            secs(f.dequant_s),
            n.median / f.total_s,
            secs(tf.total_s),
            p.median / tf.total_s,
            f.model_flops / n.median / 1e12,
            tf.model_flops / p.median / 1e12,
            f.model_flops / f.matmul_s / 1e12,
        );
    }
    // Where nibble's step goes: its phase timers beside the matmul floor of each phase.
    let with_phases: Vec<&VariantResult> =
        t.variants.iter().filter(|v| !v.phases.is_empty() && v.floor.is_some()).collect();
    if with_phases.is_empty() {
        return;
    }
    let _ = write!(
        b,
        "\nWhere nibble's step goes (its phase timers, mean per step after the first, first repeat), \
         each phase beside the floor of the matmuls it runs (`time / matmul floor`); `other` is \
         the rest of the step (moving the batch, metrics, logging):\n\n| phase |"
    );
    for v in &with_phases {
        let _ = write!(b, " {} |", v.case.variant.label());
    }
    let _ = write!(b, "\n|---|");
    for _ in &with_phases {
        let _ = write!(b, "---|");
    }
    let _ = writeln!(b);
    let phase_floor = |f: &Floor, phase: &str| -> Option<f64> {
        Some(match phase {
            "reference" => f.sum(|k| k.ends_with("/reference")),
            "forward" => f.sum(|k| k.ends_with("/forward") && !k.starts_with("head/")),
            "head" => f.sum(|k| k.starts_with("head/") && !k.ends_with("/reference")),
            "backward" => {
                f.sum(|k| (k.ends_with("/backward") || k.ends_with("/recompute")) && !k.starts_with("head/"))
            }
            _ => return None,
        })
    };
    for phase in ["reference", "forward", "head", "backward", "optimizer", "other", "step_s"] {
        let _ = write!(b, "| {} |", if phase == "step_s" { "step (phase timers' wall)" } else { phase });
        for v in &with_phases {
            let Some(f) = &v.floor else { continue };
            let time = v.phases.iter().find(|(k, _)| k == phase).map_or(f64::NAN, |(_, x)| *x);
            let cell = match phase_floor(f, phase) {
                Some(fl) if fl > 0.0 => format!("{} / {} ({:.1}x)", secs(time), secs(fl), time / fl),
                _ => secs(time),
            };
            let _ = write!(b, " {cell} |");
        }
        let _ = writeln!(b);
    }
    let _ = write!(b, "| dequantize traffic at memcpy speed (inside forward, backward, reference) |");
    for v in &with_phases {
        let _ = write!(b, " {} |", v.floor.as_ref().map_or_else(String::new, |f| secs(f.dequant_s)));
    }
    let _ = writeln!(b);
}

/// `doc` with the section that starts at the line `heading` replaced by `body` (up to the next
/// `## ` heading), or with the section appended when there is none.
fn upsert_section(doc: &str, heading: &str, body: &str) -> String {
    let section = format!("{heading}\n\n{}\n", body.trim_end());
    let lines: Vec<&str> = doc.lines().collect();
    if let Some(start) = lines.iter().position(|l| *l == heading) {
        let end = lines[start + 1..]
            .iter()
            .position(|l| l.starts_with("## "))
            .map_or(lines.len(), |e| start + 1 + e);
        let mut out = lines[..start].join("\n");
        if start > 0 {
            out.push('\n');
        }
        out.push_str(&section);
        if end < lines.len() {
            out.push('\n');
            out.push_str(&lines[end..].join("\n"));
            out.push('\n');
        }
        out
    } else {
        format!("{}\n\n{section}", doc.trim_end())
    }
}

// ---------------------------------------------------------------------------------------------
// Dates without a date crate.

/// A UTC wall-clock time.
struct Utc {
    y: i64,
    m: u32,
    d: u32,
    hh: u64,
    mm: u64,
    ss: u64,
}

impl Utc {
    fn date(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.y, self.m, self.d)
    }
    /// The date and the minute, which name a report's section: a later run appends its own
    /// section instead of replacing an earlier one (and the notes written under it).
    fn minute(&self) -> String {
        format!("{} {:02}:{:02} UTC", self.date(), self.hh, self.mm)
    }
    fn stamp(&self) -> String {
        format!("{:04}{:02}{:02}-{:02}{:02}{:02}", self.y, self.m, self.d, self.hh, self.mm, self.ss)
    }
}

fn utc_now() -> Utc {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    Utc { y, m, d, hh: secs % 86400 / 3600, mm: secs % 3600 / 60, ss: secs % 60 }
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn estimate_total_is_read_in_mib() {
        let out = "estimated peak memory on cpu:\n  LoRA weights  10.69 MiB\n  total  1.50 GiB\n";
        assert_eq!(super::parse_estimate(out), Some(1536.0));
        assert_eq!(super::parse_estimate("  total  447.46 MiB\n"), Some(447.46));
        assert_eq!(super::parse_estimate("nothing here"), None);
    }

    use super::*;

    #[test]
    fn the_faster_floor_is_kept() {
        let f = |t: f64| Some(Floor { total_s: t, ..Floor::default() });
        assert_eq!(faster(f(0.8), f(0.65)).map(|x| x.total_s), Some(0.65));
        assert_eq!(faster(f(0.6), f(0.65)).map(|x| x.total_s), Some(0.6));
        assert_eq!(faster(None, f(0.7)).map(|x| x.total_s), Some(0.7));
        assert!(faster(None, None).is_none());
    }

    #[test]
    fn floors_scale_and_phases_parse() -> Result<()> {
        let v = json::parse(
            r#"{"floor": {"floor_s": 2.0, "matmul_s": 1.5, "dequant_s": 0.5, "model_flops": 1e9,
                "by": {"base/forward": 0.5, "head/backward": 0.25, "base/recompute": 0.75}}}"#,
        )?;
        let f = Floor::from_json(&v, 0.5).context("a floor")?;
        assert_eq!((f.total_s, f.matmul_s, f.dequant_s, f.model_flops), (1.0, 0.75, 0.25, 5e8));
        assert_eq!(f.sum(|k| k.ends_with("/recompute") || k.ends_with("/forward")), 0.625);
        assert!(Floor::from_json(&json::parse(r#"{"other": 1}"#)?, 1.0).is_none());
        let dir = std::env::temp_dir().join(format!("nibble-bench-phases-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let log = dir.join("run.log");
        fs::write(
            &log,
            "INFO step 1/3\n2026-12-07T08:46:49Z  INFO time per step by phase (seconds): \
             {\"steps\":2,\"step_s\":1.5,\"forward\":0.5,\"other\":0.01}\n",
        )?;
        let phases = read_phases(&log);
        assert_eq!(phases.iter().find(|(k, _)| k == "forward").map(|p| p.1), Some(0.5));
        assert_eq!(phases.len(), 4);
        assert!(read_phases(&dir.join("absent.log")).is_empty());
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_the_command_line() -> Result<()> {
        let o = parse_args(&args("--quick"))?;
        assert!(o.quick && !o.write && o.parts.train);
        assert_eq!(o.command, "cargo xtask bench --quick");
        let o = parse_args(&[])?;
        assert!(!o.quick && o.write);
        let o = parse_args(&args("--only codec,train --repeats 3 --env OMP_WAIT_POLICY=PASSIVE"))?;
        assert_eq!(o.env, [("OMP_WAIT_POLICY".to_owned(), "PASSIVE".to_owned())]);
        assert_eq!(o.parts, Parts { codec: true, load: false, train: true });
        assert!(!o.write, "a partial run does not write docs/benchmarks.md unless asked");
        assert_eq!(o.repeats, Some(3));
        assert!(parse_args(&args("--only gpu")).is_err());
        assert!(parse_args(&args("--repeats 0")).is_err());
        assert!(parse_args(&args("--fast")).is_err());
        assert!(parse_args(&args("--env X")).is_err());
        Ok(())
    }

    #[test]
    fn dates_from_unix_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_786), (2026, 11, 29));
    }

    #[test]
    fn statistics() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.25), 2.0);
        assert!(median(&[]).is_nan());
        let run = |e: &[(f64, f64)]| Run {
            steps: e
                .iter()
                .enumerate()
                .map(|(i, &(t, n))| StepLog { step: i as u64 + 1, loss: 1.0, num_tokens: n, elapsed_s: t })
                .collect(),
            proc: Proc { peak_kib: 100, ..Proc::default() },
        };
        // Steps of 5 s (warmup), then 1, 2, 3 s with 10 tokens each.
        let s = step_stats(&[run(&[(5.0, 10.0), (6.0, 20.0), (8.0, 30.0), (11.0, 40.0)])], 1);
        assert_eq!((s.median, s.tokens_per_s, s.peak_kib), (2.0, 5.0, 100.0));
    }

    #[test]
    fn reads_yaml_numbers() {
        let y = "max_length: 256\nper_device_train_batch_size: 4  # comment\nmax_length_x: 1\n";
        assert_eq!(yaml_number(y, "max_length"), Some(256));
        assert_eq!(yaml_number(y, "per_device_train_batch_size"), Some(4));
        assert_eq!(yaml_number(y, "seed"), None);
    }

    #[test]
    fn sections_are_replaced_or_appended() {
        let doc =
            "# B\n\nintro\n\n## old\n\nx\n\n## `cargo xtask bench`, 2026-11-29\n\nstale\n\n## later\n\ny\n";
        let h = "## `cargo xtask bench`, 2026-11-29";
        let out = upsert_section(doc, h, "fresh\n");
        assert_eq!(
            out,
            "# B\n\nintro\n\n## old\n\nx\n\n## `cargo xtask bench`, 2026-11-29\n\nfresh\n\n## later\n\ny\n"
        );
        let out = upsert_section("# B\n\nintro\n", h, "new");
        assert_eq!(out, "# B\n\nintro\n\n## `cargo xtask bench`, 2026-11-29\n\nnew\n");
        // At the end of the file.
        let out = upsert_section(&out, h, "newer");
        assert_eq!(out, "# B\n\nintro\n\n## `cargo xtask bench`, 2026-11-29\n\nnewer\n");
    }

    #[test]
    fn codec_targets_are_judged_from_the_same_run() -> Result<()> {
        // 1M elements: quantize moves 2.5625 MB, the copy 4 MB; with the copy at 1 ms, a 1.28 ms
        // quantize runs at 50% of its bandwidth and a 1.3 ms one under it.
        let row = |quantize: f64| CodecRow {
            shape: "1024x1024".into(),
            n: 1024.0 * 1024.0,
            nibble: [
                (quantize, 0.0, 0.0),
                (1e-3, 0.0, 0.0),
                (1e-3, 0.0, 0.0),
                (1e-3, 0.0, 0.0),
                (1e-3, 0.0, 0.0),
                (1e-3, 0.0, 0.0),
            ],
            bnb: [(1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.0, 0.0)],
        };
        assert!((quant_bandwidth(&row(1.28125e-3)) - 0.5).abs() < 1e-9);
        let header = Header {
            date: "2026-11-29".into(),
            quick: false,
            command: "cargo xtask bench".into(),
            machine: "m".into(),
            versions: "v".into(),
            load: "l".into(),
            minutes: 1.0,
            logs: "target/bench".into(),
            env: String::new(),
        };
        for (quantize, verdict) in [(1.2e-3, ">= 50%: met"), (1.3e-3, ">= 50%: **not met**")] {
            let report = Report { codec: Some(vec![row(quantize)]), load: None, train: Vec::new() };
            let (_, body) = render(&header, &report);
            let line = body
                .lines()
                .find(|l| l.contains("bandwidth vs memcpy") && l.contains("quantize"))
                .context("no quantize bandwidth row")?;
            assert!(line.ends_with(&format!("{verdict} |")), "{line}");
        }
        Ok(())
    }
}
