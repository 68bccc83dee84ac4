//! Where each module of a model goes, decided from byte sizes and per-device budgets before
//! anything loads: the device maps of transformers/accelerate (`{"": 0}`, `auto`, `balanced`,
//! `balanced_low_0`, `sequential`, explicit prefix maps) with `max_memory`, as pure planning.
//!
//! A model is a list of [`Module`]s in forward order (embeddings, each decoder layer, final norm,
//! head); each is placed whole. Budgets come in device order (GPUs by index, then the CPU); a plan
//! never goes back to an earlier device along the forward order, so activations only move
//! forward, and whole decoder layers spill to the CPU (offload) when the GPUs are full.
//!
//! [`estimate`] sizes a run (weights, adapter, optimizer, activations) from the model's shape.
//!
//! This crate never links libtorch: it works on names and byte counts only.

#![deny(missing_docs)]

pub mod estimate;
mod size;

use std::collections::BTreeMap;
use std::fmt;

pub use size::{format_bytes, parse_bytes};

/// A place a module can live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    /// CUDA device by index (sorts before the CPU).
    Cuda(u32),
    /// Host memory: offloaded modules, or everything when there is no GPU.
    Cpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Cpu => f.write_str("cpu"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;
    /// `cpu`, `cuda`, `cuda:N` or a bare GPU index `N`, as transformers accepts.
    fn from_str(s: &str) -> Result<Self, Error> {
        let t = s.trim();
        if t == "cpu" {
            return Ok(Device::Cpu);
        }
        let idx = t.strip_prefix("cuda:").or(if t == "cuda" { Some("0") } else { None }).unwrap_or(t);
        idx.parse::<u32>().map(Device::Cuda).map_err(|_| Error::BadDevice(s.to_owned()))
    }
}

/// One unit of placement: a module name and the bytes its parameters (and buffers) take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Dotted module path, e.g. `model.layers.3`.
    pub name: String,
    /// Bytes on the device, as loaded (quantized where it will be).
    pub bytes: u64,
}

/// How modules are spread over devices (the `device_map` argument of transformers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// `{"": device}`: the whole model on one device (TRL's default for k-bit training).
    Single(Device),
    /// `auto`: balanced over the GPUs, then CPU offload (as accelerate, identical to balanced).
    Auto,
    /// `balanced`: the same share of the model on each GPU, then CPU offload.
    Balanced,
    /// `balanced_low_0`: balanced over GPUs 1.., GPU 0 keeps room for generation buffers.
    BalancedLow0,
    /// `sequential`: fill GPU 0, then GPU 1, ..., then the CPU.
    Sequential,
    /// Module prefixes to devices; the longest matching prefix wins, `""` matches everything.
    Explicit(Vec<(String, Device)>),
}

impl Strategy {
    /// Parse a transformers-style device map: a strategy name, a device, or an object of
    /// prefixes to devices (`{"": 0}`, `{"model.layers.30": "cpu", ...}`).
    pub fn from_json(v: &serde_json::Value) -> Result<Self, Error> {
        use serde_json::Value as J;
        let device = |v: &J| -> Result<Device, Error> {
            match v {
                J::Number(n) => n
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .map(Device::Cuda)
                    .ok_or_else(|| Error::BadDevice(n.to_string())),
                J::String(s) => s.parse(),
                other => Err(Error::BadDevice(other.to_string())),
            }
        };
        match v {
            J::String(s) => match s.as_str() {
                "auto" => Ok(Strategy::Auto),
                "balanced" => Ok(Strategy::Balanced),
                "balanced_low_0" => Ok(Strategy::BalancedLow0),
                "sequential" => Ok(Strategy::Sequential),
                other => {
                    other.parse().map(Strategy::Single).map_err(|_| Error::BadStrategy(other.to_owned()))
                }
            },
            J::Number(_) => device(v).map(Strategy::Single),
            J::Object(m) => {
                let entries =
                    m.iter().map(|(k, d)| Ok((k.clone(), device(d)?))).collect::<Result<Vec<_>, Error>>()?;
                match entries.as_slice() {
                    [(k, d)] if k.is_empty() => Ok(Strategy::Single(*d)),
                    _ => Ok(Strategy::Explicit(entries)),
                }
            }
            other => Err(Error::BadStrategy(other.to_string())),
        }
    }
}

/// Bytes each device may hold (`max_memory`), in device order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Budget {
    limits: BTreeMap<Device, u64>,
}

impl Budget {
    /// A budget from (device, bytes) pairs.
    pub fn new(limits: impl IntoIterator<Item = (Device, u64)>) -> Self {
        Budget { limits: limits.into_iter().collect() }
    }

