//! The adapted layer: any base linear plus a low-rank update, computed as PEFT's bitsandbytes
//! `Linear4bit` LoRA layer does, so outputs match PEFT's for every base kind; with DoRA, the
//! update PEFT's `DoraLinearLayer` computes (see `dora.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use quant::linear::Linear;
use tch::{Device, Kind, Tensor};

use crate::dora::{Dora, Step};

/// `y = base(x) + B(A(dropout(x))) * scaling`, with A `[r, in]` and B `[out, r]` trainable.
///
/// The update is computed in A's dtype (x is cast to it) and cast back to the base output's
/// dtype before the sum; dropout applies only while the shared training flag is set, and the
/// update only while the shared enabled flag is (see [`crate::Adapters::without_adapters`]).
///
/// With DoRA the output is `base(x) + (m / n - 1) * (base(x) - bias) + (m / n) * B(A(x)) *
/// scaling`, `m` the trainable magnitude and `n = ||W + scaling * B A||` per output row, detached
/// (with dropout, `base(x) - bias` is taken on the dropped input), as PEFT 0.21.2 computes it.
pub struct LoraLinear {
    base: Box<dyn Linear>,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: f64,
    dropout: f64,
    flags: Flags,
    dora: Option<Dora>,
}

/// The switches every layer of one [`crate::Adapters`] shares.
#[derive(Debug, Clone)]
pub(crate) struct Flags {
    /// Dropout on (training) or off.
    pub training: Arc<AtomicBool>,
    /// The update on, or the base layer alone.
    pub enabled: Arc<AtomicBool>,
}

impl LoraLinear {
    /// Wrap `base`; the caller has checked that A and B fit it (see [`crate::inject`]).
    pub(crate) fn new(
        base: Box<dyn Linear>,
        lora_a: Tensor,
        lora_b: Tensor,
        scaling: f64,
        dropout: f64,
        flags: Flags,
        dora: Option<Dora>,
    ) -> Self {
        LoraLinear { base, lora_a, lora_b, scaling, dropout, flags, dora }
    }

    /// The wrapped layer, for code that needs to reach the frozen weight.
    pub fn base(&self) -> &dyn Linear {
        self.base.as_ref()
    }

    /// Unwrap, dropping the adapter (the caller keeps A and B through [`crate::Adapters`]).
    pub fn into_base(self) -> Box<dyn Linear> {
        self.base
    }

    /// A, `[r, in_features]` (shares storage and gradient with [`crate::Adapters`]' copy).
    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }

    /// B, `[out_features, r]` (shares storage and gradient with [`crate::Adapters`]' copy).
    pub fn lora_b(&self) -> &Tensor {
        &self.lora_b
    }

    /// The factor on the update (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// DoRA's magnitude `[out_features]` (shares storage and gradient with [`crate::Adapters`]'
    /// copy); `None` for plain LoRA.
    pub fn magnitude(&self) -> Option<&Tensor> {
        self.dora.as_ref().map(|d| &d.magnitude)
    }

    /// Whether dropout applies to the next forward.
    fn active_dropout(&self) -> Option<f64> {
        (self.dropout > 0.0 && self.flags.training.load(Ordering::Relaxed)).then_some(self.dropout)
    }
}

impl LoraLinear {
    /// Whether the update can run as nibble's fused CPU kernels ([`quant::ops::lora_update`]):
    /// f32 factors of rank <= 64 on bf16 or f32 CPU activations, a CPU with AVX-512, and a
    /// `cpu_matmul` policy other than `native` (which keeps torch's products, PEFT's bits).
    fn kernels_fit(&self, x: &Tensor, result: &Tensor) -> bool {
        let devices = [x.device(), result.device(), self.lora_a.device(), self.lora_b.device()];
        self.lora_b.kind() == self.lora_a.kind()
            && result.kind() == x.kind()
            && devices.iter().all(|d| *d == devices[0])
            && quant::ops::lora_kernels_fit(
                quant::ops::CpuMatmul::current(),
                self.lora_a.kind(),
                x.kind(),
                devices[0],
                self.lora_a.size()[0],
            )
    }

