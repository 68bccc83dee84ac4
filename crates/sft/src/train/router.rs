//! A mixture of experts' load-balancing loss, as transformers 5.24's `load_balancing_loss_func`
//! computes it and TRL 1.16's SFTTrainer adds it (on by default for a mixture, with the model
//! config's `router_aux_loss_coef`): over every layer's router logits, each layer's softmax (in
//! the logits' dtype) and top-k, `f_e` the share of routed slots that went to expert `e` and
//! `P_e` the mean probability of `e`, both over unpadded tokens of all layers, and
//! `aux = experts * Σ_e f_e P_e`. `f` has no gradient (it comes from the top-k), so the gradient
//! of `aux` is the sum of each layer's own term, which lets a checkpointed backward add it layer
//! by layer.

use std::cell::Cell;

use tch::{Kind, Tensor};

/// The router loss's coefficient as TRL takes it: the recipe's `router_aux_loss_coef` (`set`),
/// else the model config's (`config`, present for a mixture of experts only); `None` when 0 or
/// the model is dense.
pub fn coefficient(config: Option<f64>, set: Option<f64>) -> Option<f64> {
    config.map(|c| set.unwrap_or(c)).filter(|&c| c != 0.0)
}

/// The router loss of one micro-batch: its routing shape, the tokens that count, and the weight
/// its gradient takes in the step (`coef / (accumulation steps * ranks)`, as TRL averages it).
pub struct RouterLoss {
    /// Experts per layer.
    pub experts: i64,
    /// Experts per token.
    pub top_k: i64,
    /// `[tokens]` f32, 1 where a token is not padding (`attention_mask`); `None`: all count.
    pub mask: Option<Tensor>,
    /// The loss's weight in the step's loss.
    pub scale: f64,
    /// The loss's value once the forward has run.
    pub value: Cell<Option<f64>>,
}

/// Sums over the layers seen so far (no graph).
pub struct Counts {
    tokens: Tensor,
    probs: Tensor,
    rows: Tensor,
}

impl RouterLoss {
    /// The router loss of a batch whose padding is `segment_ids < 0` (all tokens count without
    /// segments), weighted by `scale`; `None` for a dense model.
    pub fn for_batch(
        model: &model_loader::CausalLm,
        segment_ids: Option<&Tensor>,
        scale: f64,
    ) -> Result<Option<RouterLoss>, tch::TchError> {
        let Some((experts, top_k)) = model.routing() else { return Ok(None) };
        let mask = segment_ids.map(|s| s.f_ge(0)?.f_to_kind(Kind::Float)?.f_reshape([-1])).transpose()?;
        Ok(Some(RouterLoss { experts, top_k, mask, scale, value: Cell::new(None) }))
    }

    fn mask_on(&self, device: tch::Device) -> Result<Option<Tensor>, tch::TchError> {
        self.mask.as_ref().map(|m| m.f_to_device(device)).transpose()
    }

    /// Empty sums on `device`.
    pub fn counts(&self, device: tch::Device) -> Result<Counts, tch::TchError> {
        let zeros = || Tensor::f_zeros([self.experts], (Kind::Float, device));
        Ok(Counts { tokens: zeros()?, probs: zeros()?, rows: Tensor::f_zeros([], (Kind::Float, device))? })
    }

    /// Add one layer's router logits `[tokens, experts]`.
    pub fn add(&self, counts: &mut Counts, logits: &Tensor) -> Result<(), tch::TchError> {
        tch::no_grad(|| {
            let logits = logits.f_to_device(counts.tokens.device())?;
            let weights = logits.f_softmax(-1, logits.f_kind()?)?;
            let (_, chosen) = weights.f_topk(self.top_k, -1, true, true)?;
            let chosen = chosen.f_reshape([-1])?;
            let (mask, rows) = match self.mask_on(logits.device())? {
                Some(m) => {
                    let rows = m.f_sum(Kind::Float)?;
                    (m, rows)
                }
                None => {
                    let n = weights.size()[0];
                    (Tensor::f_ones([n], (Kind::Float, logits.device()))?, Tensor::from(n as f32))
                }
            };
            let slots = mask.f_repeat_interleave_self_int(self.top_k, None, None)?;
            let zeros = Tensor::f_zeros([self.experts], (Kind::Float, logits.device()))?;
            counts.tokens = counts.tokens.f_add(&zeros.f_scatter_add(0, &chosen, &slots)?)?;
            let masked = weights.f_to_kind(Kind::Float)?.f_mul(&mask.f_unsqueeze(-1)?)?;
            counts.probs =
                counts.probs.f_add(&masked.f_sum_dim_intlist(&[0i64][..], false, Kind::Float)?)?;
            counts.rows = counts.rows.f_add(&rows.f_to_device(logits.device())?)?;
            Ok(())
        })
    }

