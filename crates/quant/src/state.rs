//! bitsandbytes' serialized layout for a 4-bit weight, on plain buffers (no libtorch), so a
//! quantized tensor can go to and from the files transformers writes.
//!
//! For a module prefix `P` (e.g. `model.layers.0.self_attn.q_proj`), transformers saves a
//! `Linear4bit` as:
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `P.weight` | U8 | `[ceil(n/2), 1]` (packed nibbles) |
//! | `P.weight.absmax` | F32 (U8 codes with double quant) | `[ceil(n/blocksize)]` |
//! | `P.weight.quant_map` | F32 | `[16]` |
//! | `P.weight.nested_absmax` (double quant) | F32 | `[ceil(blocks/nested_blocksize)]` |
//! | `P.weight.nested_quant_map` (double quant) | F32 | `[256]` |
//! | `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 | `[len]`: UTF-8 JSON |
//!
//! The JSON holds `quant_type`, `blocksize`, `dtype`, `shape`, and with double quant
//! `nested_blocksize`, `nested_dtype`, `nested_offset`, written as bitsandbytes'
//! `QuantState.as_dict(packed=True)` does (Python's `json.dumps`, so the bytes match).
//! Only U8 storage is read (`bnb_4bit_quant_storage` other than uint8 is not supported yet).
//!
//! An 8-bit weight (`Linear8bitLt`, `load_in_8bit`) is saved as:
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `P.weight` | I8 | `[out, in]` (row-wise codes) |
//! | `P.SCB` | F32 | `[out]` (absmax of each row) |
//! | `P.weight_format` | U8 | `[]`: 0, row-major |
//!
//! `weight_format` names the layout of older bitsandbytes releases (0 row, 1 col32, 2
//! col_turing, 3 col_ampere); only row-major exists now, bitsandbytes refuses the others, and so
//! does nibble. A checkpoint without it is row-major.

use serde_json::Value;

use crate::Error;
use crate::codec::{self, QuantType};
use crate::int8;

/// One tensor as a safetensors file holds it: name, dtype (`"U8"`, `"F32"`, ...), shape, bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTensor {
    /// Full key, e.g. `model.layers.0.mlp.up_proj.weight.absmax`.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian data.
    pub data: Vec<u8>,
}

impl RawTensor {
    fn u8(name: String, shape: Vec<usize>, data: Vec<u8>) -> Self {
        RawTensor { name, dtype: "U8".into(), shape, data }
    }
    fn f32(name: String, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        RawTensor { name, dtype: "F32".into(), shape: vec![values.len()], data }
    }
}

/// The block scales of a 4-bit weight: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// One 8-bit code per block, dequantized with a nested blockwise state.
    Nested {
        /// One code per block.
        codes: Vec<u8>,
        /// One f32 scale per `nested_blocksize` codes.
        nested_absmax: Vec<f32>,
        /// Block size of the nested quantization (bitsandbytes: 256).
        nested_blocksize: usize,
        /// Torch dtype name of the nested state (bitsandbytes: `float32`).
        nested_dtype: String,
        /// Mean of the original absmax values, added back after dequantizing the codes.
        offset: f32,
        /// The 256-value map the codes index (bitsandbytes' dynamic map).
        nested_quant_map: Vec<f32>,
    },
}

/// A quantized 4-bit weight with everything bitsandbytes stores beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements per block.
    pub blocksize: usize,
    /// Torch dtype name of the original weight (`float32`, `float16`, `bfloat16`).
    pub dtype: String,
    /// Shape of the original weight.
    pub shape: Vec<usize>,
    /// Packed nibbles, `ceil(n/2)` bytes (element `2j` in the high nibble).
    pub packed: Vec<u8>,
    /// Block scales.
    pub absmax: Absmax,
    /// The 16 code values the nibbles index.
    pub quant_map: Vec<f32>,
}

