//! Starting values for A and B drawn as PEFT 0.21 draws them, so a recipe's seed gives PEFT's
//! tensors with nothing exchanged: from libtorch's process-wide generator, seeded as transformers'
//! `set_seed` seeds it right before TRL's `get_peft_model`, module by module in the model's order.
//! For each module PEFT builds `nn.Linear(in, r)` and `nn.Linear(r, out)` (each constructor draws
//! its weight kaiming-uniform), then redraws A as `init_lora_weights` says and zeroes B.

use std::sync::{Mutex, MutexGuard, PoisonError};

use tch::{Device, Kind, Tensor};

use crate::LoraInit;

static GLOBAL_RNG: Mutex<()> = Mutex::new(());

/// Hold this while seeding or drawing from libtorch's process-wide generator, so threads of one
/// process (tests, a library user's workers) cannot reseed it between each other's draws.
pub fn global_rng() -> MutexGuard<'static, ()> {
    GLOBAL_RNG.lock().unwrap_or_else(PoisonError::into_inner)
}

/// torch's `kaiming_uniform_(w, a=sqrt(5))` bound, computed in the same f64 steps as
/// `torch.nn.init` (so the f32 draws are bit-identical): `sqrt(3) * gain / sqrt(fan_in)`.
fn kaiming_bound(fan_in: i64) -> f64 {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    3f64.sqrt() * (gain / (fan_in as f64).sqrt())
}

/// An f32 CPU tensor of `shape` drawn uniform in ±`bound` from the global generator.
fn uniform(shape: [i64; 2], bound: f64) -> Result<Tensor, tch::TchError> {
    let mut t = Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?;
    let _ = t.f_uniform_(-bound, bound)?;
    Ok(t)
}

/// One module's starting A `[r, in]` and B `[out, r]` (f32, CPU), drawn from the global generator
/// in PEFT's order; the caller seeds it and holds [`global_rng`].
pub(crate) fn initial(init: LoraInit, r: i64, inp: i64, out: i64) -> Result<(Tensor, Tensor), tch::TchError> {
    let a0 = uniform([r, inp], kaiming_bound(inp))?;
    let b0 = uniform([out, r], kaiming_bound(r))?;
    Ok(match init {
        LoraInit::Default => (uniform([r, inp], kaiming_bound(inp))?, b0.f_zeros_like()?),
        LoraInit::Gaussian => {
            let mut a = Tensor::f_empty([r, inp], (Kind::Float, Device::Cpu))?;
            let _ = a.f_normal_(0.0, 1.0 / r as f64)?;
            (a, b0.f_zeros_like()?)
        }
        LoraInit::False => (a0, b0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32")
    }

    fn mean_std(x: &[f32]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = x.iter().map(|v| (f64::from(*v) - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    fn seeded(seed: i64, draws: &[(LoraInit, i64, i64, i64)]) -> Vec<(Vec<f32>, Vec<f32>)> {
        let _g = global_rng();
        tch::manual_seed(seed);
        draws
            .iter()
            .map(|&(init, r, inp, out)| {
                let (a, b) = initial(init, r, inp, out).expect("draw");
                (values(&a), values(&b))
            })
            .collect()
    }

    #[test]
    fn kaiming_bound_is_one_over_sqrt_fan_in() {
        for fan in [1, 8, 160, 4096] {
            assert!((kaiming_bound(fan) - 1.0 / (fan as f64).sqrt()).abs() < 1e-15);
        }
    }

    #[test]
    fn kaiming_uniform_bound_and_spread() {
        let (a, b) = seeded(1, &[(LoraInit::Default, 64, 400, 10)]).remove(0);
        let bound = 1.0 / 20.0;
        assert!(a.iter().all(|v| v.abs() <= bound));
        let (mean, std) = mean_std(&a);
        // Uniform(-b, b) has std b / sqrt(3).
        assert!(mean.abs() < 0.002 && (std - f64::from(bound) / 3f64.sqrt()).abs() < 0.001, "{mean} {std}");
        assert!(b.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn gaussian_std_is_one_over_r() {
        let (a, b) = seeded(2, &[(LoraInit::Gaussian, 8, 4000, 3)]).remove(0);
        let (mean, std) = mean_std(&a);
        assert!(mean.abs() < 0.003 && (std - 0.125).abs() < 0.003, "{mean} {std}");
        assert!(b.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn init_false_keeps_the_constructor_draws() {
        let (a, b) = seeded(3, &[(LoraInit::False, 4, 16, 1000)]).remove(0);
        assert!(b.iter().all(|v| v.abs() <= 0.5) && b.iter().any(|v| *v != 0.0));
        // The constructors' draws come first: the default init's B is zeroed, its A redrawn after them.
        let (a2, _) = seeded(3, &[(LoraInit::Default, 4, 16, 1000)]).remove(0);
        assert_ne!(a, a2);
    }

    #[test]
    fn values_follow_the_seed_and_the_module_order() {
        let shapes = [(LoraInit::Default, 2, 3, 4), (LoraInit::Default, 2, 3, 4)];
        let x = seeded(7, &shapes);
        assert_eq!(x, seeded(7, &shapes));
        assert_ne!(x, seeded(8, &shapes));
        // The second module draws after the first: its A differs though its shape is the same.
        assert_ne!(x[0].0, x[1].0);
    }
}
