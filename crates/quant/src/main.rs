//! `quant`: quantize the weights of a safetensors file into bitsandbytes' 4-bit layout, or
//! dequantize such a file back, from the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use quant::QuantType;
use quant::file;
use quant::state::{QuantState, RawTensor};

const USAGE: &str = "\
usage: quant quantize IN.safetensors OUT.safetensors [--quant-type nf4|fp4] [--blocksize 64]
                      [--double-quant] [--compute-dtype bf16|fp16|fp32] [--only REGEX]
       quant dequantize IN.safetensors OUT.safetensors [--dtype bf16|fp16|fp32]

quantize writes every selected 2-D floating tensor in bitsandbytes' 4-bit layout and copies the
others unchanged. Default selection: names ending in `.weight`, except embeddings, norms and
lm_head; --only takes a regex that must match the whole name. dequantize reverses it, to each
weight's original dtype unless --dtype is given. Output bytes are deterministic; OUT is written
atomically. Bad input exits with code 2.";

/// A problem with the user's input (exit code 2), as opposed to an internal failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct InputError(String);

fn input<T>(r: Result<T, impl std::fmt::Display>) -> Result<T> {
    r.map_err(|e| InputError(e.to_string()).into())
}

struct Options {
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
    compute_dtype: Option<String>,
    only: Option<regex::Regex>,
    dtype: Option<String>,
}

fn parse(args: &[String]) -> Result<(String, PathBuf, PathBuf, Options)> {
    let [cmd, inp, out, rest @ ..] = args else {
        bail!(InputError(format!("expected a command, an input and an output\n\n{USAGE}")));
    };
    let mut o = Options {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: false,
        compute_dtype: None,
        only: None,
        dtype: None,
    };
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| InputError(format!("{flag} needs a value")));
        match flag.as_str() {
            "--quant-type" => o.quant_type = input(value()?.parse::<QuantType>())?,
            "--blocksize" => {
                let v = value()?;
                o.blocksize =
                    input(v.parse::<usize>().map_err(|_| format!("--blocksize: `{v}` is not a number")))?;
                input(quant::codec::check_blocksize(o.blocksize))?;
            }
            "--double-quant" => o.double_quant = true,
            "--compute-dtype" => o.compute_dtype = Some(torch_dtype(&value()?)?.to_owned()),
            "--dtype" => o.dtype = Some(torch_dtype(&value()?)?.to_owned()),
            "--only" => {
                let v = value()?;
                o.only = Some(input(
                    regex::Regex::new(&format!("^(?:{v})$")).map_err(|e| format!("--only: {e}")),
                )?);
            }
            other => bail!(InputError(format!("unknown flag `{other}`\n\n{USAGE}"))),
        }
    }
    Ok((cmd.clone(), PathBuf::from(inp), PathBuf::from(out), o))
}

fn torch_dtype(s: &str) -> Result<&'static str> {
    Ok(match s {
        "bf16" | "bfloat16" => "bfloat16",
        "fp16" | "f16" | "float16" => "float16",
        "fp32" | "f32" | "float32" => "float32",
        other => bail!(InputError(format!("unknown dtype `{other}` (bf16, fp16 or fp32)"))),
    })
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

fn quantize(inp: &Path, out: &Path, o: &Options) -> Result<()> {
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
    if let Some(c) = &o.compute_dtype {
        metadata.insert("bnb_4bit_compute_dtype".into(), c.clone());
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

fn dequantize(inp: &Path, out: &Path, o: &Options) -> Result<()> {
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
        let (dtype, data) = from_f32(&values, o.dtype.as_deref().unwrap_or(&state.dtype));
        written.push(RawTensor { name: format!("{p}.weight"), dtype, shape: state.shape.clone(), data });
    }
    metadata.remove("bnb_4bit_compute_dtype");
    file::write(out, &written, &metadata)?;
    eprintln!("dequantized {} tensors into {}", prefixes.len(), out.display());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("{USAGE}");
        return if args.is_empty() { ExitCode::from(2) } else { ExitCode::SUCCESS };
    }
    let result = parse(&args).and_then(|(cmd, inp, out, o)| match cmd.as_str() {
        "quantize" => quantize(&inp, &out, &o).with_context(|| format!("quantizing {}", inp.display())),
        "dequantize" => dequantize(&inp, &out, &o).with_context(|| format!("dequantizing {}", inp.display())),
        other => Err(InputError(format!("unknown command `{other}`\n\n{USAGE}")).into()),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.chain().any(|c| c.is::<InputError>() || c.is::<file::FileError>()) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
