//! `sft RECIPE --measure-floor`: how fast one optimizer step of the recipe could go on this
//! machine. The step's matmuls (the same shapes, dtypes and `cpu_matmul` path as the run, forward
//! and backward, each timed alone through the same libtorch) plus the 4-bit weights' dequantize
//! traffic at this machine's memcpy bandwidth. `cargo xtask bench` sets each training row's step
//! time beside it, so a ratio says how far a trainer is from the machine, not only from another
//! trainer.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{Context, Result};
use device_map::estimate::{BaseWeights, ModelShape, block_linears};
use tch::{Device, Kind, Tensor};

use crate::plan::RunPlan;
use sft::train::clock::sync;

/// What a matmul belongs to, for the breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Part {
    /// A frozen decoder linear (4-bit weights dequantized, or dense).
    Base,
    /// A LoRA factor.
    Lora,
    /// `q k^T` and `p v` (causal: half the square counted).
    Attention,
    /// The output head (vocabulary projection).
    Head,
}

/// Which pass of the step a matmul is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Pass {
    /// The policy's forward.
    Forward,
    /// Its backward (input gradients through frozen weights, adapter gradients).
    Backward,
    /// Gradient checkpointing's second forward of each decoder layer.
    Recompute,
    /// DPO's reference forward (absent when its log-probs are precomputed).
    Reference,
}

/// One GEMM `[batch] (m x k) @ (k x n)` in `kind`, `count` times per optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Gemm {
    pub part: Part,
    pub pass: Pass,
    pub batch: i64,
    pub m: i64,
    pub k: i64,
    pub n: i64,
    pub kind: Kind,
    pub count: f64,
    /// For an adapter's product, the rank-r kernel that computes it where the step runs them.
    pub rank: Option<quant::ops::RankProduct>,
}

impl Gemm {
    /// Floating-point operations of all `count` of it.
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.k * self.n) as f64 * self.count
    }
}

/// What the floor needs to know of a step, resolved from the plan (kept apart from it so the
/// shape arithmetic is testable without a model).
#[derive(Debug, Clone)]
pub(crate) struct StepShape {
    pub model: ModelShape,
    /// Sequences per micro-batch (DPO: chosen and rejected, 2 x the batch size).
    pub rows: i64,
    /// Tokens per sequence.
    pub seq: i64,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub micro_batches: i64,
    /// LoRA rank (0: no adapters).
    pub lora_r: i64,
    /// Which block linears carry adapters (PEFT names, `q_proj`, ...).
    pub lora_targets: Vec<String>,
    /// The dtype the decoder's matmuls run in (f32 where `cpu_matmul` upcasts 16-bit ones).
    pub compute: Kind,
    /// The dtype the adapters' matmuls run in.
    pub adapter: Kind,
    /// The dtype the head's forward product runs in.
    pub head: Kind,
    /// The dtype its gradient product runs in (f32 where the run takes TRL's f32 product).
    pub head_grad: Kind,
    pub checkpointing: bool,
    /// The adapters' products run as nibble's rank-r kernels (`quant::ops::lora_update`), on
    /// activations of this dtype: the floor takes the faster of them and torch's matmul.
    pub lora_kernels: Option<Kind>,
    /// DPO's reference forward each step: `Some(with adapters)` (a frozen initial adapter
    /// scores the reference), `None` without one (SFT, or precomputed log-probs).
    pub reference: Option<bool>,
    /// Bytes one dequantize of a weight element reads (codes and block scales), when the base is
    /// 4-bit.
    pub four_bit_read: Option<f64>,
    /// Bytes it writes (the compute dtype's element).
    pub dequant_write: f64,
}

