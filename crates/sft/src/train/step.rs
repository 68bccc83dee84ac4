//! One micro-batch: forward, causal-LM loss (summed, divided by the label tokens of the whole
//! accumulation window, as transformers does when it knows `num_items_in_batch`), backward —
//! optionally recomputing each decoder layer in backward (gradient checkpointing).

use super::clock::{Phase, timed};
use model_loader::CausalLm;
use tch::{Kind, Reduction, Tensor};

/// A batch as tensors on the model's device.
#[derive(Debug)]
pub struct DeviceBatch {
    /// `[B, T]` token ids.
    pub input_ids: Tensor,
    /// `[B, T]` targets, -100 where ignored; not shifted (the loss shifts).
    pub labels: Tensor,
    /// `[B, T]` position of each token in its own sequence.
    pub position_ids: Tensor,
    /// `[B, T]` sequence index within the row (attention stays inside it; -1 on padding), when
    /// packed or padded.
    pub segment_ids: Option<Tensor>,
    /// Input tokens, pads excluded.
    pub num_tokens: u64,
}

impl DeviceBatch {
    /// The batch on `device` (the model's), sharing the tensors when they are there already.
    pub fn to_device(&self, device: tch::Device) -> Result<DeviceBatch, tch::TchError> {
        Ok(DeviceBatch {
            input_ids: self.input_ids.f_to_device(device)?,
            labels: self.labels.f_to_device(device)?,
            position_ids: self.position_ids.f_to_device(device)?,
            segment_ids: self.segment_ids.as_ref().map(|s| s.f_to_device(device)).transpose()?,
            num_tokens: self.num_tokens,
        })
    }
}

/// What one micro-batch gave: its share of the window loss and its next-token accuracy counts.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MicroStats {
    /// `sum of token losses / window tokens`.
    pub loss: f64,
    /// Labelled positions whose argmax prediction is the label.
    pub correct: u64,
    /// Labelled positions.
    pub total: u64,
}

/// Forward and backward of one micro-batch, gradients accumulating into the trainable tensors;
/// returns this micro-batch's share of the window loss (`sum / num_items`) and its accuracy.
///
/// `seed` reseeds torch's generator before each layer (`seed + layer`), so dropout draws the same
/// masks in a checkpointed recompute as in its first forward, and a resumed run the same as an
/// uninterrupted one.
pub fn forward_backward(
    model: &CausalLm,
    batch: &DeviceBatch,
    num_items: f64,
    checkpointing: bool,
    seed: i64,
) -> Result<MicroStats, model_loader::Error> {
    forward_backward_with(model, batch, num_items, checkpointing, seed, None, None)
}

/// NEFTune: uniform noise of magnitude `alpha / sqrt(T * hidden)` added to the token embeddings
/// while training, as transformers' `neftune_noise_alpha` does.
fn neftune(h: Tensor, alpha: Option<f64>) -> Result<Tensor, tch::TchError> {
    let Some(alpha) = alpha else { return Ok(h) };
    let size = h.size();
    let mag = alpha / ((size[1] * size[2]) as f64).sqrt();
    h.f_add(&h.f_zeros_like()?.f_uniform_(-mag, mag)?)
}

/// Bytes of f32 logits `head_loss` materialises at once: a full `[B*T, vocab]` f32 copy is
/// the largest tensor of a step (8 x 2048 tokens of a 128k vocabulary: 8 GiB), so the head and
/// the loss run over chunks of labelled positions instead.
pub const HEAD_CHUNK_BYTES: i64 = 32 << 20;

/// What [`head_loss`] gave: the micro-batch's stats and, when asked, the gradient at `h`.
struct HeadLoss {
    stats: MicroStats,
    grad: Tensor,
}