/// Torch dtype names bitsandbytes accepts for a 4-bit weight.
pub const DTYPES: [&str; 3] = ["float32", "float16", "bfloat16"];

/// The quant map bitsandbytes stores for a code book: [`QuantType::code`], except that FP4's
/// nibble 8 is +0.0 there (bitsandbytes builds the table from the integer `-0`).
pub fn bnb_quant_map(qt: QuantType) -> Vec<f32> {
    qt.code().iter().map(|&c| if c == 0.0 { 0.0 } else { c }).collect()
}

impl QuantState {
    /// Quantize `x` (the weight as f32, of `shape` and original torch `dtype`) with the
    /// reference codec, optionally with double quantization.
    pub fn quantize(
        x: &[f32],
        shape: &[usize],
        dtype: &str,
        quant_type: QuantType,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self, Error> {
        let n: usize = shape.iter().product();
        if n != x.len() {
            return Err(Error::Length { what: "weight", expected: n, got: x.len() });
        }
        if !DTYPES.contains(&dtype) {
            return Err(Error::MalformedState {
                key: "dtype".into(),
                problem: format!("unsupported dtype `{dtype}`"),
            });
        }
        let (packed, absmax) = codec::quantize_4bit(x, blocksize, quant_type)?;
        let absmax = if double_quant {
            let nested = codec::double_quant(&absmax, None)?;
            Absmax::Nested {
                codes: nested.codes,
                nested_absmax: nested.nested_absmax,
                nested_blocksize: codec::NESTED_BLOCKSIZE,
                nested_dtype: "float32".into(),
                offset: nested.offset,
                nested_quant_map: codec::dynamic_map().to_vec(),
            }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(QuantState {
            quant_type,
            blocksize,
            dtype: dtype.into(),
            shape: shape.to_vec(),
            packed,
            absmax,
            quant_map: bnb_quant_map(quant_type),
        })
    }

    /// Number of elements of the original weight.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The f32 block scales (dequantizing nested codes with the stored nested map).
    pub fn absmax_f32(&self) -> Result<Vec<f32>, Error> {
        match &self.absmax {
            Absmax::Plain(a) => Ok(a.clone()),
            Absmax::Nested { codes, nested_absmax, nested_blocksize, offset, nested_quant_map, .. } => {
                let map: &[f32; 256] = nested_quant_map.as_slice().try_into().map_err(|_| Error::Length {
                    what: "nested quant map",
                    expected: 256,
                    got: nested_quant_map.len(),
                })?;
                let mut a = codec::dequantize_blockwise_8bit(codes, nested_absmax, map, *nested_blocksize)?;
                for v in &mut a {
                    *v += *offset;
                }
                Ok(a)
            }
        }
    }

    /// Dequantize to f32, exactly as codec.rs defines it: `code[nibble] * absmax[block]` with
    /// the code book of [`QuantType`]. Like bitsandbytes' dequantize, this ignores the stored
    /// `quant_map` (whose FP4 nibble 8 is +0.0 where the kernels give -0.0).
    pub fn dequantize(&self) -> Result<Vec<f32>, Error> {
        let absmax = self.absmax_f32()?;
        let mut out = vec![0.0f32; self.numel()];
        codec::dequantize_4bit(&self.packed, &absmax, self.blocksize, self.quant_type, &mut out)?;
        Ok(out)
    }

    /// The tensors transformers writes for this weight under module prefix `prefix`.
    pub fn to_tensors(&self, prefix: &str) -> Vec<RawTensor> {
        let key = |suffix: &str| format!("{prefix}.weight{suffix}");
        let mut out = vec![RawTensor::u8(key(""), vec![self.packed.len(), 1], self.packed.clone())];
        let mut json = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type.as_str(),
            self.blocksize,
            self.dtype,
            self.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        );
        match &self.absmax {
            Absmax::Plain(a) => {
                out.push(RawTensor::f32(key(".absmax"), a));
                out.push(RawTensor::f32(key(".quant_map"), &self.quant_map));
            }
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_blocksize,
                nested_dtype,
                offset,
                nested_quant_map,
            } => {
                out.push(RawTensor::u8(key(".absmax"), vec![codes.len()], codes.clone()));
                out.push(RawTensor::f32(key(".quant_map"), &self.quant_map));
                out.push(RawTensor::f32(key(".nested_absmax"), nested_absmax));
                out.push(RawTensor::f32(key(".nested_quant_map"), nested_quant_map));
                json.push_str(&format!(
                    ", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"{nested_dtype}\", \"nested_offset\": {}",
                    py_float_repr(f64::from(*offset))
                ));
            }
        }
        json.push('}');
        let bytes = json.into_bytes();
        out.push(RawTensor::u8(
            key(&format!(".quant_state.bitsandbytes__{}", self.quant_type.as_str())),
            vec![bytes.len()],
            bytes,
        ));
        out
    }

