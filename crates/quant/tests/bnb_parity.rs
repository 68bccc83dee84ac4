//! Parity of the reference codec with bitsandbytes, through the golden files that
//! `scripts/golden_bnb.py` made with bitsandbytes' CPU functions.
//!
//! Byte for byte wherever bitsandbytes' CPU and CUDA rules agree. Where its CPU path takes
//! another rule (and codec.rs follows the CUDA kernel), every differing nibble or code must be
//! explained by one named CPU rule, recomputed here; anything else fails. The deviations are
//! counted and printed (`cargo test -p quant --test bnb_parity -- --nocapture`).
//!
//! The CPU rules, as read from bitsandbytes 0.50.2 and checked against its output here:
//! - 4-bit quantize is torch ops: `clamp(x * (1 / max(absmax, 1e-38)), -1, 1)` for full blocks,
//!   `x / max(absmax, 1e-38)` for a short last block (whose stored absmax is the clamped one),
//!   then `bucketize` against the f32 midpoints `(c[i] + c[i+1]) / 2` of the sorted code table
//!   (a value on a midpoint takes the lower sorted code). So: an all-zero block gets NF4 nibble
//!   7; the midpoints differ from the kernel's literal thresholds in the last bit for FP4; a
//!   negative FP4 value on a threshold takes the larger magnitude; and FP4 values in
//!   `(0, 0.0026]` take nibble 8 (-0.0) and those in `[-0.0026, 0]` nibble 0 (the kernel: the
//!   reverse, by the sign of x).
//! - 8-bit blockwise quantize (double quant) uses a lookup table: it may pick a code up to one
//!   table bin (2/65536) farther from the scaled value than the nearest code.
//! - 4-bit dequantize: exact, except that its torch fallback (odd last dimension) gives FP4
//!   nibble 8 as +0.0 (its quant_map table) where the kernels give -0.0; and on AVX-512, where rows that are a multiple
//!   of 16 but not of the blocksize (e.g. 688 at blocksize 64) come out wrong.
//!
//! The int8 row-wise codec (`quant::int8`, goldens in `tests/golden/int8` made by
//! `scripts/golden_int8.py`) follows bitsandbytes' CPU rules, so its codes, scales, outlier
//! columns and dequantized values are compared bit for bit with no exception.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use quant::codec::{self, QuantType};
use quant::int8;
use safetensors::{Dtype, SafeTensors};

/// One tensor of a golden file.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// One golden file: its metadata and tensors.
struct Golden {
    name: String,
    meta: BTreeMap<String, String>,
    tensors: BTreeMap<String, Raw>,
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn load(path: &Path) -> Golden {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&bytes).expect("safetensors header");
    let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, Raw { dtype: v.dtype(), shape: v.shape().to_vec(), bytes: v.data().to_vec() }))
        .collect();
    let name = path.file_stem().expect("stem").to_string_lossy().into_owned();
    Golden { name, meta, tensors }
}

fn goldens(kind: &str) -> Vec<Golden> {
    goldens_in(&golden_dir(), kind)
}

fn goldens_in(dir: &Path, kind: &str) -> Vec<Golden> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("tests/golden (regenerate with scripts/golden_bnb.py)")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    let out: Vec<Golden> = paths.iter().map(|p| load(p)).filter(|g| g.meta["kind"] == kind).collect();
    assert!(!out.is_empty(), "no golden files of kind {kind}");
    out
}

