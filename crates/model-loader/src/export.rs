//! Writing model directories as transformers saves them, so what nibble makes loads with
//! `from_pretrained`: an output directory built beside its final place and renamed into it when
//! complete ([`OutputDir`]), safetensors shards of bounded size with transformers' names and
//! index, streamed tensor by tensor ([`ShardWriter`]), `config.json` as Python's `json.dumps`
//! writes it ([`python_json`]), and the tokenizer and generation files copied
//! ([`copy_model_files`]). [`quantize_checkpoint`] puts them together for `sft quantize`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use quant::codec::{self, NESTED_BLOCKSIZE};
use quant::ops::{CodecAbsmaxOwned, QuantizeOptions, Quantized4bit};
use quant::state::{Absmax, QuantState, RawTensor, bnb_quant_map};
use serde_json::{Map, Value};
use tch::Kind;

use crate::Error;
use crate::checkpoint::{Checkpoint, torch_name};
use crate::hf_config::HfConfig;

/// transformers 5's `save_pretrained` default `max_shard_size` (`"50GB"`), in bytes.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 50_000_000_000;

/// How [`quantize_checkpoint`] quantizes and writes.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeCheckpointOptions {
    /// NF4/FP4, blocksize, double quantization.
    pub quant: QuantizeOptions,
    /// `bnb_4bit_compute_dtype` recorded in config.json (Float, Half or BFloat16).
    pub compute_dtype: Kind,
    /// Largest shard in bytes (a single larger tensor group gets a shard of its own).
    pub max_shard_size: u64,
    /// Replace a non-empty output directory instead of refusing.
    pub overwrite: bool,
}

impl Default for QuantizeCheckpointOptions {
    fn default() -> Self {
        QuantizeCheckpointOptions {
            quant: QuantizeOptions::default(),
            compute_dtype: Kind::Float,
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            overwrite: false,
        }
    }
}

/// What an export wrote, for the caller to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The final output directory.
    pub dir: PathBuf,
    /// Weight files written, in order (`model.safetensors` or `model-0000i-of-0000n.safetensors`).
    pub shards: Vec<String>,
    /// Number of tensors written.
    pub tensors: usize,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_size: u64,
    /// Parameter count as transformers' index records it (4-bit weights at their unpacked count).
    pub total_parameters: u64,
    /// Other files copied from the source (tokenizer, generation config, ...).
    pub copied: Vec<String>,
}

/// A model directory under construction: a temporary directory beside the destination, renamed
/// into place by [`OutputDir::commit`] and removed if dropped before, so a failed or interrupted
/// export never leaves a half-written model where one is expected.
#[derive(Debug)]
pub struct OutputDir {
    dst: PathBuf,
    tmp: PathBuf,
    overwrite: bool,
    committed: bool,
}

fn io_write(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Write { path: path.to_owned(), source }
}

