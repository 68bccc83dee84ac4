//! A model's weights on disk: one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, memory-mapped (nothing is copied until a tensor is used), with
//! every header checked and every tensor's dtype and shape checked against `config.json`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use device_map::estimate::block_linears;
use memmap2::Mmap;
use quant::ops::{CodecAbsmax, Quantized4bit, Quantized8bit};
use quant::state::{Absmax, Int8State, QuantState, RawTensor};
use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

use crate::Error;
use crate::hf_config::{Architecture, HfConfig};

/// One tensor's place in a shard.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the shard's file.
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// A borrowed view of one tensor's bytes in its memory-mapped shard.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'a [usize],
    /// Its raw little-endian bytes.
    pub data: &'a [u8],
    /// The file it lives in.
    pub file: &'a Path,
}

impl TensorView<'_> {
    /// The libtorch kind of a floating tensor (F32, F16, BF16); `None` for any other dtype.
    pub fn kind(&self) -> Option<Kind> {
        kind_of(self.dtype)
    }

    /// The tensor in libtorch (a CPU copy in its stored dtype), for F32, F16 and BF16 tensors;
    /// any other dtype is an error naming the tensor and file.
    pub fn to_tensor(&self) -> Result<Tensor, Error> {
        let mismatch = |message: String| Error::TensorMismatch {
            name: self.name.to_owned(),
            path: self.file.to_owned(),
            message,
        };
        let kind = kind_of(self.dtype).ok_or_else(|| {
            mismatch(format!("dtype {:?} is not a floating type (F32, F16 or BF16)", self.dtype))
        })?;
        let shape: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        Tensor::f_from_data_size(self.data, &shape, kind).map_err(|e| mismatch(e.to_string()))
    }
}

/// The libtorch kind of a floating safetensors dtype.
pub(crate) fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        _ => None,
    }
}

/// The libtorch kind of a torch dtype name as config.json and bitsandbytes write it.
pub fn kind_from_torch_name(name: &str) -> Option<Kind> {
    match name {
        "float32" => Some(Kind::Float),
        "float16" => Some(Kind::Half),
        "bfloat16" => Some(Kind::BFloat16),
        _ => None,
    }
}

/// The torch dtype name (`float32`, `float16`, `bfloat16`) transformers writes for a kind.
pub fn torch_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Float => Some("float32"),
        Kind::Half => Some("float16"),
        Kind::BFloat16 => Some("bfloat16"),
        _ => None,
    }
}

/// All tensors of a checkpoint directory, memory-mapped.
pub struct Checkpoint {
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("shards", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn read_to_string(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_owned(), source })
}

