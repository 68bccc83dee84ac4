//! The GPU half of `scripts/gpu_check.sh` (built here with `--features cuda`, run on a GPU
//! machine): the CUDA kernels against the CPU reference byte for byte on random and edge-case
//! inputs, against bitsandbytes' CUDA results when `--bnb FILE` (made by
//! `scripts/gpu_check_bnb.py`) is given, and timings (dequantize vs a device-to-device copy of the
//! same bytes, gemv). Prints one line per check and a JSON summary to `--json FILE`.
//!
//! Without a CUDA device it says so and exits 0 having checked only the CPU fallbacks.

#![allow(clippy::print_stdout, reason = "a check tool reports on stdout")]

use std::fmt::Write as _;
use std::time::Instant;

use quant::codec::{self, QuantType};
use quant::cuda;
use quant::ops::{self, Absmax4, QuantizeOptions};
use tch::{Device, Kind, Tensor};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
        // Roughly normal: sum of uniforms.
        u - 0.5
    }
    fn normal(&mut self) -> f32 {
        (0..6).map(|_| self.next_f32()).sum::<f32>()
    }
}

/// Random values with edge cases planted: an all-zero block, a subnormal block, values exactly on
/// NF4/FP4 thresholds times the block's absmax, negative zeros.
fn input(n: usize, blocksize: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed | 1);
    let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * 0.02).collect();
    let blocks = n.div_ceil(blocksize);
    if blocks > 2 {
        x[blocksize..2 * blocksize].fill(0.0);
    }
    if blocks > 3 {
        for v in &mut x[2 * blocksize..3 * blocksize] {
            *v *= 1e-37;
        }
    }
    if blocks > 4 {
        let b = &mut x[3 * blocksize..4 * blocksize];
        b[0] = 1.0;
        let ties = [0.039_790_15f32, -0.339_679_43, 0.861_478_4, 0.291_666_67, -0.0];
        for (i, t) in ties.iter().enumerate() {
            b[1 + i] = *t;
        }
    }
    x
}

fn bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(Vec::<u8>::try_from(&t.to_device(Device::Cpu).view([-1]))?)
}
fn floats(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Float).view([-1]))?)
}
/// Bit patterns of a tensor of any float kind (for exact comparison of 16-bit outputs).
fn bits(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(Device::Cpu).contiguous();
    let kind = t.kind();
    let raw = match kind {
        Kind::Float => t.view_dtype(Kind::Int),
        _ => t.view_dtype(Kind::Int16),
    };
    let n = raw.numel() * kind.elt_size_in_bytes();
    let mut out = vec![0u8; n];
    raw.view_dtype(Kind::Uint8).view([-1]).copy_data_u8(&mut out, n);
    Ok(out)
}

struct Report {
    failures: usize,
    json: String,
}
impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: &str) {
        println!(
            "{} {name}{}{detail}",
            if ok { "ok  " } else { "FAIL" },
            if detail.is_empty() { "" } else { ": " }
        );
        if !ok {
            self.failures += 1;
        }
    }
    fn number(&mut self, key: &str, value: f64) {
        println!("     {key} = {value:.4}");
        let _ = write!(self.json, "{}\"{key}\": {value}", if self.json.is_empty() { "" } else { ", " });
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("lengths {} vs {}", a.len(), b.len());
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(
            "{} bytes differ, first at {i} ({} vs {})",
            a.iter().zip(b).filter(|(x, y)| x != y).count(),
            a[i],
            b[i]
        ),
        None => String::new(),
    }
}