impl OutputDir {
    /// Start writing `dst`: refuse a non-empty `dst` (or a file there) unless `overwrite`, then
    /// create the temporary directory beside it (creating `dst`'s parent if needed).
    pub fn create(dst: &Path, overwrite: bool) -> Result<Self, Error> {
        let name = dst
            .file_name()
            .filter(|_| !dst.ends_with(".."))
            .ok_or_else(|| Error::BadOutput {
                path: dst.to_owned(),
                message: "is not a directory name nibble can create".into(),
            })?
            .to_string_lossy()
            .into_owned();
        match std::fs::symlink_metadata(dst) {
            Ok(m) => {
                let empty_dir = m.is_dir()
                    && std::fs::read_dir(dst)
                        .map_err(|source| Error::Read { path: dst.to_owned(), source })?
                        .next()
                        .is_none();
                if !empty_dir && !overwrite {
                    return Err(Error::OutputExists { path: dst.to_owned() });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Read { path: dst.to_owned(), source }),
        }
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_write(&parent))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_write(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io_write(&tmp))?;
        Ok(OutputDir { dst: dst.to_owned(), tmp, overwrite, committed: false })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The destination.
    pub fn destination(&self) -> &Path {
        &self.dst
    }

    /// Move the finished directory into place. Without `overwrite` this is one rename, which
    /// fails rather than replace a directory that filled up meanwhile; with it, the old
    /// destination is moved aside first and removed once the new one is in place.
    pub fn commit(mut self) -> Result<PathBuf, Error> {
        let exists = std::fs::symlink_metadata(&self.dst).is_ok();
        if !exists || !self.overwrite {
            std::fs::rename(&self.tmp, &self.dst).map_err(io_write(&self.dst))?;
        } else {
            let aside = self.tmp.with_file_name(format!(
                ".{}.old-{}",
                self.dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                std::process::id()
            ));
            std::fs::rename(&self.dst, &aside).map_err(io_write(&self.dst))?;
            if let Err(source) = std::fs::rename(&self.tmp, &self.dst) {
                let _ = std::fs::rename(&aside, &self.dst);
                return Err(Error::Write { path: self.dst.clone(), source });
            }
            let removed =
                if aside.is_dir() { std::fs::remove_dir_all(&aside) } else { std::fs::remove_file(&aside) };
            if let Err(e) = removed {
                tracing::warn!(path = %aside.display(), "could not remove the replaced output: {e}");
            }
        }
        self.committed = true;
        tracing::debug!(dir = %self.dst.display(), "output directory in place");
        Ok(self.dst.clone())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// One tensor to write: key, safetensors dtype name (`F32`, `BF16`, `U8`, ...), shape and
/// little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// Full key, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: &'a str,
    /// safetensors dtype name.
    pub dtype: &'a str,
    /// Shape.
    pub shape: &'a [usize],
    /// Data.
    pub data: &'a [u8],
}

impl<'a> From<&'a RawTensor> for TensorRef<'a> {
    fn from(t: &'a RawTensor) -> Self {
        TensorRef { name: &t.name, dtype: &t.dtype, shape: &t.shape, data: &t.data }
    }
}

/// Bytes per element of a safetensors dtype name.
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

struct Entry {
    dtype: String,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

struct OpenShard {
    spill_path: PathBuf,
    spill: BufWriter<File>,
    entries: BTreeMap<String, Entry>,
    size: u64,
}

/// safetensors shards written tensor by tensor, split as transformers splits a state dict
/// (greedily, in the order given, at `max_shard_size`), with a module's tensors kept in one shard.
///
/// Each shard's data goes to a spill file as it comes and gets its header when the shard is
/// closed, so memory holds one tensor group at a time. Headers list keys in sorted order with
/// `{"format": "pt"}` metadata; the same input gives the same bytes.
pub struct ShardWriter {
    dir: PathBuf,
    max_shard_size: u64,
    open: Option<OpenShard>,
    closed: Vec<(PathBuf, Vec<String>)>,
    names: BTreeSet<String>,
    total_size: u64,
    total_parameters: u64,
}

impl std::fmt::Debug for ShardWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardWriter")
            .field("dir", &self.dir)
            .field("closed", &self.closed.len())
            .field("tensors", &self.names.len())
            .finish()
    }
}

impl ShardWriter {
    /// Write shards into `dir` (normally [`OutputDir::path`]).
    pub fn new(dir: &Path, max_shard_size: u64) -> Self {
        ShardWriter {
            dir: dir.to_owned(),
            max_shard_size: max_shard_size.max(1),
            open: None,
            closed: Vec::new(),
            names: BTreeSet::new(),
            total_size: 0,
            total_parameters: 0,
        }
    }

