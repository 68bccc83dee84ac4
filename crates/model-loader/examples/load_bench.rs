//! Load a model quantizing its decoder linears to 4 bits (NF4, double quantization, as a QLoRA
//! run does) and report, as one JSON line on stdout, the time `CausalLm::load` took, this
//! process's peak and current resident memory (from /proc/self/status), and the sizes that
//! bound it: the 4-bit model and its largest tensors in f32. Used by `cargo xtask bench`:
//!
//! ```sh
//! cargo run --release -p model-loader --example load_bench -- MODEL_DIR [bf16|fp32]
//! ```
#![allow(clippy::print_stdout, reason = "the report is the output")]
#![allow(clippy::field_reassign_with_default, reason = "robust to options added to LoadOptions")]

use std::path::PathBuf;
use std::time::Instant;

use model_loader::{CausalLm, HfConfig, LoadOptions, expected_shapes};
use quant::QuantType;
use quant::ops::QuantizeOptions;
use tch::{Device, Kind};

/// Bytes of one `[rows, cols]` weight in bitsandbytes' NF4 layout with double quantization at
/// blocksize 64: packed nibbles, u8 absmax per block, f32 absmax per 256 blocks, code and offset.
fn nf4_double_quant_bytes(numel: u64) -> u64 {
    let blocks = numel.div_ceil(64);
    numel.div_ceil(2) + blocks + blocks.div_ceil(256) * 4 + 256 * 4 + 4
}

/// `VmHWM`, `VmRSS`, `RssAnon`, `RssFile` of this process, in KiB.
fn memory_kib() -> [u64; 4] {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or(0)
    };
    [field("VmHWM:"), field("VmRSS:"), field("RssAnon:"), field("RssFile:")]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: load_bench MODEL_DIR [bf16|fp32]")?);
    let dtype = match args.next().as_deref() {
        None | Some("bf16") => Kind::BFloat16,
        Some("fp32") => Kind::Float,
        Some(other) => return Err(format!("unknown dtype {other} (bf16 or fp32)").into()),
    };
    let quantize = QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true };
    // Field by field from the defaults, so that options added later keep their default here.
    let mut opts = LoadOptions::default();
    opts.dtype = dtype;
    opts.quantize = Some(quantize);
    opts.compute_dtype = dtype;
    opts.device = Device::Cpu;
    let before = memory_kib();
    let start = Instant::now();
    let model = CausalLm::load(&dir, &opts, &mut |_, _| {})?;
    let load_s = start.elapsed().as_secs_f64();
    let after = memory_kib();

    let cfg: &HfConfig = model.config();
    let elem = if dtype == Kind::Float { 4 } else { 2 };
    let (mut quantized, mut dense, mut largest_linear, mut largest) = (0u64, 0u64, 0u64, 0u64);
    for (name, shape) in expected_shapes(cfg) {
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        largest = largest.max(numel);
        if name.starts_with("model.layers.") && shape.len() == 2 {
            quantized += nf4_double_quant_bytes(numel);
            largest_linear = largest_linear.max(numel);
        } else {
            dense += numel * elem;
        }
    }
    println!(
        "{{\"load_s\": {load_s:.4}, \"vm_hwm_kib\": {}, \"vm_rss_kib\": {}, \"rss_anon_kib\": {}, \
         \"rss_file_kib\": {}, \"start_rss_kib\": {}, \"model_4bit_bytes\": {}, \"quantized_linear_bytes\": {quantized}, \
         \"largest_linear_f32_bytes\": {}, \"largest_tensor_f32_bytes\": {}, \"parameters\": {}}}",
        after[0],
        after[1],
        after[2],
        after[3],
        before[1],
        quantized + dense,
        largest_linear * 4,
        largest * 4,
        model.num_parameters()
    );
    Ok(())
}