    /// `aux` over the layers summed in `counts`.
    pub fn value_of(&self, counts: &Counts) -> Result<f64, tch::TchError> {
        let f = counts.tokens.f_div(&counts.rows)?;
        let p = counts.probs.f_div(&counts.rows)?;
        f.f_mul(&p.f_unsqueeze(0)?)?
            .f_sum(Kind::Float)?
            .f_mul_scalar(self.experts as f64)?
            .f_double_value(&[])
    }

    /// One layer's share of `scale * aux`, differentiable in its `logits`, `f` fixed from all
    /// layers' `counts`.
    pub fn layer_term(&self, counts: &Counts, logits: &Tensor) -> Result<Tensor, tch::TchError> {
        let device = logits.device();
        let f = counts.tokens.f_div(&counts.rows)?.f_to_device(device)?;
        let rows = counts.rows.f_to_device(device)?;
        let weights = logits.f_softmax(-1, logits.f_kind()?)?.f_to_kind(Kind::Float)?;
        let weights = match self.mask_on(device)? {
            Some(m) => weights.f_mul(&m.f_unsqueeze(-1)?)?,
            None => weights,
        };
        let p = weights.f_sum_dim_intlist(&[0i64][..], false, Kind::Float)?.f_div(&rows)?;
        f.f_mul(&p)?.f_sum(Kind::Float)?.f_mul_scalar(self.experts as f64 * self.scale)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// The loss by its definition on two layers of logits with padding, and the sum of the layer
    /// terms' gradients equal to autograd's through the whole formula.
    #[test]
    fn the_loss_and_its_layer_by_layer_gradient_follow_the_definition() {
        let _rng = lora::global_rng();
        tch::manual_seed(5);
        let (n, e, k) = (6, 4, 2);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 1.0, 1.0, 0.0]);
        let loss = RouterLoss {
            experts: e,
            top_k: k,
            mask: Some(mask.shallow_clone()),
            scale: 0.5,
            value: Cell::new(None),
        };
        let layers: Vec<Tensor> = (0..2)
            .map(|_| Tensor::randn([n, e], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true))
            .collect();
        let mut counts = loss.counts(tch::Device::Cpu).unwrap();
        for l in &layers {
            loss.add(&mut counts, l).unwrap();
        }
        // By hand: counts of chosen experts and mean probabilities over the 8 unpadded rows.
        let (mut f, mut p) = (vec![0.0f64; e as usize], vec![0.0f64; e as usize]);
        for l in &layers {
            let probs = Vec::<Vec<f32>>::try_from(l.detach().softmax(-1, Kind::Float)).unwrap();
            for (row, m) in probs.iter().zip([1.0, 1.0, 0.0, 1.0, 1.0, 0.0]) {
                let mut order: Vec<usize> = (0..e as usize).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                for &x in &order[..k as usize] {
                    f[x] += m;
                }
                for x in 0..e as usize {
                    p[x] += m * f64::from(row[x]);
                }
            }
        }
        let want: f64 = e as f64 * f.iter().zip(&p).map(|(a, b)| (a / 8.0) * (b / 8.0)).sum::<f64>();
        let got = loss.value_of(&counts).unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // Gradient: the layer terms against autograd on scale * aux with f held fixed.
        let total = layers
            .iter()
            .map(|l| loss.layer_term(&counts, l).unwrap())
            .fold(Tensor::from(0.0f32), |a, b| a + b);
        assert!((total.double_value(&[]) - 0.5 * got).abs() < 1e-6);
        total.backward();
        let f = Tensor::from_slice(&f.iter().map(|&x| x as f32 / 8.0).collect::<Vec<_>>());
        for l in &layers {
            let x = l.detach().set_requires_grad(true);
            let probs = x.softmax(-1, Kind::Float) * mask.unsqueeze(-1);
            let term = (&f * probs.sum_dim_intlist(&[0i64][..], false, Kind::Float) / 8.0).sum(Kind::Float)
                * (e as f64 * 0.5);
            term.backward();
            let err = (x.grad() - l.grad()).abs().max().double_value(&[]);
            assert!(err < 1e-6, "layer gradient off by {err}");
        }
    }
}