    /// Add tensors that belong together (one module's weight and its quantization state),
    /// counting `parameters` towards the index's `total_parameters`.
    pub fn add_group(&mut self, group: &[TensorRef<'_>], parameters: u64) -> Result<(), Error> {
        let mut size = 0u64;
        for t in group {
            let bad = |message: String| Error::BadOutput { path: self.dir.clone(), message };
            let elem = dtype_size(t.dtype)
                .ok_or_else(|| bad(format!("tensor `{}`: unknown dtype {}", t.name, t.dtype)))?;
            let count = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if count.and_then(|c| c.checked_mul(elem)) != Some(t.data.len()) {
                return Err(bad(format!(
                    "tensor `{}`: {} bytes do not fit dtype {} and shape {:?}",
                    t.name,
                    t.data.len(),
                    t.dtype,
                    t.shape
                )));
            }
            if self.names.contains(t.name) || group.iter().filter(|u| u.name == t.name).count() > 1 {
                return Err(bad(format!("tensor `{}` is written twice", t.name)));
            }
            size += t.data.len() as u64;
        }
        if self.open.as_ref().is_some_and(|s| !s.entries.is_empty() && s.size + size > self.max_shard_size) {
            self.close()?;
        }
        let mut shard = match self.open.take() {
            Some(s) => s,
            None => {
                let spill_path = self.dir.join(format!(".shard-{}.data", self.closed.len() + 1));
                let file = File::create(&spill_path).map_err(io_write(&spill_path))?;
                OpenShard {
                    spill_path,
                    spill: BufWriter::with_capacity(1 << 20, file),
                    entries: BTreeMap::new(),
                    size: 0,
                }
            }
        };
        for t in group {
            if let Err(source) = shard.spill.write_all(t.data) {
                let path = shard.spill_path.clone();
                self.open = Some(shard);
                return Err(Error::Write { path, source });
            }
            let start = shard.size;
            shard.size += t.data.len() as u64;
            shard.entries.insert(
                t.name.to_owned(),
                Entry { dtype: t.dtype.to_owned(), shape: t.shape.to_vec(), start, end: shard.size },
            );
            self.names.insert(t.name.to_owned());
        }
        self.open = Some(shard);
        self.total_size += size;
        self.total_parameters += parameters;
        Ok(())
    }

    /// Close the open shard: its header, then its spilled data, into `.shard-<k>.safetensors`.
    fn close(&mut self) -> Result<(), Error> {
        let Some(shard) = self.open.take() else { return Ok(()) };
        let OpenShard { spill_path, spill, entries, size } = shard;
        let spill = spill
            .into_inner()
            .map_err(|e| Error::Write { path: spill_path.clone(), source: e.into_error() })?;
        drop(spill);
        let mut header = Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        for (name, e) in &entries {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [e.start, e.end]}),
            );
        }
        let mut head = Value::Object(header).to_string().into_bytes();
        while !head.len().is_multiple_of(8) {
            head.push(b' ');
        }
        let path = self.dir.join(format!(".shard-{}.safetensors", self.closed.len() + 1));
        let result = (|| -> std::io::Result<()> {
            let mut out = File::create(&path)?;
            out.write_all(&(head.len() as u64).to_le_bytes())?;
            out.write_all(&head)?;
            let mut data = File::open(&spill_path)?;
            let copied = std::io::copy(&mut data, &mut out)?;
            if copied != size {
                return Err(std::io::Error::other(format!("spilled {copied} bytes, expected {size}")));
            }
            out.sync_all()
        })();
        result.map_err(io_write(&path))?;
        std::fs::remove_file(&spill_path).map_err(io_write(&spill_path))?;
        self.closed.push((path, entries.into_keys().collect()));
        Ok(())
    }

    /// Close the last shard, give the shards transformers' names, and write
    /// `model.safetensors.index.json` when there is more than one.
    pub fn finish(mut self) -> Result<WrittenShards, Error> {
        if self.open.is_none() && self.closed.is_empty() {
            // A model with no tensors still gets its (empty) weight file.
            self.add_group(&[], 0)?;
        }
        self.close()?;
        let n = self.closed.len();
        let mut files = Vec::with_capacity(n);
        let mut weight_map = Map::new();
        let mut all: Vec<(String, String)> = Vec::new();
        for (k, (path, names)) in self.closed.iter().enumerate() {
            let file = if n == 1 {
                "model.safetensors".to_owned()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", k + 1)
            };
            let target = self.dir.join(&file);
            std::fs::rename(path, &target).map_err(io_write(&target))?;
            all.extend(names.iter().map(|t| (t.clone(), file.clone())));
            files.push(file);
        }
        if n > 1 {
            all.sort();
            for (t, f) in all {
                weight_map.insert(t, Value::from(f));
            }
            let index = serde_json::json!({
                "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                "weight_map": Value::Object(weight_map),
            });
            write_file(
                &self.dir.join("model.safetensors.index.json"),
                (python_json(&index) + "\n").as_bytes(),
            )?;
        }
        Ok(WrittenShards {
            shards: files,
            tensors: self.names.len(),
            total_size: self.total_size,
            total_parameters: self.total_parameters,
        })
    }
}