    /// Parse `max_memory` as transformers takes it: `{0: "20GiB", "cpu": "64GB"}`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, Error> {
        let serde_json::Value::Object(m) = v else {
            return Err(Error::BadBudget(format!("expected an object of device to size, found {v}")));
        };
        let mut limits = BTreeMap::new();
        for (k, size) in m {
            let dev: Device = k.parse()?;
            let bytes = match size {
                serde_json::Value::Number(n) => {
                    n.as_u64().ok_or_else(|| Error::BadBudget(format!("{k}: {n}")))?
                }
                serde_json::Value::String(s) => parse_bytes(s)?,
                other => return Err(Error::BadBudget(format!("{k}: {other}"))),
            };
            limits.insert(dev, bytes);
        }
        Ok(Budget { limits })
    }

    /// The limit of one device (None: the device is not in the budget).
    pub fn limit(&self, d: Device) -> Option<u64> {
        self.limits.get(&d).copied()
    }

    /// Devices in order: GPUs by index, then the CPU.
    pub fn devices(&self) -> impl Iterator<Item = (Device, u64)> + '_ {
        self.limits.iter().map(|(d, b)| (*d, *b))
    }

    fn gpus(&self) -> Vec<(Device, u64)> {
        self.devices().filter(|(d, _)| matches!(d, Device::Cuda(_))).collect()
    }
}

/// The result: a device for every module, in the modules' order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// (module name, device), in forward order.
    pub placements: Vec<(String, Device)>,
}

impl Plan {
    /// Bytes placed on each device.
    pub fn usage(&self, modules: &[Module]) -> BTreeMap<Device, u64> {
        let mut out = BTreeMap::new();
        for (m, (_, d)) in modules.iter().zip(&self.placements) {
            *out.entry(*d).or_insert(0) += m.bytes;
        }
        out
    }

    /// The device of a module.
    pub fn device_of(&self, name: &str) -> Option<Device> {
        self.placements.iter().find(|(n, _)| n == name).map(|(_, d)| *d)
    }

    /// Where a module placed on `device` computes: a module on the CPU while the plan also uses
    /// GPUs computes on the plan's first GPU when it is `streamed` (its weights kept in host
    /// memory and copied over for each use, as accelerate offloads), else where it is placed.
    pub fn compute_device(&self, device: Device, streamed: bool) -> Device {
        let first_gpu = self.placements.iter().map(|(_, d)| *d).find(|d| matches!(d, Device::Cuda(_)));
        match (device, first_gpu) {
            (Device::Cpu, Some(gpu)) if streamed => gpu,
            _ => device,
        }
    }

    /// The map in transformers' JSON form (`{"model.embed_tokens": 0, "model.layers.31": "cpu"}`).
    pub fn to_json(&self) -> serde_json::Value {
        let m = self
            .placements
            .iter()
            .map(|(n, d)| {
                let v = match d {
                    Device::Cuda(i) => serde_json::json!(i),
                    Device::Cpu => serde_json::json!("cpu"),
                };
                (n.clone(), v)
            })
            .collect();
        serde_json::Value::Object(m)
    }
}

/// Why no plan exists, with the numbers to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The modules need more than all budgets together.
    #[error(
        "the model needs {} but the budgets total {}: short by {} ({shortfall} bytes)",
        format_bytes(*.needed), format_bytes(*.available), format_bytes(*.shortfall)
    )]
    TooSmall {
        /// Bytes of all modules.
        needed: u64,
        /// Bytes of all budgets.
        available: u64,
        /// `needed - available`.
        shortfall: u64,
    },
    /// One module fits on no remaining device.
    #[error(
        "module {module} ({}) fits on no remaining device: the largest room left is {} on {device}, short by {} ({shortfall} bytes)",
        format_bytes(*.bytes), format_bytes(*.room), format_bytes(*.shortfall)
    )]
    ModuleDoesNotFit {
        /// The module.
        module: String,
        /// Its bytes.
        bytes: u64,
        /// The device with the most room left at that point.
        device: Device,
        /// That room.
        room: u64,
        /// `bytes - room`.
        shortfall: u64,
    },
    /// A device given more than its budget (single or explicit maps).
    #[error(
        "{device} gets {} but its budget is {}: short by {} ({shortfall} bytes)",
        format_bytes(*.needed), format_bytes(*.budget), format_bytes(*.shortfall)
    )]
    OverBudget {
        /// The device.
        device: Device,
        /// Bytes the map puts there.
        needed: u64,
        /// Its budget.
        budget: u64,
        /// `needed - budget`.
        shortfall: u64,
    },
    /// An explicit map that leaves modules without a device.
    #[error("the device map places no device for: {}", .0.join(", "))]
    Unplaced(Vec<String>),
    /// A device name that is not `cpu`, `cuda[:N]` or an index.
    #[error("unknown device `{0}` (expected cpu, cuda, cuda:N or a GPU index)")]
    BadDevice(String),
    /// A device map that is not a strategy, a device or an object.
    #[error(
        "unknown device map `{0}` (expected auto, balanced, balanced_low_0, sequential, a device or an object)"
    )]
    BadStrategy(String),
    /// A `max_memory` entry that does not parse.
    #[error("bad max_memory: {0}")]
    BadBudget(String),
    /// Two modules with one name.
    #[error("module `{0}` is listed twice")]
    Duplicate(String),
}

