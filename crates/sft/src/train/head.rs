//! The output head's log-probs and their gradient as TRL 1.16's chunked log-prob head computes
//! them (`trl/kernels/chunked_logprob.py`, the torch path it takes on CPUs), which both its
//! SFTTrainer and DPOTrainer use: a log-sum-exp folded over vocabulary tiles, and a backward
//! that forms `g · (onehot - p)` per tile in f32, rounds it to the head's dtype and multiplies it
//! with the tile's weight rows in f32. The same operations in the same order give the same bits,
//! so nibble's curves follow TRL's to float noise in fp32, and in bf16 under `cpu_matmul: native`
//! (see [`f32_product`] for the faster product `auto` takes on CPUs with native bf16 GEMMs).

use tch::{Kind, Tensor};

/// Columns of one vocabulary tile (TRL's `_CHUNKED_LOGPROB_CHUNK_SIZE`): the fold and the
/// gradient's f32 accumulation go tile by tile, so the tile width decides the rounding.
const VOCAB_TILE: i64 = 32768;

/// Bytes of the head weight's f32 copy made at once in the backward (TRL upcasts a whole tile,
/// 512 MiB at hidden 4096): slabs of columns instead; each output element still sums over the
/// whole tile in one product, so the result is the same.
const WEIGHT_SLAB_BYTES: i64 = 32 << 20;

