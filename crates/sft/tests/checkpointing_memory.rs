//! Gradient checkpointing bounds activation memory: the peak resident memory of one forward +
//! backward through an 8-layer 4-bit model with LoRA is measured with and without recomputing
//! layers in backward. Its own test binary, so nothing else allocates while it measures.

#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "tests")]

use std::path::PathBuf;

use model_loader::{CausalLm, LoadOptions};
use quant::QuantType;
use quant::ops::QuantizeOptions;
use sft::train::{DeviceBatch, forward_backward};
use tch::{Kind, Tensor};

fn status_kb(key: &str) -> i64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Peak resident bytes above the starting point while `f` runs (VmHWM, reset through
/// /proc/self/clear_refs).
fn peak_during(f: &dyn Fn()) -> i64 {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kb("VmRSS:");
    f();
    (status_kb("VmHWM:") - before) * 1024
}

/// An 8-layer Llama-shaped model with random weights, written where the loader reads it.
fn make_model() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-ckpt-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (h, i, v, layers) = (512i64, 1376i64, 512i64, 8);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
        "vocab_size": v, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "hidden_act": "silu", "dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    tch::manual_seed(0);
    let r = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * 0.02;
    let mut t: Vec<(String, Tensor)> = vec![
        ("model.embed_tokens.weight".into(), r(&[v, h])),
        ("model.norm.weight".into(), Tensor::ones([h], (Kind::Float, tch::Device::Cpu))),
        ("lm_head.weight".into(), r(&[v, h])),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [h, h]),
            ("self_attn.v_proj", [h, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            t.push((format!("{p}.{n}.weight"), r(&s)));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.push((format!("{p}.{n}.weight"), Tensor::ones([h], (Kind::Float, tch::Device::Cpu))));
        }
    }
    let named: Vec<(&str, &Tensor)> = t.iter().map(|(n, x)| (n.as_str(), x)).collect();
    Tensor::write_safetensors(&named, dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn checkpointing_keeps_one_layer_of_activations() {
    // Large tensors come from mmap and return to the OS when freed, so RSS follows live tensors.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_MMAP_THRESHOLD: i32 = -3;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes glibc's allocation policy; no memory is touched.
        assert_eq!(unsafe { mallopt(M_MMAP_THRESHOLD, 64 * 1024) }, 1);
    }
    let dir = make_model();
    let opts = LoadOptions {
        quantize: Some(QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true }),
        ..LoadOptions::default()
    };
    let mut model = CausalLm::load(&dir, &opts, &mut |_, _| {}).unwrap();
    let cfg = lora::LoraConfig::new(8, 16.0, lora::TargetModules::AllLinear);
    let _adapters = lora::inject(model.linears_mut(), &cfg, 0).unwrap();
    let (b, t) = (4i64, 256i64);
    let ids = Tensor::randint(512, [b, t], (Kind::Int64, tch::Device::Cpu));
    let pos = Tensor::arange(t, (Kind::Int64, tch::Device::Cpu)).expand([b, t], false).contiguous();
    let batch = DeviceBatch {
        input_ids: ids.shallow_clone(),
        labels: ids,
        position_ids: pos,
        segment_ids: None,
        num_tokens: (b * t) as u64,
    };
    let run = |ckpt: bool| {
        forward_backward(&model, &batch, (b * (t - 1)) as f64, ckpt, 0).unwrap();
    };
    run(false); // warm up allocator and thread pools
    let full = peak_during(&|| run(false));
    let ckpt = peak_during(&|| run(true));
    println!("peak above baseline: {} MiB without checkpointing, {} MiB with", full >> 20, ckpt >> 20);
    assert!(ckpt * 2 < full, "checkpointing peak {ckpt} is not well below {full}");
    let _ = std::fs::remove_dir_all(&dir);
}
