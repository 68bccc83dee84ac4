//! The recipe's device map: `model_init_kwargs.device_map` and `.max_memory` (how TRL hands them
//! to `from_pretrained`), planned over the model's modules by `device_map` and handed to the
//! loader as a [`Placement`]. Without one, the k-bit default: the whole model on this process's
//! device (`{"": local_rank}`).

use anyhow::{Context, Result, bail};
use config::Recipe;
use device_map::estimate::{BaseWeights, RunShape};
use device_map::{Budget, Module, Plan, Strategy, format_bytes};
use model_loader::{HfConfig, Placement};
use tch::Device;

/// A device map and budgets as the recipe gives them (the run plan's `device_map`).
#[derive(Debug, Clone)]
pub(crate) struct DeviceMap {
    /// How modules are spread.
    pub strategy: Strategy,
    /// `max_memory`, when given.
    pub max_memory: Option<Budget>,
}

/// The recipe's device map, or `None` for the default single-device placement. Other
/// `model_init_kwargs` keys are named in a warning (nibble has no equivalent for them).
pub(crate) fn from_recipe(recipe: &Recipe) -> Result<Option<DeviceMap>> {
    let Some(kw) = recipe.training.model_init_kwargs.as_ref() else { return Ok(None) };
    let ignored: Vec<&str> =
        kw.keys().map(String::as_str).filter(|k| !matches!(*k, "device_map" | "max_memory")).collect();
    if !ignored.is_empty() {
        tracing::warn!("model_init_kwargs: nibble ignores {}", ignored.join(", "));
    }
    let max_memory =
        kw.get("max_memory").map(Budget::from_json).transpose().context("model_init_kwargs.max_memory")?;
    let Some(dm) = kw.get("device_map") else {
        if max_memory.is_some() {
            bail!("model_init_kwargs.max_memory is set without a device_map (it only bounds a device map)");
        }
        return Ok(None);
    };
    let strategy = Strategy::from_json(dm).context("model_init_kwargs.device_map")?;
    Ok(Some(DeviceMap { strategy, max_memory }))
}

/// Free bytes on CUDA device `index` as the CUDA runtime libtorch loaded reports them
/// (`cudaMemGetInfo`), or `None` without one.
fn gpu_free_bytes(index: usize) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::{c_char, c_int, c_void};
        unsafe extern "C" {
            fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
        }
        type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
        type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
        type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
        // SAFETY: RTLD_DEFAULT (null on glibc) looks the symbols up among loaded libraries; each
        // found one is the CUDA runtime's function of that C signature.
        unsafe {
            let sym = |name: &[u8]| dlsym(std::ptr::null_mut(), name.as_ptr().cast());
            let (get, set, info) =
                (sym(b"cudaGetDevice\0"), sym(b"cudaSetDevice\0"), sym(b"cudaMemGetInfo\0"));
            if get.is_null() || set.is_null() || info.is_null() {
                return None;
            }
            let get = std::mem::transmute::<*mut c_void, GetDevice>(get);
            let set = std::mem::transmute::<*mut c_void, SetDevice>(set);
            let info = std::mem::transmute::<*mut c_void, MemGetInfo>(info);
            let mut current: c_int = 0;
            if get(&mut current) != 0 || set(c_int::try_from(index).ok()?) != 0 {
                return None;
            }
            let (mut free, mut total) = (0usize, 0usize);
            let ok = info(&mut free, &mut total) == 0;
            set(current);
            ok.then_some(free as u64)
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = index;
        None
    }
}

/// Bytes the kernel says can be allocated without swapping (`MemAvailable`).
fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The budgets a plan fills: `max_memory` as given, else what transformers takes for quantized
/// models: 90% of each visible GPU's free memory, and the host's available memory.
fn budget(max_memory: Option<&Budget>, cuda_devices: usize) -> Result<Budget> {
    if let Some(b) = max_memory {
        return Ok(b.clone());
    }
    let mut limits = Vec::new();
    for i in 0..cuda_devices {
        let free = gpu_free_bytes(i).with_context(|| {
            format!("cannot read the free memory of cuda:{i}; set model_init_kwargs.max_memory")
        })?;
        limits.push((device_map::Device::Cuda(i as u32), free / 10 * 9));
    }
    let host =
        host_available_bytes().context("cannot read MemAvailable; set model_init_kwargs.max_memory")?;
    limits.push((device_map::Device::Cpu, host));
    Ok(Budget::new(limits))
}

/// The modules of the model as planned for a run of `shape`, and the plan of the recipe's device
/// map `dm` (`None` without one). `cuda_devices`: GPUs this process may use.
pub(crate) fn plan(
    dm: Option<&DeviceMap>,
    cfg: &HfConfig,
    shape: &RunShape,
    cuda_devices: usize,
) -> Result<Option<(Plan, Vec<Module>)>> {
    let Some(dm) = dm else { return Ok(None) };
    let modules = device_map::estimate::modules(&cfg.shape, shape);
    let budget = match dm.strategy {
        // Single and explicit maps check budgets only where `max_memory` gives them.
        Strategy::Single(_) | Strategy::Explicit(_) => dm.max_memory.clone().unwrap_or_default(),
        _ => budget(dm.max_memory.as_ref(), cuda_devices)?,
    };
    let plan = device_map::plan(&modules, &dm.strategy, &budget).context("model_init_kwargs.device_map")?;
    let usage = plan.usage(&modules);
    let summary: Vec<String> = usage.iter().map(|(d, b)| format!("{d}: {}", format_bytes(*b))).collect();
    tracing::info!("device map: {}", summary.join(", "));
    Ok(Some((plan, modules)))
}

/// Where the model goes for this process: the recipe's device map applied, or everything on
/// `device` (the k-bit default). `cuda_devices`: GPUs this process may use; `world`: ranks in
/// the group (a map spanning devices cannot be combined with several).
pub(crate) fn placement(
    dm: Option<&DeviceMap>,
    cfg: &HfConfig,
    shape: &RunShape,
    device: Device,
    cuda_devices: usize,
    world: usize,
) -> Result<Placement> {
    let layers = cfg.shape.layers as usize;
    let Some((plan, _)) = plan(dm, cfg, shape, cuda_devices)? else {
        return Ok(Placement::single(device, layers));
    };
    let four_bit = matches!(shape.base, BaseWeights::FourBit { .. });
    let placement = Placement::from_plan(&plan, layers, cuda_devices, four_bit)
        .context("applying model_init_kwargs.device_map")?;
    if placement.spans_devices() && world > 1 {
        bail!(
            "model_init_kwargs.device_map spreads the model over several devices, which cannot be combined \
             with {world} data-parallel ranks (each rank holds a whole model): drop the device map or run one process"
        );
    }
    tracing::info!("placement: {}", placement.describe());
    Ok(placement)
}
