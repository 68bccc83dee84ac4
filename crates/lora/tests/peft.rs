//! Parity with the pinned PEFT, both ways. Adapters PEFT saved (golden files from
//! `scripts/golden_peft.py`) load here, give PEFT's outputs (and, for DoRA and `modules_to_save`,
//! its gradients) and save back to the same bytes; adapters nibble saves load in PEFT with no
//! missing or unexpected key, give nibble's outputs, and carry the `adapter_config.json` PEFT
//! itself writes for the same adapter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use lora::{
    Adapters, LoraConfig, LoraInit, TargetModules, inject, inject_from, inject_from_with_modules,
    inject_with_modules,
};
use model_loader::{CausalLm, LoadOptions};
use quant::linear::{Dense, Linear, Linear4bit};
use quant::ops::{Absmax4, Quantized4bit};
use quant::state::RawTensor;
use tch::{Kind, Tensor};

/// The toy decoder's linears, in the order `module_names()` of the script lists them.
const MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn module_names() -> Vec<String> {
    (0..2).flat_map(|l| MODULES.iter().map(move |m| format!("model.layers.{l}.{m}"))).collect()
}

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/golden_peft.py")
}

fn to_tensor(t: &RawTensor) -> Tensor {
    let kind = match t.dtype.as_str() {
        "F32" => Kind::Float,
        "BF16" => Kind::BFloat16,
        "F16" => Kind::Half,
        "U8" => Kind::Uint8,
        "I64" => Kind::Int64,
        other => panic!("{}: dtype {other}", t.name),
    };
    let shape: Vec<i64> = t.shape.iter().map(|d| *d as i64).collect();
    Tensor::f_from_data_size(&t.data, &shape, kind).expect("tensor")
}

fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    let (raw, _) = quant::file::read(path).expect("read safetensors");
    raw.iter().map(|t| (t.name.clone(), to_tensor(t))).collect()
}

fn raw_f32(name: String, t: &Tensor) -> RawTensor {
    let t = t.to_kind(Kind::Float).contiguous();
    let mut data = vec![0u8; t.numel() * 4];
    t.copy_data_u8(&mut data, t.numel());
    RawTensor { name, dtype: "F32".into(), shape: t.size().iter().map(|d| *d as usize).collect(), data }
}

/// A toy model: its linears by module name.
type Linears = Vec<(String, Box<dyn Linear>)>;

/// The toy model's linears as Dense layers with the golden base weights.
fn toy(base: &HashMap<String, Tensor>) -> Linears {
    module_names()
        .into_iter()
        .map(|n| {
            let w = base[&format!("{n}.weight")].shallow_clone();
            let b = base.get(&format!("{n}.bias")).map(Tensor::shallow_clone);
            let layer: Box<dyn Linear> = Box::new(Dense::new(w, b).expect("dense"));
            (n, layer)
        })
        .collect()
}

fn offer(m: &mut [(String, Box<dyn Linear>)]) -> Vec<(String, &mut Box<dyn Linear>)> {
    m.iter_mut().map(|(n, l)| (n.clone(), l)).collect()
}

fn max_rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let diff = (got - want).abs().max().double_value(&[]);
    diff / want.abs().max().double_value(&[])
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-lora-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn python() -> Option<String> {
    match std::env::var("NIBBLE_PYTHON") {
        Ok(p) => Some(p),
        Err(_) => {
            eprintln!("skipped: NIBBLE_PYTHON is not set (run `cargo xtask setup` for the pinned PEFT)");
            None
        }
    }
}