/// Final norm, output head and next-token cross-entropy (summed, divided by `num_items`) over the
/// labelled positions of `h [B, T, hidden]` only, in chunks of at most `chunk_bytes` of f32
/// logits ([`HEAD_CHUNK_BYTES`] in training); with `backward`, each chunk's loss is
/// back-propagated at once (into trainable head parameters and the returned gradient at `h`), so
/// no more than one chunk of logits is ever alive. A frozen head computes as TRL's chunked
/// log-prob head does (`super::head`), so the gradient is TRL's bit for bit. Same per-position values and gradients as the whole-tensor loss; unlabelled positions
/// get exactly zero gradient, as there.
fn head_loss(
    model: &CausalLm,
    h: &Tensor,
    labels: &Tensor,
    num_items: f64,
    backward: bool,
    chunk_bytes: i64,
) -> Result<HeadLoss, model_loader::Error> {
    let size = h.size();
    let [b, t, hidden] = size[..] else {
        return Err(model_loader::Error::BadInput(format!(
            "hidden states must be [batch, seq, hidden], got {size:?}"
        )));
    };
    let leaf = h.f_detach()?.set_requires_grad(backward);
    let flat = leaf.f_reshape([b * t, hidden])?;
    // Position (r, j) predicts labels[r, j + 1]; the last position of a row predicts nothing.
    // Positions are picked on h's device; targets meet the logits on the head's.
    let labels = labels.f_to_device(h.device())?;
    let ignore = Tensor::f_full([b, 1], -100, (Kind::Int64, labels.device()))?;
    let target = Tensor::f_cat(&[labels.f_narrow(1, 1, t - 1)?.f_to_kind(Kind::Int64)?, ignore], 1)?
        .f_reshape([-1])?;
    let rows = target.f_ne(-100)?.f_nonzero()?.f_reshape([-1])?;
    let n = rows.size()[0];
    let vocab = model.vocab_size().max(1);
    let max_rows = (chunk_bytes / (4 * vocab)).max(1);
    let chunks = (n + max_rows - 1) / max_rows;
    let per = if chunks > 0 { (n + chunks - 1) / chunks } else { 0 };
    let (mut loss, mut correct) = (0.0f64, 0u64);
    let mut start = 0;
    if let Some(weight) = model.frozen_head_weight() {
        // TRL's SFTTrainer: per-token log-probs from its chunked head, the loss their negated sum
        // over the `[B, T - 1]` grid divided by the window's tokens, the gradient its head's.
        let mut lps = Vec::new();
        let g = -(1.0f32 / num_items as f32);
        while start < n {
            let len = per.min(n - start);
            let idx = rows.f_narrow(0, start, len)?;
            let tgt = target.f_index_select(0, &idx)?;
            let gs = Tensor::f_full([len], f64::from(g), (Kind::Float, tgt.device()))?;
            let (logits, lp) =
                super::head::frozen_chunk(model, weight, &flat, &idx, &tgt, backward.then_some(&gs))?;
            let tgt = tgt.f_to_device(logits.device())?;
            correct += super::head::top1_hits(&logits, &tgt)?;
            lps.push(lp.f_to_device(h.device())?);
            start += len;
        }
        if !lps.is_empty() {
            let per_token = super::head::grid(&Tensor::f_cat(&lps, 0)?, &rows, b, t)?;
            let sum = per_token.f_neg()?.f_sum(Kind::Float)?.f_div_scalar(f64::from(num_items as f32))?;
            loss = sum.f_double_value(&[])?;
        }
    }
    while start < n {
        let len = per.min(n - start);
        let idx = rows.f_narrow(0, start, len)?;
        let logits = super::head::f32_logits(model, &flat.f_index_select(0, &idx)?)?;
        let tgt = target.f_index_select(0, &idx)?.f_to_device(logits.device())?;
        correct += super::head::top1_hits(&logits, &tgt)?;
        let sum = logits.f_cross_entropy_loss::<Tensor>(&tgt, None, Reduction::Sum, -100, 0.0)?;
        loss += sum.f_double_value(&[])? / num_items;
        if backward {
            sum.f_div_scalar(num_items)?.f_backward()?;
        }
        start += len;
    }
    let grad = if backward {
        let g = leaf.grad();
        if g.defined() { g } else { leaf.f_zeros_like()? }
    } else {
        Tensor::new()
    };
    Ok(HeadLoss { stats: MicroStats { loss, correct, total: n as u64 }, grad })
}

/// Back-propagate `grad`, the gradient at `y`, through `y`'s graph (autograd's `backward(grad)`:
/// the gradient of `sum(y * grad)` with respect to `y` is exactly `grad`).
pub(crate) fn backward_from(y: &Tensor, grad: &Tensor) -> Result<(), tch::TchError> {
    y.f_mul(grad)?.f_sum(y.f_kind()?)?.f_backward()
}