impl Golden {
    fn raw(&self, key: &str) -> &Raw {
        self.tensors.get(key).unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }
    fn f32s(&self, key: &str) -> Vec<f32> {
        to_f32(self.raw(key))
    }
    fn i8s(&self, key: &str) -> Vec<i8> {
        let r = self.raw(key);
        assert_eq!(r.dtype, Dtype::I8, "{}: {key}", self.name);
        r.bytes.iter().map(|&b| b as i8).collect()
    }
    fn i64s(&self, key: &str) -> Vec<i64> {
        let r = self.raw(key);
        assert_eq!(r.dtype, Dtype::I64, "{}: {key}", self.name);
        r.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
    }
    fn u8s(&self, key: &str) -> Vec<u8> {
        let r = self.raw(key);
        assert_eq!(r.dtype, Dtype::U8, "{}: {key}", self.name);
        r.bytes.clone()
    }
    fn blocksize(&self) -> usize {
        self.meta["blocksize"].parse().expect("blocksize")
    }
    fn quant_type(&self) -> QuantType {
        self.meta["quant_type"].parse().expect("quant_type")
    }
    fn avx512(&self) -> bool {
        self.meta["cpu_capability"].starts_with("AVX512")
    }
}

fn to_f32(r: &Raw) -> Vec<f32> {
    let b = &r.bytes;
    match r.dtype {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => panic!("not a float tensor: {other:?}"),
    }
}

/// f32 values rounded to nearest even into `dtype`, as little-endian bytes.
fn to_dtype_bytes(x: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::BF16 => x.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        other => panic!("not a float dtype: {other:?}"),
    }
}

fn nibble(packed: &[u8], i: usize) -> u8 {
    if i.is_multiple_of(2) { packed[i / 2] >> 4 } else { packed[i / 2] & 0x0f }
}

/// bitsandbytes' CPU 4-bit rule: bucketize against f32 midpoints of the sorted code table.
struct CpuRule {
    bounds: [f32; 15],
    order: [u8; 16],
}

impl CpuRule {
    fn new(qt: QuantType) -> Self {
        let code = qt.code();
        let mut order: Vec<usize> = (0..16).collect();
        // A stable sort keeps +0.0 (nibble 0) before -0.0 (nibble 8), as torch.argsort did.
        order.sort_by(|&a, &b| code[a].partial_cmp(&code[b]).expect("finite code"));
        let mut bounds = [0.0f32; 15];
        for i in 0..15 {
            bounds[i] = (code[order[i]] + code[order[i + 1]]) / 2.0;
        }
        let order = std::array::from_fn(|i| order[i] as u8);
        CpuRule { bounds, order }
    }
    /// torch.bucketize(right=False): the number of bounds strictly below x.
    fn encode(&self, x: f32) -> u8 {
        self.order[self.bounds.iter().filter(|&&b| b < x).count()]
    }
    /// Nibbles (one per element, plus a pad) and absmax as bitsandbytes' CPU path makes them.
    fn quantize(&self, x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
        let n = x.len();
        let full = n - n % blocksize;
        let mut nibs = Vec::with_capacity(n + 1);
        let mut absmax = Vec::new();
        for (b, block) in x.chunks(blocksize).enumerate() {
            let m = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let clamped = m.max(1e-38);
            if b * blocksize < full {
                absmax.push(m);
                let r = 1.0f32 / clamped;
                nibs.extend(block.iter().map(|v| self.encode((v * r).clamp(-1.0, 1.0))));
            } else {
                absmax.push(clamped);
                nibs.extend(block.iter().map(|v| self.encode((v / clamped).clamp(-1.0, 1.0))));
            }
        }
        if n % 2 == 1 {
            nibs.push(self.encode(0.0));
        }
        (nibs, absmax)
    }
}

/// Why a codec nibble differs from bitsandbytes' CPU nibble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Why {
    /// All-zero block: kernel 0 * inf = NaN -> code 0; CPU clamps absmax, 0 -> code of 0.0.
    ZeroBlock,
    /// Block absmax below 1e-38: the CPU clamps it, the kernel's 1/absmax overflows.
    SubnormalAbsmax,
    /// Short last block: the CPU divides by absmax instead of multiplying by its reciprocal.
    Division,
    /// FP4 zero: CPU gives +0/-0 by bucket, the kernel by the sign of x.
    Fp4SignedZero,
    /// Torch's f32 midpoints and bucketize tie rule instead of the kernel's literal thresholds.
    Thresholds,
}