/// What [`ShardWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenShards {
    /// Weight files, in order (`model.safetensors` or `model-0000i-of-0000n.safetensors`).
    pub shards: Vec<String>,
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub total_size: u64,
    /// Parameters as counted by the caller.
    pub total_parameters: u64,
}

impl ExportSummary {
    /// The summary of an export to `dir` that wrote `written` and copied `copied`.
    pub fn new(dir: PathBuf, written: WrittenShards, copied: Vec<String>) -> Self {
        let WrittenShards { shards, tensors, total_size, total_parameters } = written;
        ExportSummary { dir, shards, tensors, total_size, total_parameters, copied }
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some(s) = self.open.take() {
            drop(s.spill);
            let _ = std::fs::remove_file(&s.spill_path);
        }
    }
}

/// Write a whole file and sync it (inside an [`OutputDir`], whose rename makes it visible).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    result.map_err(io_write(path))
}

/// Whether `name` is a weight or index file (which an export writes itself), or config.json.
fn is_weights_or_config(name: &str) -> bool {
    const WEIGHT_EXTS: [&str; 9] =
        [".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx"];
    name == "config.json" || name.ends_with(".index.json") || WEIGHT_EXTS.iter().any(|e| name.ends_with(e))
}

/// Copy every top-level file of `src` that is not weights, a weight index, `config.json` or
/// hidden (tokenizer files, chat template, generation config, license, ...) into `dst`,
/// following symlinks (hub-cache snapshots link to blobs). Returns the names copied, sorted.
pub fn copy_model_files(src: &Path, dst: &Path) -> Result<Vec<String>, Error> {
    let read = |source| Error::Read { path: src.to_owned(), source };
    let mut copied = Vec::new();
    for entry in std::fs::read_dir(src).map_err(read)? {
        let entry = entry.map_err(read)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || is_weights_or_config(&name) || !path.is_file() {
            continue;
        }
        let target = dst.join(&name);
        std::fs::copy(&path, &target).map_err(|source| Error::Write { path: target.clone(), source })?;
        copied.push(name);
    }
    copied.sort();
    Ok(copied)
}

pub use pyfiles::json::dumps_sorted as python_json;

/// Compare tensor names with digit runs as numbers, so `layers.2` comes before `layers.10`: the
/// order of a model's modules, which transformers shards in.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..da], &b[..db]);
                let ta = na.iter().position(|&c| c != b'0').map_or(&na[na.len()..], |p| &na[p..]);
                let tb = nb.iter().position(|&c| c != b'0').map_or(&nb[nb.len()..], |p| &nb[p..]);
                let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb)).then_with(|| da.cmp(&db));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// Whether `name` is a decoder linear's weight nibble quantizes