impl Checkpoint {
    /// Open `dir/model.safetensors.index.json` (sharded) or `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<(PathBuf, Vec<String>)> = if index.is_file() {
            let text = read_to_string(&index)?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadCheckpoint {
                path: index.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
            let map =
                v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::BadCheckpoint {
                    path: index.clone(),
                    message: "missing `weight_map` (tensor name -> shard file)".into(),
                })?;
            let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| Error::BadCheckpoint {
                    path: index.clone(),
                    message: format!("weight_map[{tensor}] is not a file name"),
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(Error::BadCheckpoint {
                        path: index.clone(),
                        message: format!("weight_map[{tensor}] = `{file}` leaves the model directory"),
                    });
                }
                by_file.entry(file.to_owned()).or_default().push(tensor.clone());
            }
            for f in by_file.keys() {
                if !dir.join(f).is_file() {
                    return Err(Error::MissingShard { index: index.clone(), shard: dir.join(f) });
                }
            }
            by_file.into_iter().map(|(f, t)| (dir.join(f), t)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.is_file() {
                return Err(Error::BadCheckpoint {
                    path: dir.to_owned(),
                    message: "no model.safetensors nor model.safetensors.index.json".into(),
                });
            }
            vec![(single, Vec::new())]
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut entries = BTreeMap::new();
        for (i, (path, listed)) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
            // SAFETY: the map is read-only; a file changed underneath while mapped would give
            // wrong weights (not memory unsafety in safe code reading bytes), as with any reader.
            let map =
                unsafe { Mmap::map(&file) }.map_err(|source| Error::Read { path: path.clone(), source })?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::BadCheckpoint {
                path: path.clone(),
                message: format!("invalid safetensors: {e:?}"),
            })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                entries.insert(
                    name.clone(),
                    Entry {
                        shard: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            for t in &listed {
                if entries.get(t).is_none_or(|e| e.shard != i) {
                    return Err(Error::BadCheckpoint {
                        path: path.clone(),
                        message: format!("the index puts tensor `{t}` here, but the file does not hold it"),
                    });
                }
            }
            shards.push(Shard { path, map });
        }
        Ok(Checkpoint { shards, entries })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Number of shard files.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// One tensor's bytes.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, Error> {
        let (key, e) = self
            .entries
            .get_key_value(name)
            .ok_or_else(|| Error::MissingTensor { name: name.to_owned(), path: self.location() })?;
        let shard = &self.shards[e.shard];
        Ok(TensorView {
            name: key,
            dtype: e.dtype,
            shape: &e.shape,
            data: &shard.map[e.start..e.end],
            file: &shard.path,
        })
    }

    /// Drop tensor `name`'s pages from this process's resident set once it has been copied out
    /// (they stay in the page cache): without it, reading a whole checkpoint through the map
    /// leaves every byte of it counted in RSS until the map closes. Only whole pages inside the
    /// tensor's bytes are released; a later read faults them back in with the same contents
    /// (the map is a read-only view of a file). Best effort: errors are ignored.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(e) = self.entries.get(name) {
            const PAGE: usize = 4096;
            let start = e.start.div_ceil(PAGE) * PAGE;
            let end = e.end / PAGE * PAGE;
            if end > start {
                // SAFETY: MADV_DONTNEED on a shared read-only file mapping only evicts pages from
                // this mapping; any access refaults them from the file, so borrowed slices keep
                // reading the same bytes (the data-zeroing hazard applies to private and
                // anonymous mappings only).
                let _ = unsafe {
                    self.shards[e.shard].map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// The module prefixes whose weight bitsandbytes saved in 4 bits (those with a
    /// `<prefix>.weight.quant_state.bitsandbytes__nf4` or `__fp4` tensor), sorted.
    pub fn quantized_prefixes(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .names()
            .filter_map(|n| {
                n.strip_suffix(".weight.quant_state.bitsandbytes__nf4")
                    .or_else(|| n.strip_suffix(".weight.quant_state.bitsandbytes__fp4"))
                    .map(str::to_owned)
            })
            .collect();
        out.dedup();
        out
    }

    /// The 4-bit weight of module `prefix` as bitsandbytes saved it (`<prefix>.weight` packed
    /// bytes plus its `weight.*` state tensors), every tensor checked; errors name the tensor.
    pub fn quantized_weight(&self, prefix: &str) -> Result<Quantized4bit, Error> {
        let weight = format!("{prefix}.weight");
        let companions = format!("{weight}.");
        let mut raw = Vec::new();
        for (name, _) in self.entries.range(weight.clone()..).take_while(|(n, _)| n.starts_with(&weight)) {
            if *name != weight && !name.starts_with(&companions) {
                continue;
            }
            let v = self.tensor(name)?;
            raw.push(RawTensor {
                name: name.clone(),
                dtype: format!("{:?}", v.dtype),
                shape: v.shape.to_vec(),
                data: v.data.to_vec(),
            });
        }
        let quant_err = |source| Error::Quant { name: weight.clone(), source };
        let state = QuantState::from_tensors(prefix, &raw).map_err(quant_err)?;
        let shape: Vec<i64> = state.shape.iter().map(|&d| d as i64).collect();
        let dtype = kind_from_torch_name(&state.dtype).unwrap_or(Kind::BFloat16);
        let q = match &state.absmax {
            Absmax::Plain(a) => Quantized4bit::from_codec(
                &state.packed,
                CodecAbsmax::Plain(a),
                &shape,
                dtype,
                state.blocksize,
                state.quant_type,
            ),
            Absmax::Nested { codes, nested_absmax, offset, .. } => {
                let nested = quant::NestedAbsmax {
                    codes: codes.clone(),
                    nested_absmax: nested_absmax.clone(),
                    offset: *offset,
                };
                Quantized4bit::from_codec(
                    &state.packed,
                    CodecAbsmax::Nested(&nested),
                    &shape,
                    dtype,
                    state.blocksize,
                    state.quant_type,
                )
            }
        };
        q.map_err(quant_err)
    }

    /// The module prefixes whose weight bitsandbytes saved in 8 bits (those with a
    /// `<prefix>.SCB` tensor), sorted.
    pub fn int8_prefixes(&self) -> Vec<String> {
        self.names().filter_map(|n| n.strip_suffix(".SCB").map(str::to_owned)).collect()
    }

    /// The 8-bit weight of module `prefix` as bitsandbytes saved it (`<prefix>.weight` int8,
    /// `<prefix>.SCB`, `<prefix>.weight_format`), every tensor checked; errors name the tensor.
    pub fn int8_weight(&self, prefix: &str) -> Result<Quantized8bit, Error> {
        let mut raw = Vec::new();
        for suffix in ["weight", "SCB", "weight_format"] {
            let name = format!("{prefix}.{suffix}");
            if suffix == "weight_format" && !self.entries.contains_key(&name) {
                continue;
            }
            let v = self.tensor(&name)?;
            raw.push(RawTensor {
                name,
                dtype: format!("{:?}", v.dtype),
                shape: v.shape.to_vec(),
                data: v.data.to_vec(),
            });
        }
        let quant_err = |source| Error::Quant { name: format!("{prefix}.weight"), source };
        let state = Int8State::from_tensors(prefix, &raw).map_err(quant_err)?;
        Quantized8bit::from_codec(&state.codes, &state.scb, state.shape).map_err(quant_err)
    }

    fn location(&self) -> PathBuf {
        self.shards.first().and_then(|s| s.path.parent()).map(Path::to_path_buf).unwrap_or_default()
    }

    /// Check that every tensor the architecture needs is present with the shape config.json
    /// implies and a floating dtype (for a pre-quantized checkpoint, an int8 linear weight is
    /// checked for its shape, a packed 4-bit one not at all).
    pub fn check_against(&self, cfg: &HfConfig) -> Result<(), Error> {
        for (name, shape) in expected_shapes(cfg) {
            let quantized_linear = cfg.prequantized && crate::export::decoder_linear_prefix(&name).is_some();
            let t = self.tensor(&name)?;
            // Packed 4-bit codes have no shape to check; a float linear among them (a mixture's
            // expert, which bitsandbytes leaves in full precision) is checked as any float tensor.
            if quantized_linear && t.dtype != Dtype::I8 && kind_of(t.dtype).is_none() {
                continue;
            }
            let quantized_linear = quantized_linear && t.dtype == Dtype::I8;
            if quantized_linear && t.shape != shape.as_slice() {
                return Err(Error::TensorMismatch {
                    name,
                    path: t.file.to_owned(),
                    message: format!("int8 shape {:?}, but config.json implies {shape:?}", t.shape),
                });
            }
            if quantized_linear {
                continue;
            }
            if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(Error::TensorMismatch {
                    name,
                    path: t.file.to_owned(),
                    message: format!("dtype {:?} is not a floating type (F32, F16 or BF16)", t.dtype),
                });
            }
            if t.shape != shape.as_slice() {
                return Err(Error::TensorMismatch {
                    name,
                    path: t.file.to_owned(),
                    message: format!("shape {:?}, but config.json implies {shape:?}", t.shape),
                });
            }
        }
        Ok(())
    }
}

