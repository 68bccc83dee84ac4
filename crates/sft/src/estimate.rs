//! `sft RECIPE --estimate-memory`: the memory a run will need, from the model's config.json and
//! the recipe, before anything loads.

use anyhow::{Context, Result};
use config::Recipe;
use config::types::{Dtype, TargetModules};
use device_map::estimate::{BaseWeights, RunShape, estimate};
use device_map::{Device, format_bytes};
use model_loader::HfConfig;

/// Bytes per element of the compute dtype: the recipe's `dtype`, or the checkpoint's for `auto`.
fn dtype_bytes(recipe: &Recipe, cfg: &HfConfig) -> u64 {
    let name = match recipe.model.dtype {
        Dtype::Auto => cfg.dtype.as_deref().unwrap_or("float32"),
        d => d.as_str(),
    };
    match name {
        "bfloat16" | "float16" | "bf16" | "fp16" => 2,
        _ => 4,
    }
}

/// sft's resident memory when loading starts (libtorch, tokenizer, the process), measured on the
/// bench machine (docs/benchmarks.md).
const RUNTIME_BYTES: u64 = 170 << 20;

/// Whether the run's 16-bit matmuls will run in f32 (the recipe's `cpu_matmul` on this CPU).
fn matmul_in_f32(recipe: &Recipe, device: Device) -> Result<bool> {
    crate::run::apply_cpu_matmul(recipe)?;
    let kind = match recipe.model.dtype {
        Dtype::Float16 => tch::Kind::Half,
        _ => tch::Kind::BFloat16,
    };
    Ok(device == Device::Cpu && quant::ops::matmul_in_f32(kind, tch::Device::Cpu))
}

/// Which of a decoder block's linears the recipe's `lora_target_modules` selects, judged on the
/// module paths of layer 0 (PEFT's rules: exact name or `.suffix` for lists, full-match regex
/// for a string, every linear but the head for `all-linear`).
pub fn lora_targets(targets: Option<&TargetModules>) -> Result<Vec<String>> {
    let names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let path = |n: &str| {
        let block = if n.ends_with("_proj") && ["gate_proj", "up_proj", "down_proj"].contains(&n) {
            "mlp"
        } else {
            "self_attn"
        };
        format!("model.layers.0.{block}.{n}")
    };
    let chosen = match targets {
        None => Vec::new(),
        Some(TargetModules::Pattern(p)) if p == "all-linear" => names.to_vec(),
        Some(TargetModules::Pattern(p)) => {
            let re = regex::Regex::new(&format!("^(?:{p})$"))
                .with_context(|| format!("lora_target_modules: bad regex `{p}`"))?;
            names.iter().copied().filter(|n| re.is_match(&path(n))).collect()
        }
        Some(TargetModules::List(l)) => names
            .iter()
            .copied()
            .filter(|n| l.iter().any(|t| path(n) == *t || path(n).ends_with(&format!(".{t}"))))
            .collect(),
    };
    Ok(chosen.into_iter().map(str::to_owned).collect())
}

/// Whether the run's decoder linears are 4-bit: quantized while loading, or read pre-quantized.
pub(crate) fn loads_4bit(recipe: &Recipe, cfg: &HfConfig) -> bool {
    recipe.model.load_in_4bit || cfg.quantization == Some(model_loader::Prequantized::FourBit)
}

/// The run's memory-driving settings from the recipe, for training on `device`.
pub(crate) fn run_shape(recipe: &Recipe, cfg: &HfConfig, device: Device) -> Result<RunShape> {
    let base = if loads_4bit(recipe, cfg) {
        BaseWeights::FourBit { double_quant: recipe.model.use_bnb_nested_quant }
    } else if recipe.model.load_in_8bit {
        BaseWeights::EightBit
    } else {
        BaseWeights::Dense
    };
    Ok(RunShape {
        base,
        dtype_bytes: dtype_bytes(recipe, cfg),
        lora_r: if recipe.model.use_peft { u64::try_from(recipe.model.lora_r).unwrap_or(0) } else { 0 },
        lora_targets: lora_targets(recipe.model.lora_target_modules.as_ref())?,
        adapter_bytes: 4,
        lora_dropout: recipe.model.use_peft && recipe.model.lora_dropout > 0.0,
        batch: u64::try_from(recipe.training.per_device_train_batch_size).unwrap_or(1),
        seq: recipe.training.max_length.and_then(|n| u64::try_from(n).ok()).unwrap_or(1024),
        gradient_checkpointing: recipe.training.gradient_checkpointing,
        // Packed rows attend through an explicit mask, which keeps the probabilities.
        attention_scores: recipe.training.packing,
        matmul_in_f32: matmul_in_f32(recipe, device)?,
        logits_chunk_bytes: sft::train::HEAD_CHUNK_BYTES as u64,
        runtime: if device == Device::Cpu { RUNTIME_BYTES } else { 0 },
    })
}

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
    *out.entry(Device::Cpu).or_insert(0) += e.runtime;
    out
}

/// Print the estimate for a resolved recipe on `device` (the default k-bit device map,
/// `{"": local device}`), and per device when the recipe's device map spreads the model.
pub fn print(recipe: &Recipe, device: Device) -> Result<()> {
    let (dir, cfg) = crate::prepare::model(recipe)?;
    let run = run_shape(recipe, &cfg, device)?;
    let e = estimate(&cfg.shape, &run);
    let s = &cfg.shape;
    let params = s.linear_params() + s.other_params();
    let lora_params = e.lora_weights / run.adapter_bytes.max(1);
    #[allow(clippy::print_stdout)]
    {
        println!(
            "model: {} ({:?}, {} parameters, {} layers)",
            dir.display(),
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
        let cuda = if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
        if let Some((plan, modules)) = crate::place::plan(recipe, &cfg, cuda)? {
            println!("per device (model_init_kwargs.device_map):");
            for (d, b) in per_device(&e, &plan, &modules, matches!(run.base, BaseWeights::FourBit { .. })) {
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

    fn t(v: &[&str]) -> TargetModules {
        TargetModules::List(v.iter().map(|s| s.to_string()).collect())
    }

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

    #[test]
    fn targets_follow_peft_matching() {
        assert_eq!(lora_targets(None).ok(), Some(vec![]));
        assert_eq!(
            lora_targets(Some(&TargetModules::Pattern("all-linear".into()))).map(|v| v.len()).ok(),
            Some(7)
        );
        assert_eq!(
            lora_targets(Some(&t(&["q_proj", "v_proj", "lm_head"]))).ok(),
            Some(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(lora_targets(Some(&t(&["self_attn.o_proj"]))).ok(), Some(vec!["o_proj".into()]));
        let re = TargetModules::Pattern(r".*\.mlp\..*".into());
        assert_eq!(
            lora_targets(Some(&re)).ok(),
            Some(vec!["gate_proj".into(), "up_proj".into(), "down_proj".into()])
        );
        assert!(lora_targets(Some(&TargetModules::Pattern("(".into()))).is_err());
    }
}
