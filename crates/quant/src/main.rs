//! `quant`: quantize the weights of a safetensors file into bitsandbytes' 4-bit layout, or
//! dequantize such a file back, from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use quant::QuantType;
use quant::file;
use quant::state::{QuantState, RawTensor};

/// `quant`'s command line.
#[derive(Parser, Debug)]
#[command(
    name = "quant",
    version,
    about = "Quantize the weights of a safetensors file into bitsandbytes' 4-bit layout, or back",
    long_about = "Quantize the weights of a safetensors file into bitsandbytes' 4-bit layout, or back.\n\n\
                  Output bytes are deterministic; OUT is written atomically. Bad input exits with code 2.",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Store every selected 2-D floating tensor in bitsandbytes' 4-bit layout and copy the others
    /// unchanged (default selection: names ending in `.weight`, except embeddings, norms and lm_head)
    Quantize(QuantizeArgs),
    /// Turn a file's 4-bit weights back into floating tensors (each weight's original dtype unless
    /// --dtype is given)
    Dequantize(DequantizeArgs),
}

#[derive(Args, Debug)]
struct QuantizeArgs {
    /// The safetensors file to read
    #[arg(value_name = "IN.safetensors")]
    input: PathBuf,
    /// The safetensors file to write
    #[arg(value_name = "OUT.safetensors")]
    output: PathBuf,
    /// The 4-bit code
    #[arg(long, alias = "quant_type", default_value = "nf4", value_parser = quant::values::quant_type)]
    quant_type: QuantType,
    /// Elements per block (a power of two, 32..4096)
    #[arg(long, default_value_t = 64, value_parser = quant::values::blocksize)]
    blocksize: usize,
    /// Quantize the block scales too (bitsandbytes' nested quantization)
    #[arg(long, alias = "double_quant")]
    double_quant: bool,
    /// The compute dtype recorded in the file's metadata (`bnb_4bit_compute_dtype`)
    #[arg(long, alias = "compute_dtype", value_parser = quant::values::float_dtype)]
    compute_dtype: Option<&'static str>,
    /// Quantize the tensors whose whole name matches this regex instead of the default selection
    #[arg(long, value_parser = whole_name)]
    only: Option<regex::Regex>,
}

#[derive(Args, Debug)]
struct DequantizeArgs {
    /// The safetensors file to read
    #[arg(value_name = "IN.safetensors")]
    input: PathBuf,
    /// The safetensors file to write
    #[arg(value_name = "OUT.safetensors")]
    output: PathBuf,
    /// The dtype of every dequantized weight (default: each weight's original one)
    #[arg(long, value_parser = quant::values::float_dtype)]
    dtype: Option<&'static str>,
}

fn whole_name(v: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{v})$")).map_err(|e| e.to_string())
}

/// A problem with the user's input (exit code 2), as opposed to an internal failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct InputError(String);

fn input<T>(r: Result<T, impl std::fmt::Display>) -> Result<T> {
    r.map_err(|e| InputError(e.to_string()).into())
}

/// safetensors dtype name -> torch dtype name, for the floating types a 4-bit weight may have.
fn torch_name(st: &str) -> Option<&'static str> {
    match st {
        "F32" => Some("float32"),
        "F16" => Some("float16"),
        "BF16" => Some("bfloat16"),
        _ => None,
    }
}

fn to_f32(t: &RawTensor) -> Result<Vec<f32>> {
    let chunks = |n: usize| t.data.chunks_exact(n);
    Ok(match t.dtype.as_str() {
        "F32" => chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "F16" => chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "BF16" => chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => bail!(InputError(format!(
            "tensor `{}`: dtype {other} cannot be quantized (F32, F16 or BF16)",
            t.name
        ))),
    })
}

