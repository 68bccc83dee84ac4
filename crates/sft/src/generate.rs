//! `sft generate`: sample from a model (optionally 4-bit, optionally with a trained adapter) to
//! see what training did, and write the prompt's logits for parity checks against Python.

use std::path::Path;

use anyhow::{Context, Result};
use data::Tokenizer;
use data::template::ChatTemplate;
use model_loader::{CausalLm, HubCache, LoadOptions, resolve_model};
use quant::ops::QuantizeOptions;
use tch::Tensor;

use crate::cli::GenerateCli;

/// Run `sft generate`.
pub(crate) fn run(a: &GenerateCli) -> Result<()> {
    let model = match (&a.model, &a.adapter) {
        (Some(m), _) => m.clone(),
        (None, Some(ad)) => crate::cli::model_of_run(ad)?,
        (None, None) => anyhow::bail!("give --model, or --adapter to take the model its run trained on"),
    };
    let dir = resolve_model(&model, "main", &HubCache::from_env(|k| std::env::var(k).ok()))?;
    let opts = LoadOptions {
        quantize: a
            .load_in_4bit
            .then(|| QuantizeOptions { double_quant: true, ..QuantizeOptions::default() }),
        ..LoadOptions::default()
    };
    let mut model =
        CausalLm::load(&dir, &opts, &mut |_, _| {}).with_context(|| format!("loading {}", dir.display()))?;
    let mut dirs: Vec<&Path> = Vec::new();
    if let Some(ad) = &a.adapter {
        let slots = sft::params::slots(&model);
        let (linears, tensors) = model.adaptable_mut();
        let (adapters, made) = lora::inject_from_with_params(linears, tensors, &slots, ad)
            .with_context(|| format!("loading the adapter in {}", ad.display()))?;
        sft::params::install(&mut model, made)?;
        adapters.set_training(false);
        dirs.push(ad);
    }
    dirs.push(&dir);
    let tok_dir = dirs.iter().find(|d| d.join("tokenizer.json").is_file()).copied().unwrap_or(&dir);
    let tok = Tokenizer::from_dir(tok_dir)?;
    let text = if a.chat {
        let source = data::template::find_chat_template(&dirs)?
            .context("--chat: neither the adapter nor the model has a chat template")?;
        let ctx = serde_json::json!({
            "messages": [{"role": "user", "content": a.prompt}],
            "add_generation_prompt": true,
        });
        ChatTemplate::new(&source)?.render(&ctx)?.text
    } else {
        a.prompt.clone()
    };
    // Chat-templated text carries its own special tokens (as transformers tokenizes it).
    let ids: Vec<i64> =
        tok.encode(&text, !a.chat).map_err(anyhow::Error::msg)?.into_iter().map(i64::from).collect();
    let mut sampling = a.sampling();
    sampling.stop_ids.extend(tok.eos_token_id().map(i64::from));
    let out = model.generate(&ids, &sampling)?;
    if let Some(path) = &a.logits_out {
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        Tensor::write_safetensors(&[("logits", &out.prompt_logits)], &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    let new: Vec<u32> = out.tokens.iter().map(|&t| t as u32).collect();
    let decoded = tok.inner().decode(&new, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    #[allow(clippy::print_stdout)]
    {
        println!("{}", decoded.trim_end());
    }
    Ok(())
}