/// Every matmul of one optimizer step.
pub(crate) fn gemms(s: &StepShape) -> Vec<Gemm> {
    let mut out = Vec::new();
    let layers = s.model.layers as f64;
    let micro = s.micro_batches as f64;
    let (n_tok, t) = (s.rows * s.seq, s.seq);
    let mut add = |part, pass, batch, m, k, n, kind, count: f64| {
        out.push(Gemm { part, pass, batch, m, k, n, kind, count: count * micro, rank: None });
    };
    // A block's linears, `(PEFT name, in, out)`, as the memory estimate knows them.
    let linears: Vec<_> =
        block_linears(&s.model).into_iter().map(|(name, i, o)| (name, i as i64, o as i64)).collect();
    let targeted = |name: &str| s.lora_r > 0 && s.lora_targets.iter().any(|t| t == name);
    // A mixture's experts, `(in, out)` per expert linear, each over an even share of the routed
    // rows (`tokens * top_k / experts`), and its router.
    let (experts, expert_rows, router) = match s.model.moe {
        None => (Vec::new(), 0, 0),
        Some(m) => {
            let (h, i) = (s.model.hidden as i64, m.intermediate as i64);
            let rows = (n_tok * m.top_k as i64 + m.experts as i64 - 1) / m.experts as i64;
            (vec![(h, i), (h, i), (i, h)], rows, m.experts as i64)
        }
    };
    let per_expert = s.model.moe.map_or(0.0, |m| m.experts as f64) * layers;
    // One forward of `share` of the decoder layers: each linear, its adapter, attention's two
    // products.
    let forward =
        |add: &mut dyn FnMut(Part, Pass, i64, i64, i64, i64, Kind, f64), pass, adapters: bool, share: f64| {
            let (layers, per_expert) = (layers * share, per_expert * share);
            for &(name, fan_in, fan_out) in &linears {
                add(Part::Base, pass, 1, n_tok, fan_in, fan_out, s.compute, layers);
                if adapters && targeted(name) {
                    add(Part::Lora, pass, 1, n_tok, fan_in, s.lora_r, s.adapter, layers);
                    add(Part::Lora, pass, 1, n_tok, s.lora_r, fan_out, s.adapter, layers);
                }
            }
            if router > 0 {
                add(Part::Base, pass, 1, n_tok, s.model.hidden as i64, router, s.compute, layers);
            }
            for &(fan_in, fan_out) in &experts {
                add(Part::Base, pass, 1, expert_rows, fan_in, fan_out, s.compute, per_expert);
            }
            let (bh, hd) = (s.rows * s.model.heads as i64, s.model.head_dim as i64);
            add(Part::Attention, pass, bh, t, hd, t, s.compute, layers * 0.5);
            add(Part::Attention, pass, bh, t, t, hd, s.compute, layers * 0.5);
        };
    let (h, v) = (s.model.hidden as i64, s.model.vocab as i64);
    forward(&mut add, Pass::Forward, true, 1.0);
    add(Part::Head, Pass::Forward, 1, n_tok, h, v, s.head, 1.0);
    // Backward: the head's input gradient (the head is frozen), then each layer's.
    add(Part::Head, Pass::Backward, 1, n_tok, v, h, s.head_grad, 1.0);
    for &(name, fan_in, fan_out) in &linears {
        add(Part::Base, Pass::Backward, 1, n_tok, fan_out, fan_in, s.compute, layers);
        if targeted(name) {
            let r = s.lora_r;
            // dB = dY^T (x A^T), d(x A^T) = dY B, dA = d(x A^T)^T x, dx += d(x A^T) A.
            add(Part::Lora, Pass::Backward, 1, fan_out, n_tok, r, s.adapter, layers);
            add(Part::Lora, Pass::Backward, 1, n_tok, fan_out, r, s.adapter, layers);
            add(Part::Lora, Pass::Backward, 1, r, n_tok, fan_in, s.adapter, layers);
            add(Part::Lora, Pass::Backward, 1, n_tok, r, fan_in, s.adapter, layers);
        }
    }
    // The experts and router are frozen: their inputs' gradients only.
    if router > 0 {
        add(Part::Base, Pass::Backward, 1, n_tok, router, s.model.hidden as i64, s.compute, layers);
    }
    for &(fan_in, fan_out) in &experts {
        add(Part::Base, Pass::Backward, 1, expert_rows, fan_out, fan_in, s.compute, per_expert);
    }
    // dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q.
    let (bh, hd) = (s.rows * s.model.heads as i64, s.model.head_dim as i64);
    add(Part::Attention, Pass::Backward, bh, t, t, hd, s.compute, layers * 1.5);
    add(Part::Attention, Pass::Backward, bh, t, hd, t, s.compute, layers * 0.5);
    if s.checkpointing {
        forward(&mut add, Pass::Recompute, true, recomputed_share(s));
    }
    if let Some(adapters) = s.reference {
        forward(&mut add, Pass::Reference, adapters, 1.0);
        add(Part::Head, Pass::Reference, 1, n_tok, h, v, s.head, 1.0);
    }
    // The adapters' products in the order listed: a forward pass's adapter is `x A^T` then its
    // B product, a backward's the gradients of B and of `x A^T`, of A and of x.
    use quant::ops::RankProduct::{Contract, Expand, Reduce};
    let mut nth: BTreeMap<Pass, usize> = BTreeMap::new();
    for g in out.iter_mut().filter(|g| g.part == Part::Lora) {
        let i = nth.entry(g.pass).or_insert(0);
        g.rank = Some(if g.pass == Pass::Backward {
            [Reduce, Contract, Reduce, Expand][*i % 4]
        } else {
            [Contract, Expand][*i % 2]
        });
        *i += 1;
    }
    out
}