    /// Read the state of module prefix `prefix` from its tensors (looked up by full key).
    pub fn from_tensors<'a>(
        prefix: &str,
        tensors: impl IntoIterator<Item = &'a RawTensor>,
    ) -> Result<Self, Error> {
        let tensors: Vec<&RawTensor> = tensors.into_iter().collect();
        let find = |suffix: &str| {
            let key = format!("{prefix}.weight{suffix}");
            tensors.iter().copied().find(|t| t.name == key).ok_or(Error::MissingTensor { key })
        };
        // The JSON tensor names the quant type.
        let qs_nf4 = find(".quant_state.bitsandbytes__nf4");
        let qs_fp4 = find(".quant_state.bitsandbytes__fp4");
        let (qs, key_type) = match (qs_nf4, qs_fp4) {
            (Ok(t), Err(_)) => (t, QuantType::Nf4),
            (Err(_), Ok(t)) => (t, QuantType::Fp4),
            (Err(e), Err(_)) => return Err(e),
            (Ok(t), Ok(_)) => {
                return Err(Error::MalformedState {
                    key: t.name.clone(),
                    problem: "both bitsandbytes__nf4 and bitsandbytes__fp4 are present".into(),
                });
            }
        };
        check_dtype(qs, "U8")?;
        let bad = |problem: String| Error::MalformedState { key: qs.name.clone(), problem };
        let json: Value = serde_json::from_slice(&qs.data).map_err(|e| bad(format!("bad JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| bad("JSON is not an object".into()))?;
        let field = |name: &str| obj.get(name).ok_or_else(|| bad(format!("JSON has no `{name}`")));
        let string = |name: &str| -> Result<String, Error> {
            field(name)?.as_str().map(str::to_owned).ok_or_else(|| bad(format!("`{name}` is not a string")))
        };
        let uint = |name: &str| -> Result<usize, Error> {
            field(name)?
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| bad(format!("`{name}` is not a non-negative integer")))
        };
        let quant_type: QuantType = string("quant_type")?.parse().map_err(|e: Error| bad(format!("{e}")))?;
        if quant_type != key_type {
            return Err(bad(format!("quant_type `{}` does not match the key", quant_type.as_str())));
        }
        let blocksize = uint("blocksize")?;
        codec::check_blocksize(blocksize).map_err(|e| bad(format!("{e}")))?;
        let dtype = string("dtype")?;
        if !DTYPES.contains(&dtype.as_str()) {
            return Err(bad(format!("unsupported dtype `{dtype}`")));
        }
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|dims| dims.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .ok_or_else(|| bad("`shape` is not a list of non-negative integers".into()))?;
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad("shape overflows".into()))?;
        let blocks = codec::n_blocks(n, blocksize);

        let weight = find("")?;
        check_dtype(weight, "U8")?;
        let packed_len = codec::packed_len(n);
        check_shape(weight, &[packed_len, 1], || {
            format!("{n} elements of shape {shape:?} packed two per byte")
        })?;

        let quant_map = f32s(find(".quant_map")?, 16, || "16 code values".into())?;
        let absmax_t = find(".absmax")?;
        let nested = obj.contains_key("nested_offset");
        let absmax = if nested {
            check_dtype(absmax_t, "U8")?;
            check_shape(absmax_t, &[blocks], || format!("ceil({n} / blocksize {blocksize}) blocks"))?;
            let nested_blocksize = uint("nested_blocksize")?;
            codec::check_blocksize(nested_blocksize).map_err(|e| bad(format!("nested: {e}")))?;
            let nested_dtype = string("nested_dtype")?;
            let offset = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| bad("`nested_offset` is not a number".into()))?;
            let nested_blocks = codec::n_blocks(blocks, nested_blocksize);
            let nested_absmax = f32s(find(".nested_absmax")?, nested_blocks, || {
                format!("ceil({blocks} blocks / nested blocksize {nested_blocksize})")
            })?;
            let nested_quant_map = f32s(find(".nested_quant_map")?, 256, || "256 code values".into())?;
            Absmax::Nested {
                codes: absmax_t.data.clone(),
                nested_absmax,
                nested_blocksize,
                nested_dtype,
                offset: offset as f32,
                nested_quant_map,
            }
        } else {
            Absmax::Plain(f32s(absmax_t, blocks, || format!("ceil({n} / blocksize {blocksize}) blocks"))?)
        };
        Ok(QuantState { quant_type, blocksize, dtype, shape, packed: weight.data.clone(), absmax, quant_map })
    }
}

