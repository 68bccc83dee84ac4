//! DoRA (weight-decomposed LoRA, `use_dora`) as PEFT 0.21.2's `DoraLinearLayer` computes it, for
//! any base behind [`Linear`] (dense or 4-bit), without ever holding the base's dense weight.
//!
//! PEFT's layer output is `base(x) + (m / n - 1) * base_nobias(x) + (m / n) * B(A(x)) * scaling`,
//! with `m` the trainable magnitude (one per output row) and `n = ||W + scaling * B A||` per row,
//! detached from the graph (DoRA paper, section 4.3). PEFT dequantizes W on every forward to get
//! `n`, and with dropout it also computes `x_drop W^T` with that dequantized W, which autograd then
//! keeps until backward.
//!
//! Here `n` comes from the expansion
//! `n_j^2 = ||W_j||^2 + 2 s <W_j, (B A)_j> + s^2 ||(B A)_j||^2`, where `||W_j||^2` is measured once
//! when the adapter is made (the base is frozen), `<W_j, (B A)_j> = sum_r B_jr (A W^T)_rj` needs
//! the base applied to A's r rows, and `||(B A)_j||^2 = (B (A A^T) B^T)_jj` needs only A and B.
//! All of it runs without a graph, in f64, so it is as exact as PEFT's direct f32 norm.
//!
//! Memory: no `[out, in]` tensor is ever made here. Each forward calls the base once more on r
//! rows (for a 4-bit base: one transient dequantization inside the base's own op, freed when it
//! returns, the same work PEFT does with its dequantized copy); measuring `||W||^2` at injection
//! runs the base on identity rows in chunks of at most [`PROBE_ELEMENTS`] elements, and costs
//! `in^2 * out` multiply-adds per module, once. With dropout the base is applied to the dropped
//! input through its own autograd (a 4-bit base re-dequantizes in backward) instead of keeping a
//! dequantized copy alive until backward as PEFT's `F.linear` does; in f32 the two agree to
//! rounding, and with a lower-precision compute dtype this term is computed in that dtype, which
//! only touches the `(m / n - 1)` part of the output (zero at initialisation).
//!
//! The base is known only through [`Linear::forward`]: its bias is `base(0)`, and its weight is
//! seen through `base(I) - base(0)`. With a bias that difference is exact only up to rounding of
//! `W + b` in the probe dtype (f32 when the base accepts it, else its own dtype).

use quant::linear::Linear;
use tch::{Device, Kind, Tensor};

use crate::Error;

/// Upper bound on the elements of one identity probe (`rows x max(in, out)`).
pub(crate) const PROBE_ELEMENTS: i64 = 1 << 22;

/// What DoRA needs to know about a frozen base layer, measured once.
#[derive(Debug)]
pub(crate) struct BaseStats {
    /// `||W_j||^2` per output row, f64 `[out]`.
    weight_sq_norm: Tensor,
    /// The bias the base adds, `[out]` in `probe_kind`; `None` when it is zero or absent.
    bias: Option<Tensor>,
    /// A dtype the base takes as input and computes W exactly in (f32 if it accepts it).
    probe_kind: Kind,
}

impl BaseStats {
    /// Measure `base` (named `module` in errors) without recording a graph.
    pub(crate) fn measure(module: &str, base: &dyn Linear) -> Result<Self, Error> {
        tch::no_grad(|| {
            let (inp, out, device) = (base.in_features(), base.out_features(), base.device());
            let (probe_kind, bias) = probe_bias(module, base, device)?;
            let bias = if bias.f_abs()?.f_max()?.f_double_value(&[])? == 0.0 { None } else { Some(bias) };
            let weight_sq_norm = Tensor::f_zeros([out], (Kind::Double, device))?;
            let mut stats = BaseStats { weight_sq_norm, bias, probe_kind };
            let rows = (PROBE_ELEMENTS / inp.max(out).max(1)).clamp(1, inp.max(1));
            let mut start = 0;
            while start < inp {
                let len = rows.min(inp - start);
                let probe = Tensor::f_zeros([len, inp], (probe_kind, device))?;
                probe.f_narrow(1, start, len)?.f_copy_(&Tensor::f_eye(len, (probe_kind, device))?)?;
                // [len, out]: columns start..start+len of W, transposed.
                let y = base
                    .forward(&probe)
                    .map_err(|source| Error::Base { module: module.to_owned(), source })?;
                let wt = stats.without_bias(y)?.f_to_kind(Kind::Double)?;
                stats.weight_sq_norm =
                    stats.weight_sq_norm.f_add(&wt.f_square()?.f_sum_dim_intlist(0, false, None)?)?;
                start += len;
            }
            Ok(stats)
        })
    }

