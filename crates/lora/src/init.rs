//! Seeded starting values for A and B, made in Rust rather than with libtorch's global generator,
//! so a run is reproducible from its seed alone, whatever else the process draws, and each
//! module's values depend only on (seed, module name, which matrix).

use crate::LoraInit;

/// SplitMix64: small, fast, and statistically good enough for initial weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The generator for one matrix: the seed mixed with an FNV-1a hash of `module` and `which`.
fn stream(seed: u64, module: &str, which: &str) -> SplitMix64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in module.bytes().chain([0]).chain(which.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut g = SplitMix64(seed ^ h);
    g.next_u64();
    g
}

fn uniform(g: &mut SplitMix64, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| ((2.0 * g.next_f64() - 1.0) * bound) as f32).collect()
}

fn normal(g: &mut SplitMix64, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Box-Muller; 1 - u keeps the logarithm finite.
        let (u1, u2) = (1.0 - g.next_f64(), g.next_f64());
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let angle = std::f64::consts::TAU * u2;
        out.push((radius * angle.cos()) as f32);
        out.push((radius * angle.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Starting A `[r, in]` and B `[out, r]`, row-major, as PEFT's `init_lora_weights` makes them:
/// kaiming-uniform with `a = sqrt(5)` is uniform in ±1/sqrt(fan_in).
pub(crate) fn initial(
    init: LoraInit,
    seed: u64,
    module: &str,
    r: usize,
    inp: usize,
    out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut ga = stream(seed, module, "lora_A");
    let a = match init {
        LoraInit::Default | LoraInit::False => uniform(&mut ga, r * inp, 1.0 / (inp as f64).sqrt()),
        LoraInit::Gaussian => normal(&mut ga, r * inp, 1.0 / r as f64),
    };
    let b = match init {
        LoraInit::False => uniform(&mut stream(seed, module, "lora_B"), out * r, 1.0 / (r as f64).sqrt()),
        LoraInit::Default | LoraInit::Gaussian => vec![0.0; out * r],
    };
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_std(x: &[f32]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = x.iter().map(|v| (f64::from(*v) - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn kaiming_uniform_bound_and_spread() {
        let (a, b) = initial(LoraInit::Default, 1, "m", 64, 400, 10);
        let bound = 1.0 / 20.0;
        assert!(a.iter().all(|v| v.abs() <= bound));
        let (mean, std) = mean_std(&a);
        // Uniform(-b, b) has std b / sqrt(3).
        assert!(mean.abs() < 0.002 && (std - bound as f64 / 3f64.sqrt()).abs() < 0.001, "{mean} {std}");
        assert!(b.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn gaussian_std_is_one_over_r() {
        let (a, b) = initial(LoraInit::Gaussian, 2, "m", 8, 4000, 3);
        let (mean, std) = mean_std(&a);
        assert!(mean.abs() < 0.003 && (std - 0.125).abs() < 0.003, "{mean} {std}");
        assert!(b.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn init_false_draws_b_too() {
        let (_, b) = initial(LoraInit::False, 3, "m", 4, 16, 1000);
        assert!(b.iter().all(|v| v.abs() <= 0.5) && b.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn values_depend_on_seed_and_module_only() {
        let x = initial(LoraInit::False, 7, "model.layers.0.mlp.up_proj", 2, 3, 4);
        assert_eq!(x, initial(LoraInit::False, 7, "model.layers.0.mlp.up_proj", 2, 3, 4));
        assert_ne!(x, initial(LoraInit::False, 8, "model.layers.0.mlp.up_proj", 2, 3, 4));
        assert_ne!(x.0, initial(LoraInit::False, 7, "model.layers.1.mlp.up_proj", 2, 3, 4).0);
        assert_ne!(x.0, x.1[..6]);
    }
}