fn check_dtype(t: &RawTensor, expected: &str) -> Result<(), Error> {
    if t.dtype == expected {
        Ok(())
    } else {
        Err(Error::TensorDtype { key: t.name.clone(), expected: expected.into(), got: t.dtype.clone() })
    }
}

fn check_shape(t: &RawTensor, expected: &[usize], why: impl FnOnce() -> String) -> Result<(), Error> {
    let elem = match t.dtype.as_str() {
        "F32" => 4,
        _ => 1,
    };
    let count: usize = expected.iter().product();
    if t.shape != expected {
        return Err(Error::TensorShape {
            key: t.name.clone(),
            expected: expected.to_vec(),
            got: t.shape.clone(),
            why: why(),
        });
    }
    if t.data.len() != count * elem {
        return Err(Error::MalformedState {
            key: t.name.clone(),
            problem: format!("{} data bytes for shape {:?}", t.data.len(), t.shape),
        });
    }
    Ok(())
}

/// A 1-D F32 tensor of `len` values.
fn f32s(t: &RawTensor, len: usize, why: impl FnOnce() -> String) -> Result<Vec<f32>, Error> {
    check_dtype(t, "F32")?;
    check_shape(t, &[len], why)?;
    Ok(t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

pub use pyfiles::json::py_float_repr;

/// A row-wise int8 weight with its scales, as bitsandbytes' `Linear8bitLt` saves it.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8State {
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Row-major codes in `[-127, 127]` (bitsandbytes' `CB`).
    pub codes: Vec<i8>,
    /// f32 absmax of each row (bitsandbytes' `SCB`).
    pub scb: Vec<f32>,
}

/// `weight_format` of a row-major 8-bit weight, the only layout bitsandbytes still has.
pub const WEIGHT_FORMAT_ROW: u8 = 0;

impl Int8State {
    /// Quantize a `[out, in]` weight (f32 values) as bitsandbytes does: through float16, then
    /// row-wise int8 without outliers. A value float16 cannot hold is [`Error::Float16Range`].
    pub fn quantize(x: &[f32], shape: [usize; 2]) -> Result<Self, Error> {
        let n = shape[0] * shape[1];
        if x.len() != n {
            return Err(Error::Length { what: "weight", expected: n, got: x.len() });
        }
        let h = int8::round_to_f16(x);
        if let Some(index) = h.iter().position(|v| !v.is_finite()) {
            return Err(Error::Float16Range { index, value: x[index] });
        }
        let q = int8::quantize_rowwise(&h, shape[1], 0.0)?;
        // quantize_rowwise infers the rows from the columns; with no columns, keep the given rows.
        let scb = if shape[1] == 0 { vec![0.0; shape[0]] } else { q.scb };
        Ok(Int8State { shape, codes: q.codes, scb })
    }

    /// The weight an 8-bit layer multiplies with: `code * (SCB / 127)` ([`int8::matmul_weight`]).
    pub fn dequantize(&self) -> Result<Vec<f32>, Error> {
        if self.shape[1] == 0 {
            return Ok(Vec::new());
        }
        int8::matmul_weight(&self.codes, &self.scb, self.shape[1])
    }

    /// The tensors transformers writes for this weight under module prefix `prefix`.
    pub fn to_tensors(&self, prefix: &str) -> Vec<RawTensor> {
        let codes = self.codes.iter().map(|&c| c as u8).collect();
        vec![
            RawTensor {
                name: format!("{prefix}.weight"),
                dtype: "I8".into(),
                shape: self.shape.to_vec(),
                data: codes,
            },
            RawTensor::f32(format!("{prefix}.SCB"), &self.scb),
            RawTensor::u8(format!("{prefix}.weight_format"), Vec::new(), vec![WEIGHT_FORMAT_ROW]),
        ]
    }

    /// Whether module prefix `prefix` holds an 8-bit weight in `tensors` (a `P.SCB` tensor).
    pub fn is_present<'a>(prefix: &str, tensors: impl IntoIterator<Item = &'a RawTensor>) -> bool {
        let key = format!("{prefix}.SCB");
        tensors.into_iter().any(|t| t.name == key)
    }

    /// Read the 8-bit weight of module prefix `prefix` from its tensors (looked up by full key).
    pub fn from_tensors<'a>(
        prefix: &str,
        tensors: impl IntoIterator<Item = &'a RawTensor>,
    ) -> Result<Self, Error> {
        let tensors: Vec<&RawTensor> = tensors.into_iter().collect();
        let find = |suffix: &str| {
            let key = format!("{prefix}.{suffix}");
            tensors.iter().copied().find(|t| t.name == key).ok_or(Error::MissingTensor { key })
        };
        let weight = find("weight")?;
        check_dtype(weight, "I8")?;
        let shape: [usize; 2] = weight.shape.as_slice().try_into().map_err(|_| Error::MalformedState {
            key: weight.name.clone(),
            problem: format!("an 8-bit weight must be 2-D [out, in], got shape {:?}", weight.shape),
        })?;
        check_shape(weight, &shape, || "an 8-bit weight is 2-D [out, in]".into())?;
        let scb = f32s(find("SCB")?, shape[0], || format!("one scale per row of `{}`", weight.name))?;
        match find("weight_format") {
            Err(_) => {}
            Ok(f) => {
                check_dtype(f, "U8")?;
                let format = match (f.shape.iter().product::<usize>(), f.data.as_slice()) {
                    (1, [v]) => *v,
                    _ => {
                        return Err(Error::MalformedState {
                            key: f.name.clone(),
                            problem: format!("expected one value, got shape {:?}", f.shape),
                        });
                    }
                };
                if format != WEIGHT_FORMAT_ROW {
                    let name = match format {
                        1 => "col32",
                        2 => "col_turing",
                        3 => "col_ampere",
                        _ => "unknown",
                    };
                    return Err(Error::MalformedState {
                        key: f.name.clone(),
                        problem: format!(
                            "weight format {format} ({name}) is not supported: only row-major (0) 8-bit weights are"
                        ),
                    });
                }
            }
        }
        let codes = weight.data.iter().map(|&b| b as i8).collect();
        Ok(Int8State { shape, codes, scb })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(double_quant: bool) -> QuantState {
        let x: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        QuantState::quantize(&x, &[3, 100], "bfloat16", QuantType::Nf4, 64, double_quant).expect("quantize")
    }

    #[test]
    fn python_float_repr() {
        for (x, want) in [
            (0.0, "0.0"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (2.639_143_705_368_042, "2.639143705368042"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (f64::from(0.1f32), "0.10000000149011612"),
        ] {
            assert_eq!(py_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn keys_and_json_are_bitsandbytes() {
        let t = sample(true).to_tensors("m.q");
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "m.q.weight",
                "m.q.weight.absmax",
                "m.q.weight.quant_map",
                "m.q.weight.nested_absmax",
                "m.q.weight.nested_quant_map",
                "m.q.weight.quant_state.bitsandbytes__nf4"
            ]
        );
        assert_eq!(t[0].shape, vec![150, 1]);
        let json = String::from_utf8(t[5].data.clone()).expect("utf8");
        assert!(
            json.starts_with(
                r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 100], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": "#
            ),
            "{json}"
        );
    }

    #[test]
    fn round_trip_plain_and_nested() {
        for dq in [false, true] {
            let s = sample(dq);
            let back = QuantState::from_tensors("a.b", &s.to_tensors("a.b")).expect("read back");
            assert_eq!(back, s);
        }
    }

    fn corrupt(dq: bool, f: impl FnOnce(&mut Vec<RawTensor>)) -> Error {
        let mut t = sample(dq).to_tensors("p");
        f(&mut t);
        QuantState::from_tensors("p", &t).expect_err("malformed state must be an error")
    }

    fn set_json(t: &mut [RawTensor], json: &str) {
        let last = t.len() - 1;
        t[last].data = json.as_bytes().to_vec();
        t[last].shape = vec![json.len()];
    }

    #[test]
    fn malformed_state_is_a_typed_error_naming_the_tensor() {
        let e = corrupt(false, |t| t.retain(|t| t.name != "p.weight.absmax"));
        assert!(matches!(&e, Error::MissingTensor { key } if key == "p.weight.absmax"), "{e}");
        let e = corrupt(false, |t| t.retain(|t| !t.name.contains("quant_state")));
        assert!(matches!(&e, Error::MissingTensor { key } if key.ends_with("bitsandbytes__nf4")), "{e}");
        let e = corrupt(false, |t| t[1].dtype = "F16".into());
        assert!(matches!(&e, Error::TensorDtype { key, .. } if key == "p.weight.absmax"), "{e}");
        let e = corrupt(false, |t| t[0].shape = vec![150]);
        assert!(matches!(&e, Error::TensorShape { key, .. } if key == "p.weight"), "{e}");
        let e = corrupt(false, |t| set_json(t, "{not json"));
        assert!(
            matches!(&e, Error::MalformedState { key, problem } if key.ends_with("__nf4") && problem.contains("bad JSON")),
            "{e}"
        );
        let e = corrupt(false, |t| {
            set_json(t, r#"{"quant_type": "int4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 100]}"#)
        });
        assert!(matches!(&e, Error::MalformedState { problem, .. } if problem.contains("int4")), "{e}");
        // Blocksize 128 implies 3 absmax values, the data has 5.
        let e = corrupt(false, |t| {
            set_json(t, r#"{"quant_type": "nf4", "blocksize": 128, "dtype": "bfloat16", "shape": [3, 100]}"#)
        });
        assert!(
            matches!(&e, Error::TensorShape { key, expected, got, .. } if key == "p.weight.absmax" && expected == &[3] && got == &[5]),
            "{e}"
        );
        // A shape whose packed length differs from the weight's.
        let e = corrupt(false, |t| {
            set_json(t, r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 101]}"#)
        });
        assert!(matches!(&e, Error::TensorShape { key, .. } if key == "p.weight"), "{e}");
        let e = corrupt(false, |t| t[2].data.truncate(60));
        assert!(matches!(&e, Error::MalformedState { key, .. } if key == "p.weight.quant_map"), "{e}");
        let e = corrupt(true, |t| t.retain(|t| t.name != "p.weight.nested_quant_map"));
        assert!(matches!(&e, Error::MissingTensor { key } if key == "p.weight.nested_quant_map"), "{e}");
        let e = corrupt(true, |t| t[1].dtype = "F32".into());
        assert!(matches!(&e, Error::TensorDtype { key, .. } if key == "p.weight.absmax"), "{e}");
    }

    fn int8_sample() -> Int8State {
        let x: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32 - 50.0) / 170.0).collect();
        Int8State::quantize(&x, [3, 100]).expect("quantize")
    }

    #[test]
    fn int8_keys_round_trip_and_errors_name_the_tensor() {
        let s = int8_sample();
        let t = s.to_tensors("m.q");
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["m.q.weight", "m.q.SCB", "m.q.weight_format"]);
        assert_eq!((t[0].dtype.as_str(), t[0].shape.as_slice()), ("I8", &[3, 100][..]));
        assert_eq!((t[2].shape.len(), t[2].data.as_slice()), (0, &[0u8][..]));
        assert!(Int8State::is_present("m.q", &t) && !Int8State::is_present("m", &t));
        assert_eq!(Int8State::from_tensors("m.q", &t).expect("read back"), s);
        // Without weight_format (older files): row-major.
        assert_eq!(Int8State::from_tensors("m.q", &t[..2]).expect("no format"), s);

        let corrupt = |f: &dyn Fn(&mut Vec<RawTensor>)| {
            let mut t = int8_sample().to_tensors("p");
            f(&mut t);
            Int8State::from_tensors("p", &t).expect_err("malformed state must be an error")
        };
        let e = corrupt(&|t| t.retain(|t| t.name != "p.SCB"));
        assert!(matches!(&e, Error::MissingTensor { key } if key == "p.SCB"), "{e}");
        let e = corrupt(&|t| t[0].dtype = "U8".into());
        assert!(matches!(&e, Error::TensorDtype { key, .. } if key == "p.weight"), "{e}");
        let e = corrupt(&|t| t[1].data.truncate(8));
        assert!(matches!(&e, Error::MalformedState { key, .. } if key == "p.SCB"), "{e}");
        let e = corrupt(&|t| t[1].shape = vec![4]);
        assert!(matches!(&e, Error::TensorShape { key, .. } if key == "p.SCB"), "{e}");
        let e = corrupt(&|t| t[0].shape = vec![300]);
        assert!(matches!(&e, Error::MalformedState { key, .. } if key == "p.weight"), "{e}");
        let e = corrupt(&|t| t[2].data = vec![2]);
        assert!(
            matches!(&e, Error::MalformedState { key, problem } if key == "p.weight_format" && problem.contains("col_turing")),
            "{e}"
        );
    }

    #[test]
    fn int8_weights_go_through_float16() {
        let mut x = vec![0.25f32; 8];
        x[5] = 1e5;
        assert!(matches!(Int8State::quantize(&x, [2, 4]), Err(Error::Float16Range { index: 5, .. })));
        // 0.1 is not a float16: the codes are those of its float16 value.
        let s = Int8State::quantize(&[0.1, 0.03], [1, 2]).expect("quantize");
        assert_eq!(s.scb, vec![half::f16::from_f32(0.1).to_f32()]);
        assert_eq!(s.codes, vec![127, 38]);
        assert_eq!(s.dequantize().expect("dequantize").len(), 2);
    }

    #[test]
    fn dequantize_matches_the_codec() {
        let s = sample(false);
        let Absmax::Plain(a) = &s.absmax else { panic!("plain") };
        let mut want = vec![0.0f32; 300];
        codec::dequantize_4bit(&s.packed, a, 64, QuantType::Nf4, &mut want).expect("codec");
        assert_eq!(s.dequantize().expect("state"), want);
    }
}