/// CUDA vs the CPU reference, byte for byte.
fn codec_checks(r: &mut Report, dev: Device) -> Result<()> {
    let kinds = [Kind::Float, Kind::Half, Kind::BFloat16];
    let sizes = [1usize, 2, 63, 4096 + 33, 64 * 1000 + 7, 1 << 20];
    let mut seed = 1;
    for &bs in &codec::BLOCKSIZES {
        for &n in &sizes {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                seed += 1;
                let x = input(n, bs, seed);
                let xc = Tensor::from_slice(&x);
                let (rp, ra) = codec::quantize_4bit(&x, bs, qt)?;
                let (p, a) = cuda::quantize_4bit(&xc.to_device(dev), bs, qt)?;
                let name = format!("quantize {} bs{bs} n{n} f32", qt.as_str());
                let d = first_diff(&bytes(&p)?, &rp);
                let am = floats(&a)?;
                let ok_a = am.iter().zip(&ra).all(|(x, y)| x.to_bits() == y.to_bits());
                r.check(&name, d.is_empty() && ok_a && am.len() == ra.len(), &d);
                // 16-bit inputs: vs the CPU op on the same tensor.
                for kind in [Kind::Half, Kind::BFloat16] {
                    let xk = xc.to_kind(kind);
                    let (cp, ca) = ops::quantize_4bit(&xk, bs, qt)?;
                    let (gp, ga) = cuda::quantize_4bit(&xk.to_device(dev), bs, qt)?;
                    let d = first_diff(&bytes(&gp)?, &bytes(&cp)?);
                    let da = first_diff(&bits(&ga)?, &bits(&ca)?);
                    r.check(
                        &format!("quantize {} bs{bs} n{n} {kind:?}", qt.as_str()),
                        d.is_empty() && da.is_empty(),
                        &format!("{d}{da}"),
                    );
                }
                // Double quant: codes vs the codec with the device's offset.
                let q = cuda::quantize(
                    &xc.to_device(dev),
                    QuantizeOptions { quant_type: qt, blocksize: bs, double_quant: true },
                )?;
                if let Absmax4::Nested { codes, nested_absmax, offset } = &q.absmax {
                    let reference = codec::double_quant(&ra, Some(*offset))?;
                    let d = first_diff(&bytes(codes)?, &reference.codes);
                    let na = floats(nested_absmax)?;
                    let ok = na.iter().zip(&reference.nested_absmax).all(|(x, y)| x.to_bits() == y.to_bits());
                    r.check(&format!("double quant {} bs{bs} n{n}", qt.as_str()), d.is_empty() && ok, &d);
                    let cpu_offset = f32::try_from(Tensor::from_slice(&ra).mean(Kind::Float))?;
                    if cpu_offset.to_bits() != offset.to_bits() {
                        println!(
                            "     note: CUDA mean {offset:e} vs CPU mean {cpu_offset:e} (torch reductions differ)"
                        );
                    }
                }
                // Dequantize, plain and nested, to each kind: bit-identical to the CPU path.
                let qcpu = q.to_device(Device::Cpu)?;
                for kind in kinds {
                    let g = cuda::dequantize(&q, kind)?;
                    let c = cuda::dequantize(&qcpu, kind)?;
                    let d = first_diff(&bits(&g)?, &bits(&c)?);
                    r.check(
                        &format!("dequantize nested {} bs{bs} n{n} -> {kind:?}", qt.as_str()),
                        d.is_empty(),
                        &d,
                    );
                    let gp = cuda::dequantize_4bit(&p, &Absmax4::Plain(a.shallow_clone()), n, bs, qt, kind)?;
                    let cp = ops::dequantize_4bit(
                        &Tensor::from_slice(&rp),
                        &Tensor::from_slice(&ra),
                        n,
                        bs,
                        qt,
                        kind,
                    )?;
                    let d = first_diff(&bits(&gp)?, &bits(&cp)?);
                    r.check(
                        &format!("dequantize plain {} bs{bs} n{n} -> {kind:?}", qt.as_str()),
                        d.is_empty(),
                        &d,
                    );
                }
            }
        }
    }
    // A non-finite input is reported with its index, as on the CPU.
    let mut x = input(1000, 64, 7);
    x[777] = f32::NAN;
    let got = cuda::quantize_4bit(&Tensor::from_slice(&x).to_device(dev), 64, QuantType::Nf4);
    r.check(
        "non-finite input names element 777",
        matches!(got, Err(quant::Error::NonFinite { index: 777, .. })),
        "",
    );
    Ok(())
}