/// (`model.layers.<n>.{self_attn.{q,k,v,o}_proj,mlp.{gate,up,down}_proj}.weight`, Phi-3's
/// fused `qkv_proj` / `gate_up_proj`, or an expert's linear,
/// `{block_sparse_moe,mlp}.experts.<e>.{w1,w2,w3,gate_proj,up_proj,down_proj}`; a router, `gate`,
/// is not one); returns the module prefix.
pub fn decoder_linear_prefix(name: &str) -> Option<&str> {
    use device_map::estimate::{DECODER_LINEARS, FUSED_DECODER_LINEARS};
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let prefix = name.strip_suffix(".weight")?;
    let rest = prefix.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let expert = || -> Option<()> {
        let rest = module
            .strip_prefix("block_sparse_moe.experts.")
            .or_else(|| module.strip_prefix("mlp.experts."))?;
        let (e, linear) = rest.split_once('.')?;
        let known = ["w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"].contains(&linear);
        (digits(e) && known).then_some(())
    };
    let known =
        DECODER_LINEARS.contains(&module) || FUSED_DECODER_LINEARS.contains(&module) || expert().is_some();
    (digits(layer) && known).then_some(prefix)
}

/// Read `dir/config.json` as a JSON object, naming the file in errors.
pub fn read_config_json(dir: &Path) -> Result<Map<String, Value>, Error> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(Error::BadConfig { path, message: "is not a JSON object".into() }),
        Err(e) => Err(Error::BadConfig { path, message: format!("not valid JSON: {e}") }),
    }
}

/// The `quantization_config` transformers writes for `BitsAndBytesConfig(load_in_4bit=True, ...)`
/// with these options (every field of transformers 5.24's `to_dict`).
pub fn bnb_quantization_config(quant: &QuantizeOptions, compute_dtype: Kind) -> Result<Value, Error> {
    let compute = torch_name(compute_dtype).ok_or_else(|| {
        Error::BadOption(format!("compute dtype {compute_dtype:?} is not float32, float16 or bfloat16"))
    })?;
    Ok(serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant.quant_type.as_str(),
        "bnb_4bit_use_double_quant": quant.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    }))
}

/// The state bitsandbytes saves for a weight quantized by the fast path (bnb's stored quant map,
/// its nested dynamic map and float32 nested dtype).
fn to_state(q: &Quantized4bit) -> Result<QuantState, quant::Error> {
    let dtype = torch_name(q.dtype)
        .ok_or_else(|| quant::Error::BadTensor {
            what: "weight",
            problem: format!("dtype {:?} cannot be saved in 4 bits", q.dtype),
        })?
        .to_owned();
    let absmax = match q.codec_absmax()? {
        CodecAbsmaxOwned::Plain(a) => Absmax::Plain(a),
        CodecAbsmaxOwned::Nested(n) => Absmax::Nested {
            codes: n.codes,
            nested_absmax: n.nested_absmax,
            nested_blocksize: NESTED_BLOCKSIZE,
            nested_dtype: "float32".into(),
            offset: n.offset,
            nested_quant_map: codec::dynamic_map().to_vec(),
        },
    };
    Ok(QuantState {
        quant_type: q.quant_type,
        blocksize: q.blocksize,
        dtype,
        shape: q.shape.iter().map(|&d| d.max(0) as usize).collect(),
        packed: q.packed_bytes()?,
        absmax,
        quant_map: bnb_quant_map(q.quant_type),
    })
}

/// Refuse an output that is the source itself or inside it (replacing it would destroy the input).
pub fn check_distinct(src: &Path, dst: &Path) -> Result<(), Error> {
    let (Ok(s), Some(parent)) = (src.canonicalize(), dst.parent()) else { return Ok(()) };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let Ok(p) = parent.canonicalize() else { return Ok(()) };
    let d = match dst.file_name() {
        Some(n) => p.join(n),
        None => p,
    };
    if d == s || d.starts_with(&s) {
        return Err(Error::BadOutput {
            path: dst.to_owned(),
            message: format!("is the source model {} or inside it", src.display()),
        });
    }
    Ok(())
}