/// [`forward_backward`] with NEFTune embedding noise (`neftune_alpha`), drawn from the same
/// per-step seed so checkpointed recomputes and resumed runs see the same noise.
pub fn forward_backward_with(
    model: &CausalLm,
    batch: &DeviceBatch,
    num_items: f64,
    checkpointing: bool,
    seed: i64,
    neftune_alpha: Option<f64>,
    router: Option<&super::router::RouterLoss>,
) -> Result<MicroStats, model_loader::Error> {
    let batch = &batch.to_device(model.device())?;
    let labels = &batch.labels;
    let layers = Layers {
        input_ids: &batch.input_ids,
        position_ids: &batch.position_ids,
        segment_ids: batch.segment_ids.as_ref(),
        checkpointing,
        seed,
        neftune_alpha,
        router,
        skip_padding: false,
    };
    layers.forward_backward(model, |h| {
        let head = head_loss(model, h, labels, num_items, true, HEAD_CHUNK_BYTES)?;
        Ok((head.stats, head.grad))
    })
}

/// The decoder stack of one micro-batch, run forward and back around an objective's head: the
/// part SFT and DPO share (dropout reseeded per layer, NEFTune, gradient checkpointing by
/// recomputing one layer at a time, a trainable embedding's gradient).
pub struct Layers<'a> {
    /// `[B, T]` token ids on the model's device.
    pub input_ids: &'a Tensor,
    /// `[B, T]` positions.
    pub position_ids: &'a Tensor,
    /// `[B, T]` sequence ids (attention stays within equal ids), when packed or padded.
    pub segment_ids: Option<&'a Tensor>,
    /// Recompute each layer in backward instead of keeping its activations.
    pub checkpointing: bool,
    /// This micro-batch's dropout seed (`seed + layer` before each layer).
    pub seed: i64,
    /// NEFTune's alpha, while training.
    pub neftune_alpha: Option<f64>,
    /// A mixture of experts' load-balancing loss, added to the objective's (its value is left in
    /// it once the forward has run). With `skip_padding` its mask must be `None`: the router
    /// then sees the real tokens only.
    pub router: Option<&'a super::router::RouterLoss>,
    /// Run the layers on the real tokens only ([`CausalLm::context_skipping_padding`]); the
    /// head still gets `[B, T, hidden]`.
    pub skip_padding: bool,
}