/// gemv vs `x @ dequant(W)^T` on the CPU (f32 accumulation both sides; order differs).
fn gemv_checks(r: &mut Report, dev: Device) -> Result<()> {
    for (out_f, in_f) in [(1usize, 8usize), (33, 100), (4096, 4096), (11008, 4096), (4096, 11008), (7, 129)] {
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            for dq in [false, true] {
                let w = Tensor::from_slice(&input(out_f * in_f, 64, 99)).view([out_f as i64, in_f as i64]);
                let q = quant::ops::Quantized4bit::quantize(
                    &w,
                    QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: dq },
                )?;
                let x = Tensor::from_slice(&input(in_f, 64, 5)).to_kind(kind).view([1, in_f as i64]);
                let reference = x
                    .to_kind(Kind::Float)
                    .linear::<&Tensor>(&cuda::dequantize(&q, kind)?.to_kind(Kind::Float), None);
                let got = cuda::gemv_4bit(&x.to_device(dev), &q.to_device(dev)?)?;
                let err = (got.to_device(Device::Cpu).to_kind(Kind::Float) - &reference)
                    .abs()
                    .max()
                    .double_value(&[]);
                let scale = reference.abs().max().double_value(&[]).max(1e-6);
                let tol = match kind {
                    Kind::Float => 1e-5,
                    Kind::Half => 2e-3,
                    _ => 1e-2,
                };
                r.check(
                    &format!("gemv {out_f}x{in_f} {kind:?} dq={dq}"),
                    err / scale <= tol,
                    &format!("max rel err {:.2e}", err / scale),
                );
            }
        }
    }
    Ok(())
}

/// `Linear4bit` with its weight on `dev` (the C++ autograd Function dequantizing through the
/// registered CUDA kernels, forward and again in backward) against the same layer on the CPU:
/// output and input gradient, compute dtype f32 (tight) and bf16 (16-bit rounding).
fn linear4bit_checks(r: &mut Report, dev: Device) -> Result<()> {
    use quant::linear::{Linear, Linear4bit};
    for (out_f, in_f, rows) in [(96usize, 64usize, 5i64), (4096, 4096, 16), (7, 129, 3)] {
        for kind in [Kind::Float, Kind::BFloat16] {
            for dq in [false, true] {
                let w = Tensor::from_slice(&input(out_f * in_f, 64, 17)).view([out_f as i64, in_f as i64]);
                let opts = QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: dq };
                let q = quant::ops::Quantized4bit::quantize(&w, opts)?;
                let on_dev = Linear4bit::new(q.to_device(dev)?, None, kind)?;
                // CPU offload: codes in (pinned) host memory, products on `dev`.
                let host = if dev.is_cuda() { q.pin_memory(dev)? } else { q.to_device(Device::Cpu)? };
                let offloaded = Linear4bit::new(host, None, kind)?.with_exec_device(dev)?;
                let on_cpu = Linear4bit::new(q, None, kind)?;
                let x = Tensor::from_slice(&input(rows as usize * in_f, 64, 23))
                    .view([rows, in_f as i64])
                    .to_kind(kind);
                let g = Tensor::from_slice(&input(rows as usize * out_f, 64, 29))
                    .view([rows, out_f as i64])
                    .to_kind(kind);
                let run = |layer: &Linear4bit, d: Device| -> Result<(Tensor, Tensor)> {
                    let xi = x.to_device(d).detach().set_requires_grad(true);
                    let y = layer.forward(&xi)?;
                    (&y * g.to_device(d)).sum(kind).backward();
                    Ok((
                        y.to_device(Device::Cpu).to_kind(Kind::Float),
                        xi.grad().to_device(Device::Cpu).to_kind(Kind::Float),
                    ))
                };
                let (want_y, want_gx) = run(&on_cpu, Device::Cpu)?;
                let (got_y, got_gx) = run(&on_dev, dev)?;
                let rel = |a: &Tensor, b: &Tensor| {
                    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-6)
                };
                let (off_y, off_gx) = run(&offloaded, dev)?;
                r.check(
                    &format!("Linear4bit {out_f}x{in_f} x{rows} {kind:?} dq={dq}: offloaded = on device"),
                    off_y.equal(&got_y) && off_gx.equal(&got_gx) && offloaded.device() == dev,
                    "weights in host memory, computed on the device, bit for bit",
                );
                let (ey, eg) = (rel(&got_y, &want_y), rel(&got_gx, &want_gx));
                let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                r.check(
                    &format!("Linear4bit {out_f}x{in_f} x{rows} {kind:?} dq={dq}: output and input gradient"),
                    ey <= tol && eg <= tol,
                    &format!("max rel err {ey:.2e} / {eg:.2e}"),
                );
            }
        }
    }
    Ok(())
}