    /// `result + B(A(dropout(x))) * scaling` as PEFT's bitsandbytes layer orders it (bit for bit
    /// where the scaling is a power of two, see below).
    fn peft_update(&self, x: &Tensor, result: Tensor, dropout: Option<f64>) -> Result<Tensor, quant::Error> {
        let kind = self.lora_a.kind();
        let down = if dropout.is_none() && kind == Kind::Float && x.kind() != kind {
            // PEFT casts the input to the factor's dtype; autograd would then keep that f32
            // copy for lora_A's gradient, where the 16-bit input itself suffices.
            quant::ops::upcast_input_linear(x, &self.lora_a)?
        } else {
            let x = if x.kind() == kind { x.shallow_clone() } else { x.f_to_kind(kind)? };
            let x = match dropout {
                Some(p) => x.f_dropout(p, true)?,
                None => x,
            };
            x.f_linear(&self.lora_a, None::<Tensor>)?
        };
        let update = if self.scaling == 1.0 {
            down.f_linear(&self.lora_b, None::<Tensor>)?
        } else if exact_power_of_two(self.scaling) {
            // A power of two scales exactly wherever it is applied: on the `[.., r]` input of B
            // rather than on its `[.., out]` output (and, in backward, on the `[.., r]` gradient),
            // the same bits as PEFT's order for a pass less over the layer's output each way.
            down.f_mul_scalar(self.scaling)?.f_linear(&self.lora_b, None::<Tensor>)?
        } else {
            down.f_linear(&self.lora_b, None::<Tensor>)?.f_mul_scalar(self.scaling)?
        };
        let update = if update.kind() == result.kind() { update } else { update.f_to_kind(result.kind())? };
        Ok(result.f_add(&update)?)
    }
}

impl Linear for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor, quant::Error> {
        // Adapters switched off (the reference model of DPO): the base layer alone, as PEFT's
        // `disable_adapter()` computes it, DoRA included.
        if !self.flags.enabled.load(Ordering::Relaxed) {
            return self.base.forward(x);
        }
        if let Some(dora) = &self.dora {
            let step = Step {
                base: self.base.as_ref(),
                lora_a: &self.lora_a,
                lora_b: &self.lora_b,
                scaling: self.scaling,
                dropout: self.active_dropout(),
            };
            return dora.forward(&step, x);
        }
        let result = self.base.forward(x)?;
        let dropout = self.active_dropout();
        if dropout.is_none() && self.kernels_fit(x, &result) {
            return quant::ops::lora_update(x, &result, &self.lora_a, &self.lora_b, self.scaling);
        }
        self.peft_update(x, result, dropout)
    }
    fn in_features(&self) -> i64 {
        self.base.in_features()
    }
    fn out_features(&self) -> i64 {
        self.base.out_features()
    }
    fn device(&self) -> Device {
        self.base.device()
    }
}

/// Whether `x` is `2^k` for an integer `k` (so that multiplying by it only moves exponents).
fn exact_power_of_two(x: f64) -> bool {
    x > 0.0 && x.is_finite() && {
        let (mantissa_bits, exponent) = (x.to_bits() & ((1u64 << 52) - 1), (x.to_bits() >> 52) & 0x7ff);
        // A normal double with an all-zero mantissa, within f32's and bf16's normal range.
        mantissa_bits == 0 && exponent > 0 && (x as f32).is_normal() && (1.0 / x as f32).is_normal()
    }
}

impl std::fmt::Debug for LoraLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraLinear")
            .field("in_features", &self.base.in_features())
            .field("out_features", &self.base.out_features())
            .field("r", &self.lora_a.size().first())
            .field("scaling", &self.scaling)
            .field("dropout", &self.dropout)
            .field("dora", &self.dora.is_some())
            .finish_non_exhaustive()
    }
}

/// What a slot holds for the instant between taking its base out and putting the adapter in.
pub(crate) struct Taken;

