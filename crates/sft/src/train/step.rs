//! One micro-batch: forward, causal-LM loss (summed, divided by the label tokens of the whole
//! accumulation window, as transformers does when it knows `num_items_in_batch`), backward —
//! optionally recomputing each decoder layer in backward (gradient checkpointing).

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
    /// `[B, T]` sequence index within the row (attention stays inside it), when packed.
    pub segment_ids: Option<Tensor>,
    /// Input tokens, pads excluded.
    pub num_tokens: u64,
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

/// Argmax hits and labelled positions of next-token predictions (TRL's `mean_token_accuracy`).
pub fn token_accuracy(logits: &Tensor, labels: &Tensor) -> Result<(u64, u64), tch::TchError> {
    let t = logits.size()[1];
    let pred = logits.f_narrow(1, 0, t - 1)?.f_argmax(-1, false)?;
    let target = labels.f_narrow(1, 1, t - 1)?;
    let mask = target.f_ne(-100)?;
    let correct = pred.f_eq_tensor(&target)?.f_logical_and(&mask)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    let total = mask.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    Ok((correct as u64, total as u64))
}

/// Sum of next-token cross-entropy over the labelled positions, in f32.
pub fn loss_sum(logits: &Tensor, labels: &Tensor) -> Result<Tensor, tch::TchError> {
    let t = logits.size()[1];
    let v = logits.size()[2];
    let pred = logits.f_narrow(1, 0, t - 1)?.f_to_kind(Kind::Float)?.f_reshape([-1, v])?;
    let target = labels.f_narrow(1, 1, t - 1)?.f_reshape([-1])?;
    pred.f_cross_entropy_loss::<Tensor>(&target, None, Reduction::Sum, -100, 0.0)
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
    forward_backward_with(model, batch, num_items, checkpointing, seed, None)
}

/// NEFTune: uniform noise of magnitude `alpha / sqrt(T * hidden)` added to the token embeddings
/// while training, as transformers' `neftune_noise_alpha` does.
fn neftune(h: Tensor, alpha: Option<f64>) -> Result<Tensor, tch::TchError> {
    let Some(alpha) = alpha else { return Ok(h) };
    let size = h.size();
    let mag = alpha / ((size[1] * size[2]) as f64).sqrt();
    h.f_add(&h.f_zeros_like()?.f_uniform_(-mag, mag)?)
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
) -> Result<MicroStats, model_loader::Error> {
    let ctx = model.context(&batch.position_ids, batch.segment_ids.as_ref())?;
    let embed = || -> Result<Tensor, model_loader::Error> {
        tch::manual_seed(seed.wrapping_sub(1));
        Ok(neftune(model.embed(&batch.input_ids)?, neftune_alpha)?)
    };
    let layer = |i: usize, h: &Tensor| {
        tch::manual_seed(seed.wrapping_add(i as i64));
        model.layer(i, h, &ctx)
    };
    if !checkpointing {
        let mut h = embed()?;
        for i in 0..model.num_layers() {
            h = layer(i, &h)?;
        }
        let logits = model.head(&h)?;
        let (correct, total) = token_accuracy(&logits, &batch.labels)?;
        let loss = loss_sum(&logits, &batch.labels)?.f_div_scalar(num_items)?;
        loss.f_backward()?;
        return Ok(MicroStats { loss: loss.f_double_value(&[])?, correct, total });
    }
    // Forward without a graph, keeping only each layer's input.
    let mut inputs = Vec::with_capacity(model.num_layers());
    let mut h = tch::no_grad(embed)?;
    for i in 0..model.num_layers() {
        let next = tch::no_grad(|| layer(i, &h))?;
        inputs.push(h);
        h = next;
    }
    // Head and loss with a graph, giving the gradient at the last hidden state.
    let last = h.f_detach()?.set_requires_grad(true);
    let logits = model.head(&last)?;
    let (correct, total) = token_accuracy(&logits, &batch.labels)?;
    let loss = loss_sum(&logits, &batch.labels)?.f_div_scalar(num_items)?;
    loss.f_backward()?;
    let value = loss.f_double_value(&[])?;
    drop(logits);
    let mut grad = last.grad();
    // Then layer by layer, last first: recompute with a graph and push the gradient through.
    for i in (0..model.num_layers()).rev() {
        let x = inputs[i].f_detach()?.set_requires_grad(true);
        let y = layer(i, &x)?;
        y.f_mul(&grad)?.f_sum(y.f_kind()?)?.f_backward()?;
        grad = x.grad();
        inputs.truncate(i);
    }
    // A trainable embedding (`modules_to_save: [embed_tokens]`) gets its gradient from a
    // recomputed embedding lookup (same seed, so the same NEFTune noise).
    if grad.defined() {
        let h0 = embed()?;
        if h0.requires_grad() {
            h0.f_mul(&grad)?.f_sum(h0.f_kind()?)?.f_backward()?;
        }
    }
    Ok(MicroStats { loss: value, correct, total })
}

/// Evaluation of one batch without a graph: summed token loss and accuracy counts.
pub fn evaluate_batch(model: &CausalLm, batch: &DeviceBatch) -> Result<(f64, u64, u64), model_loader::Error> {
    tch::no_grad(|| {
        let logits =
            model.forward(&batch.input_ids, Some(&batch.position_ids), batch.segment_ids.as_ref())?;
        let (correct, total) = token_accuracy(&logits, &batch.labels)?;
        let sum = loss_sum(&logits, &batch.labels)?.f_double_value(&[])?;
        Ok((sum, correct, total))
    })
}