/// Median seconds of `f` over `iters` runs after warm-up, synchronised.
fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    tch::Cuda::synchronize(0);
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let s = Instant::now();
        f()?;
        tch::Cuda::synchronize(0);
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[iters / 2])
}

fn timings(r: &mut Report, dev: Device) -> Result<()> {
    // A 8192 x 8192 weight (64 Mi elements): dequantize to bf16 vs copying the bf16 output.
    let (o, i) = (8192i64, 8192i64);
    let w = Tensor::randn([o, i], (Kind::BFloat16, dev));
    let q = cuda::quantize(
        &w,
        QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true },
    )?;
    let out = Tensor::empty([o * i], (Kind::BFloat16, dev));
    let mut dst = Tensor::empty([o * i], (Kind::BFloat16, dev));
    let t_copy = time(20, || {
        dst.copy_(&out);
        Ok(())
    })?;
    let t_deq = time(20, || {
        let _ = cuda::dequantize(&q, Kind::BFloat16)?;
        Ok(())
    })?;
    let n = (o * i) as f64;
    let copy_bw = 4.0 * n / t_copy; // read 2n + write 2n bytes
    let deq_bytes = n / 2.0 + n / 64.0 + 2.0 * n; // packed + absmax codes + bf16 out
    let deq_bw = deq_bytes / t_deq;
    r.number("copy_bf16_64Mi_ms", t_copy * 1e3);
    r.number("copy_GBps", copy_bw / 1e9);
    r.number("dequant_nf4_dq_bf16_64Mi_ms", t_deq * 1e3);
    r.number("dequant_GBps", deq_bw / 1e9);
    r.number("dequant_over_copy_bandwidth", deq_bw / copy_bw);
    r.check("dequantize >= 85% of copy bandwidth", deq_bw >= 0.85 * copy_bw, "");
    for (of, inf) in [(4096i64, 4096i64), (11008, 4096), (4096, 11008), (14336, 4096)] {
        let w = Tensor::randn([of, inf], (Kind::BFloat16, dev));
        let q = cuda::quantize(
            &w,
            QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true },
        )?;
        let x = Tensor::randn([1, inf], (Kind::BFloat16, dev));
        let t = time(50, || {
            let _ = cuda::gemv_4bit(&x, &q)?;
            Ok(())
        })?;
        r.number(&format!("gemv_nf4_dq_bf16_{of}x{inf}_us"), t * 1e6);
    }
    Ok(())
}

