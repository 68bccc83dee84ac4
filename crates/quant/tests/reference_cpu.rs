//! The pin on the reference stack's CPU paths (scripts/refcpu, docs/reference-cpu-paths.md): each
//! mode gives bitsandbytes the probes it says, the forced AVX512-BF16 mode reproduces that host's
//! failures on any host, and `nibble_refcpu.portable_4bit` keeps a 4-bit module off them.

use std::process::Command;

fn python() -> String {
    std::env::var("NIBBLE_PYTHON").unwrap_or_else(|_| {
        panic!("NIBBLE_PYTHON is not set: run `cargo xtask setup` (it installs the pinned Python stack)")
    })
}

/// Runs `script` in a reference process pinned to `mode` and returns its last stdout line.
fn run_pinned(mode: &str, script: &str) -> String {
    let out = Command::new(python())
        .env("TORCHDYNAMO_DISABLE", "1")
        .env("NIBBLE_REF_CPU", mode)
        .arg("-c")
        .arg(script)
        .output()
        .expect("run NIBBLE_PYTHON");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python ({mode}) failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().last().unwrap_or_default().to_owned()
}

/// What a process sees: torch's capability, bitsandbytes' two probes, a Linear4bit's copy of the
/// bf16 one, and whether the int8 matmul went to `torch._int_mm`.
const PROBES: &str = r#"
import json, nibble_refcpu, torch
import bitsandbytes as bnb, bitsandbytes.functional as F
from bitsandbytes.backends.cpu import ops
m = bnb.nn.Linear4bit(64, 40)
print(json.dumps({"mode": nibble_refcpu.applied(), "capability": torch.backends.cpu.get_cpu_capability(),
                  "bnb_avx512": ops._has_avx512, "bf16": bool(F.has_avx512bf16()),
                  "module_bf16": bool(m.support_avx512bf16_for_cpu)}))
"#;

#[test]
fn each_mode_gives_bitsandbytes_its_probes() {
    for (mode, avx512) in [("avx2", false), ("avx512bf16", true)] {
        let seen: serde_json::Value = serde_json::from_str(&run_pinned(mode, PROBES)).expect("json");
        assert_eq!(seen["mode"], mode, "{seen}");
        assert_eq!(seen["capability"] == "AVX512", avx512, "{mode}: {seen}");
        for probe in ["bnb_avx512", "bf16", "module_bf16"] {
            assert_eq!(seen[probe], avx512, "{mode}: {probe} in {seen}");
        }
    }
    // The suite's own reference processes: the default pin, unless the run asks for another.
    let suite =
        std::env::var("NIBBLE_REF_CPU").ok().filter(|m| !m.is_empty()).unwrap_or_else(|| "avx2".into());
    let out = Command::new(python())
        .env("TORCHDYNAMO_DISABLE", "1")
        .args(["-c", "import nibble_refcpu; print(nibble_refcpu.applied())"])
        .output()
        .expect("python");
    let applied = String::from_utf8_lossy(&out.stdout);
    assert_eq!(applied.trim(), suite, "sitecustomize did not pin: is scripts/refcpu on PYTHONPATH?");
}