/// The share of the decoder layers checkpointing runs twice: all but the last, whose graph the
/// step keeps from its forward (`train::step::Layers`).
fn recomputed_share(s: &StepShape) -> f64 {
    let layers = s.model.layers as f64;
    if s.checkpointing && layers > 0.0 { (layers - 1.0) / layers } else { 0.0 }
}

/// Dequantize passes over every 4-bit weight per micro-batch: forward and backward (the layer
/// keeps only the codes), the recompute (all layers but the last) and the reference forward
/// when there are.
fn dequant_passes(s: &StepShape) -> f64 {
    (2.0 + recomputed_share(s) + f64::from(u8::from(s.reference.is_some()))) * s.micro_batches as f64
}

/// The step shape `plan` trains, on the CPU or its device.
pub(crate) fn step_shape(plan: &RunPlan) -> StepShape {
    let run = plan.run_shape(plan.map_device());
    let kind = plan.load.compute_dtype;
    let upcast = |k: Kind| {
        if quant::ops::matmul_in_f32_under(plan.cpu_matmul, k, plan.device) { Kind::Float } else { k }
    };
    let compute = upcast(kind);
    let adapter = upcast(if run.adapter_bytes == 4 { Kind::Float } else { Kind::BFloat16 });
    // The head's logits come from its weight's dtype (upcast as any frozen 16-bit product); its
    // gradient product as `head_product_in_f32` says (under the process's policy, which `main`
    // set from the recipe).
    let head = upcast(plan.load.dtype);
    let head_grad = if sft::train::head_product_in_f32(plan.load.dtype, plan.device) {
        Kind::Float
    } else {
        plan.load.dtype
    };
    let four_bit_read = match run.base {
        // Codes, then the block scales: one byte per 64 elements, plus the nested f32 absmax per
        // 256 blocks, or one f32 per 64 elements.
        BaseWeights::FourBit { double_quant: true } => Some(0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0)),
        BaseWeights::FourBit { double_quant: false } => Some(0.5 + 4.0 / 64.0),
        _ => None,
    };
    StepShape {
        model: plan.model_config.shape,
        rows: run.batch as i64,
        seq: run.seq as i64,
        micro_batches: plan.grad_accum.max(1) as i64,
        lora_r: run.lora_r as i64,
        lora_targets: run.lora_targets.clone(),
        compute,
        adapter,
        head,
        head_grad,
        checkpointing: run.gradient_checkpointing,
        lora_kernels: lora_kernels(plan, &run),
        reference: plan.dpo.as_ref().filter(|d| !d.precompute).map(|_| plan.lora_init_adapter.is_some()),
        four_bit_read,
        dequant_write: match compute {
            Kind::Float => 4.0,
            _ => 2.0,
        },
    }
}