fn run_python(python: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(python)
        .env("TORCHDYNAMO_DISABLE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .args(args)
        .output()
        .expect("run NIBBLE_PYTHON");
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python failed:\n{text}");
    text
}

/// Each golden case: its name and the adapter dtype PEFT computed in.
const GOLDEN_CASES: [(&str, Kind); 3] =
    [("list_rslora", Kind::Float), ("regex_bf16", Kind::BFloat16), ("all_linear", Kind::Float)];

/// Load a golden case: through `inject_from` for Float adapters, through read + inject +
/// `load_into` for another dtype.
fn load_golden(case: &str, dtype: Kind, linears: &mut [(String, Box<dyn Linear>)]) -> Adapters {
    let dir = golden().join(case);
    if dtype == Kind::Float {
        return inject_from(offer(linears), &dir).unwrap_or_else(|e| panic!("{case}: {e}"));
    }
    let mut cfg = LoraConfig::read(&dir).expect("config");
    cfg.dtype = dtype;
    let mut adapters = inject(offer(linears), &cfg, 0).expect("inject");
    adapters.load_into(&dir).unwrap_or_else(|e| panic!("{case}: {e}"));
    adapters.set_training(false);
    adapters
}

#[test]
fn peft_adapters_give_peft_outputs_and_save_back_to_the_same_bytes() {
    let base = read_tensors(&golden().join("base.safetensors"));
    for (case, dtype) in GOLDEN_CASES {
        let mut linears = toy(&base);
        let adapters = load_golden(case, dtype, &mut linears);
        let (file_keys, _) = quant::file::read(&golden().join(case).join(lora::WEIGHTS_FILE)).expect("read");
        assert_eq!(2 * adapters.modules().len(), file_keys.len(), "{case}");
        for (name, layer) in &linears {
            let got = layer.forward(&base[&format!("x.{name}")]).expect("forward");
            let want = &base[&format!("{case}.{name}")];
            let err = max_rel_err(&got, want);
            assert!(err <= 1e-5, "{case} {name}: relative error {err:e}");
        }
        let out = temp_dir(&format!("resave-{case}"));
        adapters.save(&out).expect("save");
        for file in [lora::CONFIG_FILE, lora::WEIGHTS_FILE] {
            let ours = std::fs::read(out.join(file)).expect("ours");
            let theirs = std::fs::read(golden().join(case).join(file)).expect("golden");
            assert!(
                ours == theirs,
                "{case}/{file}: nibble's bytes differ from PEFT's\n--- nibble\n{}\n--- PEFT\n{}",
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
        }
        std::fs::remove_dir_all(&out).expect("clean up");
    }
}

#[test]
fn golden_files_are_what_the_script_makes_now() {
    let Some(python) = python() else { return };
    let dir = temp_dir("regen");
    run_python(&python, &[script().as_os_str(), dir.as_os_str()]);
    let regenerate =
        "regenerate with\n  \"$NIBBLE_PYTHON\" scripts/golden_peft.py crates/lora/tests/golden/peft";
    for (case, _) in GOLDEN_CASES {
        for file in [lora::CONFIG_FILE, lora::WEIGHTS_FILE] {
            let now = std::fs::read(dir.join(case).join(file)).expect("regenerated");
            let committed = std::fs::read(golden().join(case).join(file)).expect("golden");
            assert!(now == committed, "tests/golden/peft/{case}/{file} is stale; {regenerate}");
        }
    }
    for case in DORA_CASES.iter().chain(&MTS_CASES.map(|(c, _)| c)) {
        for file in [lora::CONFIG_FILE, lora::WEIGHTS_FILE] {
            let now = std::fs::read(dir.join(case).join(file)).expect("regenerated");
            let committed = std::fs::read(golden().join(case).join(file)).expect("golden");
            assert!(now == committed, "tests/golden/peft/{case}/{file} is stale; {regenerate}");
        }
        let expected = Path::new(case).join("expected.safetensors");
        same_tensors(&dir.join(&expected), &golden().join(&expected), regenerate);
    }
    same_tensors(&dir.join("base.safetensors"), &golden().join("base.safetensors"), regenerate);
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// Whether the golden tensor file `now` (just regenerated) holds what `committed` holds: the same
/// names and metadata, inputs, weights and integer tensors exactly, computed values within 1e-6.
fn same_tensors(now: &Path, committed: &Path, regenerate: &str) {
    let file = committed.strip_prefix(golden()).unwrap_or(committed).display().to_string();
    let (now_meta, committed_meta) =
        (quant::file::read(now).expect("now").1, quant::file::read(committed).expect("golden").1);
    assert_eq!(now_meta, committed_meta, "{file}: metadata is stale; {regenerate}");
    let (now, committed) = (read_tensors(now), read_tensors(committed));
    let mut names: Vec<&String> = committed.keys().collect();
    let mut names_now: Vec<&String> = now.keys().collect();
    names.sort();
    names_now.sort();
    assert_eq!(names, names_now, "{file} is stale; {regenerate}");
    for name in names {
        let (a, b) = (&now[name], &committed[name]);
        // Inputs and weights are exact; outputs (gradients of weights included) may differ in the
        // last bits on another kind of CPU, whose BLAS sums in another order.
        let exact = !name.starts_with("grad.") && name.ends_with(".weight")
            || name.ends_with(".bias")
            || name.starts_with("x.")
            || name.starts_with("g.")
            || matches!(name.as_str(), "input_ids" | "upstream")
            || !matches!(a.kind(), Kind::Float | Kind::BFloat16 | Kind::Half);
        let ok = if exact { a.equal(b) } else { max_rel_err(a, b) <= 1e-6 };
        assert!(ok, "{file}: `{name}` is stale; {regenerate}");
    }
}

/// Checks, in PEFT, the adapters nibble saved under `argv[1]/<case>` (see `spec.json` there).
const PEFT_CHECK: &str = r#"
import difflib, json, pathlib, sys, warnings
sys.path.insert(0, sys.argv[3])
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
import golden_peft as gp

work, golden = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
base = load_file(golden / "base.safetensors")
spec = json.loads((work / "spec.json").read_text())
ours = load_file(work / "outputs.safetensors")
failures = []
for case, s in spec.items():
    d = work / case
    # The config: what PEFT writes for the same adapter (targets sorted, as nibble writes them).
    ref_dir = work / (case + ".peft")
    gp.peft_model(s["kwargs"], base).save_pretrained(ref_dir)
    gp.sort_targets(ref_dir / "adapter_config.json")
    mine, theirs = (d / "adapter_config.json").read_text(), (ref_dir / "adapter_config.json").read_text()
    if mine != theirs:
        diff = "\n".join(difflib.unified_diff(theirs.splitlines(), mine.splitlines(), "PEFT", "nibble", lineterm=""))
        failures.append(f"{case}: adapter_config.json differs from PEFT's:\n{diff}")
    loaded = LoraConfig.from_pretrained(d)
    if loaded.to_dict() != LoraConfig.from_pretrained(ref_dir).to_dict():
        failures.append(f"{case}: LoraConfig.from_pretrained reads {loaded} from nibble's file")
    # The tensors: every key taken, none missing.
    model = get_peft_model(gp.toy(base), loaded)
    result = set_peft_model_state_dict(model, load_file(d / "adapter_model.safetensors"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        failures.append(f"{case}: unexpected keys {result.unexpected_keys}, missing {missing}")
    # The outputs, through PeftModel.from_pretrained.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(gp.toy(base), d)
    for w in caught:
        if "key" in str(w.message).lower():
            failures.append(f"{case}: from_pretrained warned: {w.message}")
    dtype = getattr(torch, s["dtype"])
    wrapped = []
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            module.lora_A.to(dtype)
            module.lora_B.to(dtype)
            wrapped.append(name)
    if sorted(wrapped) != sorted(s["modules"]):
        failures.append(f"{case}: PEFT wrapped {sorted(wrapped)}, nibble {sorted(s['modules'])}")
    peft_model.eval()
    with torch.no_grad():
        for name in gp.module_names():
            got = peft_model.base_model.model.get_submodule(name)(base[f"x.{name}"])
            want = ours[f"{case}.{name}"]
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
            if err > 1e-5:
                failures.append(f"{case} {name}: PEFT vs nibble relative error {err:.3g}")
if failures:
    print("\n".join(failures))
    sys.exit(1)
print("peft check ok:", ", ".join(spec))
"#;

struct RustCase {
    name: &'static str,
    cfg: LoraConfig,
    /// The same adapter as PEFT `LoraConfig` arguments (JSON).
    kwargs: serde_json::Value,
    dtype: &'static str,
}

fn rust_cases() -> Vec<RustCase> {
    let list = {
        let mut c = LoraConfig::new(
            4,
            16.0,
            TargetModules::List(vec!["q_proj".into(), "k_proj".into(), "mlp.up_proj".into()]),
        );
        c.dropout = 0.05;
        c.use_rslora = true;
        c.init = LoraInit::False;
        c
    };
    let regex = {
        let mut c =
            LoraConfig::new(3, 5.5, TargetModules::Regex(r".*\.0\.(self_attn|mlp)\.(v|gate)_proj".into()));
        c.init = LoraInit::False;
        c.dtype = Kind::BFloat16;
        c.base_model_name_or_path = Some("nibble/toy-decoder".into());
        c
    };
    let all = {
        let mut c = LoraConfig::new(2, 4.0, TargetModules::AllLinear);
        c.init = LoraInit::Gaussian;
        c
    };
    vec![
        RustCase {
            name: "list",
            cfg: list,
            kwargs: serde_json::json!({"r": 4, "lora_alpha": 16, "lora_dropout": 0.05, "use_rslora": true,
                "init_lora_weights": false, "target_modules": ["q_proj", "k_proj", "mlp.up_proj"]}),
            dtype: "float32",
        },
        RustCase {
            name: "regex",
            cfg: regex,
            kwargs: serde_json::json!({"r": 3, "lora_alpha": 5.5, "init_lora_weights": false,
                "target_modules": r".*\.0\.(self_attn|mlp)\.(v|gate)_proj",
                "base_model_name_or_path": "nibble/toy-decoder"}),
            dtype: "bfloat16",
        },
        RustCase {
            name: "all",
            cfg: all,
            kwargs: serde_json::json!({"r": 2, "lora_alpha": 4, "init_lora_weights": "gaussian",
                "target_modules": "all-linear"}),
            dtype: "float32",
        },
    ]
}

#[test]
fn peft_loads_what_nibble_saves() {
    let Some(python) = python() else { return };
    let base = read_tensors(&golden().join("base.safetensors"));
    let work = temp_dir("to-peft");
    let mut spec = serde_json::Map::new();
    let mut outputs = Vec::new();
    for (i, case) in rust_cases().into_iter().enumerate() {
        let mut linears = toy(&base);
        let adapters = inject(offer(&mut linears), &case.cfg, 100 + i as u64).expect("inject");
        if case.cfg.init == LoraInit::Gaussian {
            // B starts at zero; stand in for training so the adapter changes the output.
            tch::no_grad(|| {
                for m in adapters.modules() {
                    let mut b = m.lora_b().shallow_clone();
                    b.copy_(&(m.lora_b().ones_like().cumsum(0, Kind::Float) * 0.05));
                }
            });
        }
        adapters.set_training(false);
        for (name, layer) in &linears {
            let y = layer.forward(&base[&format!("x.{name}")]).expect("forward");
            outputs.push(raw_f32(format!("{}.{name}", case.name), &y));
        }
        adapters.save(&work.join(case.name)).expect("save");
        let modules: Vec<&str> = adapters.modules().iter().map(|m| m.name()).collect();
        spec.insert(
            case.name.to_owned(),
            serde_json::json!({"kwargs": case.kwargs, "dtype": case.dtype, "modules": modules}),
        );
    }
    quant::file::write(&work.join("outputs.safetensors"), &outputs, &Default::default()).expect("outputs");
    std::fs::write(work.join("spec.json"), serde_json::Value::Object(spec).to_string()).expect("spec");
    let scripts = script().parent().expect("scripts dir").to_owned();
    let out = run_python(
        &python,
        &["-c".as_ref(), PEFT_CHECK.as_ref(), work.as_os_str(), golden().as_os_str(), scripts.as_os_str()],
    );
    assert!(out.contains("peft check ok: list, regex, all"), "{out}");
    std::fs::remove_dir_all(&work).expect("clean up");
}

// ---------------------------------------------------------------------------------------------
// DoRA and modules_to_save

/// The DoRA golden cases: on the toy's dense linears, and on a toy of bitsandbytes 4-bit linears.
const DORA_CASES: [&str; 2] = ["dora_dense", "dora_4bit"];

/// The modules_to_save golden cases and the tiny model (crates/model-loader/tests/golden) each
/// adapts.
const MTS_CASES: [(&str, &str); 2] = [("mts_llama", "llama"), ("mts_qwen2_dora", "qwen2")];

/// The 4-bit toy's linears, as the script's `module_names4()` lists them.
const MODULES4: [&str; 3] = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"];

fn model_golden(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-loader/tests/golden").join(family)
}

/// The 4-bit toy from the packed weights bitsandbytes made (NF4, blocksize 64, f32 compute).
fn toy4(t: &HashMap<String, Tensor>) -> Linears {
    MODULES4
        .iter()
        .map(|m| {
            let n = format!("model.layers.0.{m}");
            let shape = t[&format!("{n}.weight")].size();
            let q = Quantized4bit {
                packed: t[&format!("{n}.packed")].shallow_clone(),
                absmax: Absmax4::Plain(t[&format!("{n}.absmax")].shallow_clone()),
                shape,
                dtype: Kind::Float,
                blocksize: 64,
                quant_type: quant::QuantType::Nf4,
            };
            let bias = t.get(&format!("{n}.bias")).map(Tensor::shallow_clone);
            let layer: Box<dyn Linear> = Box::new(Linear4bit::new(q, bias, Kind::Float).expect("4-bit"));
            (n, layer)
        })
        .collect()
}

/// A DoRA case's base linears and the tensors holding their inputs.
fn dora_base(case: &str) -> (Linears, HashMap<String, Tensor>) {
    if case == "dora_4bit" {
        let t = read_tensors(&golden().join(case).join("expected.safetensors"));
        (toy4(&t), t)
    } else {
        let base = read_tensors(&golden().join("base.safetensors"));
        (toy(&base), base)
    }
}

fn zero_grad(t: &Tensor) {
    let mut t = t.shallow_clone();
    t.zero_grad();
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let err = max_rel_err(got, want);
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

/// Save `adapters` and compare both files with the golden ones byte for byte.
fn saves_back_to_the_same_bytes(adapters: &Adapters, case: &str) {
    let out = temp_dir(&format!("resave-{case}"));
    adapters.save(&out).expect("save");
    for file in [lora::CONFIG_FILE, lora::WEIGHTS_FILE] {
        let ours = std::fs::read(out.join(file)).expect("ours");
        let theirs = std::fs::read(golden().join(case).join(file)).expect("golden");
        assert!(
            ours == theirs,
            "{case}/{file}: nibble's bytes differ from PEFT's\n--- nibble\n{}\n--- PEFT\n{}",
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
    }
    std::fs::remove_dir_all(&out).expect("clean up");
}

#[test]
fn peft_dora_adapters_give_peft_outputs_and_gradients() {
    for case in DORA_CASES {
        let (mut linears, inputs) = dora_base(case);
        let dir = golden().join(case);
        let expected = read_tensors(&dir.join("expected.safetensors"));
        let adapters = inject_from(offer(&mut linears), &dir).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(adapters.modules().iter().all(|m| m.magnitude().is_some()));
        for (name, layer) in &linears {
            let got = layer.forward(&inputs[&format!("x.{name}")]).expect("forward");
            check(&format!("{case} eval {name}"), &got, &expected[&format!("eval.{name}")], 1e-5);
        }
        // Gradients in the eval path (the base output reused) and the training path (dropout,
        // the base run again on the dropped input), seeded as the script seeds them.
        let mut adapted: Vec<&lora::AdapterModule> = adapters.modules().iter().collect();
        adapted.sort_by(|a, b| a.name().cmp(b.name()));
        for (i, m) in adapted.into_iter().enumerate() {
            let name = m.name();
            let layer = &linears.iter().find(|(n, _)| n == name).expect("layer").1;
            let params = [("A", m.lora_a()), ("B", m.lora_b()), ("m", m.magnitude().expect("magnitude"))];
            for mode in ["eval", "train"] {
                adapters.set_training(mode == "train");
                for (_, p) in &params {
                    zero_grad(p);
                }
                let x = inputs[&format!("x.{name}")].copy().set_requires_grad(true);
                let y = {
                    let _rng = lora::global_rng();
                    tch::manual_seed(1000 + i as i64);
                    layer.forward(&x).expect("forward")
                };
                (&y * &expected[&format!("g.{name}")]).sum(Kind::Float).backward();
                let what = |t: &str| format!("{case} {mode} {t} {name}");
                check(&what("y"), &y, &expected[&format!("{mode}.y.{name}")], 1e-5);
                check(&what("x grad"), &x.grad(), &expected[&format!("{mode}.x_grad.{name}")], 1e-5);
                for (k, p) in &params {
                    check(
                        &what(&format!("{k} grad")),
                        &p.grad(),
                        &expected[&format!("{mode}.{k}_grad.{name}")],
                        1e-5,
                    );
                }
            }
        }
        adapters.set_training(false);
        saves_back_to_the_same_bytes(&adapters, case);
    }
}

/// A tiny model of crates/model-loader/tests/golden, in f32 on the CPU.
fn tiny_model(family: &str) -> CausalLm {
    CausalLm::load(&model_golden(family), &LoadOptions::default(), &mut |_, _| {}).expect("tiny model")
}

#[test]
fn peft_modules_to_save_give_peft_logits_gradients_and_report() {
    for (case, family) in MTS_CASES {
        let dir = golden().join(case);
        let (expected, meta) = {
            let (raw, meta) = quant::file::read(&dir.join("expected.safetensors")).expect("expected");
            let t: HashMap<String, Tensor> = raw.iter().map(|t| (t.name.clone(), to_tensor(t))).collect();
            (t, meta)
        };
        let mut model = tiny_model(family);
        let base_params = model.num_parameters();
        let (linears, tensors) = model.adaptable_mut();
        let adapters =
            inject_from_with_modules(linears, tensors, &dir).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(
            adapters.trainable_report(base_params),
            meta["trainable"],
            "{case}: PEFT's trainable line"
        );
        let logits = model.forward(&expected["input_ids"], None, None).expect("forward");
        check(&format!("{case} logits"), &logits, &expected["logits"], 1e-5);
        (&logits * &expected["upstream"]).sum(Kind::Float).backward();
        for s in adapters.saved() {
            assert!(!s.original().grad().defined(), "{case}: the original {} is frozen", s.name());
            check(
                &format!("{case} grad {}", s.name()),
                &s.trainable().grad(),
                &expected[&format!("grad.{}", s.name())],
                1e-5,
            );
        }
        saves_back_to_the_same_bytes(&adapters, case);
    }
}

/// Checks, in PEFT, the DoRA and modules_to_save adapters nibble saved under `argv[1]/<case>`:
/// the config PEFT writes for the same settings, the same keys as PEFT's own file, no missing or
/// unexpected key, nibble's outputs (or logits), and for a fresh DoRA adapter PEFT's own
/// initial magnitude recomputed from nibble's A and B.
const PEFT_CHECK_EXTRAS: &str = r#"
import difflib, json, pathlib, sys, warnings
sys.path.insert(0, sys.argv[3])
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
import golden_peft as gp

work, golden = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
spec = json.loads((work / "spec.json").read_text())
ours = load_file(work / "outputs.safetensors")
base = load_file(golden / "base.safetensors")
golden4 = load_file(golden / "dora_4bit" / "expected.safetensors")
failures = []

def rel(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()

def fresh(s):
    if s["kind"] == "toy":
        return gp.toy(base), base, gp.module_names()
    if s["kind"] == "toy4":
        b4 = {k: v for k, v in golden4.items() if k.endswith((".weight", ".bias")) or k.startswith("x.")}
        model = gp.toy4(b4)
        for k, v in b4.items():
            if k.endswith((".packed", ".absmax")) and not torch.equal(v, golden4[k]):
                failures.append(f"bitsandbytes quantized {k} differently from the golden file")
        return model, b4, gp.module_names4()
    return gp.tiny_model(s["family"]), None, None

for case, s in spec.items():
    d = work / case
    ref_dir = work / (case + ".peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(fresh(s)[0], LoraConfig(task_type="CAUSAL_LM", **s["kwargs"]))
    ref.save_pretrained(ref_dir)
    gp.sort_targets(ref_dir / "adapter_config.json")
    mine, theirs = (d / "adapter_config.json").read_text(), (ref_dir / "adapter_config.json").read_text()
    if mine != theirs:
        diff = "\n".join(difflib.unified_diff(theirs.splitlines(), mine.splitlines(), "PEFT", "nibble", lineterm=""))
        failures.append(f"{case}: adapter_config.json differs from PEFT's:\n{diff}")
    nibble_file = load_file(d / "adapter_model.safetensors")
    peft_file = load_file(ref_dir / "adapter_model.safetensors")
    if sorted(nibble_file) != sorted(peft_file):
        failures.append(f"{case}: keys {sorted(nibble_file)} differ from PEFT's {sorted(peft_file)}")
    for k in set(nibble_file) & set(peft_file):
        if nibble_file[k].shape != peft_file[k].shape or nibble_file[k].dtype != peft_file[k].dtype:
            failures.append(f"{case}: {k} is {nibble_file[k].dtype}{list(nibble_file[k].shape)}, PEFT's {peft_file[k].dtype}{list(peft_file[k].shape)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh(s)[0], LoraConfig.from_pretrained(d))
    result = set_peft_model_state_dict(model, nibble_file)
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        failures.append(f"{case}: unexpected keys {result.unexpected_keys}, missing {missing}")
    model, inputs, names = fresh(s)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, d)
    for w in caught:
        text = str(w.message).lower()
        if "missing" in text or "unexpected" in text:
            failures.append(f"{case}: from_pretrained warned: {w.message}")
    peft_model.eval()
    with torch.no_grad():
        if inputs is None:
            logits = peft_model(input_ids=torch.tensor(s["ids"])).logits
            err = rel(logits, ours[f"{case}.logits"])
            if err > 1e-5:
                failures.append(f"{case}: logits, PEFT vs nibble relative error {err:.3g}")
        else:
            for name in names:
                got = peft_model.base_model.model.get_submodule(name)(inputs[f"x.{name}"])
                err = rel(got, ours[f"{case}.{name}"])
                if err > 1e-5:
                    failures.append(f"{case} {name}: PEFT vs nibble relative error {err:.3g}")
    if s.get("fresh_dora"):
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                layer = module.lora_magnitude_vector["default"]
                saved = layer.weight.detach().clone()
                layer.update_layer(
                    base_layer=module.get_base_layer(),
                    lora_A=module.lora_A["default"].weight,
                    lora_B=module.lora_B["default"].weight,
                    scaling=module.scaling["default"],
                )
                err = rel(saved, layer.weight.detach())
                if err > 1e-6:
                    failures.append(f"{case} {name}: nibble's initial magnitude vs PEFT's: relative error {err:.3g}")
if failures:
    print("\n".join(failures))
    sys.exit(1)
print("peft extras check ok:", ", ".join(spec))
"#;

/// Multiply a trainable tensor in place, as an optimizer step would change it.
fn nudge(t: &Tensor, by: &Tensor) {
    tch::no_grad(|| {
        let mut t = t.shallow_clone();
        let v = &t * by;
        t.copy_(&v);
    });
}

#[test]
fn peft_loads_nibble_dora_and_modules_to_save() {
    let Some(python) = python() else { return };
    let work = temp_dir("to-peft-extras");
    let mut spec = serde_json::Map::new();
    let mut outputs = Vec::new();
    let dora_cases = [
        (
            "dora_dense",
            "toy",
            serde_json::json!({"r": 3, "lora_alpha": 6, "lora_dropout": 0.1,
            "target_modules": ["q_proj", "v_proj", "mlp.up_proj"], "use_dora": true, "init_lora_weights": false}),
        ),
        (
            "dora_4bit",
            "toy4",
            serde_json::json!({"r": 2, "lora_alpha": 8,
            "target_modules": ["q_proj", "down_proj"], "use_dora": true, "init_lora_weights": false}),
        ),
    ];
    for (case, kind, kwargs) in dora_cases {
        for fresh in [true, false] {
            let (mut linears, inputs) = dora_base(case);
            let k = &kwargs;
            let targets = k["target_modules"].as_array().expect("list").iter();
            let mut cfg = LoraConfig::new(
                k["r"].as_u64().expect("r") as usize,
                k["lora_alpha"].as_f64().expect("alpha"),
                TargetModules::List(targets.map(|t| t.as_str().expect("str").to_owned()).collect()),
            );
            cfg.dropout = k.get("lora_dropout").and_then(|d| d.as_f64()).unwrap_or(0.0);
            cfg.use_dora = true;
            cfg.init = LoraInit::False;
            let adapters = inject(offer(&mut linears), &cfg, 21).expect("inject");
            if !fresh {
                for m in adapters.modules() {
                    let mag = m.magnitude().expect("magnitude");
                    nudge(
                        mag,
                        &(Tensor::arange(mag.size()[0], (Kind::Float, tch::Device::Cpu)) * 0.02 + 0.9),
                    );
                }
            }
            adapters.set_training(false);
            let name = format!("{case}_{}", if fresh { "fresh" } else { "trained" });
            for (module, layer) in &linears {
                let y = layer.forward(&inputs[&format!("x.{module}")]).expect("forward");
                outputs.push(raw_f32(format!("{name}.{module}"), &y));
            }
            adapters.save(&work.join(&name)).expect("save");
            spec.insert(name, serde_json::json!({"kind": kind, "kwargs": kwargs, "fresh_dora": fresh}));
        }
    }
    let model_cases = [
        (
            "mts_llama",
            "llama",
            serde_json::json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"],
            "modules_to_save": ["lm_head"], "init_lora_weights": false}),
        ),
        (
            "mts_qwen2_dora",
            "qwen2",
            serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "up_proj"],
            "modules_to_save": ["embed_tokens", "lm_head"], "use_dora": true, "init_lora_weights": false}),
        ),
    ];
    for (case, family, kwargs) in model_cases {
        let k = &kwargs;
        let list = |key: &str| -> Vec<String> {
            k[key].as_array().expect("list").iter().map(|t| t.as_str().expect("str").to_owned()).collect()
        };
        let mut cfg = LoraConfig::new(
            k["r"].as_u64().expect("r") as usize,
            k["lora_alpha"].as_f64().expect("alpha"),
            TargetModules::List(list("target_modules")),
        );
        cfg.modules_to_save = list("modules_to_save");
        cfg.use_dora = k.get("use_dora").is_some();
        cfg.init = LoraInit::False;
        let mut model = tiny_model(family);
        let (linears, tensors) = model.adaptable_mut();
        let adapters = inject_with_modules(linears, tensors, &cfg, 33).expect("inject");
        assert_eq!(adapters.saved().len(), cfg.modules_to_save.len());
        for s in adapters.saved() {
            let t = s.trainable();
            nudge(
                t,
                &(Tensor::arange(t.numel() as i64, (Kind::Float, tch::Device::Cpu))
                    .view(t.size().as_slice())
                    .sin()
                    * 0.05
                    + 1.0),
            );
        }
        for m in adapters.modules() {
            if let Some(mag) = m.magnitude() {
                nudge(mag, &Tensor::from(1.1f32));
            }
        }
        adapters.set_training(false);
        let ids: Vec<Vec<i64>> =
            (0..2).map(|b| (0..6).map(|t| (b * 37 + t * 11 + 5) % 96).collect()).collect();
        let flat: Vec<i64> = ids.concat();
        let logits = model.forward(&Tensor::from_slice(&flat).view([2, 6]), None, None).expect("forward");
        outputs.push(raw_f32(format!("{case}.logits"), &logits));
        adapters.save(&work.join(case)).expect("save");
        spec.insert(
            case.to_owned(),
            serde_json::json!({"kind": "model", "family": family, "kwargs": kwargs, "ids": ids}),
        );
    }
    quant::file::write(&work.join("outputs.safetensors"), &outputs, &Default::default()).expect("outputs");
    std::fs::write(work.join("spec.json"), serde_json::Value::Object(spec).to_string()).expect("spec");
    let scripts = script().parent().expect("scripts dir").to_owned();
    let out = run_python(
        &python,
        &[
            "-c".as_ref(),
            PEFT_CHECK_EXTRAS.as_ref(),
            work.as_os_str(),
            golden().as_os_str(),
            scripts.as_os_str(),
        ],
    );
    assert!(
        out.contains("peft extras check ok: dora_dense_fresh, dora_dense_trained, dora_4bit_fresh"),
        "{out}"
    );
    std::fs::remove_dir_all(&work).expect("clean up");
}

/// PEFT's fresh adapter after transformers' `set_seed`, as TRL makes it before training: A and B
/// for each `init_lora_weights`, on each tiny family, written to `argv[1]/<case>.safetensors`.
const PEFT_SEEDED_INIT: &str = r#"
import pathlib, sys, warnings
sys.path.insert(0, sys.argv[2])
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import set_seed
import golden_peft as gp

out = pathlib.Path(sys.argv[1])
for family in ["llama", "qwen3"]:
    for init in [True, "gaussian", False]:
        for seed, targets in [(42, "all-linear"), (7, ["q_proj", "v_proj"])]:
            set_seed(seed)
            model = gp.tiny_model(family)
            set_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
            tensors = {n: p.detach().contiguous() for n, p in m.named_parameters() if "lora_" in n}
            save_file(tensors, str(out / f"{family}-{str(init).lower()}-{seed}.safetensors"))
"#;

/// With nothing exchanged, the seed gives PEFT's starting tensors bit for bit: nibble draws from
/// libtorch's generator in PEFT's order (module order; per module the two constructors' draws,
/// then A redrawn as `init_lora_weights` says).
#[test]
fn the_seed_gives_pefts_starting_adapter_bit_for_bit() {
    let Some(python) = python() else { return };
    let dir = temp_dir("seeded-init");
    let scripts = script().parent().expect("scripts").to_path_buf();
    run_python(&python, &["-c".as_ref(), PEFT_SEEDED_INIT.as_ref(), dir.as_os_str(), scripts.as_os_str()]);
    for family in ["llama", "qwen3"] {
        for (init, label) in
            [(LoraInit::Default, "true"), (LoraInit::Gaussian, "gaussian"), (LoraInit::False, "false")]
        {
            for (seed, targets) in [
                (42, TargetModules::AllLinear),
                (7, TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
            ] {
                let case = format!("{family}-{label}-{seed}");
                let theirs = read_tensors(&dir.join(format!("{case}.safetensors")));
                let mut model = tiny_model(family);
                let mut cfg = LoraConfig::new(4, 8.0, targets);
                cfg.init = init;
                let adapters = inject(model.linears_mut(), &cfg, seed).expect("inject");
                assert_eq!(theirs.len(), 2 * adapters.modules().len(), "{case}: adapted modules");
                for m in adapters.modules() {
                    for (which, ours) in [("lora_A", m.lora_a()), ("lora_B", m.lora_b())] {
                        let key = format!("base_model.model.{}.{which}.default.weight", m.name());
                        let want = theirs.get(&key).unwrap_or_else(|| panic!("{case}: PEFT has no {key}"));
                        assert!(ours.equal(want), "{case}: {key} differs from PEFT's draw");
                    }
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}
