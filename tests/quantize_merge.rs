//! `sft quantize` and `sft merge` as a user runs them: a quantized model loads pre-quantized in
//! nibble with the logits of quantizing while loading, and in transformers + bitsandbytes with
//! the logits of transformers quantizing on load; a merged model's weights are exactly
//! `W + B A * scaling`, its logits are the unmerged adapter's, and transformers loads it with the
//! weights PEFT's own `merge_and_unload` gives.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lora::{LoraConfig, LoraInit, TargetModules};
use model_loader::{CausalLm, Checkpoint, LoadOptions};
use quant::QuantType;
use quant::ops::QuantizeOptions;
use quant::state::RawTensor;
use tch::{Kind, Tensor};

use nibble_tests::repo;

fn tiny() -> PathBuf {
    repo().join("models/tiny-llama")
}

fn golden(name: &str) -> PathBuf {
    repo().join("crates/model-loader/tests/golden").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-qm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sft(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(nibble_tests::sft()).args(args).env_remove("NIBBLE_LOG").output().unwrap()
}

fn ok(out: &Output) {
    assert!(out.status.success(), "sft failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &std::ffi::OsStr {
    p.as_os_str()
}

fn load(dir: &Path, opts: LoadOptions) -> CausalLm {
    // These are comparisons with transformers' logits on the same bytes: bf16 models compute with
    // torch's own bf16 kernels in both stacks (every test here loads through this function).
    quant::ops::CpuMatmul::Native.set();
    CausalLm::load(dir, &opts, &mut |_, _| {}).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The input every comparison runs: `(arange(24).view(2, 12) * 7 + 3) % vocab`.
fn ids(vocab: i64) -> Tensor {
    (Tensor::arange(24, (Kind::Int64, tch::Device::Cpu)).view([2, 12]) * 7 + 3).remainder(vocab)
}

fn logits(model: &CausalLm) -> Tensor {
    let vocab = model.config().shape.vocab as i64;
    tch::no_grad(|| model.forward(&ids(vocab), None, None)).unwrap().to_kind(Kind::Float)
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-12)
}

fn python() -> Option<String> {
    match std::env::var("NIBBLE_PYTHON") {
        Ok(p) => Some(p),
        Err(_) => {
            eprintln!("skipped the transformers half: NIBBLE_PYTHON is not set (run `cargo xtask setup`)");
            None
        }
    }
}

fn run_python(python: &str, script: &str, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = Command::new(python)
        .env("TORCHDYNAMO_DISABLE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn save_logits(path: &Path, t: &Tensor) {
    let t = t.contiguous();
    let mut data = vec![0u8; t.numel() * 4];
    t.copy_data_u8(&mut data, t.numel());
    let raw = RawTensor {
        name: "logits".into(),
        dtype: "F32".into(),
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    };
    quant::file::write(path, &[raw], &Default::default()).unwrap();
}

/// A copy of the tiny model with every tensor in bf16 (and config.json saying so).
fn tiny_bf16(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (tensors, meta) = quant::file::read(&tiny().join("model.safetensors")).unwrap();
    let converted: Vec<RawTensor> = tensors
        .into_iter()
        .map(|t| {
            let v: Vec<f32> =
                t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let b = Tensor::from_slice(&v).to_kind(Kind::BFloat16);
            let mut data = vec![0u8; v.len() * 2];
            b.copy_data_u8(&mut data, v.len());
            RawTensor { name: t.name, dtype: "BF16".into(), shape: t.shape, data }
        })
        .collect();
    quant::file::write(&dir.join("model.safetensors"), &converted, &meta).unwrap();
    let config = std::fs::read_to_string(tiny().join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"dtype\": \"float32\"", "\"dtype\": \"bfloat16\""),
    )
    .unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// sft quantize

#[test]
fn quantize_writes_what_nibble_loads_pre_quantized() {
    let root = scratch("quantize");
    let out = root.join("tiny-4bit");
    let run = sft(&[
        "quantize".as_ref(),
        s(&tiny()),
        s(&out),
        "--double-quant".as_ref(),
        "--quant-type".as_ref(),
        "fp4".as_ref(),
        "--max-shard-size".as_ref(),
        "40KB".as_ref(),
    ]);
    ok(&run);
    assert!(out.join("model.safetensors.index.json").is_file(), "sharded at 40KB");
    let pre = load(&out, LoadOptions::default());
    assert!(pre.config().prequantized);
    let quant = QuantizeOptions { quant_type: QuantType::Fp4, blocksize: 64, double_quant: true };
    let on_load = load(&tiny(), LoadOptions { quantize: Some(quant), ..LoadOptions::default() });
    assert!(logits(&pre).equal(&logits(&on_load)), "pre-quantized differs from quantized while loading");

    // A non-empty output is refused (exit 2) and left alone; --overwrite replaces it.
    let before = std::fs::read(out.join("config.json")).unwrap();
    let again = sft(&["quantize".as_ref(), s(&tiny()), s(&out)]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("is not empty (use --overwrite"), "{}", stderr(&again));
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), before);
    ok(&sft(&["quantize".as_ref(), s(&tiny()), s(&out), "--overwrite".as_ref()]));
    assert!(out.join("model.safetensors").is_file() && !out.join("model.safetensors.index.json").exists());
    let names: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "no temporary directory is left: {names:?}");
    let _ = std::fs::remove_dir_all(&root);
}