fn from_f32(values: &[f32], torch: &str) -> (String, Vec<u8>) {
    match torch {
        "bfloat16" => {
            ("BF16".into(), values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect())
        }
        "float16" => {
            ("F16".into(), values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect())
        }
        _ => ("F32".into(), values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

/// The default selection: weights of linear layers (2-D, floating, not embeddings/norms/head).
fn default_selected(t: &RawTensor) -> bool {
    let n = t.name.to_ascii_lowercase();
    n.ends_with(".weight")
        && t.shape.len() == 2
        && torch_name(&t.dtype).is_some()
        && !(n.contains("embed") || n.contains("norm") || n.contains("lm_head"))
}

fn quantize(o: &QuantizeArgs) -> Result<()> {
    let (inp, out) = (o.input.as_path(), o.output.as_path());
    let (tensors, mut metadata) = input(file::read(inp))?;
    let mut written = Vec::with_capacity(tensors.len());
    let mut count = 0;
    for t in &tensors {
        let selected = match &o.only {
            Some(re) => re.is_match(&t.name),
            None => default_selected(t),
        };
        if !selected {
            written.push(t.clone());
            continue;
        }
        let Some(prefix) = t.name.strip_suffix(".weight") else {
            bail!(InputError(format!(
                "tensor `{}`: only `<module>.weight` tensors can be stored in bitsandbytes' layout",
                t.name
            )));
        };
        if t.shape.len() != 2 {
            bail!(InputError(format!(
                "tensor `{}`: shape {:?} is not 2-D; only linear weights are quantized",
                t.name, t.shape
            )));
        }
        let dtype = torch_name(&t.dtype).ok_or_else(|| {
            InputError(format!("tensor `{}`: dtype {} cannot be quantized", t.name, t.dtype))
        })?;
        let values = to_f32(t)?;
        let state = QuantState::quantize(&values, &t.shape, dtype, o.quant_type, o.blocksize, o.double_quant)
            .map_err(|e| InputError(format!("tensor `{}`: {e}", t.name)))?;
        written.extend(state.to_tensors(prefix));
        count += 1;
    }
    metadata.insert("format".into(), "pt".into());
    if let Some(c) = o.compute_dtype {
        metadata.insert("bnb_4bit_compute_dtype".into(), c.to_owned());
    }
    file::write(out, &written, &metadata)?;
    eprintln!(
        "quantized {count} tensors ({}, blocksize {}{}) into {}",
        o.quant_type.as_str(),
        o.blocksize,
        if o.double_quant { ", double quant" } else { "" },
        out.display()
    );
    Ok(())
}

fn dequantize(o: &DequantizeArgs) -> Result<()> {
    let (inp, out) = (o.input.as_path(), o.output.as_path());
    let (tensors, mut metadata) = input(file::read(inp))?;
    let marker = ".weight.quant_state.bitsandbytes__";
    let prefixes: Vec<String> =
        tensors.iter().filter_map(|t| t.name.find(marker).map(|i| t.name[..i].to_owned())).collect();
    let owned_by = |name: &str| {
        prefixes.iter().any(|p| name == format!("{p}.weight") || name.starts_with(&format!("{p}.weight.")))
    };
    let mut written: Vec<RawTensor> = tensors.iter().filter(|t| !owned_by(&t.name)).cloned().collect();
    for p in &prefixes {
        let state = input(QuantState::from_tensors(p, &tensors))?;
        let values = input(state.dequantize())?;
        let (dtype, data) = from_f32(&values, o.dtype.unwrap_or(&state.dtype));
        written.push(RawTensor { name: format!("{p}.weight"), dtype, shape: state.shape.clone(), data });
    }
    metadata.remove("bnb_4bit_compute_dtype");
    file::write(out, &written, &metadata)?;
    eprintln!("dequantized {} tensors into {}", prefixes.len(), out.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Help and --version on stdout (exit 0); usage errors on stderr (exit 2).
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let result = match &cli.command {
        Command::Quantize(a) => quantize(a).with_context(|| format!("quantizing {}", a.input.display())),
        Command::Dequantize(a) => {
            dequantize(a).with_context(|| format!("dequantizing {}", a.input.display()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.chain().any(|c| {
                c.is::<InputError>()
                    || c.downcast_ref::<quant::Error>().is_some_and(|e| {
                        matches!(e, quant::Error::InvalidFile { .. } | quant::Error::FileIo { .. })
                    })
            }) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