#[test]
fn quant_maps_and_dynamic_map_are_bnb_bit_for_bit() {
    for g in goldens("4bit") {
        let map = g.f32s("quant_map");
        let ours = g.quant_type().code();
        for (i, (a, b)) in map.iter().zip(ours).enumerate() {
            // FP4 nibble 8: bnb's table holds +0.0 (Python's `-0` is an int), the CUDA kernel
            // dequantizes it as `0.0 * absmax * -1` = -0.0, and so does codec.rs.
            let signed_zero = g.quant_type() == QuantType::Fp4 && i == 8 && *a == 0.0 && *b == 0.0;
            assert!(a.to_bits() == b.to_bits() || signed_zero, "{}: quant_map[{i}] {a:e} vs {b:e}", g.name);
        }
        if g.meta["double_quant"] == "true" {
            let nested = g.f32s("nested_quant_map");
            let ok = nested.iter().zip(codec::dynamic_map()).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(ok, "{}: nested_quant_map", g.name);
        }
    }
    let g = &goldens("map")[0];
    let m = g.f32s("dynamic_map");
    assert_eq!(m.len(), 256);
    assert!(
        m.iter().zip(codec::dynamic_map()).all(|(a, b)| a.to_bits() == b.to_bits()),
        "create_dynamic_map"
    );
}

#[test]
fn four_bit_quantization_matches_bnb_or_a_named_cpu_rule() {
    let mut totals: BTreeMap<Why, usize> = BTreeMap::new();
    let mut nibbles = 0usize;
    for g in goldens("4bit") {
        let (qt, bs) = (g.quant_type(), g.blocksize());
        let x = g.f32s("input");
        let shape: Vec<usize> = serde_json::from_str(&g.meta["shape"]).expect("shape");
        assert_eq!(shape.iter().product::<usize>(), x.len(), "{}", g.name);
        let packed = g.u8s("packed");
        let bnb_absmax =
            if g.meta["double_quant"] == "true" { g.f32s("absmax_raw") } else { g.f32s("absmax") };
        let (ours, ours_absmax) = codec::quantize_4bit(&x, bs, qt).expect("quantize");
        assert_eq!(ours.len(), packed.len(), "{}: packed length", g.name);

        // The CPU emulation must reproduce bitsandbytes exactly, or the explanations mean nothing.
        let cpu = CpuRule::new(qt);
        let (cpu_nibs, cpu_absmax) = cpu.quantize(&x, bs);
        assert_eq!(cpu_nibs.len(), 2 * packed.len(), "{}: CPU emulation length", g.name);
        for (i, cpu_nib) in cpu_nibs.iter().enumerate() {
            assert_eq!(nibble(&packed, i), *cpu_nib, "{}: CPU emulation, nibble {i}", g.name);
        }
        assert_eq!(cpu_absmax.len(), bnb_absmax.len(), "{}", g.name);

        // absmax: equal, except a short last block below 1e-38 (the CPU stores the clamp).
        let last = bnb_absmax.len() - 1;
        for (b, (a, o)) in bnb_absmax.iter().zip(&ours_absmax).enumerate() {
            assert_eq!(a.to_bits(), cpu_absmax[b].to_bits(), "{}: CPU emulation, absmax {b}", g.name);
            let short = x.len() % bs != 0 && b == last;
            if a.to_bits() != o.to_bits() {
                assert!(
                    short && *o < 1e-38 && *a == 1e-38f32,
                    "{}: absmax {b}: bnb {a} vs codec {o}",
                    g.name
                );
                *totals.entry(Why::SubnormalAbsmax).or_default() += 1;
            }
        }

        let mut why_here: BTreeMap<Why, usize> = BTreeMap::new();
        for i in 0..2 * packed.len() {
            nibbles += 1;
            let (b_nib, o_nib) = (nibble(&packed, i), nibble(&ours, i));
            if b_nib == o_nib {
                continue;
            }
            let block = i / bs;
            let m = ours_absmax[block];
            let v = x.get(i).copied().unwrap_or(0.0);
            let short = x.len() % bs != 0 && block == last;
            let kernel_scaled = v * (1.0f32 / m);
            let why = if m == 0.0 {
                assert_eq!(b_nib, cpu.encode(0.0), "{}: zero block nibble {i}", g.name);
                Why::ZeroBlock
            } else if m < 1e-38 {
                Why::SubnormalAbsmax
            } else if short && qt.encode(v / m) == b_nib {
                Why::Division
            } else if qt == QuantType::Fp4 && (b_nib & 7) == 0 && (o_nib & 7) == 0 {
                Why::Fp4SignedZero
            } else if cpu.encode(kernel_scaled.clamp(-1.0, 1.0)) == b_nib
                || (short && cpu.encode((v / m).clamp(-1.0, 1.0)) == b_nib)
            {
                Why::Thresholds
            } else {
                panic!(
                    "{}: nibble {i} (x = {v:e}, absmax {m:e}): bnb {b_nib} vs codec {o_nib}, unexplained",
                    g.name
                )
            };
            *why_here.entry(why).or_default() += 1;
        }
        if !why_here.is_empty() {
            eprintln!("{}: {why_here:?}", g.name);
        }
        for (k, v) in why_here {
            *totals.entry(k).or_default() += v;
        }
    }
    eprintln!("4-bit nibbles compared: {nibbles}; deviations from bnb CPU by rule: {totals:?}");
    // The golden edge cases exercise each rule at least once.
    for why in [Why::ZeroBlock, Why::SubnormalAbsmax, Why::Division, Why::Fp4SignedZero, Why::Thresholds] {
        assert!(totals.contains_key(&why), "no case exercised {why:?}");
    }
}

