//! `sft quantize MODEL OUT_DIR`: write a model pre-quantized to 4 bits as transformers +
//! bitsandbytes save one, so later runs (and `from_pretrained`) skip quantizing at load. The work
//! is `model_loader::export::quantize_checkpoint`; this is its command line and progress bar.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use model_loader::export::{DEFAULT_MAX_SHARD_SIZE, QuantizeCheckpointOptions, quantize_checkpoint};
use model_loader::{HubCache, resolve_model};
use quant::QuantType;
use quant::ops::QuantizeOptions;
use tch::Kind;

use crate::UsageError;

/// `sft quantize`'s arguments.
#[derive(Debug, PartialEq)]
pub(crate) struct QuantizeArgs {
    /// Local directory or hub id.
    pub model: String,
    /// Hub revision (ignored for a local directory).
    pub revision: String,
    /// The output directory.
    pub out: PathBuf,
    /// Quantization and writing options.
    pub quant: QuantizeOptions,
    /// `bnb_4bit_compute_dtype` to record.
    pub compute_dtype: Kind,
    /// Largest shard in bytes.
    pub max_shard_size: u64,
    /// Replace a non-empty OUT_DIR.
    pub overwrite: bool,
}

/// A `--flag value` or `--flag=value` pair's value, or a usage error.
pub(crate) fn flag_value(
    flag: &str,
    inline: Option<String>,
    rest: &mut impl Iterator<Item = String>,
) -> Result<String, UsageError> {
    inline.or_else(|| rest.next()).ok_or_else(|| UsageError(format!("{flag} needs a value")))
}

/// `bf16` / `fp16` / `fp32` (or torch's names) as a kind.
pub(crate) fn parse_dtype(flag: &str, v: &str) -> Result<Kind, UsageError> {
    match v {
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "fp16" | "f16" | "float16" => Ok(Kind::Half),
        "fp32" | "f32" | "float32" => Ok(Kind::Float),
        other => Err(UsageError(format!("{flag}: unknown dtype `{other}` (bf16, fp16 or fp32)"))),
    }
}

/// `5GB`, `500MiB`, `1000000` as bytes.
pub(crate) fn parse_size(flag: &str, v: &str) -> Result<u64, UsageError> {
    match device_map::parse_bytes(v) {
        Ok(0) => Err(UsageError(format!("{flag}: must be more than 0 bytes"))),
        Ok(b) => Ok(b),
        Err(e) => Err(UsageError(format!("{flag}: {e}"))),
    }
}

/// Split `--flag=value` into the flag and its inline value.
pub(crate) fn split_flag(arg: &str) -> (&str, Option<String>) {
    match arg.split_once('=') {
        Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
        _ => (arg, None),
    }
}

/// Parse the arguments after `quantize`.
pub(crate) fn parse(args: Vec<String>) -> Result<QuantizeArgs, UsageError> {
    let mut positional = Vec::new();
    let mut quant = QuantizeOptions::default();
    let mut compute_dtype = Kind::Float;
    let mut max_shard_size = DEFAULT_MAX_SHARD_SIZE;
    let mut overwrite = false;
    let mut revision = "main".to_owned();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = split_flag(&arg);
        match flag {
            "--quant-type" | "--quant_type" => {
                let v = flag_value(flag, inline, &mut it)?;
                quant.quant_type = v
                    .parse::<QuantType>()
                    .map_err(|_| UsageError(format!("{flag}: `{v}` is not nf4 or fp4")))?;
            }
            "--double-quant" | "--double_quant" => quant.double_quant = true,
            "--blocksize" => {
                let v = flag_value(flag, inline, &mut it)?;
                quant.blocksize =
                    v.parse().map_err(|_| UsageError(format!("{flag}: `{v}` is not a number")))?;
                quant::codec::check_blocksize(quant.blocksize)
                    .map_err(|e| UsageError(format!("{flag}: {e}")))?;
            }
            "--compute-dtype" | "--compute_dtype" => {
                compute_dtype = parse_dtype(flag, &flag_value(flag, inline, &mut it)?)?;
            }
            "--max-shard-size" | "--max_shard_size" => {
                max_shard_size = parse_size(flag, &flag_value(flag, inline, &mut it)?)?;
            }
            "--revision" => revision = flag_value(flag, inline, &mut it)?,
            "--overwrite" => overwrite = true,
            _ if flag.starts_with("--") => {
                return Err(UsageError(format!("quantize: unknown flag `{flag}`")));
            }
            _ => positional.push(arg),
        }
    }
    let [model, out] = <[String; 2]>::try_from(positional)
        .map_err(|p| UsageError(format!("quantize takes MODEL and OUT_DIR, got {} argument(s)", p.len())))?;
    Ok(QuantizeArgs {
        model,
        revision,
        out: PathBuf::from(out),
        quant,
        compute_dtype,
        max_shard_size,
        overwrite,
    })
}

/// A progress bar on a terminal, hidden otherwise.
pub(crate) fn progress_bar(what: &str) -> ProgressBar {
    let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} tensors {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// Run `sft quantize`.
pub(crate) fn run(args: QuantizeArgs) -> Result<()> {
    let cache = HubCache::from_env(|k| std::env::var(k).ok());
    let src = resolve_model(&args.model, &args.revision, &cache)?;
    let opts = QuantizeCheckpointOptions {
        quant: args.quant,
        compute_dtype: args.compute_dtype,
        max_shard_size: args.max_shard_size,
        overwrite: args.overwrite,
    };
    tracing::info!(
        model = %src.display(),
        out = %args.out.display(),
        quant_type = args.quant.quant_type.as_str(),
        blocksize = args.quant.blocksize,
        double_quant = args.quant.double_quant,
        "quantizing"
    );
    let pb = progress_bar("quantize");
    let result = quantize_checkpoint(&src, &args.out, &opts, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    });
    pb.finish_and_clear();
    result?;
    Ok(())
}