/// PEFT loads an adapter nibble trained on a mixture with `all-linear` (attention linears, and
/// as `target_parameters` the router and both expert banks, in PEFT's key nesting and layout),
/// and gives nibble's logits with it; `sft merge` folds it into the checkpoint's own router and
/// per-expert linears, which transformers loads with the same logits.
const PEFT_MOE_CHECK: &str = r#"
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel

base, adapter, nibble_logits = sys.argv[1:4]
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
vocab = m.config.vocab_size
ids = (torch.arange(24).view(2, 12) * 7 + 3) % vocab
with torch.no_grad():
    got = m(input_ids=ids).logits.float()
want = load_file(nibble_logits)["logits"]
keys = sorted(k for k in load_file(adapter + "/adapter_model.safetensors") if ".layers.0." in k)
out = {"rel": ((got - want).abs().max() / want.abs().max()).item(), "keys": keys}
if len(sys.argv) > 4:
    merged, info = AutoModelForCausalLM.from_pretrained(sys.argv[4], dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        mine = merged(input_ids=ids).logits.float()
    out["merged_rel"] = ((mine - want).abs().max() / want.abs().max()).item()
    out["merged_missing"] = list(info["missing_keys"]) + list(info["unexpected_keys"])
print(json.dumps(out))
"#;

#[test]
fn a_mixtures_expert_and_router_adapters_load_in_peft() {
    let Some(py) = python() else { return };
    let root = scratch("peft-moe");
    let model = repo().join("tests/golden/families/mixtral/model");
    let recipe = repo().join("tests/golden/families/mixtral/recipe.yaml");
    let out = root.join("run");
    let run = nibble_tests::sft_in(&root.join("cache"))
        .arg(&recipe)
        .args(["--output_dir", out.to_str().unwrap(), "--max_steps", "3"])
        .output()
        .unwrap();
    ok(&run);
    // nibble's logits with its adapter on the fp32 base (experts dense here, as in transformers).
    let mut base = load(&model, LoadOptions::default());
    let slots = sft::params::slots(&base);
    let (linears, tensors) = base.adaptable_mut();
    let (_adapters, made) = lora::inject_from_with_params(linears, tensors, &slots, &out).unwrap();
    assert_eq!(made.len(), 3 * 2, "router and both banks in each of 2 layers");
    sft::params::install(&mut base, made).unwrap();
    save_logits(&root.join("nibble.safetensors"), &logits(&base));
    let merged = root.join("merged");
    ok(&merge(&model, &out, &merged, &[]));
    let r = run_python(
        &py,
        PEFT_MOE_CHECK,
        &[s(&model), s(&out), s(&root.join("nibble.safetensors")), s(&merged)],
    );
    eprintln!("PEFT on nibble's MoE adapter: {r}");
    assert!(r["rel"].as_f64().unwrap() <= 1e-5, "{r}");
    // The merge: each expert's slice of the banks' updates in its own linears, the router's in it.
    assert!(r["merged_rel"].as_f64().unwrap() <= 1e-5, "{r}");
    assert_eq!(r["merged_missing"], serde_json::json!([]), "{r}");
    let keys: Vec<&str> = r["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    for k in [
        "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight",
        "base_model.model.model.layers.0.mlp.experts.lora_B.weight",
        "base_model.model.model.layers.0.mlp.gate.lora_A.weight",
    ] {
        assert!(keys.contains(&k), "{k} not in {keys:?}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A mixture of experts quantized by `sft quantize`: every expert's linears in 4 bits under the
/// checkpoint's own per-expert names (bitsandbytes' tensor layout), the routers left in float, and
/// nibble reloads it without quantizing, with the logits of quantizing while loading.
#[test]
fn quantized_experts_keep_their_names_and_reload_unchanged() {
    let root = scratch("quantize-moe");
    for (family, expert) in [
        ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2"),
        ("qwen3moe", "model.layers.1.mlp.experts.3.down_proj"),
    ] {
        let out = root.join(family);
        ok(&sft(&["quantize".as_ref(), s(&golden(family)), s(&out), "--double-quant".as_ref()]));
        let (tensors, _) = quant::file::read(&out.join("model.safetensors")).unwrap();
        let find = |name: String| tensors.iter().find(|t| t.name == name);
        let w = find(format!("{expert}.weight")).unwrap_or_else(|| panic!("{family}: {expert}.weight"));
        assert_eq!(w.dtype, "U8", "{family}: an expert's weight is packed 4-bit");
        assert!(find(format!("{expert}.weight.absmax")).is_some(), "{family}: its quant state");
        let router = if family == "mixtral" { "block_sparse_moe" } else { "mlp" };
        let gate = find(format!("model.layers.1.{router}.gate.weight")).expect("router");
        assert_eq!(gate.dtype, "F32", "{family}: the router stays float");
        let pre = load(&out, LoadOptions::default());
        assert!(pre.config().prequantized);
        let quant = QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true };
        let on_load = load(&golden(family), LoadOptions { quantize: Some(quant), ..LoadOptions::default() });
        assert!(
            logits(&pre).equal(&logits(&on_load)),
            "{family}: pre-quantized differs from quantized while loading"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn quantize_takes_a_hub_id_from_the_cache_with_symlinked_files() {
    // The layout huggingface_hub leaves: refs/main -> a snapshot whose files link to blobs.
    let root = scratch("hub");
    let repo = root.join("hub/models--org--tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in std::fs::read_dir(tiny()).unwrap() {
        let f = f.unwrap();
        let blob = repo.join("blobs").join(f.file_name());
        std::fs::copy(f.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(f.file_name())).unwrap();
    }
    let out = root.join("out");
    let run = Command::new(nibble_tests::sft())
        .args(["quantize".as_ref(), "org/tiny".as_ref(), s(&out)])
        .env("HF_HUB_CACHE", root.join("hub"))
        .env_remove("NIBBLE_LOG")
        .output()
        .unwrap();
    ok(&run);
    let meta = std::fs::symlink_metadata(out.join("tokenizer.json")).unwrap();
    assert!(meta.is_file(), "the file is copied, not the link");
    assert!(load(&out, LoadOptions::default()).config().prequantized);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_arguments_exit_2_and_missing_models_are_named() {
    let root = scratch("args");
    for bad in [
        vec!["quantize"],
        vec!["quantize", "m", "o", "--blocksize", "100"],
        vec!["quantize", "m", "o", "--quant-type", "int4"],
        vec!["quantize", "m", "o", "--frobnicate"],
        vec!["merge", "--model", "m", "--adapter", "a"],
        vec!["merge", "--model", "m", "--adapter", "a", "--out", "o", "--dtype", "fp8"],
    ] {
        let args: Vec<&std::ffi::OsStr> = bad.iter().map(|a| a.as_ref()).collect();
        let out = sft(&args);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with("error: ") && err.contains("--help"), "{bad:?}: {err}");
    }
    let missing = root.join("no-such-model");
    let out = sft(&["quantize".as_ref(), s(&missing), s(&root.join("o"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no-such-model"), "{}", stderr(&out));
    assert!(!root.join("o").exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// Load nibble's quantized output in transformers (with bitsandbytes on the CPU): keys, logits
/// against transformers quantizing the source on load and against nibble's logits, and the
/// bytes and config.json transformers itself saves for the same model.
const TRANSFORMERS_QUANTIZE_CHECK: &str = r#"
import json, os, sys, tempfile
import nibble_refcpu, torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as s:
                for k in s.keys():
                    out[k] = s.get_tensor(k)
    return out

def logits(m):
    # The 4-bit path every CPU takes (an AVX512-BF16 host would repack for its fused kernel,
    # which asserts out_features % 32 == 0, and save the repacked absmax).
    nibble_refcpu.portable_4bit(m)
    vocab = m.config.vocab_size
    ids = (torch.arange(24).view(2, 12) * 7 + 3) % vocab
    with torch.no_grad():
        return m(input_ids=ids).logits.float()

def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

def check(src, ours, quant_type, double_quant, nibble_logits):
    loaded, info = AutoModelForCausalLM.from_pretrained(ours, device_map="cpu", output_loading_info=True)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map="cpu")
    mine = logits(loaded)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        same_config = open(os.path.join(tmp, "config.json")).read() == open(os.path.join(ours, "config.json")).read()
        theirs, ours_t = tensors(tmp), tensors(ours)
        differing = sorted(k for k in theirs.keys() & ours_t.keys()
                           if theirs[k].dtype != ours_t[k].dtype or theirs[k].shape != ours_t[k].shape
                           or not torch.equal(theirs[k], ours_t[k]))
        key_diff = sorted(theirs.keys() ^ ours_t.keys())
    return {
        "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
        "is_4bit": bool(getattr(loaded, "is_loaded_in_4bit", False)),
        "rel_vs_transformers": rel(mine, logits(ref)),
        "rel_vs_nibble": rel(mine, load_file(nibble_logits)["logits"]),
        "same_config": same_config, "differing": differing, "key_diff": key_diff,
    }

print(json.dumps([check(*case) for case in json.loads(sys.argv[1])]))
"#;

#[test]
fn transformers_loads_the_quantized_model_with_its_own_logits() {
    let Some(py) = python() else { return };
    let root = scratch("tf-quantize");
    tiny_bf16(&root.join("tiny-bf16"));
    // (source, flags, quant type, double quant, bytes equal to bitsandbytes' CPU quantization)
    let cases: [(PathBuf, &[&str], QuantType, bool, bool); 8] = [
        (tiny(), &[], QuantType::Nf4, false, true),
        (golden("gemma2"), &[], QuantType::Nf4, false, true),
        (golden("gemma3"), &[], QuantType::Nf4, false, true),
        (golden("phi3"), &[], QuantType::Nf4, false, true),
        (root.join("tiny-bf16"), &["--max-shard-size", "30KB"], QuantType::Nf4, false, true),
        (golden("llama"), &["--double-quant"], QuantType::Nf4, true, false),
        (golden("qwen3"), &[], QuantType::Nf4, false, true),
        // nibble quantizes as bitsandbytes' CUDA kernel does; its CPU path picks other FP4
        // codes and 8-bit absmax codes near thresholds (quant's codec.rs lists each rule).
        (tiny(), &["--quant-type", "fp4", "--double-quant"], QuantType::Fp4, true, false),
    ];
    let mut specs = Vec::new();
    for (i, (src, flags, qt, dq, _)) in cases.iter().enumerate() {
        let out = root.join(format!("case{i}"));
        let mut args: Vec<&std::ffi::OsStr> = vec!["quantize".as_ref(), s(src), s(&out)];
        args.extend(flags.iter().map(std::ffi::OsStr::new));
        ok(&sft(&args));
        // transformers keeps the checkpoint's dtype for what is not quantized; so does nibble here.
        let bf16 = model_loader::HfConfig::from_dir(src).unwrap().dtype.as_deref() == Some("bfloat16");
        let dtype = if bf16 { Kind::BFloat16 } else { Kind::Float };
        let nibble = root.join(format!("nibble{i}.safetensors"));
        save_logits(&nibble, &logits(&load(&out, LoadOptions { dtype, ..LoadOptions::default() })));
        specs.push(serde_json::json!([src, out, qt.as_str(), dq, nibble]));
    }
    let results =
        run_python(&py, TRANSFORMERS_QUANTIZE_CHECK, &[serde_json::Value::from(specs).to_string().as_ref()]);
    for (i, ((src, _, qt, dq, exact), r)) in cases.iter().zip(results.as_array().unwrap()).enumerate() {
        let case = format!("case {i} ({}): {r}", src.display());
        assert_eq!(r["missing"], serde_json::json!([]), "{case}");
        assert_eq!(r["unexpected"], serde_json::json!([]), "{case}");
        assert_eq!(r["mismatched"], serde_json::json!([]), "{case}");
        assert_eq!(r["is_4bit"], true, "{case}");
        assert_eq!(r["same_config"], true, "config.json differs from transformers' own: {case}");
        assert_eq!(r["key_diff"], serde_json::json!([]), "{case}");
        // transformers computes on nibble's bytes what nibble computes.
        assert!(r["rel_vs_nibble"].as_f64().unwrap() <= 1e-5, "{case}");
        let vs_transformers = r["rel_vs_transformers"].as_f64().unwrap();
        if *exact {
            assert_eq!(r["differing"], serde_json::json!([]), "{case}");
            assert!(vs_transformers <= 1e-5, "{case}");
        } else if *qt == QuantType::Nf4 {
            // The golden llama: one 8-bit absmax code apart, still within 1e-5.
            assert!(vs_transformers <= 1e-5, "{case}");
        } else {
            assert!(*dq && vs_transformers <= 1e-3, "{case}");
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------------------------
// sft merge

/// Put a random adapter (`init_lora_weights=False`: B is not zero) on the tiny model's linears and
/// save it as PEFT does.
fn random_adapter(dir: &Path, targets: TargetModules, rslora: bool) -> LoraConfig {
    random_adapter_on(&tiny(), dir, targets, rslora)
}

/// [`random_adapter`] on the model in `base`.
fn random_adapter_on(base: &Path, dir: &Path, targets: TargetModules, rslora: bool) -> LoraConfig {
    let mut model = load(base, LoadOptions::default());
    let mut cfg = LoraConfig::new(4, 6.0, targets);
    cfg.init = LoraInit::False;
    cfg.use_rslora = rslora;
    cfg.base_model_name_or_path = Some(base.display().to_string());
    let adapters = lora::inject(model.linears_mut(), &cfg, 7).unwrap();
    adapters.save(dir).unwrap();
    cfg
}

/// The adapter's (A, B) of `module`, as Float tensors.
fn adapter_pair(dir: &Path, module: &str) -> Option<(Tensor, Tensor)> {
    let (raw, _) = quant::file::read(&dir.join(lora::WEIGHTS_FILE)).unwrap();
    let get = |ab: &str| {
        raw.iter().find(|t| {
            t.name == format!("base_model.model.{module}.lora_{ab}.weight")
                || t.name == format!("base_model.model.{module}.lora_{ab}.default.weight")
        })
    };
    let to = |t: &RawTensor| {
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        Tensor::from_data_size(&t.data, &shape, Kind::Float)
    };
    Some((to(get("A")?), to(get("B")?)))
}

fn tensor(ck: &Checkpoint, name: &str) -> Tensor {
    ck.tensor(name).unwrap().to_tensor().unwrap()
}

fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "merge".as_ref(),
        "--model".as_ref(),
        s(base),
        "--adapter".as_ref(),
        s(adapter),
        "--out".as_ref(),
        s(out),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    sft(&args)
}

#[test]
fn merged_weights_are_w_plus_b_a_scaled_exactly() {
    let root = scratch("merge-exact");
    let targets = TargetModules::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]);
    let adapter = root.join("adapter");
    let cfg = random_adapter(&adapter, targets, true);
    assert_eq!(cfg.scaling(), 3.0);
    // PEFT keys with the adapter name load too.
    let path = adapter.join(lora::WEIGHTS_FILE);
    let (mut raw, meta) = quant::file::read(&path).unwrap();
    for t in &mut raw {
        t.name = t.name.replace(".weight", ".default.weight");
    }
    quant::file::write(&path, &raw, &meta).unwrap();

    for (dtype, kind) in [(None, Kind::Float), (Some("bf16"), Kind::BFloat16), (Some("fp16"), Kind::Half)] {
        let out = root.join(format!("merged-{kind:?}"));
        let flags: Vec<&str> = dtype.map(|d| vec!["--dtype", d]).unwrap_or_default();
        ok(&merge(&tiny(), &adapter, &out, &flags));
        let base = Checkpoint::open(&tiny()).unwrap();
        let merged = Checkpoint::open(&out).unwrap();
        assert_eq!(merged.names().collect::<Vec<_>>(), base.names().collect::<Vec<_>>());
        let mut adapted = 0;
        for name in base.names() {
            let w = tensor(&base, name);
            let got = tensor(&merged, name);
            let module = name.strip_suffix(".weight").unwrap_or(name);
            let want = match adapter_pair(&adapter, module) {
                Some((a, b)) => {
                    adapted += 1;
                    &w + b.matmul(&a) * cfg.scaling()
                }
                None => w,
            };
            assert_eq!(got.kind(), kind, "{name}");
            assert!(got.equal(&want.to_kind(kind)), "{name} ({kind:?}) is not W + B A s");
        }
        assert_eq!(adapted, 3 * 2);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let name = model_loader::torch_name(kind).unwrap();
        assert_eq!(config["dtype"], name);
        assert!(config.get("quantization_config").is_none());
        assert_eq!(
            std::fs::read(out.join("tokenizer.json")).unwrap(),
            std::fs::read(tiny().join("tokenizer.json")).unwrap()
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn merged_logits_equal_the_unmerged_adapter_on_dense_and_4bit_bases() {
    let root = scratch("merge-logits");
    let adapter = root.join("adapter");
    random_adapter(&adapter, TargetModules::AllLinear, false);
    // Dense base.
    let merged = root.join("merged");
    ok(&merge(&tiny(), &adapter, &merged, &["--max-shard-size", "100KB"]));
    assert!(merged.join("model.safetensors.index.json").is_file());
    let mut base = load(&tiny(), LoadOptions::default());
    let adapters = lora::inject_from(base.linears_mut(), &adapter).unwrap();
    assert_eq!(adapters.modules().len(), 14);
    let want = logits(&base);
    let got = logits(&load(&merged, LoadOptions::default()));
    let err = max_rel_err(&got, &want);
    assert!(err <= 1e-5, "merged logits differ from base + adapter by {err:e}");
    assert!(
        max_rel_err(&got, &logits(&load(&tiny(), LoadOptions::default()))) > 1e-3,
        "the adapter did nothing"
    );

    // A 4-bit base (as `sft quantize` writes it): dequantized exactly, then merged.
    let q = root.join("tiny-4bit");
    ok(&sft(&["quantize".as_ref(), s(&tiny()), s(&q), "--double-quant".as_ref()]));
    let merged4 = root.join("merged-from-4bit");
    ok(&merge(&q, &adapter, &merged4, &[]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged4.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "float32", "the 4-bit base's bnb_4bit_compute_dtype");
    assert!(config.get("quantization_config").is_none());
    let qck = Checkpoint::open(&q).unwrap();
    let mck = Checkpoint::open(&merged4).unwrap();
    let module = "model.layers.1.mlp.gate_proj";
    let (a, b) = adapter_pair(&adapter, module).unwrap();
    let w = qck.quantized_weight(module).unwrap().dequantize(Kind::Float).unwrap();
    assert!(tensor(&mck, &format!("{module}.weight")).equal(&(w + b.matmul(&a) * 1.5)));
    assert!(!mck.names().any(|n| n.contains("absmax") || n.contains("quant_state")));
    let mut base4 = load(&q, LoadOptions::default());
    lora::inject_from(base4.linears_mut(), &adapter).unwrap();
    let err = max_rel_err(&logits(&load(&merged4, LoadOptions::default())), &logits(&base4));
    assert!(err <= 1e-5, "merged-from-4-bit logits differ from 4-bit base + adapter by {err:e}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn merge_refuses_what_does_not_fit() {
    let root = scratch("merge-bad");
    let adapter = root.join("adapter");
    random_adapter(&adapter, TargetModules::AllLinear, false);
    // Non-empty output: exit 2, untouched.
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let r = merge(&tiny(), &adapter, &out, &[]);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(out.join("keep.txt").is_file());
    // An adapter made for another model: its shapes are named.
    let r = merge(&golden("llama"), &adapter, &root.join("o2"), &[]);
    assert_eq!(r.status.code(), Some(1));
    let e = stderr(&r);
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("lora_A.weight") && e.contains("shape"),
        "{e}"
    );
    // No adapter there.
    let r = merge(&tiny(), &root.join("nothing"), &root.join("o3"), &[]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("nothing/adapter_config.json"), "{}", stderr(&r));
    // A corrupt base names the file.
    let bad = root.join("bad-base");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(tiny().join("config.json"), bad.join("config.json")).unwrap();
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    std::fs::write(bad.join("model.safetensors"), &bytes[..1000]).unwrap();
    let r = merge(&bad, &adapter, &root.join("o4"), &[]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("bad-base/model.safetensors"), "{}", stderr(&r));
    for o in ["o2", "o3", "o4"] {
        assert!(!root.join(o).exists(), "{o}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// transformers loads the merged directories; PEFT merges the same base and adapter itself.
const TRANSFORMERS_MERGE_CHECK: &str = r#"
import json, os, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel

base, adapter, merged32, merged16, nibble_logits = sys.argv[1:6]

def logits(m):
    vocab = m.config.vocab_size
    ids = (torch.arange(24).view(2, 12) * 7 + 3) % vocab
    with torch.no_grad():
        return m(input_ids=ids).logits.float()

def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

want = load_file(nibble_logits)["logits"]
out = {}
for tag, d in [("fp32", merged32), ("bf16", merged16)]:
    m, info = AutoModelForCausalLM.from_pretrained(d, device_map="cpu", output_loading_info=True)
    out[tag] = {"missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
                "dtype": str(m.dtype), "rel": rel(logits(m), want)}
    if tag == "fp32":
        ours = {k: v.detach().clone() for k, v in m.state_dict().items()}
    else:
        # The bf16 file is the f32 merge rounded once, weight by weight.
        out[tag]["max_diff_vs_f32_rounded"] = max(
            (v.float() - ours[k].to(torch.bfloat16).float()).abs().max().item() for k, v in m.state_dict().items()
        )
peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
peft_rel = rel(logits(peft), want)
theirs = peft.merge_and_unload().state_dict()
diff = 0.0
for k, v in theirs.items():
    diff = max(diff, (v.float() - ours[k].float()).abs().max().item())
out["peft"] = {"keys_equal": sorted(theirs) == sorted(ours), "max_abs_diff": diff,
               "rel_logits": peft_rel}
print(json.dumps(out))
"#;

#[test]
fn transformers_loads_the_merged_model_and_peft_merges_the_same() {
    let Some(py) = python() else { return };
    check_merge_in_transformers(&py, &tiny(), "tf-merge");
}

/// The same for each family beyond Llama's layout: nibble's adapter loads in PEFT with nibble's
/// logits, and nibble's merge loads in transformers with them (Phi-3's fused linears included; a
/// mixture's attention adapters, its experts written back under their per-expert names).
#[test]
fn newer_families_merges_and_adapters_load_in_transformers_and_peft() {
    let Some(py) = python() else { return };
    for family in ["gemma2", "gemma3", "phi3", "mixtral", "qwen3moe"] {
        check_merge_in_transformers(
            &py,
            &repo().join("tests/golden/families").join(family).join("model"),
            family,
        );
    }
}

/// A random all-linear adapter on `model`, merged by nibble in fp32 and bf16, checked in
/// transformers and PEFT ([`TRANSFORMERS_MERGE_CHECK`]).
fn check_merge_in_transformers(py: &str, model: &Path, tag: &str) {
    let root = scratch(&format!("tf-merge-{tag}"));
    let adapter = root.join("adapter");
    random_adapter_on(model, &adapter, TargetModules::AllLinear, true);
    let (m32, m16) = (root.join("merged-fp32"), root.join("merged-bf16"));
    ok(&merge(model, &adapter, &m32, &["--max-shard-size", "150KB"]));
    ok(&merge(model, &adapter, &m16, &["--dtype", "bf16"]));
    let mut base = load(model, LoadOptions::default());
    lora::inject_from(base.linears_mut(), &adapter).unwrap();
    save_logits(&root.join("nibble.safetensors"), &logits(&base));
    let r = run_python(
        py,
        TRANSFORMERS_MERGE_CHECK,
        &[s(model), s(&adapter), s(&m32), s(&m16), s(&root.join("nibble.safetensors"))],
    );
    eprintln!("{tag}: transformers and PEFT on the merged model: {r}");
    for tag in ["fp32", "bf16"] {
        assert_eq!(r[tag]["missing"], serde_json::json!([]), "{r}");
        assert_eq!(r[tag]["unexpected"], serde_json::json!([]), "{r}");
    }
    assert_eq!(r["fp32"]["dtype"], "torch.float32");
    assert_eq!(r["bf16"]["dtype"], "torch.bfloat16");
    assert!(r["fp32"]["rel"].as_f64().unwrap() <= 1e-5, "{r}");
    assert_eq!(r["bf16"]["max_diff_vs_f32_rounded"].as_f64(), Some(0.0), "{r}");
    // bf16 rounding of the random adapter's large update (no tighter bound holds for every draw);
    // a mixture of experts' bf16 routing can pick other experts than its f32 one, so its bf16
    // logits have no such bound (the file itself is checked above: the f32 merge rounded once).
    let moe = model_loader::HfConfig::from_dir(model).unwrap().moe.is_some();
    assert!(moe || r["bf16"]["rel"].as_f64().unwrap() <= 0.15, "{r}");
    // PEFT's own merge gives the same weights, and its unmerged model nibble's logits.
    assert_eq!(r["peft"]["keys_equal"], true, "{r}");
    assert_eq!(r["peft"]["max_abs_diff"].as_f64(), Some(0.0), "{r}");
    assert!(r["peft"]["rel_logits"].as_f64().unwrap() <= 1e-5, "{r}");
    let _ = std::fs::remove_dir_all(&root);
}