/// Nearest-code distance excess the CPU lookup table may add: one bin of 65536 over [-1, 1].
const LUT_BIN: f32 = 2.0 / 65536.0;

/// Compare 8-bit codes; every difference must be within the lookup table's resolution.
fn check_8bit_codes(name: &str, scaled: &[f32], bnb: &[u8], ours: &[u8]) -> usize {
    let map = codec::dynamic_map();
    let mut deviations = 0;
    for (i, ((s, b), o)) in scaled.iter().zip(bnb).zip(ours).enumerate() {
        if b == o {
            continue;
        }
        deviations += 1;
        let excess = (map[*b as usize] - s).abs() - (map[*o as usize] - s).abs();
        assert!(
            excess <= LUT_BIN,
            "{name}: code {i} (scaled {s:e}): bnb {b} vs codec {o}, {excess:e} farther than the nearest"
        );
    }
    deviations
}

#[test]
fn double_quant_matches_bnb_given_its_offset() {
    let mut total = (0usize, 0usize);
    for g in goldens("4bit").into_iter().filter(|g| g.meta["double_quant"] == "true") {
        let raw = g.f32s("absmax_raw");
        let (_, ours_raw) =
            codec::quantize_4bit(&g.f32s("input"), g.blocksize(), g.quant_type()).expect("quantize");
        assert!(raw.iter().zip(&ours_raw).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: raw absmax", g.name);
        let offset = g.f32s("offset")[0];
        let mean = codec::absmax_offset(&raw);
        let ulps = (i64::from(mean.to_bits() as i32) - i64::from(offset.to_bits() as i32)).abs();
        eprintln!("{}: offset bnb {offset:e}, codec f64 mean {mean:e} ({ulps} ulp apart)", g.name);
        assert!(ulps <= 2, "{}: the f64 mean is {ulps} ulp from torch's", g.name);

        let nested = codec::double_quant(&raw, Some(offset)).expect("double quant");
        let bnb_nested_absmax = g.f32s("nested_absmax");
        assert!(
            nested.nested_absmax.iter().zip(&bnb_nested_absmax).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: nested_absmax",
            g.name
        );
        let scaled: Vec<f32> = raw
            .iter()
            .enumerate()
            .map(|(i, a)| (a - offset) * (1.0 / bnb_nested_absmax[i / codec::NESTED_BLOCKSIZE]))
            .collect();
        let d = check_8bit_codes(&g.name, &scaled, &g.u8s("absmax_codes"), &nested.codes);
        eprintln!("{}: {d} of {} absmax codes differ (lookup table)", g.name, raw.len());
        total.0 += d;
        total.1 += raw.len();
    }
    eprintln!(
        "double quant: {} of {} absmax codes differ from bnb CPU, all within one table bin",
        total.0, total.1
    );
}

#[test]
fn blockwise_8bit_matches_bnb_within_its_lookup_table() {
    for g in goldens("8bit") {
        let x = g.f32s("input");
        let bs = g.blocksize();
        let (codes, absmax) = codec::quantize_blockwise_8bit(&x, codec::dynamic_map(), bs).expect("quantize");
        let bnb_absmax = g.f32s("absmax");
        assert!(
            absmax.iter().zip(&bnb_absmax).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: absmax",
            g.name
        );
        let scaled: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * (1.0 / absmax[i / bs])).collect();
        let d = check_8bit_codes(&g.name, &scaled, &g.u8s("codes"), &codes);
        eprintln!("{}: {d} of {} codes differ (lookup table)", g.name, x.len());
        // Dequantization is the same product on both sides.
        let back = codec::dequantize_blockwise_8bit(&g.u8s("codes"), &bnb_absmax, codec::dynamic_map(), bs)
            .expect("dequantize");
        assert_eq!(to_dtype_bytes(&back, Dtype::F32), g.raw("dequantized").bytes, "{}: dequantized", g.name);
    }
}

