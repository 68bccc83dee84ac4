//! AdamW with torch's update rule (decoupled weight decay, bias-corrected moments, eps added
//! after the square root), on plain tensors so its state can be checkpointed and resumed.

use tch::{Kind, Tensor};

/// AdamW hyperparameters (the recipe's `adam_*` and `weight_decay`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// torch's fused kernel (`AdamW(fused=True)`, transformers' default `adamw_torch_fused`)
    /// rather than its single-tensor loop (`adamw_torch` on a CPU): the same update, rounded
    /// differently in the last bits.
    pub fused: bool,
}

/// AdamW over a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// An optimizer for `params` (shallow clones of the trainable tensors), moments at zero.
    pub fn new(params: Vec<Tensor>, cfg: AdamWConfig) -> Result<Self, tch::TchError> {
        let exp_avg = params.iter().map(|p| p.f_zeros_like()).collect::<Result<Vec<_>, _>>()?;
        let exp_avg_sq = params.iter().map(|p| p.f_zeros_like()).collect::<Result<Vec<_>, _>>()?;
        Ok(AdamW { cfg, params, exp_avg, exp_avg_sq, step: 0 })
    }

    /// The settings it runs with.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The parameters it updates.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// One update with learning rate `lr`, from the parameters' current `.grad()`; parameters
    /// without a gradient are left alone (as torch does). Bit for bit torch 2.11's single-tensor
    /// AdamW on the CPU (its default there), in the parameters' dtype: tch has no `value` argument
    /// for `addcmul_`/`addcdiv_`, so those two run as torch's CPU kernels compute them (in f32, the
    /// `addcmul` as one fused multiply-add, rounded once to the moment's dtype).
    pub fn step(&mut self, lr: f64) -> Result<(), tch::TchError> {
        self.step += 1;
        if self.cfg.fused {
            return self.fused_step(lr);
        }
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.cfg;
        // Python's `beta ** step` and `bc2 ** 0.5` are libm's pow.
        let bc1 = 1.0 - beta1.powf(self.step as f64);
        let bc2_sqrt = (1.0 - beta2.powf(self.step as f64)).powf(0.5);
        let step_size = lr / bc1;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for ((p, m), v) in self.params.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if weight_decay != 0.0 {
                    let _ = p.f_mul_scalar_(1.0 - lr * weight_decay)?;
                }
                let _ = m.f_lerp_(&g, 1.0 - beta1)?;
                let _ = v.f_mul_scalar_(beta2)?;
                // v.addcmul_(g, g, value=1 - beta2): fma(f32(value * g), g, v) in f32.
                let gf = g.f_to_kind(Kind::Float)?;
                let vg = gf.f_mul_scalar(1.0 - beta2)?.f_to_kind(Kind::Double)?;
                let fma = vg.f_mul(&gf.f_to_kind(Kind::Double)?)?.f_add(&v.f_to_kind(Kind::Double)?)?;
                v.f_copy_(&fma.f_to_kind(Kind::Float)?)?;
                let denom = v.f_sqrt()?.f_div_scalar(bc2_sqrt)?.f_add_scalar(eps)?;
                // p.addcdiv_(m, denom, value=-step_size): p + f32(value * m) / denom in f32.
                let update = m
                    .f_to_kind(Kind::Float)?
                    .f_mul_scalar(-step_size)?
                    .f_div(&denom.f_to_kind(Kind::Float)?)?
                    .f_add(&p.f_to_kind(Kind::Float)?)?;
                p.f_copy_(&update)?;
            }
            Ok(())
        })
    }

    /// torch's `_fused_adamw_` over the parameters that have a gradient, each with the step count
    /// torch would hold for it (0-dim f32, already incremented, as its optimizer passes it): the
    /// optimizer's one count, as every adapter tensor has a gradient at every step.
    fn fused_step(&mut self, lr: f64) -> Result<(), tch::TchError> {
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.cfg;
        let mut with_grad = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            let g = p.grad();
            if g.defined() {
                with_grad.push((i, g));
            }
        }
        if with_grad.is_empty() {
            return Ok(());
        }
        let steps = with_grad
            .iter()
            .map(|(i, _)| Tensor::f_full([], self.step as f64, (Kind::Float, self.params[*i].device())))
            .collect::<Result<Vec<_>, _>>()?;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            let ptrs = |v: &[Tensor]| -> Vec<*const std::ffi::c_void> {
                with_grad.iter().map(|(i, _)| v[*i].as_ptr() as *const std::ffi::c_void).collect()
            };
            let (p, m, v) = (ptrs(&self.params), ptrs(&self.exp_avg), ptrs(&self.exp_avg_sq));
            let s: Vec<*const std::ffi::c_void> =
                steps.iter().map(|t| t.as_ptr() as *const std::ffi::c_void).collect();
            let g: Vec<*const std::ffi::c_void> =
                with_grad.iter().map(|(_, g)| g.as_ptr() as *const std::ffi::c_void).collect();
            // SAFETY: every pointer is a live `at::Tensor` owned by `self`, `with_grad` or `steps`, which
            // outlive the call; the C function copies the handles and catches every exception.
            let err = unsafe {
                ffi::nibble_fused_adamw(
                    p.as_ptr(),
                    g.as_ptr(),
                    m.as_ptr(),
                    v.as_ptr(),
                    s.as_ptr(),
                    with_grad.len() as i64,
                    lr,
                    beta1,
                    beta2,
                    weight_decay,
                    eps,
                )
            };
            if err.is_null() {
                return Ok(());
            }
            // SAFETY: a non-null return is a NUL-terminated string malloc'd by the C side.
            let msg = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned();
            unsafe { ffi::nibble_sft_free_error(err) };
            Err(tch::TchError::Torch(msg))
        })
    }

    /// Drop every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// The moments as named tensors plus the step count, for a checkpoint.
    pub fn state(&self) -> (Vec<(String, Tensor)>, u64) {
        let mut out = Vec::with_capacity(self.params.len() * 2);
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
            out.push((format!("state.{i}.exp_avg"), m.shallow_clone()));
            out.push((format!("state.{i}.exp_avg_sq"), v.shallow_clone()));
        }
        (out, self.step)
    }

    /// Restore moments and step from [`AdamW::state`]'s output.
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], step: u64) -> Result<(), String> {
        for (i, (m, v)) in self.exp_avg.iter_mut().zip(self.exp_avg_sq.iter_mut()).enumerate() {
            for (name, dst) in [(format!("state.{i}.exp_avg"), m), (format!("state.{i}.exp_avg_sq"), v)] {
                let src = tensors
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| format!("optimizer state lacks `{name}`"))?;
                if src.size() != dst.size() {
                    return Err(format!("`{name}` has shape {:?}, expected {:?}", src.size(), dst.size()));
                }
                tch::no_grad(|| dst.f_copy_(&src.to_kind(dst.kind()))).map_err(|e| e.to_string())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

mod ffi {
    use std::ffi::{c_char, c_void};

    unsafe extern "C" {
        pub fn nibble_sft_free_error(err: *mut c_char);
        #[allow(clippy::too_many_arguments, reason = "torch's own signature")]
        pub fn nibble_fused_adamw(
            params: *const *const c_void,
            grads: *const *const c_void,
            exp_avgs: *const *const c_void,
            exp_avg_sqs: *const *const c_void,
            steps: *const *const c_void,
            n: i64,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> *mut c_char;
    }
}

/// torch's `linalg.vector_norm(t, 2)` in `t`'s dtype (tch offers it as `linalg_norm` of the
/// flattened tensor, which is a vector norm for one dimension).
fn vector_norm(t: &Tensor) -> Result<Tensor, tch::TchError> {
    t.f_flatten(0, -1)?.f_linalg_norm(2.0, None::<&[i64]>, false, None::<Kind>)
}

/// Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping. Step for step torch's `clip_grad_norm_` on the CPU, in the gradients' dtype (bf16
/// adapters get bf16 norms and a bf16 coefficient, as TRL's QLoRA runs do): each gradient's
/// `vector_norm`, the norm of those, then `grad *= min(max_norm * (1 / (norm + 1e-6)), 1)`.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64, tch::TchError> {
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    // Parameters may sit on several devices (a device map): the norms meet on the first one's.
    let device = grads.first().map_or(tch::Device::Cpu, Tensor::device);
    // torch groups the gradients by (device, dtype), each group in parameter order ...
    let mut groups: Vec<((tch::Device, Kind), Vec<&Tensor>)> = Vec::new();
    for g in &grads {
        let key = (g.device(), g.kind());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(g),
            None => groups.push((key, vec![g])),
        }
    }
    // ... and visits them in its hash map's order: for two groups the later-seen first (checked
    // for every pair of f32, bf16 and f16 in tests/optim_torch.rs' torch).
    groups.reverse();
    let norms = groups
        .iter()
        .flat_map(|(_, gs)| gs.iter())
        .map(|g| vector_norm(g)?.f_to_device(device))
        .collect::<Result<Vec<_>, _>>()?;
    let total = vector_norm(&Tensor::f_stack(&norms, 0)?)?;
    let total_f = total.f_double_value(&[])?;
    if max_norm > 0.0 {
        // `max_norm / (total + 1e-6)` on a tensor is `reciprocal() * max_norm` in torch.
        let coef = total.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?.f_clamp_max(1.0)?;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for g in &grads {
                let _ = g.shallow_clone().f_mul_(&coef.f_to_device(g.device())?)?;
            }
            Ok(())
        })?;
    }
    Ok(total_f)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn matches_the_adamw_formula_by_hand() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, fused: false };
        let mut opt = AdamW::new(vec![p.shallow_clone()], cfg).unwrap();
        let mut expect = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for step in 1..=3 {
            opt.zero_grad();
            (&p * &p).sum(Kind::Float).backward(); // grad = 2p
            let lr = 0.01;
            opt.step(lr).unwrap();
            for i in 0..2 {
                let g = 2.0 * expect[i];
                expect[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let bc1 = 1.0 - 0.9f64.powi(step);
                let bc2 = 1.0 - 0.999f64.powi(step);
                expect[i] -= lr / bc1 * m[i] / ((v[i]).sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - expect[i]).abs() < 1e-5, "{got:?} vs {expect:?}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        (&p * 1.0).sum(Kind::Float).backward();
        let q = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        (&q * 12.0).sum(Kind::Float).backward();
        // grads: [1, 1] and [12]: norm sqrt(146)
        let n = clip_grad_norm(&[p.shallow_clone(), q.shallow_clone()], 1.0).unwrap();
        assert!((n - 146f64.sqrt()).abs() < 1e-5);
        let after = clip_grad_norm(&[p, q], 0.0).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }
}
