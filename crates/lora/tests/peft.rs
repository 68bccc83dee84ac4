//! Parity with the pinned PEFT, both ways. Adapters PEFT saved (golden files from
//! `scripts/golden_peft.py`) load here, give PEFT's outputs and save back to the same bytes;
//! adapters nibble saves load in PEFT with no missing or unexpected key, give nibble's outputs,
//! and carry the `adapter_config.json` PEFT itself writes for the same adapter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use lora::{Adapters, LoraConfig, LoraInit, TargetModules, inject, inject_from};
use quant::linear::{Dense, Linear};
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

/// The toy model's linears as Dense layers with the golden base weights.
fn toy(base: &HashMap<String, Tensor>) -> Vec<(String, Box<dyn Linear>)> {
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
    let now = read_tensors(&dir.join("base.safetensors"));
    let committed = read_tensors(&golden().join("base.safetensors"));
    let mut names: Vec<&String> = committed.keys().collect();
    let mut names_now: Vec<&String> = now.keys().collect();
    names.sort();
    names_now.sort();
    assert_eq!(names, names_now, "base.safetensors is stale; {regenerate}");
    for name in names {
        let (a, b) = (&now[name], &committed[name]);
        // Inputs and weights are exact; outputs may differ in the last bits on another CPU.
        let exact = name.ends_with(".weight") || name.ends_with(".bias") || name.starts_with("x.");
        let ok = if exact { a.equal(b) } else { max_rel_err(a, b) <= 1e-6 };
        assert!(ok, "base.safetensors: `{name}` is stale; {regenerate}");
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
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