impl Linear for Taken {
    fn forward(&self, _: &Tensor) -> Result<Tensor, quant::Error> {
        Err(quant::Error::Torch("layer is being wrapped by a LoRA adapter".into()))
    }
    fn in_features(&self) -> i64 {
        0
    }
    fn out_features(&self) -> i64 {
        0
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quant::linear::Dense;

    /// `y = base(x) + (x A^T B^T) * s` in PEFT's order, its gradients by autograd.
    fn peft_order(x: &Tensor, base: &Dense, a: &Tensor, b: &Tensor, s: f64) -> (Tensor, Tensor, Tensor) {
        let y = base.forward(x).expect("base")
            + x.to_kind(a.kind())
                .linear(a, None::<Tensor>)
                .linear(b, None::<Tensor>)
                .g_mul_scalar(s)
                .to_kind(x.kind());
        y.to_kind(Kind::Float).square().sum(Kind::Float).backward();
        (y.detach(), a.grad(), b.grad())
    }

    #[test]
    fn power_of_two_scaling_gives_peft_bits_and_others_keep_peft_order() {
        assert!(exact_power_of_two(2.0) && exact_power_of_two(0.25) && exact_power_of_two(4096.0));
        assert!(!exact_power_of_two(1.5) && !exact_power_of_two(32.0 / 6.0) && !exact_power_of_two(0.0));
        assert!(
            !exact_power_of_two(f64::INFINITY) && !exact_power_of_two(1e-60) && !exact_power_of_two(-2.0)
        );
        tch::manual_seed(3);
        for (kind, factors, s) in [
            (Kind::BFloat16, Kind::Float, 2.0),
            (Kind::BFloat16, Kind::BFloat16, 4.0),
            (Kind::Float, Kind::Float, 0.5),
            (Kind::BFloat16, Kind::Float, 32.0 / 12.0_f64.sqrt()),
        ] {
            let x = Tensor::randn([3, 5, 24], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
            let w = Tensor::randn([40, 24], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
            let a = Tensor::randn([8, 24], (factors, tch::Device::Cpu)).set_requires_grad(true);
            let b = Tensor::randn([40, 8], (factors, tch::Device::Cpu)).set_requires_grad(true);
            let (y0, ga0, gb0) =
                peft_order(&x, &Dense::new(w.shallow_clone(), None).expect("dense"), &a, &b, s);
            let (a1, b1) =
                (a.detach().copy().set_requires_grad(true), b.detach().copy().set_requires_grad(true));
            let flags = Flags {
                training: Arc::new(AtomicBool::new(false)),
                enabled: Arc::new(AtomicBool::new(true)),
            };
            let base = Box::new(Dense::new(w.shallow_clone(), None).expect("dense"));
            let layer = LoraLinear::new(base, a1.shallow_clone(), b1.shallow_clone(), s, 0.0, flags, None);
            // PEFT's order, which `forward` takes where the fused kernels do not fit (and always
            // under `cpu_matmul: native`).
            let y1 = layer.peft_update(&x, layer.base().forward(&x).expect("base"), None).expect("forward");
            y1.to_kind(Kind::Float).square().sum(Kind::Float).backward();
            let same = |p: &Tensor, q: &Tensor| p.to_kind(Kind::Float).equal(&q.to_kind(Kind::Float));
            assert!(same(&y0, &y1), "{kind:?} {factors:?} s={s}: outputs differ");
            assert!(
                same(&ga0, &a1.grad()) && same(&gb0, &b1.grad()),
                "{kind:?} {factors:?} s={s}: gradients differ"
            );
        }
    }

    /// Where the fused kernels fit (f32 factors on bf16 or f32 CPU activations, AVX-512, a
    /// policy other than `native`), `forward` is `quant::ops::lora_update`; with f32 factors on
    /// f16 activations it keeps PEFT's order.
    #[test]
    fn forward_takes_the_fused_kernels_where_they_fit() {
        if !quant::ops::lora_kernels_available()
            || quant::ops::CpuMatmul::current() == quant::ops::CpuMatmul::Native
        {
            return;
        }
        tch::manual_seed(4);
        for kind in [Kind::BFloat16, Kind::Float, Kind::Half] {
            let x = Tensor::randn([2, 3, 24], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
            let w = Tensor::randn([40, 24], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
            let a = Tensor::randn([8, 24], (Kind::Float, tch::Device::Cpu));
            let b = Tensor::randn([40, 8], (Kind::Float, tch::Device::Cpu));
            let flags = Flags {
                training: Arc::new(AtomicBool::new(false)),
                enabled: Arc::new(AtomicBool::new(true)),
            };
            let base = Box::new(Dense::new(w.shallow_clone(), None).expect("dense"));
            let layer = LoraLinear::new(base, a.shallow_clone(), b.shallow_clone(), 2.0, 0.0, flags, None);
            let got = layer.forward(&x).expect("forward");
            let base_out = layer.base().forward(&x).expect("base");
            let want = if kind == Kind::Half {
                layer.peft_update(&x, base_out, None).expect("peft")
            } else {
                quant::ops::lora_update(&x, &base_out, &a, &b, 2.0).expect("fused")
            };
            assert!(got.equal(&want), "{kind:?}");
        }
    }
}
