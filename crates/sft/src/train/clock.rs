//! Where a training step's time goes: wall time per phase (reference pass, forward, head,
//! backward, optimizer), summed by timers around each phase on the thread that trains, read and
//! reset once per optimizer step by the loop, which logs the mean per step at the end of the run
//! (what `cargo xtask bench` reports as its per-step breakdown). On a GPU each timer waits for the
//! device, so a phase is its kernels' time, not their launch.

use std::cell::Cell;
use std::time::Instant;

/// A part of the step; declared in the order of [`Phase::ALL`], which indexes the per-phase sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// DPO's reference log-probs (no graph).
    Reference,
    /// Embedding and decoder layers, forward (without a graph under gradient checkpointing).
    Forward,
    /// Final norm, output head, loss and the head's own backward.
    Head,
    /// Back through the decoder layers (with gradient checkpointing, their recompute too) and
    /// into a trainable embedding.
    Backward,
    /// Gradient clipping, the optimizer step and zeroing the gradients.
    Optimizer,
}

impl Phase {
    /// Every phase, in the order a step runs them.
    pub const ALL: [Phase; 5] =
        [Phase::Reference, Phase::Forward, Phase::Head, Phase::Backward, Phase::Optimizer];

    /// Its name in the log.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Reference => "reference",
            Phase::Forward => "forward",
            Phase::Head => "head",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer",
        }
    }
}

thread_local! {
    static SPENT: Cell<[f64; 5]> = const { Cell::new([0.0; 5]) };
    /// A phase is being timed on this thread: an inner phase's time is not counted twice.
    static TIMING: Cell<bool> = const { Cell::new(false) };
}

/// Waits for `device`'s queued work (a no-op on the CPU), so a wall-clock interval is the
/// work's time, not its launch's.
pub fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs `f`, adding its wall time to `phase` (unless an enclosing phase is being timed already).
pub fn timed<R>(phase: Phase, device: tch::Device, f: impl FnOnce() -> R) -> R {
    if TIMING.get() {
        return f();
    }
    sync(device);
    TIMING.set(true);
    let start = Instant::now();
    let out = f();
    sync(device);
    let secs = start.elapsed().as_secs_f64();
    TIMING.set(false);
    SPENT.with(|s| {
        let mut v = s.get();
        v[phase as usize] += secs;
        s.set(v);
    });
    out
}

/// Seconds per phase (in [`Phase::ALL`]'s order) since the last call, and reset.
pub fn take() -> [f64; 5] {
    SPENT.with(|s| s.replace([0.0; 5]))
}

/// The mean time per step of each phase over the steps after the first (its allocations and lazy
/// initialisation are not a step's cost), and the rest of the step's wall time as `other`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PhaseTotals {
    spent: [f64; 5],
    wall: f64,
    steps: u64,
    first: Option<([f64; 5], f64)>,
}

impl PhaseTotals {
    /// Records one step: its phases (from [`take`]) and its wall time.
    pub fn add(&mut self, phases: [f64; 5], wall: f64) {
        if self.first.is_none() {
            self.first = Some((phases, wall));
            return;
        }
        for (t, p) in self.spent.iter_mut().zip(phases) {
            *t += p;
        }
        self.wall += wall;
        self.steps += 1;
    }

    /// `{"steps": n, "step_s": .., "reference": .., ..., "other": ..}`: means per step over the
    /// steps after the first (the first alone when there was one step); `None` before any step.
    pub fn to_json(&self) -> Option<serde_json::Value> {
        let (spent, wall, steps) = match (self.steps, self.first) {
            (0, None) => return None,
            (0, Some((p, w))) => (p, w, 1),
            (n, _) => (self.spent, self.wall, n),
        };
        let n = steps as f64;
        let mut m = serde_json::Map::new();
        m.insert("steps".into(), steps.into());
        m.insert("step_s".into(), (wall / n).into());
        for (p, s) in Phase::ALL.iter().zip(spent) {
            m.insert(p.name().into(), (s / n).into());
        }
        m.insert("other".into(), ((wall - spent.iter().sum::<f64>()) / n).max(0.0).into());
        Some(serde_json::Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_and_nest_once() {
        let _ = take();
        timed(Phase::Forward, tch::Device::Cpu, || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            // An inner timer inside an outer one counts nothing of its own.
            timed(Phase::Head, tch::Device::Cpu, || std::thread::sleep(std::time::Duration::from_millis(5)));
        });
        timed(Phase::Optimizer, tch::Device::Cpu, || std::thread::sleep(std::time::Duration::from_millis(5)));
        let t = take();
        assert!(t[1] >= 0.025 && t[1] < 0.5, "{t:?}");
        assert_eq!(t[2], 0.0);
        assert!(t[4] >= 0.005);
        assert_eq!(take(), [0.0; 5]);
    }

    #[test]
    fn totals_leave_out_the_first_step() {
        let mut totals = PhaseTotals::default();
        assert_eq!(totals.to_json(), None);
        totals.add([0.0, 9.0, 0.0, 9.0, 0.0], 20.0);
        assert_eq!(totals.to_json().and_then(|j| j["forward"].as_f64()), Some(9.0));
        totals.add([0.0, 1.0, 0.5, 2.0, 0.1], 4.0);
        totals.add([0.0, 3.0, 0.5, 2.0, 0.1], 6.0);
        let j = totals.to_json().expect("steps");
        assert_eq!(j["steps"], 2);
        assert_eq!(j["forward"].as_f64(), Some(2.0));
        assert_eq!(j["step_s"].as_f64(), Some(5.0));
        assert!((j["other"].as_f64().unwrap_or(0.0) - 0.4).abs() < 1e-12);
    }
}