/// Whether bitsandbytes' CPU dequantize is known wrong for this case (AVX-512 kernel only).
fn bnb_dequant_known_wrong(g: &Golden, shape: &[usize]) -> bool {
    let last = shape.last().copied().unwrap_or(1);
    g.avx512() && g.blocksize() < 2048 && last % 2 == 0 && last % 16 == 0 && last % g.blocksize() != 0
}

#[test]
fn dequantization_is_exact_and_matches_bnb_where_bnb_is_correct() {
    let (mut equal, mut wrong, mut signed_zeros) = (0, 0, 0);
    for g in goldens("4bit") {
        let (qt, bs) = (g.quant_type(), g.blocksize());
        let shape: Vec<usize> = serde_json::from_str(&g.meta["shape"]).expect("shape");
        let n: usize = shape.iter().product();
        let absmax = if g.meta["double_quant"] == "true" {
            let nested = quant::NestedAbsmax {
                codes: g.u8s("absmax_codes"),
                nested_absmax: g.f32s("nested_absmax"),
                offset: g.f32s("offset")[0],
            };
            nested.absmax().expect("nested absmax")
        } else {
            g.f32s("absmax")
        };
        let packed = g.u8s("packed");
        let mut out = vec![0.0f32; n];
        codec::dequantize_4bit(&packed, &absmax, bs, qt, &mut out).expect("dequantize");
        let deq = g.raw("dequantized");
        assert_eq!(deq.shape.iter().product::<usize>(), n, "{}", g.name);
        let theirs = to_f32(deq);
        let ours = to_dtype_bytes(&out, deq.dtype);
        if bnb_dequant_known_wrong(&g, &shape) {
            assert_ne!(ours, deq.bytes, "{}: bnb's AVX-512 dequantize was expected to be wrong here", g.name);
            wrong += 1;
            continue;
        }
        let width = ours.len() / n;
        for i in 0..n {
            if ours[i * width..(i + 1) * width] == deq.bytes[i * width..(i + 1) * width] {
                continue;
            }
            // The one allowed difference: FP4 nibble 8 is -0.0 for the kernels (CUDA and bnb's C
            // CPU kernel) and codec.rs, +0.0 in bnb's torch fallback (odd last dimension), which
            // indexes its quant_map table.
            let ok = qt == QuantType::Fp4
                && shape.last().is_some_and(|d| d % 2 == 1)
                && nibble(&packed, i) == 8
                && out[i] == 0.0
                && out[i].is_sign_negative()
                && theirs[i] == 0.0
                && theirs[i].is_sign_positive();
            assert!(ok, "{}: element {i}: codec {:e} vs bnb {:e}", g.name, out[i], theirs[i]);
            signed_zeros += 1;
        }
        equal += 1;
        if g.name.contains("688") && !g.avx512() {
            eprintln!(
                "{}: made on {} (not AVX-512): bnb's CPU dequantize is exact there, and matches",
                g.name, g.meta["cpu_capability"]
            );
        }
    }
    eprintln!(
        "dequantize: {equal} cases equal to bnb (but {signed_zeros} FP4 -0.0 vs +0.0), {wrong} cases where bnb CPU is known wrong"
    );
}

