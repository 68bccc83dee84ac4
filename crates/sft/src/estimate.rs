//! `sft RECIPE --estimate-memory`: the memory a run will need, from the run plan (the model's
//! config.json and the recipe, resolved as the run resolves them), before anything loads.

use anyhow::Result;
use device_map::estimate::{BaseWeights, RunShape, estimate};
use device_map::{Device, format_bytes};

use crate::plan::RunPlan;

/// The estimate split over a plan's devices: each module's bytes (weights, and a layer's adapter
/// with its gradients and AdamW states) where the plan puts it; activations where each layer
/// computes, in proportion (a 4-bit layer offloaded to the CPU computes on the plan's first GPU,
/// and its adapter lives there too: LoRA puts its tensors beside the layer's compute device); the
/// loss's logits on the head's device; the process itself on the host.
pub(crate) fn per_device(
    e: &device_map::estimate::Estimate,
    plan: &device_map::Plan,
    modules: &[device_map::Module],
    four_bit: bool,
) -> std::collections::BTreeMap<Device, u64> {
    let mut out = plan.usage(modules);
    let layers: Vec<(Device, Device)> = plan
        .placements
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers."))
        .map(|(_, d)| (*d, plan.compute_device(*d, four_bit)))
        .collect();
    let n = layers.len().max(1) as u64;
    let trainable = (e.lora_weights + e.lora_grads + e.optimizer) / n;
    for (placed, compute) in &layers {
        *out.entry(*compute).or_insert(0) += e.activations / n;
        if placed != compute {
            let on_placed = out.entry(*placed).or_insert(0);
            *on_placed = on_placed.saturating_sub(trainable);
            *out.entry(*compute).or_insert(0) += trainable;
        }
    }
    if let Some(head) = plan.device_of("lm_head") {
        *out.entry(head).or_insert(0) += e.logits;
    }
    // The process and the CPU GEMM library's cached kernels (counted for CPU runs only).
    *out.entry(Device::Cpu).or_insert(0) += e.runtime + e.gemm_kernels;
    out
}

/// Print the estimate of `plan` training on `device` (the default k-bit device map,
/// `{"": local device}`), and per device when the recipe's device map spreads the model.
pub fn print(plan: &RunPlan, device: Device, cuda_devices: usize) -> Result<()> {
    let cfg = &plan.model_config;
    let run = plan.run_shape(device);
    let e = estimate(&cfg.shape, &run);
    let s = &cfg.shape;
    let params = s.linear_params() + s.other_params();
    let lora_params = e.lora_weights / run.adapter_bytes.max(1);
    #[allow(clippy::print_stdout)]
    {
        println!(
            "model: {} ({:?}, {} parameters, {} layers)",
            plan.model_dir.display(),
            cfg.architecture,
            params,
            s.layers
        );
        println!(
            "run: {:?}, {}-byte compute, LoRA r={} on {:?} ({lora_params} trainable), batch {} x {} tokens, gradient checkpointing {}",
            run.base,
            run.dtype_bytes,
            run.lora_r,
            run.lora_targets,
            run.batch,
            run.seq,
            run.gradient_checkpointing
        );
        println!("estimated peak memory on {device}:");
        println!("{e}");
        // A device map: the same total, split by where each part lives (GPUs may be absent here:
        // the plan is made for the recipe's budgets).
        if let Some((map, modules)) = crate::place::plan(plan.device_map.as_ref(), cfg, &run, cuda_devices)? {
            println!("per device (model_init_kwargs.device_map):");
            for (d, b) in per_device(&e, &map, &modules, matches!(run.base, BaseWeights::FourBit { .. })) {
                println!("  {:<32} {:>12}", d.to_string(), format_bytes(b));
            }
        }
        let other = RunShape { gradient_checkpointing: !run.gradient_checkpointing, ..run.clone() };
        println!(
            "  (with gradient checkpointing {}: {})",
            if other.gradient_checkpointing { "on" } else { "off" },
            format_bytes(estimate(&cfg.shape, &other).total())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offloaded_layer_keeps_its_adapter_and_activations_on_the_gpu() {
        let e = device_map::estimate::Estimate {
            base_linears: 0,
            unquantized: 0,
            lora_weights: 20,
            lora_grads: 20,
            optimizer: 40,
            activations: 1000,
            logits: 7,
            runtime: 3,
            gemm_kernels: 0,
        };
        let names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"];
        let devices = [Device::Cuda(0), Device::Cuda(0), Device::Cpu, Device::Cpu, Device::Cpu];
        let plan = device_map::Plan {
            placements: names.iter().zip(devices).map(|(n, d)| (n.to_string(), d)).collect(),
        };
        // A layer's bytes hold its weights (100) and its adapter with grads and moments (40).
        let bytes = [500, 140, 140, 10, 0];
        let modules: Vec<device_map::Module> = names
            .iter()
            .zip(bytes)
            .map(|(n, b)| device_map::Module { name: n.to_string(), bytes: b })
            .collect();
        let four_bit = per_device(&e, &plan, &modules, true);
        // GPU: embedding, layer 0, both layers' activations, layer 1's adapter (streamed from the CPU).
        assert_eq!(four_bit[&Device::Cuda(0)], 500 + 140 + 1000 + 40);
        // CPU: layer 1's weights, the norm, the head's logits, the runtime.
        assert_eq!(four_bit[&Device::Cpu], 100 + 10 + 7 + 3);
        // Not 4-bit: layer 1 computes on the CPU, with its adapter and activations there.
        let dense = per_device(&e, &plan, &modules, false);
        assert_eq!(dense[&Device::Cuda(0)], 500 + 140 + 500);
        assert_eq!(dense[&Device::Cpu], 140 + 500 + 10 + 7 + 3);
        let total: u64 = modules.iter().map(|m| m.bytes).sum::<u64>() + 1000 + 7 + 3;
        assert_eq!(four_bit.values().sum::<u64>(), total);
    }
}
