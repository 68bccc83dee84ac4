//! Learning-rate schedules as transformers' `get_scheduler` defines them: a multiplier of the
//! base rate for each optimizer step (0-based), with a linear warmup.

use crate::Error;
use config::types::{KwArgs, Scheduler};

/// The multiplier of the base learning rate at each step.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    kind: Kind,
    warmup: u64,
    total: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Linear,
    Cosine { cycles: f64, min_rate: f64 },
    Constant,
    ConstantWithWarmup,
}

/// Warmup steps as transformers 5 derives them: whole steps when >= 1, else a ceiling fraction.
pub fn warmup_steps(warmup: f64, total: u64) -> u64 {
    if warmup >= 1.0 { warmup as u64 } else { (total as f64 * warmup).ceil() as u64 }
}

impl Schedule {
    /// The recipe's schedule over `total` optimizer steps.
    pub fn new(
        sched: &Scheduler,
        kwargs: Option<&KwArgs>,
        base_lr: f64,
        warmup: f64,
        total: u64,
    ) -> Result<Self, Error> {
        let num = |k: &str| kwargs.and_then(|m| m.get(k)).and_then(serde_json::Value::as_f64);
        let cycles = num("num_cycles").unwrap_or(0.5);
        let kind = match sched {
            Scheduler::Linear => Kind::Linear,
            Scheduler::Cosine => Kind::Cosine { cycles, min_rate: 0.0 },
            Scheduler::CosineWithMinLr => {
                let min_rate = match (num("min_lr"), num("min_lr_rate")) {
                    (Some(_), Some(_)) => {
                        return Err(Error::ScheduleKwargs(
                            "set only one of `min_lr` and `min_lr_rate`".into(),
                        ));
                    }
                    (Some(min_lr), None) => min_lr / base_lr,
                    (None, Some(rate)) => rate,
                    (None, None) => {
                        return Err(Error::ScheduleKwargs(
                            "cosine_with_min_lr needs `min_lr` or `min_lr_rate`".into(),
                        ));
                    }
                };
                Kind::Cosine { cycles, min_rate }
            }
            Scheduler::Constant => Kind::Constant,
            Scheduler::ConstantWithWarmup => Kind::ConstantWithWarmup,
            other => return Err(Error::UnsupportedSchedule(other.as_str().to_owned())),
        };
        Ok(Schedule { kind, warmup: warmup_steps(warmup, total), total })
    }

    /// Warmup steps in effect.
    pub fn warmup(&self) -> u64 {
        self.warmup
    }

    /// The multiplier for optimizer step `step` (0 for the first step).
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let warming = step < self.warmup && !matches!(self.kind, Kind::Constant);
        if warming {
            return s / w.max(1.0);
        }
        match self.kind {
            Kind::Constant | Kind::ConstantWithWarmup => 1.0,
            Kind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Kind::Cosine { cycles, min_rate } => {
                let progress = (s - w) / (t - w).max(1.0);
                let f = 0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos());
                (f * (1.0 - min_rate) + min_rate).max(0.0)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn warmup_fraction_rounds_up_like_transformers() {
        assert_eq!(warmup_steps(0.1, 20), 2);
        assert_eq!(warmup_steps(0.1, 21), 3);
        assert_eq!(warmup_steps(5.0, 20), 5);
        assert_eq!(warmup_steps(0.0, 20), 0);
    }

    #[test]
    fn linear_and_cosine_shapes() {
        let lin = Schedule::new(&Scheduler::Linear, None, 1e-3, 2.0, 10).unwrap();
        let got: Vec<f64> = (0..10).map(|s| lin.factor(s)).collect();
        assert_eq!(&got[..3], &[0.0, 0.5, 1.0]);
        assert!((got[6] - 0.5).abs() < 1e-12);
        let cos = Schedule::new(&Scheduler::Cosine, None, 1e-3, 0.0, 10).unwrap();
        assert_eq!(cos.factor(0), 1.0);
        assert!((cos.factor(5) - 0.5).abs() < 1e-12);
        assert!(cos.factor(10).abs() < 1e-12);
        let mut kw = KwArgs::new();
        kw.insert("min_lr".into(), serde_json::json!(1e-4));
        let minlr = Schedule::new(&Scheduler::CosineWithMinLr, Some(&kw), 1e-3, 0.0, 10).unwrap();
        assert!((minlr.factor(10) - 0.1).abs() < 1e-12);
        assert!(Schedule::new(&Scheduler::CosineWithMinLr, None, 1e-3, 0.0, 10).is_err());
        let c = Schedule::new(&Scheduler::ConstantWithWarmup, None, 1e-3, 4.0, 10).unwrap();
        assert_eq!((c.factor(1), c.factor(4), c.factor(9)), (0.25, 1.0, 1.0));
        let k = Schedule::new(&Scheduler::Constant, None, 1e-3, 4.0, 10).unwrap();
        assert_eq!(k.factor(0), 1.0);
    }
}