/// A 4-bit layer of 64 inputs and `argv[1]` outputs, in train mode and then in eval mode without
/// grad (the forward bitsandbytes repacks for its fused kernel where it sees AVX512-BF16), with
/// `portable_4bit` first when `argv[2]` says so: the eval output against the train one, or the
/// error the eval forward raised.
const EVAL_FORWARD: &str = r#"
import json, sys, torch, nibble_refcpu
import bitsandbytes as bnb
out_features, portable = int(sys.argv[1]), sys.argv[2] == "portable"
torch.manual_seed(0)
m = bnb.nn.Linear4bit(64, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
m.weight = bnb.nn.Params4bit(torch.randn(out_features, 64), requires_grad=False, quant_type="nf4")
m = m.to("cpu")
x = torch.randn(3, 64)
m.train()
with torch.no_grad():
    want = m(x)
if portable:
    nibble_refcpu.portable_4bit(m)
m.eval()
seen = {"host_bf16": nibble_refcpu._host_bf16}
try:
    with torch.no_grad():
        got = m(x)
    seen.update(equal=torch.equal(got, want), rel=((got - want).abs().max() / want.abs().max()).item())
except (AssertionError, RuntimeError) as e:
    seen["error"] = str(e)
print(json.dumps(seen))
"#;

fn eval_forward(mode: &str, out_features: usize, portable: bool) -> serde_json::Value {
    let portable = if portable { "portable" } else { "plain" };
    let script = format!("import sys; sys.argv[1:] = [\"{out_features}\", \"{portable}\"]\n{EVAL_FORWARD}");
    serde_json::from_str(&run_pinned(mode, &script)).expect("json")
}

#[test]
fn forced_avx512bf16_reproduces_the_repacking_and_portable_4bit_avoids_it() {
    // 40 outputs: not a multiple of the 32 the repacking needs.
    let forced = eval_forward("avx512bf16", 40, false);
    assert_eq!(forced["error"], "N must be divisible by block_n", "{forced}");
    for mode in ["avx2", "avx512bf16"] {
        let portable = eval_forward(mode, 40, true);
        assert_eq!(portable["equal"], true, "{mode}: {portable}");
    }
    assert_eq!(eval_forward("avx2", 40, false)["equal"], true);
}

/// FP4 code 8 ("-0") through bitsandbytes' dequantize: -0 on the scalar kernel, +0 on the native
/// AVX-512 one (which the forced mode shows on every host).
const FP4_ZERO: &str = r#"
import json, torch
import bitsandbytes.functional as F
packed, state = F.quantize_4bit(torch.ones(2, 64), blocksize=64, quant_type="fp4")
packed.view(-1)[0] = 0x83  # codes 8 ("-0") and 3 (1.0)
out = F.dequantize_4bit(packed, state)
print(json.dumps({"zero": out[0, 0].item(), "one": out[0, 1].item(), "negative_zero": bool(torch.signbit(out[0, 0]))}))
"#;

#[test]
fn forced_avx512bf16_gives_fp4_zeros_the_avx512_sign() {
    let forced: serde_json::Value = serde_json::from_str(&run_pinned("avx512bf16", FP4_ZERO)).expect("json");
    assert_eq!((forced["zero"].as_f64(), forced["one"].as_f64()), (Some(0.0), Some(1.0)), "{forced}");
    assert_eq!(forced["negative_zero"], false, "{forced}");
}

/// Rows of 160 at blocksize 64, where bitsandbytes' native AVX-512 dequantize is wrong: every
/// pinned mode gives `code * absmax` (its torch implementation) on every host.
const WRONG_ON_AVX512: &str = r#"
import json, torch
import bitsandbytes.functional as F
from bitsandbytes.backends.utils import _get_4bit_code
worst = 0.0
for qt in ["nf4", "fp4"]:
    w = torch.randn(3, 160, generator=torch.Generator().manual_seed(1))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=qt)
    b = packed.view(-1)
    nibbles = torch.stack([b >> 4, b & 15], dim=1).view(-1).long()
    exact = (_get_4bit_code(qt, b.device)[nibbles] * state.absmax[torch.arange(480) // 64]).view(3, 160)
    worst = max(worst, (F.dequantize_4bit(packed, state) - exact).abs().max().item())
print(json.dumps({"worst": worst}))
"#;

#[test]
fn pinned_modes_dequantize_every_row_length_right() {
    for mode in ["avx2", "avx512bf16"] {
        let seen: serde_json::Value = serde_json::from_str(&run_pinned(mode, WRONG_ON_AVX512)).expect("json");
        assert_eq!(seen["worst"].as_f64(), Some(0.0), "{mode}: {seen}");
    }
}

/// A layer the AVX512-BF16 repacking accepts (64 x 64) in the forced mode: a host with
/// AVX512-BF16 runs bitsandbytes' fused kernel (bf16 arithmetic, close to the portable output);
/// a host without it gets an error naming `portable_4bit`, never an illegal instruction.
#[test]
fn forced_avx512bf16_runs_the_fused_kernel_only_where_the_host_can() {
    let seen = eval_forward("avx512bf16", 64, false);
    if seen["host_bf16"] == true {
        let rel = seen["rel"].as_f64().unwrap_or_else(|| panic!("{seen}"));
        assert!(rel < 2e-2, "the fused bf16 kernel is far from the portable path: {seen}");
    } else {
        let error = seen["error"].as_str().unwrap_or_else(|| panic!("{seen}"));
        assert!(error.contains("portable_4bit"), "{seen}");
    }
}