    /// `||W + scaling * B A||` per output row, without a graph, in A's dtype (PEFT's
    /// `get_weight_norm(...).detach()`).
    pub(crate) fn weight_norm(
        &self,
        base: &dyn Linear,
        lora_a: &Tensor,
        lora_b: &Tensor,
        scaling: f64,
    ) -> Result<Tensor, quant::Error> {
        tch::no_grad(|| {
            // [r, out] = A W^T.
            let aw = base.forward(&lora_a.f_detach()?.f_to_kind(self.probe_kind)?)?;
            let aw = self.without_bias(aw)?.f_to_kind(Kind::Double)?;
            let a = lora_a.f_detach()?.f_to_kind(Kind::Double)?;
            let b = lora_b.f_detach()?.f_to_kind(Kind::Double)?;
            let cross = b.f_mul(&aw.f_tr()?)?.f_sum_dim_intlist(1, false, None)?;
            let gram = a.f_matmul(&a.f_tr()?)?;
            let quad = b.f_matmul(&gram)?.f_mul(&b)?.f_sum_dim_intlist(1, false, None)?;
            let sq = self
                .weight_sq_norm
                .f_add(&cross.f_mul_scalar(2.0 * scaling)?)?
                .f_add(&quad.f_mul_scalar(scaling * scaling)?)?;
            Ok(sq.f_clamp_min(0.0)?.f_sqrt()?.f_to_kind(lora_a.f_kind()?)?)
        })
    }

    /// `y` less the base's bias, taken in `y`'s dtype.
    fn without_bias(&self, y: Tensor) -> Result<Tensor, tch::TchError> {
        match &self.bias {
            Some(b) => y.f_sub(&b.f_to_kind(y.f_kind()?)?),
            None => Ok(y),
        }
    }
}

/// The first of f32, bf16, f16 the base accepts as input, and `base(0)` (its bias) in it.
fn probe_bias(module: &str, base: &dyn Linear, device: Device) -> Result<(Kind, Tensor), Error> {
    let mut last = None;
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        let zeros = Tensor::f_zeros([1, base.in_features()], (kind, device))?;
        match base.forward(&zeros) {
            Ok(y) => return Ok((kind, y.f_view([base.out_features()])?)),
            Err(e) => last = Some(e),
        }
    }
    let source = last.unwrap_or_else(|| quant::Error::Torch("no dtype tried".into()));
    Err(Error::Base { module: module.to_owned(), source })
}

/// One DoRA layer's own state: the trainable magnitude and the base's measurements.
#[derive(Debug)]
pub(crate) struct Dora {
    pub(crate) magnitude: Tensor,
    pub(crate) stats: BaseStats,
}

/// The inputs of one DoRA forward beyond the layer's own state.
pub(crate) struct Step<'a> {
    pub(crate) base: &'a dyn Linear,
    pub(crate) lora_a: &'a Tensor,
    pub(crate) lora_b: &'a Tensor,
    pub(crate) scaling: f64,
    /// Dropout probability when it applies now (training and p > 0), else `None`.
    pub(crate) dropout: Option<f64>,
}

impl Dora {
    /// PEFT's `DoraLinearVariant.forward` for input `x`: `base(x)` plus the DoRA term, in the base
    /// output's dtype. Without active dropout the base output (less its bias) is reused; with it,
    /// the base is applied again to the dropped input.
    pub(crate) fn forward(&self, s: &Step<'_>, x: &Tensor) -> Result<Tensor, quant::Error> {
        let result = s.base.forward(x)?;
        let kind = s.lora_a.f_kind()?;
        let xa = if x.f_kind()? == kind { x.shallow_clone() } else { x.f_to_kind(kind)? };
        let (xl, base_result) = match s.dropout {
            None => (xa, self.stats.without_bias(result.shallow_clone())?),
            Some(p) => {
                let xl = xa.f_dropout(p, true)?;
                let again =
                    if xl.f_kind()? == x.f_kind()? { xl.shallow_clone() } else { xl.f_to_kind(x.f_kind()?)? };
                let base_result = self.stats.without_bias(s.base.forward(&again)?)?;
                (xl, base_result)
            }
        };
        let norm = self.stats.weight_norm(s.base, s.lora_a, s.lora_b, s.scaling)?;
        let scale = self.magnitude.f_div(&norm)?.f_view([1, -1])?;
        let lora_result = xl.f_linear(s.lora_a, None::<Tensor>)?.f_linear(s.lora_b, None::<Tensor>)?;
        let dora = scale
            .f_sub_scalar(1.0)?
            .f_mul(&base_result)?
            .f_add(&scale.f_mul(&lora_result)?.f_mul_scalar(s.scaling)?)?;
        let out = result.f_add(&dora)?;
        let kind = result.f_kind()?;
        Ok(if out.f_kind()? == kind { out } else { out.f_to_kind(kind)? })
    }
}