/// Quantize the model in `src` to 4 bits and write it to `dst` as transformers + bitsandbytes
/// save a 4-bit model, so `from_pretrained(dst)` (and [`crate::CausalLm::load`]) load it
/// pre-quantized: every decoder linear weight quantized tensor by tensor with the fast path
/// (the same bytes as quantizing while loading), every other tensor copied as it is, config.json
/// with transformers' `quantization_config`, the other model files copied. The output appears
/// only once complete. `progress(done, total)` is called after each source tensor.
pub fn quantize_checkpoint(
    src: &Path,
    dst: &Path,
    opts: &QuantizeCheckpointOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportSummary, Error> {
    let cfg = HfConfig::from_dir(src)?;
    if cfg.prequantized {
        return Err(Error::BadConfig {
            path: src.join("config.json"),
            message: "the model is already quantized (`quantization_config` is set)".into(),
        });
    }
    codec::check_blocksize(opts.quant.blocksize).map_err(|e| Error::BadOption(e.to_string()))?;
    let mut config = read_config_json(src)?;
    config.insert("quantization_config".into(), bnb_quantization_config(&opts.quant, opts.compute_dtype)?);
    let ck = Checkpoint::open(src)?;
    ck.check_against(&cfg)?;
    check_distinct(src, dst)?;

    let out = OutputDir::create(dst, opts.overwrite)?;
    let mut writer = ShardWriter::new(out.path(), opts.max_shard_size);
    let mut names: Vec<&str> = ck.names().collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    let total = names.len();
    let mut quantized = 0usize;
    for (i, name) in names.iter().enumerate() {
        let view = ck.tensor(name)?;
        match decoder_linear_prefix(name) {
            Some(prefix) => {
                let quant_err = |source| Error::Quant { name: (*name).to_owned(), source };
                let w = view.to_tensor()?;
                let q = Quantized4bit::quantize(&w, opts.quant).map_err(quant_err)?;
                drop(w);
                let state = to_state(&q).map_err(quant_err)?;
                let tensors = state.to_tensors(prefix);
                let refs: Vec<TensorRef<'_>> = tensors.iter().map(TensorRef::from).collect();
                // transformers counts a 4-bit weight as its packed bytes times two.
                writer.add_group(&refs, 2 * state.packed.len() as u64)?;
                quantized += 1;
            }
            None => {
                let dtype = format!("{:?}", view.dtype);
                let t = TensorRef { name, dtype: &dtype, shape: view.shape, data: view.data };
                writer.add_group(&[t], view.shape.iter().product::<usize>() as u64)?;
            }
        }
        progress(i + 1, total);
    }
    let written = writer.finish()?;
    write_file(&out.path().join("config.json"), (python_json(&Value::Object(config)) + "\n").as_bytes())?;
    let copied = copy_model_files(src, out.path())?;
    let dir = out.commit()?;
    tracing::info!(
        dir = %dir.display(),
        quantized,
        tensors = written.tensors,
        size = %device_map::format_bytes(written.total_size),
        files = written.shards.len(),
        "quantized model written"
    );
    Ok(ExportSummary::new(dir, written, copied))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_module_order() {
        let mut v = vec!["model.layers.10.a", "model.layers.2.b", "lm_head.weight", "model.layers.2.a"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["lm_head.weight", "model.layers.2.a", "model.layers.2.b", "model.layers.10.a"]);
        assert_eq!(natural_cmp("a01", "a1"), std::cmp::Ordering::Greater);
        assert_eq!(natural_cmp("a1", "a1"), std::cmp::Ordering::Equal);
    }

    #[test]
    fn decoder_linears_are_recognised() {
        assert_eq!(
            decoder_linear_prefix("model.layers.3.self_attn.q_proj.weight"),
            Some("model.layers.3.self_attn.q_proj")
        );
        assert_eq!(
            decoder_linear_prefix("model.layers.3.mlp.down_proj.weight"),
            Some("model.layers.3.mlp.down_proj")
        );
        for no in [
            "model.layers.3.self_attn.q_proj.bias",
            "lm_head.weight",
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.3.input_layernorm.weight",
            "model.layers.3.self_attn.q_norm.weight",
        ] {
            assert_eq!(decoder_linear_prefix(no), None, "{no}");
        }
    }

    #[test]
    fn json_is_written_as_python_writes_it() {
        let v = serde_json::json!({"b": [1, 2.5, 1e-6], "a": {"é": "x\"y"}, "c": [], "d": {}, "e": 6.0});
        assert_eq!(
            python_json(&v),
            "{\n  \"a\": {\n    \"\\u00e9\": \"x\\\"y\"\n  },\n  \"b\": [\n    1,\n    2.5,\n    1e-06\n  ],\n  \"c\": [],\n  \"d\": {},\n  \"e\": 6.0\n}"
        );
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nibble-export-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch");
        d
    }

    #[test]
    fn shards_split_at_the_limit_and_keep_groups_together() {
        let dir = scratch("shards");
        let mut w = ShardWriter::new(&dir, 10);
        let four = [0u8; 4];
        let t = |name| TensorRef { name, dtype: "F32", shape: &[1], data: &four };
        w.add_group(&[t("a")], 1).expect("a");
        w.add_group(&[t("b")], 1).expect("b");
        w.add_group(&[t("c"), t("d")], 2).expect("c, d");
        w.add_group(&[t("e")], 1).expect("e");
        assert!(w.add_group(&[t("e")], 1).is_err(), "duplicate name");
        let bad = TensorRef { name: "f", dtype: "F32", shape: &[2], data: &four };
        assert!(w.add_group(&[bad], 1).is_err(), "length does not fit the shape");
        let written = w.finish().expect("finish");
        assert_eq!(
            written.shards,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );
        assert_eq!((written.tensors, written.total_size, written.total_parameters), (5, 20, 5));
        let index: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).expect("index"),
        )
        .expect("json");
        assert_eq!(index["weight_map"]["c"], "model-00002-of-00003.safetensors");
        assert_eq!(index["weight_map"]["d"], "model-00002-of-00003.safetensors");
        assert_eq!(index["metadata"]["total_size"], 20);
        let ck = Checkpoint::open(&dir).expect("reads back");
        assert_eq!(ck.names().collect::<Vec<_>>(), ["a", "b", "c", "d", "e"]);
        assert_eq!(ck.shard_count(), 3);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn output_dir_refuses_non_empty_and_cleans_up() {
        let root = scratch("outdir");
        let dst = root.join("out");
        std::fs::create_dir_all(&dst).expect("dst");
        std::fs::write(dst.join("keep"), b"x").expect("file");
        let e = OutputDir::create(&dst, false).expect_err("non-empty");
        assert!(matches!(&e, Error::OutputExists { path } if path == &dst), "{e}");
        {
            let o = OutputDir::create(&dst, true).expect("overwrite");
            std::fs::write(o.path().join("new"), b"y").expect("write");
            // Dropped without commit: the old contents stay, the temporary goes.
        }
        assert!(dst.join("keep").is_file());
        assert_eq!(std::fs::read_dir(&root).expect("root").count(), 1);
        let o = OutputDir::create(&dst, true).expect("overwrite");
        std::fs::write(o.path().join("new"), b"y").expect("write");
        o.commit().expect("commit");
        assert!(dst.join("new").is_file() && !dst.join("keep").exists());
        assert_eq!(std::fs::read_dir(&root).expect("root").count(), 1);
        let _ = std::fs::remove_dir_all(&root);
    }
}