/// bitsandbytes' CUDA results (from scripts/gpu_check_bnb.py) against the kernels.
fn bnb_checks(r: &mut Report, dev: Device, file: &str) -> Result<()> {
    let tensors = Tensor::read_safetensors(file)?;
    let get = |k: &str| tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t.shallow_clone());
    let mut case = 0;
    while let Some(x) = get(&format!("case{case}.x")) {
        let meta = get(&format!("case{case}.meta")).ok_or("meta")?;
        let m = Vec::<i64>::try_from(&meta)?; // [blocksize, qt (0 nf4 / 1 fp4)]
        let (bs, qt) = (m[0] as usize, if m[1] == 0 { QuantType::Nf4 } else { QuantType::Fp4 });
        let (p, a) = cuda::quantize_4bit(&x.to_device(dev), bs, qt)?;
        let bp = get(&format!("case{case}.packed")).ok_or("packed")?;
        let ba = get(&format!("case{case}.absmax")).ok_or("absmax")?;
        let d = first_diff(&bytes(&p)?, &bytes(&bp)?);
        let da = first_diff(&bits(&a)?, &bits(&ba)?);
        r.check(
            &format!("bnb case{case} quantize {} bs{bs} {:?}", qt.as_str(), x.size()),
            d.is_empty() && da.is_empty(),
            &format!("{d}{da}"),
        );
        if let (Some(bc), Some(bn), Some(bo)) = (
            get(&format!("case{case}.dq_codes")),
            get(&format!("case{case}.dq_nested")),
            get(&format!("case{case}.dq_offset")),
        ) {
            let off = f32::try_from(&bo)?;
            let map = cuda::dynamic_map_on(dev)?;
            let (c, n, o) =
                cuda::quantize_blockwise_8bit(&a, &map, codec::NESTED_BLOCKSIZE, ops::Offset::Mean)?;
            let d = first_diff(&bytes(&c)?, &bytes(&bc)?);
            let dn = first_diff(&bits(&n)?, &bits(&bn)?);
            r.check(
                &format!("bnb case{case} double quant"),
                d.is_empty() && dn.is_empty() && o.to_bits() == off.to_bits(),
                &format!("{d}{dn} offset {o:e} vs {off:e}"),
            );
        }
        if let Some(bd) = get(&format!("case{case}.dequant_bf16")) {
            let g = cuda::dequantize_4bit(
                &bp.to_device(dev),
                &Absmax4::Plain(ba.to_device(dev)),
                x.numel(),
                bs,
                qt,
                Kind::BFloat16,
            )?;
            let d = first_diff(&bits(&g)?, &bits(&bd)?);
            r.check(&format!("bnb case{case} dequantize bf16"), d.is_empty(), &d);
        }
        case += 1;
    }
    for key in [
        "bnb_gemv_4096x4096_us",
        "bnb_gemv_11008x4096_us",
        "bnb_gemv_4096x11008_us",
        "bnb_gemv_14336x4096_us",
        "bnb_dequant_bf16_64Mi_ms",
    ] {
        if let Some(t) = get(key) {
            r.number(key, f64::try_from(&t)?);
        }
    }
    println!("     ({case} bitsandbytes cases)");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let mut r = Report { failures: 0, json: String::new() };
    if !cuda::is_available() {
        println!("cuda_check: no CUDA device visible to libtorch: CUDA checks skipped (CPU fallback only)");
        let x = Tensor::from_slice(&input(1000, 64, 3));
        let (p, _) = cuda::quantize_4bit(&x, 64, QuantType::Nf4)?;
        let (rp, _) = codec::quantize_4bit(&input(1000, 64, 3), 64, QuantType::Nf4)?;
        r.check("CPU fallback quantize", bytes(&p)? == rp, "");
        // The layer checks' CPU-against-CPU run exercises the harness itself.
        linear4bit_checks(&mut r, Device::Cpu)?;
        return if r.failures == 0 { Ok(()) } else { Err("CPU fallback failed".into()) };
    }
    let dev = Device::Cuda(0);
    let started = Instant::now();
    codec_checks(&mut r, dev)?;
    gemv_checks(&mut r, dev)?;
    linear4bit_checks(&mut r, dev)?;
    if let Some(file) = arg("--bnb") {
        bnb_checks(&mut r, dev, &file)?;
    }
    if !args.iter().any(|a| a == "--no-timing") {
        timings(&mut r, dev)?;
    }
    r.number("failures", r.failures as f64);
    r.number("seconds", started.elapsed().as_secs_f64());
    if let Some(path) = arg("--json") {
        std::fs::write(&path, format!("{{{}}}\n", r.json))?;
    }
    println!("cuda_check: {} failure(s)", r.failures);
    if r.failures == 0 { Ok(()) } else { Err(format!("{} check(s) failed", r.failures).into()) }
}