/// A threshold as torch compares it with data of `dtype`: rounded into that dtype.
fn threshold_in(threshold: f32, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F16 => f16::from_f32(threshold).to_f32(),
        Dtype::BF16 => bf16::from_f32(threshold).to_f32(),
        _ => threshold,
    }
}

#[test]
fn int8_rowwise_quantization_is_bnb_bit_for_bit() {
    let cases = goldens_in(&golden_dir().join("int8"), "int8");
    let mut outliers = 0;
    for g in &cases {
        let x = g.f32s("input");
        let shape: Vec<usize> = serde_json::from_str(&g.meta["shape"]).expect("shape");
        let cols = shape[1];
        let threshold: f32 = g.meta["threshold"].parse().expect("threshold");
        let t = threshold_in(threshold, g.raw("input").dtype);
        let q = int8::quantize_rowwise(&x, cols, t).expect("quantize");
        assert_eq!(q.codes, g.i8s("codes"), "{}: codes", g.name);
        assert_eq!(bits(&q.scb), bits(&g.f32s("scb")), "{}: SCB", g.name);
        let cols_bnb: Vec<usize> = g.i64s("outlier_cols").iter().map(|&c| c as usize).collect();
        assert_eq!(q.outlier_cols, cols_bnb, "{}: outlier columns", g.name);
        outliers += cols_bnb.len();
        let back = int8::dequantize_rowwise(&q.codes, &q.scb, cols).expect("dequantize");
        assert_eq!(bits(&back), bits(&g.f32s("dequantized")), "{}: dequantized", g.name);
        if t != threshold {
            // The float16 rounding of the threshold matters for this case.
            let unrounded = int8::quantize_rowwise(&x, cols, threshold).expect("quantize");
            assert_ne!(
                unrounded.outlier_cols, q.outlier_cols,
                "{}: threshold rounding not exercised",
                g.name
            );
        }
    }
    assert!(cases.len() >= 6 && outliers > 0, "{} cases, {outliers} outlier columns", cases.len());
}

#[test]
fn int8_scale_is_the_reciprocal_times_127() {
    // The edge case's rows 1.. have absmax values where `(1/m) * 127` and `127/m` differ, and
    // values where that changes the code: the correctly rounded division would not match.
    let g = &goldens_in(&golden_dir().join("int8"), "int8")
        .into_iter()
        .find(|g| g.name == "edges_f32")
        .expect("edges");
    let x = g.f32s("input");
    let codes = g.i8s("codes");
    let mut differing = 0;
    for (r, row) in x.chunks(16).enumerate() {
        let m = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (c, v) in row.iter().enumerate() {
            if (v * (127.0 / m)).round_ties_even() as i8 != codes[r * 16 + c] && m > 1e-30 {
                differing += 1;
            }
        }
    }
    assert!(differing > 0, "no value distinguishes the two scales");
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
