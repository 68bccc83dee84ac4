//! The optimizer step against torch itself (the pinned torch of `NIBBLE_PYTHON`): the same
//! parameters and gradients through `clip_grad_norm_` and `torch.optim.AdamW` give the same bits,
//! for f32 adapters and for the bf16 ones TRL trains on a 4-bit base, clipping on and off, with
//! torch's fused kernel (transformers' default) and its single-tensor loop.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

use sft::train::optim::{AdamW, AdamWConfig, clip_grad_norm};
use tch::{Kind, Tensor};

const TORCH_SIDE: &str = r#"
import sys, torch
from safetensors.torch import save_file
out, fused, steps = sys.argv[1], sys.argv[2] == "fused", 8
g = torch.Generator().manual_seed(3)
shapes = [("a", (8, 40), torch.bfloat16), ("b", (40, 8), torch.bfloat16), ("m", (40,), torch.float32), ("f", (16, 16), torch.float32)]
params = [(torch.randn(s, generator=g) * 0.05).to(d) for _, s, d in shapes]
t = {f"init.{n}": p.clone() for (n, _, _), p in zip(shapes, params)}
params = [p.requires_grad_() for p in params]
opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01, fused=fused)
for step in range(steps):
    scale = 0.3 if step % 2 else 0.01  # clipping on every other step
    for (n, s, d), p in zip(shapes, params):
        p.grad = (torch.randn(s, generator=g) * scale).to(d)
        t[f"grad.{step}.{n}"] = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    t[f"norm.{step}"] = norm.detach().float().reshape(1)
    opt.step()
    for (n, _, _), p in zip(shapes, params):
        t[f"after.{step}.{n}"] = p.detach().clone()
save_file(t, out)
"#;

/// transformers' default `adamw_torch_fused`: torch's fused kernel.
#[test]
fn fused_adamw_and_clipping_give_torchs_bits() {
    compare(true);
}

/// `adamw_torch` on a CPU: torch's single-tensor loop.
#[test]
fn single_tensor_adamw_and_clipping_give_torchs_bits() {
    compare(false);
}

fn compare(fused: bool) {
    let python = std::env::var("NIBBLE_PYTHON")
        .expect("NIBBLE_PYTHON is unset: run `cargo xtask setup` (it installs the pinned torch and sets it)");
    let file =
        std::env::temp_dir().join(format!("nibble-optim-torch-{}-{fused}.safetensors", std::process::id()));
    let o = Command::new(python)
        .args(["-c", TORCH_SIDE])
        .arg(&file)
        .arg(if fused { "fused" } else { "single" })
        .output()
        .unwrap();
    assert!(o.status.success(), "torch side failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let t: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&file).unwrap().into_iter().collect();
    let _ = std::fs::remove_file(&file);
    let names = ["a", "b", "m", "f"];
    let params: Vec<Tensor> =
        names.iter().map(|n| t[&format!("init.{n}")].copy().set_requires_grad(true)).collect();
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, fused };
    let mut opt = AdamW::new(params.iter().map(Tensor::shallow_clone).collect(), cfg).unwrap();
    for step in 0..8 {
        opt.zero_grad();
        for (n, p) in names.iter().zip(&params) {
            // d/dp sum(p * g) = g, exactly, in p's dtype.
            (p * &t[&format!("grad.{step}.{n}")]).sum(Kind::Float).backward();
        }
        let norm = clip_grad_norm(&params, 1.0).unwrap();
        let want = t[&format!("norm.{step}")].double_value(&[0]);
        assert_eq!(norm, want, "step {step}: gradient norm");
        opt.step(2e-3).unwrap();
        for (n, p) in names.iter().zip(&params) {
            let want = &t[&format!("after.{step}.{n}")];
            assert_eq!(p.kind(), want.kind());
            let diff =
                (p.detach().to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs().max().double_value(&[]);
            assert!(p.detach().equal(want), "step {step}: {n} differs from torch's AdamW by up to {diff:e}");
        }
    }
}
