//! `sft quantize MODEL OUT_DIR`: write a model pre-quantized to 4 bits as transformers +
//! bitsandbytes save one, so later runs (and `from_pretrained`) skip quantizing at load. The work
//! is `model_loader::export::quantize_checkpoint`; this is its command line and progress bar.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use model_loader::export::{QuantizeCheckpointOptions, quantize_checkpoint};
use model_loader::{HubCache, resolve_model};

use crate::cli::QuantizeCli;

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
pub(crate) fn run(args: &QuantizeCli) -> Result<()> {
    let cache = HubCache::from_env(|k| std::env::var(k).ok());
    let src = resolve_model(&args.model, &args.io.revision, &cache)?;
    let opts = QuantizeCheckpointOptions {
        quant: args.quant(),
        compute_dtype: args.compute_dtype,
        max_shard_size: args.io.max_shard_size(),
        overwrite: args.io.overwrite,
    };
    tracing::info!(
        model = %src.display(),
        out = %args.out.display(),
        quant_type = args.quant_type.as_str(),
        blocksize = args.blocksize,
        double_quant = args.double_quant,
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