/// Place every module, or say by how many bytes it cannot be done.
pub fn plan(modules: &[Module], strategy: &Strategy, budget: &Budget) -> Result<Plan, Error> {
    let mut seen = std::collections::HashSet::new();
    for m in modules {
        if !seen.insert(m.name.as_str()) {
            return Err(Error::Duplicate(m.name.clone()));
        }
    }
    let placements = match strategy {
        Strategy::Single(d) => modules.iter().map(|m| (m.name.clone(), *d)).collect(),
        Strategy::Explicit(entries) => explicit(modules, entries)?,
        Strategy::Sequential => {
            let limits: Vec<(Device, u64)> = budget.devices().collect();
            fill(modules, &limits)?
        }
        Strategy::Auto | Strategy::Balanced | Strategy::BalancedLow0 => {
            fill(modules, &balanced_limits(modules, budget, *strategy == Strategy::BalancedLow0))?
        }
    };
    let plan = Plan { placements };
    check_budgets(&plan, modules, budget)?;
    Ok(plan)
}

fn explicit(modules: &[Module], entries: &[(String, Device)]) -> Result<Vec<(String, Device)>, Error> {
    let matches = |name: &str, prefix: &str| {
        prefix.is_empty() || name == prefix || name.strip_prefix(prefix).is_some_and(|r| r.starts_with('.'))
    };
    let mut out = Vec::with_capacity(modules.len());
    let mut unplaced = Vec::new();
    for m in modules {
        let best = entries.iter().filter(|(p, _)| matches(&m.name, p)).max_by_key(|(p, _)| p.len());
        match best {
            Some((_, d)) => out.push((m.name.clone(), *d)),
            None => unplaced.push(m.name.clone()),
        }
    }
    if unplaced.is_empty() { Ok(out) } else { Err(Error::Unplaced(unplaced)) }
}

/// Per-device limits for the balanced strategies: the GPUs sharing the model get an equal share
/// each (the last one takes the remainder, up to its budget), never above their budget; with
/// `low_0`, GPU 0 holds at most the largest module; the CPU keeps its full budget for what the
/// GPUs cannot hold.
fn balanced_limits(modules: &[Module], budget: &Budget, low_0: bool) -> Vec<(Device, u64)> {
    let total: u64 = modules.iter().map(|m| m.bytes).sum();
    let largest = modules.iter().map(|m| m.bytes).max().unwrap_or(0);
    let gpus = budget.gpus();
    let spare_0 = low_0 && gpus.len() > 1;
    let sharing = (gpus.len() - usize::from(spare_0)).max(1) as u64;
    let share = total.div_ceil(sharing);
    let mut limits: Vec<(Device, u64)> = gpus
        .iter()
        .enumerate()
        .map(|(i, (d, b))| {
            let want = if spare_0 && i == 0 {
                largest
            } else if i + 1 == gpus.len() {
                *b
            } else {
                share
            };
            (*d, want.min(*b))
        })
        .collect();
    limits.extend(budget.limit(Device::Cpu).map(|b| (Device::Cpu, b)));
    limits
}

/// Walk modules in order over devices in order, moving to the next device when one is full.
fn fill(modules: &[Module], limits: &[(Device, u64)]) -> Result<Vec<(String, Device)>, Error> {
    let needed: u64 = modules.iter().map(|m| m.bytes).sum();
    let available: u64 = limits.iter().map(|(_, b)| *b).sum();
    if needed > available {
        return Err(Error::TooSmall { needed, available, shortfall: needed - available });
    }
    if limits.is_empty() {
        return if modules.is_empty() {
            Ok(Vec::new())
        } else {
            Err(Error::Unplaced(modules.iter().map(|m| m.name.clone()).collect()))
        };
    }
    let mut out = Vec::with_capacity(modules.len());
    let (mut dev, mut used) = (0usize, 0u64);
    for m in modules {
        let (mut d, mut u) = (dev, used);
        while d < limits.len() && u + m.bytes > limits[d].1 {
            d += 1;
            u = 0;
        }
        if d == limits.len() {
            // The most room any still-usable device has: what is left on the current one, or a
            // later one's whole budget.
            let (device, room) = std::iter::once((limits[dev].0, limits[dev].1 - used))
                .chain(limits[dev + 1..].iter().copied())
                .max_by_key(|(_, r)| *r)
                .unwrap_or((limits[dev].0, 0));
            return Err(Error::ModuleDoesNotFit {
                module: m.name.clone(),
                bytes: m.bytes,
                device,
                room,
                shortfall: m.bytes - room,
            });
        }
        (dev, used) = (d, u + m.bytes);
        out.push((m.name.clone(), limits[dev].0));
    }
    Ok(out)
}

fn check_budgets(plan: &Plan, modules: &[Module], budget: &Budget) -> Result<(), Error> {
    for (device, needed) in plan.usage(modules) {
        // A device absent from the budget is unconstrained (no max_memory given for it).
        if let Some(limit) = budget.limit(device)
            && needed > limit
        {
            return Err(Error::OverBudget { device, needed, budget: limit, shortfall: needed - limit });
        }
    }
    Ok(())
}