/// The activations' dtype where the run's adapters take nibble's fused kernels (the conditions
/// `lora::LoraLinear` checks: f32 factors of rank <= 64 without dropout on bf16/f32 CPU
/// activations, a CPU with the kernels, a policy other than `native`).
fn lora_kernels(plan: &RunPlan, run: &device_map::estimate::RunShape) -> Option<Kind> {
    let activations = plan.load.compute_dtype;
    let factors = if run.adapter_bytes == 4 { Kind::Float } else { Kind::BFloat16 };
    (!run.lora_dropout
        && quant::ops::lora_kernels_fit(
            plan.cpu_matmul,
            factors,
            activations,
            plan.device,
            run.lora_r as i64,
        ))
    .then_some(activations)
}

/// Operands for one adapter product as the step's kernel takes them (`a`, `b`, which kernel):
/// `[m, k] x [k, n]` with one side the rank; the gradient of B, `[out, rows] x [rows, r]` in the
/// list, is the kernel's `a^T b` over the rows (`[rows, r]`, `[rows, out]`).
fn rank_operands(g: &Gemm, act: Kind) -> Result<(Tensor, Tensor, quant::ops::RankProduct)> {
    use quant::ops::RankProduct;
    let f = |s: [i64; 2], k: Kind| Tensor::f_randn(s, (k, Device::Cpu));
    let op = g.rank.ok_or_else(|| anyhow::anyhow!("{g:?} is no adapter product"))?;
    let (a, b) = match op {
        RankProduct::Expand => (f([g.m, g.k], Kind::Float)?, f([g.k, g.n], Kind::Float)?),
        // The gradient of A, `[r, rows] x [rows, in]`: the rows are the sum.
        RankProduct::Reduce if g.m < g.n => (f([g.k, g.m], Kind::Float)?, f([g.k, g.n], act)?),
        // The gradient of B, `[out, rows] x [rows, r]`, as `a^T b` over the rows.
        RankProduct::Reduce => (f([g.k, g.n], Kind::Float)?, f([g.k, g.m], act)?),
        RankProduct::Contract => (f([g.m, g.k], act)?, f([g.k, g.n], Kind::Float)?),
    };
    Ok((a, b, op))
}

/// The measured floor.
#[derive(Debug, Clone, Default)]
pub(crate) struct Floor {
    /// Seconds of the step's matmuls, each shape timed alone.
    pub matmul_s: f64,
    /// Seconds to move the dequantize traffic at memcpy bandwidth.
    pub dequant_s: f64,
    /// Bytes read + written per second by a large copy.
    pub memcpy_bytes_per_s: f64,
    /// Matmul FLOP per step, recompute included.
    pub flops: f64,
    /// Matmul FLOP per step the model needs (gradient checkpointing's recompute left out).
    pub model_flops: f64,
    /// Seconds by `part/pass`.
    pub by: BTreeMap<String, f64>,
}