impl Layers<'_> {
    /// Run the layers to the last hidden state `h`, let `head` compute its objective and the
    /// gradient at `h` (its own backward through the head already done), then push that gradient
    /// back through the layers into the trainable tensors; returns what `head` returned.
    pub fn forward_backward<S>(
        &self,
        model: &CausalLm,
        head: impl FnOnce(&Tensor) -> Result<(S, Tensor), model_loader::Error>,
    ) -> Result<S, model_loader::Error> {
        let ctx = model.context_for(
            self.input_ids,
            Some(self.position_ids),
            self.segment_ids,
            self.skip_padding,
        )?;
        // Each seeding holds libtorch's process-wide generator through the draws it seeds for
        // (NEFTune's noise, dropout masks), so no other thread reseeds it in between. The noise
        // is drawn on the batch's grid, then the layers' layout is taken.
        let embed = || -> Result<Tensor, model_loader::Error> {
            let _rng = lora::global_rng();
            tch::manual_seed(self.seed.wrapping_sub(1));
            ctx.pack(&neftune(model.embed(self.input_ids)?, self.neftune_alpha)?)
        };
        let layer = |i: usize, h: &Tensor| {
            let _rng = lora::global_rng();
            tch::manual_seed(self.seed.wrapping_add(i as i64));
            model.layer_routed(i, h, &ctx)
        };
        let device = model.device();
        let router = self.router.filter(|_| model.routing().is_some());
        let mut counts = router.map(|r| r.counts(device)).transpose()?;
        if !self.checkpointing {
            let (h, logits) = timed(Phase::Forward, device, || -> Result<_, model_loader::Error> {
                let mut h = embed()?;
                let mut logits = Vec::new();
                for i in 0..model.num_layers() {
                    let (next, l) = layer(i, &h)?;
                    if let (Some(r), Some(c), Some(l)) = (router, counts.as_mut(), l) {
                        r.add(c, &l)?;
                        logits.push(l);
                    }
                    h = next;
                }
                Ok((ctx.unpack(&h)?, logits))
            })?;
            let (stats, grad) = timed(Phase::Head, device, || head(&h))?;
            // Push the head's gradient at the last hidden state through the layers' graph, with
            // the router loss's own.
            timed(Phase::Backward, device, || -> Result<(), model_loader::Error> {
                let mut root = h.f_mul(&grad)?.f_sum(h.f_kind()?)?;
                if let (Some(r), Some(c)) = (router, counts.as_ref()) {
                    r.value.set(Some(r.value_of(c)?));
                    for l in &logits {
                        root = root.f_add(&r.layer_term(c, l)?.f_to_device(root.device())?)?;
                    }
                }
                Ok(root.f_backward()?)
            })?;
            return Ok(stats);
        }
        // Forward without a graph, keeping only each layer's input (and the router's counts);
        // the last layer alone keeps its graph: its backward comes right after the head, so a
        // recompute would redo the same forward to rebuild what is still fresh (one layer's
        // activations held through the head, 1/L of the recompute saved).
        let last = model.num_layers().checked_sub(1);
        let (inputs, mut kept, h) = timed(Phase::Forward, device, || -> Result<_, model_loader::Error> {
            let mut inputs = Vec::with_capacity(model.num_layers());
            let mut kept = None;
            let mut h = tch::no_grad(embed)?;
            for i in 0..model.num_layers() {
                let (next, l) = if Some(i) == last {
                    let x = h.f_detach()?.set_requires_grad(true);
                    let (y, l) = layer(i, &x)?;
                    kept = Some((x, y.shallow_clone(), l.as_ref().map(Tensor::shallow_clone)));
                    (y.f_detach()?, l)
                } else {
                    tch::no_grad(|| layer(i, &h))?
                };
                if let (Some(r), Some(c), Some(l)) = (router, counts.as_mut(), l) {
                    r.add(c, &l)?;
                }
                inputs.push(h);
                h = next;
            }
            Ok((inputs, kept, ctx.unpack(&h)?))
        })?;
        if let (Some(r), Some(c)) = (router, counts.as_ref()) {
            r.value.set(Some(r.value_of(c)?));
        }
        // The objective, giving the gradient at the last hidden state.
        let (stats, grad) = timed(Phase::Head, device, || head(&h))?;
        drop(h);
        // Then layer by layer, last first: recompute with a graph and push the gradient through,
        // with the layer's share of the router loss.
        timed(Phase::Backward, device, || -> Result<(), model_loader::Error> {
            let (mut inputs, mut grad) = (inputs, ctx.pack(&grad)?);
            for i in (0..model.num_layers()).rev() {
                let graph = if Some(i) == last { kept.take() } else { None };
                let (x, y, l) = match graph {
                    Some(graph) => graph,
                    None => {
                        let x = inputs[i].f_detach()?.set_requires_grad(true);
                        let (y, l) = layer(i, &x)?;
                        (x, y, l)
                    }
                };
                match (router, counts.as_ref(), l) {
                    (Some(r), Some(c), Some(l)) => {
                        let root = y.f_mul(&grad)?.f_sum(y.f_kind()?)?;
                        root.f_add(&r.layer_term(c, &l)?.f_to_device(root.device())?)?.f_backward()?;
                    }
                    _ => backward_from(&y, &grad)?,
                }
                grad = x.grad();
                inputs.truncate(i);
            }
            // A trainable embedding (`modules_to_save: [embed_tokens]`) gets its gradient from a
            // recomputed embedding lookup (same seed, so the same NEFTune noise).
            if grad.defined() {
                let h0 = embed()?;
                if h0.requires_grad() {
                    backward_from(&h0, &grad)?;
                }
            }
            Ok(())
        })?;
        Ok(stats)
    }
}

/// The last hidden states of `input_ids` without a graph (positions default to `0..T`),
/// with the layers on the real tokens only when `skip_padding` (see [`Layers::skip_padding`]),
/// and, with `router`, its load-balancing loss over every layer's router (an evaluation's; with
/// `skip_padding` its mask must be `None`).
pub fn hidden_states_routed(
    model: &CausalLm,
    input_ids: &Tensor,
    position_ids: Option<&Tensor>,
    segment_ids: Option<&Tensor>,
    router: Option<&super::router::RouterLoss>,
    skip_padding: bool,
) -> Result<(Tensor, Option<f64>), model_loader::Error> {
    tch::no_grad(|| {
        let ctx = model.context_for(input_ids, position_ids, segment_ids, skip_padding)?;
        let Some(router) = router.filter(|_| model.routing().is_some()) else {
            return Ok((model.hidden_states_in(&ctx, input_ids, &mut |_| Ok(()))?, None));
        };
        let mut counts = router.counts(model.device())?;
        let h = model.hidden_states_in(&ctx, input_ids, &mut |l| Ok(router.add(&mut counts, &l)?))?;
        Ok((h, Some(router.value_of(&counts)?)))
    })
}