/// Every tensor of a Llama-family checkpoint with the shape config.json implies.
pub fn expected_shapes(cfg: &HfConfig) -> Vec<(String, Vec<usize>)> {
    let s = &cfg.shape;
    let u = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    let (h, i, v) = (u(s.hidden), u(s.intermediate), u(s.vocab));
    let (q, kv, hd) = (u(s.heads * s.head_dim), u(s.kv_heads * s.head_dim), u(s.head_dim));
    let mut out =
        vec![("model.embed_tokens.weight".to_owned(), vec![v, h]), ("model.norm.weight".to_owned(), vec![h])];
    if !s.tied_embeddings {
        out.push(("lm_head.weight".to_owned(), vec![v, h]));
    }
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        // The decoder linears from device-map's one table: [out, in] as torch stores them.
        let linears = device_map::estimate::decoder_linears(s).iter().zip(block_linears(s));
        out.extend(
            linears.map(|(path, (_, fan_in, fan_out))| {
                (format!("{p}.{path}.weight"), vec![u(fan_out), u(fan_in)])
            }),
        );
        if cfg.qkv_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        if cfg.o_bias {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        if cfg.mlp_bias {
            out.push((format!("{p}.mlp.gate_proj.bias"), vec![i]));
            out.push((format!("{p}.mlp.up_proj.bias"), vec![i]));
            out.push((format!("{p}.mlp.down_proj.bias"), vec![h]));
        }
        if matches!(cfg.architecture, Architecture::Qwen3 | Architecture::Gemma3) {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
        }
        if cfg.gemma.is_some() {
            out.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![h]));
        }
        if let Some(moe) = &cfg.moe {
            let block = format!("{p}.{}", moe.names.block);
            let (n, inter) = (u(moe.experts), u(moe.expert_intermediate));
            out.push((format!("{block}.gate.weight"), vec![n, h]));
            let [gate, up, down] = moe.names.linears;
            for e in 0..moe.experts {
                out.push((format!("{block}.experts.{e}.{gate}.weight"), vec![inter, h]));
                out.push((format!("{block}.experts.{e}.{up}.weight"), vec![inter, h]));
                out.push((format!("{block}.experts.{e}.{down}.weight"), vec![h, inter]));
            }
        }
    }
    out
}