/// Median seconds of `f` over repeats that fill about `budget_s` (at least 3, at most 50).
fn time_median(device: Device, budget_s: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    sync(device);
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 3 || (times.len() < 50 && started.elapsed().as_secs_f64() < budget_s) {
        let t = Instant::now();
        f()?;
        sync(device);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Measures `shape`'s floor on `device`.
pub(crate) fn measure(shape: &StepShape, device: Device) -> Result<Floor> {
    let _guard = tch::no_grad_guard();
    let mut floor = Floor::default();
    let mut seen: HashMap<(i64, i64, i64, i64, Kind, bool), f64> = HashMap::new();
    let list = gemms(shape);
    let bar = indicatif::ProgressBar::new(list.len() as u64).with_message("timing the step's matmuls");
    for g in &list {
        // Where the step runs an adapter's product on nibble's rank-r kernel, the floor is the
        // faster of that kernel and torch's matmul, each timed alone.
        let kernel = shape.lora_kernels.filter(|_| g.part == Part::Lora && g.batch == 1);
        let key = (g.batch, g.m, g.k, g.n, g.kind, kernel.is_some());
        let secs = match seen.get(&key) {
            Some(&s) => s,
            None => {
                let opts = (g.kind, device);
                let (a, b) = if g.batch == 1 {
                    (Tensor::f_randn([g.m, g.k], opts)?, Tensor::f_randn([g.k, g.n], opts)?)
                } else {
                    (Tensor::f_randn([g.batch, g.m, g.k], opts)?, Tensor::f_randn([g.batch, g.k, g.n], opts)?)
                };
                let mut s = time_median(device, 0.3, || {
                    let _ = a.f_matmul(&b)?;
                    Ok(())
                })
                .with_context(|| {
                    format!("timing a {}x{}x{} x{} matmul in {:?}", g.m, g.k, g.n, g.batch, g.kind)
                })?;
                if let Some(act) = kernel {
                    let (a, b, op) = rank_operands(g, act)?;
                    let k = time_median(device, 0.3, || {
                        let _ = quant::ops::lora_rank_product(op, &a, &b)?;
                        Ok(())
                    })
                    .with_context(|| format!("timing a {}x{}x{} rank product ({op:?})", g.m, g.k, g.n))?;
                    s = s.min(k);
                }
                seen.insert(key, s);
                s
            }
        };
        floor.matmul_s += secs * g.count;
        floor.flops += g.flops();
        if g.pass != Pass::Recompute {
            floor.model_flops += g.flops();
        }
        *floor.by.entry(format!("{:?}/{:?}", g.part, g.pass).to_lowercase()).or_insert(0.0) += secs * g.count;
        bar.inc(1);
    }
    bar.finish_and_clear();
    // A copy larger than any cache, read + written.
    let bytes: i64 = 256 << 20;
    let src = Tensor::f_ones([bytes], (Kind::Uint8, device))?;
    let mut dst = Tensor::f_zeros([bytes], (Kind::Uint8, device))?;
    let copy_s = time_median(device, 0.5, || {
        dst.f_copy_(&src)?;
        Ok(())
    })?;
    floor.memcpy_bytes_per_s = 2.0 * bytes as f64 / copy_s;
    if let Some(read) = shape.four_bit_read {
        let elements = shape.model.linear_params() as f64;
        let traffic = elements * (read + shape.dequant_write) * dequant_passes(shape);
        floor.dequant_s = traffic / floor.memcpy_bytes_per_s;
    }
    Ok(floor)
}

/// `sft RECIPE --measure-floor`: measure and print the floor (a table, then one JSON line).
pub fn print(plan: &RunPlan) -> Result<()> {
    let shape = step_shape(plan);
    let floor = measure(&shape, plan.device)?;
    let total = floor.matmul_s + floor.dequant_s;
    #[allow(clippy::print_stdout)]
    {
        println!(
            "step: {} x {} tokens x {} micro-batch(es), matmuls in {:?} (adapters {:?}{}, head {:?}, its gradient {:?}), gradient checkpointing {}{}",
            shape.rows,
            shape.seq,
            shape.micro_batches,
            shape.compute,
            shape.adapter,
            if shape.lora_kernels.is_some() { " on nibble's rank-r kernels" } else { "" },
            shape.head,
            shape.head_grad,
            shape.checkpointing,
            match shape.reference {
                Some(true) => ", DPO reference forward (with the initial adapter)",
                Some(false) => ", DPO reference forward (adapters off)",
                None => "",
            }
        );
        for (what, s) in &floor.by {
            println!("  {what:<24} {:>10.1} ms", s * 1e3);
        }
        println!(
            "  {:<24} {:>10.1} ms ({:.2e} FLOP, {:.2e} of them the model's)",
            "matmuls",
            floor.matmul_s * 1e3,
            floor.flops,
            floor.model_flops
        );
        println!(
            "  {:<24} {:>10.1} ms (memcpy {:.1} GB/s)",
            "dequantize traffic",
            floor.dequant_s * 1e3,
            floor.memcpy_bytes_per_s / 1e9
        );
        println!("  {:<24} {:>10.1} ms", "floor", total * 1e3);
        let by: serde_json::Map<String, serde_json::Value> =
            floor.by.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
        println!(
            "{}",
            serde_json::json!({"floor": {
                "floor_s": total,
                "matmul_s": floor.matmul_s,
                "dequant_s": floor.dequant_s,
                "memcpy_bytes_per_s": floor.memcpy_bytes_per_s,
                "flops": floor.flops,
                "model_flops": floor.model_flops,
                "tokens": shape.rows * shape.seq * shape.micro_batches,
                "by": by,
            }})
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mixture's step counts its routed tokens through `top_k` experts, not every expert: the
    /// FLOPs of the experts' products are `top_k / experts` of all experts on all tokens.
    #[test]
    fn experts_count_only_routed_tokens() {
        let dense = shape();
        let moe = StepShape {
            model: ModelShape {
                moe: Some(device_map::estimate::MoeShape { experts: 8, top_k: 2, intermediate: 160 }),
                ..dense.model
            },
            lora_targets: vec!["q_proj".into()],
            ..shape()
        };
        let base = |s: &StepShape| -> f64 {
            gemms(s).iter().filter(|g| g.part == Part::Base).map(|g| g.flops()).sum()
        };
        let attention_only = StepShape { lora_targets: vec!["q_proj".into()], ..shape() };
        // The dense MLP is 3 linears of 64 x 160 on every token; the mixture runs them on 2/8 of
        // the tokens for each of 8 experts (twice the dense MLP), plus a 64 x 8 router.
        let tokens = (moe.rows * moe.seq) as f64;
        // 2 FLOPs per multiply-add, forward + input gradient, 2 layers.
        let mlp = 3.0 * 2.0 * 2.0 * tokens * 64.0 * 160.0 * 2.0;
        let router = 2.0 * 2.0 * tokens * 64.0 * 8.0 * 2.0;
        let attention = base(&attention_only) - mlp;
        let want = attention + 2.0 * mlp + router;
        assert!((base(&moe) - want).abs() < 1e-6 * want, "{} vs {want}", base(&moe));
    }

    fn shape() -> StepShape {
        StepShape {
            model: ModelShape {
                vocab: 1000,
                hidden: 64,
                intermediate: 160,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                tied_embeddings: false,
                fused_projections: false,
                moe: None,
            },
            rows: 2,
            seq: 32,
            micro_batches: 1,
            lora_r: 8,
            lora_targets: vec!["q_proj".into(), "v_proj".into()],
            compute: Kind::BFloat16,
            adapter: Kind::Float,
            head: Kind::BFloat16,
            head_grad: Kind::Float,
            checkpointing: false,
            lora_kernels: None,
            reference: None,
            four_bit_read: Some(0.5),
            dequant_write: 2.0,
        }
    }

    fn flops(s: &StepShape, pass: Option<Pass>) -> f64 {
        gemms(s).iter().filter(|g| pass.is_none_or(|p| g.pass == p)).map(Gemm::flops).sum()
    }

    #[test]
    fn counts_the_textbook_flops() {
        let s = shape();
        let n = 64.0;
        // Decoder linears: 2 layers x (64x64 + 2x64x32 + 64x64 + 3x64x160) weights.
        let weights = 2.0 * (64.0 * 64.0 * 2.0 + 64.0 * 32.0 * 2.0 + 3.0 * 64.0 * 160.0);
        let lora = 2.0 * 8.0 * ((64.0 + 64.0) + (64.0 + 32.0));
        // Attention, forward: 2 layers x 2 products x 2 rows x 4 heads x 32 x 32 x 16 (causal half).
        let attention = 2.0 * 2.0 * (2.0 * 2.0 * 4.0 * 32.0 * 32.0 * 16.0 * 0.5);
        let head = 64.0 * 1000.0;
        let forward = 2.0 * n * (weights + lora + head) + attention;
        assert!((flops(&s, Some(Pass::Forward)) - forward).abs() < 1e-6 * forward);
        // Backward: input gradients through frozen weights (1x), adapters' four products (2x
        // their forward), attention 2x.
        let backward = 2.0 * n * (weights + 2.0 * lora + head) + 2.0 * attention;
        assert!((flops(&s, Some(Pass::Backward)) - backward).abs() < 1e-6 * backward);
        assert_eq!(flops(&s, Some(Pass::Recompute)), 0.0);
    }

    #[test]
    fn checkpointing_adds_a_forward_and_dpo_a_reference_pass() {
        let base = shape();
        let gc = StepShape { checkpointing: true, ..shape() };
        let fwd = flops(&base, Some(Pass::Forward));
        let head = 2.0 * 64.0 * 64.0 * 1000.0;
        // The recompute is the forward of all layers but the last (of 2 here), without the head.
        assert!((flops(&gc, Some(Pass::Recompute)) - (fwd - head) / 2.0).abs() < 1e-6 * fwd);
        assert_eq!(dequant_passes(&gc), 2.5);
        let dpo = StepShape { reference: Some(false), ..shape() };
        let lora_fwd: f64 = gemms(&base)
            .iter()
            .filter(|g| g.pass == Pass::Forward && g.part == Part::Lora)
            .map(Gemm::flops)
            .sum();
        assert!(lora_fwd > 0.0);
        assert!((flops(&dpo, Some(Pass::Reference)) - (fwd - lora_fwd)).abs() < 1e-6 * fwd);
        let with_init = StepShape { reference: Some(true), ..shape() };
        assert!((flops(&with_init, Some(Pass::Reference)) - fwd).abs() < 1e-6 * fwd);
        assert_eq!(dequant_passes(&base), 2.0);
        assert_eq!(dequant_passes(&StepShape { micro_batches: 3, ..with_init.clone() }), 9.0);
        let accum = StepShape { micro_batches: 4, ..shape() };
        assert!((flops(&accum, None) - 4.0 * flops(&base, None)).abs() < 1e-6 * flops(&accum, None));
    }

    #[test]
    fn measures_a_small_step() -> Result<()> {
        let s = StepShape { checkpointing: true, reference: Some(true), ..shape() };
        let f = measure(&s, Device::Cpu)?;
        assert!(f.matmul_s > 0.0 && f.dequant_s > 0.0 && f.memcpy_bytes_per_s > 0.0);
        assert!(f.flops > f.model_flops);
        let parts: f64 = f.by.values().sum();
        assert!((parts - f.matmul_s).abs() <= 1e-9 * f.matmul_s.max(1.0));
        assert!(f.by.contains_key("lora/reference") && f.by.contains_key("head/backward"));
        // Where the step runs the adapters on nibble's kernels, the floor also times those (and
        // keeps the faster of the two per shape).
        if quant::ops::lora_kernels_available() {
            let k = StepShape { lora_kernels: Some(Kind::BFloat16), ..s.clone() };
            let fk = measure(&k, Device::Cpu)?;
            assert!(fk.by["lora/backward"] > 0.0 && (fk.flops - f.flops).abs() <= 1e-9 * f.flops);
        }
        Ok(())
    }

    /// Each adapter product of the list maps to the kernel the step runs it on, with operands
    /// whose product has the listed FLOP.
    #[test]
    fn adapter_products_map_to_the_steps_kernels() -> Result<()> {
        use quant::ops::RankProduct;
        let s = StepShape { checkpointing: true, ..shape() };
        let mut ops = Vec::new();
        for g in gemms(&s).iter().filter(|g| g.part == Part::Lora) {
            let (a, b, op) = rank_operands(g, Kind::BFloat16)?;
            // `a [m, k] x b [k, n]`, or for a reduce `a [k, m]^T x b [k, n]`: the same FLOP.
            let (sa, sb) = (a.size(), b.size());
            assert_eq!(2 * sa[0] * sa[1] * sb[1], 2 * g.m * g.k * g.n, "{g:?} as {op:?}");
            // The operands meet on the summed side: the rows for a reduce, `k` otherwise.
            if op == RankProduct::Reduce {
                assert_eq!(sa[0], sb[0])
            } else {
                assert_eq!(sa[1], sb[0])
            }
            ops.push((g.pass, op));
        }
        // Forward: contract then expand per adapter; backward: reduce (B), contract, reduce (A),
        // expand.
        assert_eq!(ops[..2], [(Pass::Forward, RankProduct::Contract), (Pass::Forward, RankProduct::Expand)]);
        let back: Vec<_> = ops.iter().filter(|(p, _)| *p == Pass::Backward).map(|(_, o)| *o).collect();
        assert_eq!(
            back[..4],
            [RankProduct::Reduce, RankProduct::Contract, RankProduct::Reduce, RankProduct::Expand]
        );
        let recompute: Vec<_> = ops.iter().filter(|(p, _)| *p == Pass::Recompute).map(|(_, o)| *o).collect();
        assert_eq!(recompute[..2], [RankProduct::Contract, RankProduct::Expand]);
        Ok(())
    }
}