/// Evaluation of one batch without a graph: summed token loss and accuracy counts, and with
/// `router` a mixture's load-balancing loss of the batch.
pub fn evaluate_batch(
    model: &CausalLm,
    batch: &DeviceBatch,
    router: Option<&super::router::RouterLoss>,
) -> Result<(f64, u64, u64, Option<f64>), model_loader::Error> {
    tch::no_grad(|| {
        let batch = &batch.to_device(model.device())?;
        let (h, aux) = hidden_states_routed(
            model,
            &batch.input_ids,
            Some(&batch.position_ids),
            batch.segment_ids.as_ref(),
            router,
            false,
        )?;
        let head = head_loss(model, &h, &batch.labels, 1.0, false, HEAD_CHUNK_BYTES)?;
        Ok((head.stats.loss, head.stats.correct, head.stats.total, aux))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use model_loader::LoadOptions;

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
        d / b.to_kind(Kind::Double).abs().max().double_value(&[]).max(1e-30)
    }

    /// Chunks of a few positions give the loss, accuracy and gradient at the hidden states of
    /// the whole-logits computation (`head(h)[:, :-1]` against `labels[:, 1:]`, summed).
    #[test]
    fn chunked_head_loss_matches_the_whole_logits_loss() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let model = CausalLm::load(&dir, &LoadOptions::default(), &mut |_, _| {}).unwrap();
        let (b, t) = (3, 11);
        // Hidden states of the model's width and dtype.
        let probe = model.embed(&Tensor::zeros([1, 1], (Kind::Int64, tch::Device::Cpu))).unwrap();
        let (h, labels) = {
            let _rng = lora::global_rng();
            let h = Tensor::randn([b, t, probe.size()[2]], (probe.kind(), tch::Device::Cpu));
            (h, Tensor::randint_low(0, model.vocab_size(), [b, t], (Kind::Int64, tch::Device::Cpu)))
        };
        // Masked positions: a prompt, and a whole row with nothing to learn.
        let _ = labels.narrow(1, 0, 4).fill_(-100);
        let _ = labels.get(2).fill_(-100);
        let num_items = 7.0;

        let x = h.detach().set_requires_grad(true);
        let logits = model.head(&x).unwrap();
        let pred = logits.narrow(1, 0, t - 1).to_kind(Kind::Float).reshape([-1, model.vocab_size()]);
        let target = labels.narrow(1, 1, t - 1).reshape([-1]);
        let want = pred.cross_entropy_loss::<Tensor>(&target, None, Reduction::Sum, -100, 0.0) / num_items;
        want.backward();
        let mask = target.ne(-100);
        let want_correct = pred.argmax(-1, false).eq_tensor(&target).logical_and(&mask).sum(Kind::Int64);

        for rows in [1, 3, 1000] {
            let got = head_loss(&model, &h, &labels, num_items, true, 4 * model.vocab_size() * rows).unwrap();
            assert!(
                (got.stats.loss - want.double_value(&[])).abs() < 1e-5 * want.double_value(&[]).abs(),
                "{rows} rows"
            );
            assert_eq!(got.stats.correct, want_correct.int64_value(&[]) as u64, "{rows} rows");
            assert_eq!(got.stats.total, mask.sum(Kind::Int64).int64_value(&[]) as u64, "{rows} rows");
            assert!(rel(&got.grad, &x.grad()) < 1e-5, "{rows} rows: gradient at h");
            // Positions that predict nothing get exactly no gradient.
            assert_eq!(got.grad.get(2).abs().max().double_value(&[]), 0.0, "{rows} rows");
        }
        let eval = head_loss(&model, &h, &labels, 1.0, false, 4 * model.vocab_size()).unwrap();
        assert!((eval.stats.loss - want.double_value(&[]) * num_items).abs() < 1e-4);
        assert!(!eval.grad.defined());
    }
}