/// Each row's target log-prob `z[target] - log Σ exp(z)` and its `log Σ exp(z)`, for f32 logits
/// `z [n, vocab]` and `target [n]`, folded as TRL folds them: per tile a running max and a
/// rescaled sum of exponentials, `max + ln(sum)` at the end.
pub(crate) fn target_logps(z: &Tensor, target: &Tensor) -> Result<(Tensor, Tensor), tch::TchError> {
    let (n, v) = (z.size()[0], z.size()[1]);
    let mut m = Tensor::f_full([n], f64::NEG_INFINITY, (Kind::Float, z.device()))?;
    let mut sum = Tensor::f_zeros([n], (Kind::Float, z.device()))?;
    let mut start = 0;
    while start < v {
        let len = VOCAB_TILE.min(v - start);
        let tile = z.f_narrow(1, start, len)?;
        let new_m = m.f_maximum(&tile.f_amax(&[-1i64][..], false)?)?;
        let rescale = m.f_sub(&new_m)?.f_exp()?;
        let e = tile.f_sub(&new_m.f_unsqueeze(-1)?)?.f_exp()?;
        sum = sum.f_mul(&rescale)?.f_add(&e.f_sum_dim_intlist(&[-1i64][..], false, Kind::Float)?)?;
        m = new_m;
        start += len;
    }
    let log_z = m.f_add(&sum.f_log()?)?;
    let lp = z.f_gather(1, &target.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?.f_sub(&log_z)?;
    Ok((lp, log_z))
}

/// Per row of `z [n, vocab]`, whether `argmax(z)` (its first largest entry) is `target [n]`: the
/// accuracy metric's test, exactly, without a full argmax. torch's CPU argmax is a scalar scan
/// (30 ms for 512 x 32000 bf16 logits, 7 ms in f32: 3% of the 134M step), while the row maximum
/// is one vectorized pass; only rows whose target attains the maximum (the hits and any ties)
/// are scanned again for a first maximum before the target.
pub(crate) fn top1_is_target(z: &Tensor, target: &Tensor) -> Result<Tensor, tch::TchError> {
    let target = target.f_unsqueeze(1)?;
    let hit = z.f_gather(1, &target, false)?.f_eq_tensor(&z.f_amax(&[-1i64][..], true)?)?.f_squeeze_dim(1)?;
    let cand = hit.f_nonzero()?.f_reshape([-1])?;
    if cand.size()[0] == 0 {
        return Ok(hit);
    }
    let first = z.f_index_select(0, &cand)?.f_argmax(-1, false)?;
    let same = first.f_eq_tensor(&target.f_index_select(0, &cand)?.f_squeeze_dim(1)?)?;
    hit.f_index_put(&[Some(cand)], &same, false)
}

/// How many rows of `z` predict their `target` ([`top1_is_target`]).
pub(crate) fn top1_hits(z: &Tensor, target: &Tensor) -> Result<u64, tch::TchError> {
    Ok(top1_is_target(z, target)?.f_sum(Kind::Int64)?.f_int64_value(&[])? as u64)
}

/// Whether a `kind` head's gradient product runs as TRL's CPU path runs it, in f32 on the 16-bit
/// values, rather than as a 16-bit GEMM: always for f32; for 16-bit on the CPU under `cpu_matmul:
/// native` (torch's own arithmetic, bit for bit: TRL upcasts there) and where 16-bit products run
/// in f32 anyway (`auto` without native 16-bit GEMMs, or `f32`). On a CPU with native bf16 GEMMs
/// under `auto`, and on a GPU, one 16-bit GEMM: 3-4x faster than the f32 one (the 134M model's
/// head, 512 positions: 27 ms against 90-115 ms), the same sums in another order.
pub fn f32_product(kind: Kind, device: tch::Device) -> bool {
    kind == Kind::Float
        || (device == tch::Device::Cpu
            && (quant::ops::CpuMatmul::current() == quant::ops::CpuMatmul::Native
                || quant::ops::matmul_in_f32(kind, device)))
}

/// The gradient at the head's input of `Σ_i g[i] · lp[i]` (`lp` from [`target_logps`] of the
/// capped `z`), through the frozen `weight [vocab, hidden]`: `z [n, vocab]` the f32 logits the
/// head computed in `kind` (before any soft-cap), returned in `out_kind` (the input's dtype).
/// With a logit soft-cap `cap` (Gemma 2), the tile's gradient is multiplied by `1 - t²`,
/// `t = tanh(z / cap)`, after `g · (onehot - p)`, as TRL's torch path orders it.
#[allow(clippy::too_many_arguments, reason = "the head's pieces, each needed once")]
pub(crate) fn input_grad(
    weight: &Tensor,
    z: &Tensor,
    log_z: &Tensor,
    kind: Kind,
    target: &Tensor,
    g: &Tensor,
    out_kind: Kind,
    cap: Option<f64>,
) -> Result<Tensor, tch::TchError> {
    let (n, v) = (z.size()[0], z.size()[1]);
    let hidden = weight.size()[1];
    let dev = z.device();
    let mut acc = Tensor::f_zeros([n, hidden], (Kind::Float, dev))?;
    let g = g.f_to_device(dev)?.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
    let target = target.f_to_device(dev)?.f_unsqueeze(-1)?;
    let log_z = log_z.f_unsqueeze(-1)?;
    let mut start = 0;
    while start < v {
        let len = VOCAB_TILE.min(v - start);
        // TRL's `g * (onehot - p)`, in place on one buffer: `-p`, plus 1 at the target (`1 - p`
        // and `-p + 1` are the same IEEE sum), times `g`, plus 0 (TRL starts from zeros, so a
        // `-0` product becomes `+0` there too).
        let raw = z.f_narrow(1, start, len)?;
        let tanh = cap.map(|c| raw.f_div_scalar(c)?.f_tanh()).transpose()?;
        let capped = match (&tanh, cap) {
            (Some(t), Some(c)) => t.f_mul_scalar(c)?,
            _ => raw,
        };
        let mut grad = capped.f_sub(&log_z)?.f_exp()?;
        let _ = grad.f_neg_()?;
        let local = target.f_sub_scalar(start)?;
        let in_tile = local.f_ge(0)?.f_logical_and(&local.f_lt(len)?)?;
        let _ = grad.f_scatter_add_(1, &local.f_clamp(0, len - 1)?, &in_tile.f_to_kind(Kind::Float)?)?;
        let _ = grad.f_mul_(&g)?.f_add_scalar_(0.0)?;
        if let Some(t) = &tanh {
            // d(cap · tanh(z / cap)) / dz = 1 - t², formed as TRL forms it.
            let _ = grad.f_mul_(&t.f_mul(t)?.f_neg()?.f_add_scalar(1.0)?)?;
        }
        let rows = weight.f_narrow(0, start, len)?;
        if !f32_product(kind, dev) {
            // One 16-bit GEMM per tile (f32 sums inside, one rounding), into the f32 sum.
            let part = grad.f_to_kind(kind)?.f_mm(&rows.f_to_device(dev)?)?;
            let _ = acc.f_add_(&part.f_to_kind(Kind::Float)?)?;
            start += len;
            continue;
        }
        // TRL writes the tile's gradient into its logits buffer, in the head's dtype.
        if kind != Kind::Float {
            grad = grad.f_to_kind(kind)?.f_to_kind(Kind::Float)?;
        }
        let cols = (WEIGHT_SLAB_BYTES / (4 * len)).max(1);
        let mut j = 0;
        while j < hidden {
            let w = cols.min(hidden - j);
            let slab = rows.f_narrow(1, j, w)?.f_to_device(dev)?.f_to_kind(Kind::Float)?;
            let _ = acc.f_narrow(1, j, w)?.f_addmm_(&grad, &slab)?;
            j += w;
        }
        start += len;
    }
    acc.f_to_kind(out_kind)
}

/// Rows `idx` of the hidden states `flat [positions, hidden]` through the final norm and the
/// frozen head `weight`: the logits (in f32, before any soft-cap) and each row's log-prob of `target [len]`; with
/// `g` (one per row), the gradient of `Σ g · lp`, computed as TRL's chunked head does, is also
/// back-propagated through the norm into `flat`'s graph. What SFT's and DPO's heads share.
pub(crate) fn frozen_chunk(
    model: &model_loader::CausalLm,
    weight: &Tensor,
    flat: &Tensor,
    idx: &Tensor,
    target: &Tensor,
    g: Option<&Tensor>,
) -> Result<(Tensor, Tensor), model_loader::Error> {
    let normed = model.final_norm(&flat.f_index_select(0, idx)?)?;
    let target = target.f_to_device(normed.device())?;
    let (z, lp, grad) = tch::no_grad(|| -> Result<_, model_loader::Error> {
        let logits = model.head_of_normed(&normed)?;
        let z = logits.f_to_kind(Kind::Float)?;
        // TRL caps the f32 tile (Gemma 2's `final_logit_softcapping`).
        let (lp, log_z) = target_logps(&model.cap_logits(&z)?, &target)?;
        let (kind, out_kind) = (logits.f_kind()?, normed.f_kind()?);
        let cap = model.final_logit_softcapping();
        let grad = g.map(|g| input_grad(weight, &z, &log_z, kind, &target, g, out_kind, cap)).transpose()?;
        Ok((z, lp, grad))
    })?;
    if let Some(grad) = grad {
        // Autograd for the norm below the head.
        super::step::backward_from(&normed, &grad)?;
    }
    Ok((z, lp))
}

/// f32 logits of hidden states `x [.., hidden]` through the final norm and the head, soft-capped
/// in f32 where the model caps its logits (as TRL's chunked head caps its f32 tiles); autograd
/// follows them when the head or the input needs it.
pub(crate) fn f32_logits(model: &model_loader::CausalLm, x: &Tensor) -> Result<Tensor, model_loader::Error> {
    let z = model.head_of_normed(&model.final_norm(x)?)?.f_to_kind(Kind::Float)?;
    model.cap_logits(&z)
}

/// `[rows, t]` per-position values (`v`, one per position of `positions` in the flattened
/// `[rows * t]` grid) summed as TRL sums its per-token tensors: zeros elsewhere, over the
/// `t - 1` predicting positions of each row (the last predicts nothing), `[rows, t - 1]`
/// contiguous.
pub(crate) fn grid(v: &Tensor, positions: &Tensor, rows: i64, t: i64) -> Result<Tensor, tch::TchError> {
    let dev = v.device();
    Tensor::f_zeros([rows * t], (Kind::Float, dev))?
        .f_index_copy(0, &positions.f_to_device(dev)?, v)?
        .f_reshape([rows, t])?
        .f_narrow(1, 0, t - 1)?
        .f_contiguous()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Over several vocabulary tiles, the fold gives log-softmax's values and the gradient
    /// autograd's through log-softmax (to rounding).
    #[test]
    fn the_tiled_fold_and_gradient_are_log_softmax_and_its_gradient() {
        let _rng = lora::global_rng();
        tch::manual_seed(3);
        let (n, v, hidden) = (5, 2 * VOCAB_TILE + 17, 6);
        let weight = Tensor::randn([v, hidden], (Kind::Float, tch::Device::Cpu)).f_mul_scalar(0.5).unwrap();
        let x = Tensor::randn([n, hidden], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let target = Tensor::from_slice(&[0i64, 5, VOCAB_TILE, VOCAB_TILE + 3, v - 1]);
        let g = Tensor::from_slice(&[1.0f32, -0.5, 0.25, 2.0, 0.0]);
        let z = x.linear::<Tensor>(&weight, None);
        let want = z.log_softmax(-1, Kind::Float).gather(1, &target.unsqueeze(1), false).squeeze_dim(1);
        (&want * &g).sum(Kind::Float).backward();
        let (lp, log_z) = tch::no_grad(|| target_logps(&z.detach(), &target)).unwrap();
        assert!(f64::try_from((&lp - &want).abs().max()).unwrap() < 1e-5);
        let got =
            input_grad(&weight, &z.detach(), &log_z, Kind::Float, &target, &g, Kind::Float, None).unwrap();
        let err = f64::try_from((&got - x.grad()).abs().max()).unwrap();
        assert!(err < 1e-4, "gradient off by {err}");
    }

    /// With a logit soft-cap the fold takes the capped logits and the gradient is autograd's
    /// through `cap · tanh(z / cap)` and log-softmax.
    #[test]
    fn the_soft_capped_gradient_is_autograds() {
        let _rng = lora::global_rng();
        tch::manual_seed(4);
        let (n, v, hidden, cap) = (4, VOCAB_TILE + 9, 5, 3.0);
        let weight = Tensor::randn([v, hidden], (Kind::Float, tch::Device::Cpu)).f_mul_scalar(2.0).unwrap();
        let x = Tensor::randn([n, hidden], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let target = Tensor::from_slice(&[1i64, VOCAB_TILE + 2, 7, v - 1]);
        let g = Tensor::from_slice(&[1.0f32, -0.5, 2.0, 0.25]);
        let z = x.linear::<Tensor>(&weight, None);
        let capped = (&z / cap).tanh() * cap;
        let want = capped.log_softmax(-1, Kind::Float).gather(1, &target.unsqueeze(1), false).squeeze_dim(1);
        (&want * &g).sum(Kind::Float).backward();
        let zc = tch::no_grad(|| (&z.detach() / cap).tanh() * cap);
        let (lp, log_z) = tch::no_grad(|| target_logps(&zc, &target)).unwrap();
        assert!(f64::try_from((&lp - &want).abs().max()).unwrap() < 1e-5);
        let got = input_grad(&weight, &z.detach(), &log_z, Kind::Float, &target, &g, Kind::Float, Some(cap))
            .unwrap();
        let err = f64::try_from((&got - x.grad()).abs().max()).unwrap();
        assert!(err < 1e-4, "capped gradient off by {err}");
        // And the cap matters: without it the gradient is another one.
        let plain =
            input_grad(&weight, &z.detach(), &log_z, Kind::Float, &target, &g, Kind::Float, None).unwrap();
        assert!(f64::try_from((&plain - x.grad()).abs().max()).unwrap() > 1e-2);
    }

    /// The test is argmax's, ties included: a target that shares the maximum with an earlier
    /// entry is a miss, with a later one a hit; in f32 and on bf16 logits full of ties.
    #[test]
    fn top1_is_argmax_against_the_target_ties_included() {
        let z = Tensor::from_slice(&[
            1.0f32, 3.0, 3.0, 0.0, /**/ 5.0, 2.0, 5.0, 1.0, /**/ 0.0, 1.0, 2.0, 3.0,
        ])
        .reshape([3, 4]);
        // Row 0: max 3 at 1 and 2, target 2 (a later tie: miss) / 1 (first: hit);
        // row 1: max 5 at 0 and 2, target 0 (hit); row 2: target 1 (not the max: miss).
        let got =
            |t: &[i64]| Vec::<bool>::try_from(top1_is_target(&z, &Tensor::from_slice(t)).unwrap()).unwrap();
        assert_eq!(got(&[2, 0, 1]), vec![false, true, false]);
        assert_eq!(got(&[1, 2, 3]), vec![true, false, true]);
        let _rng = lora::global_rng();
        tch::manual_seed(5);
        // bf16 logits rounded coarsely so that maxima repeat, against targets near the argmax.
        let z = Tensor::randint(6, [64, 50], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::BFloat16);
        let am = z.argmax(-1, false);
        let noise = Tensor::randint_low(-2, 3, [64], (Kind::Int64, tch::Device::Cpu));
        let target = (&am + noise).clamp(0, 49);
        let want = am.eq_tensor(&target);
        assert!(want.sum(Kind::Int64).int64_value(&[]) > 0);
        assert!(top1_is_target(&z, &target).unwrap().equal(&want));
        assert_eq!(
            top1_hits(&z.to_kind(Kind::Float), &target).unwrap(),
            want.sum(Kind::Int64).int64_value(&[]) as u64
        );
    }

    /// Values land at their flattened positions, each row's last position is dropped.
    #[test]
    fn grid_places_values_and_drops_the_last_position() {
        let v = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let g = grid(&v, &Tensor::from_slice(&[0i64, 2, 4]), 2, 3).unwrap();
        assert_eq!(Vec::<f32>::try_from(g.reshape([-1])).unwrap(), vec![1.0, 0.0, 0.0, 3.0]);
    }
}
