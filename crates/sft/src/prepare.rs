//! The parts of a run that exist so far, done for real on the recipe's inputs: find the model,
//! check its checkpoint against config.json, read the training rows and render the first one
//! with the chat template. The training loop (issue 6) continues from here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use config::Recipe;
use model_loader::{Checkpoint, HfConfig, HubCache, resolve_model};
use sft::data::{Example, read_rows};
use sft::template::ChatTemplate;

/// The template to use: the recipe's, else the model's `chat_template.jinja`, else the one in
/// its `tokenizer_config.json`.
fn chat_template(recipe: &Recipe, model_dir: &Path) -> Result<Option<String>> {
    if let Some(t) = &recipe.training.chat_template {
        return Ok(Some(t.clone()));
    }
    let jinja = model_dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some(
            std::fs::read_to_string(&jinja).with_context(|| format!("reading {}", jinja.display()))?,
        ));
    }
    let cfg = model_dir.join("tokenizer_config.json");
    if cfg.is_file() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg)?)
            .with_context(|| format!("{}: not valid JSON", cfg.display()))?;
        return Ok(v.get("chat_template").and_then(|t| t.as_str()).map(str::to_owned));
    }
    Ok(None)
}

/// The recipe's model directory (local, or a hub-cache snapshot) and its config.json.
pub fn model(recipe: &Recipe) -> Result<(PathBuf, HfConfig)> {
    let id = recipe.model.model_name_or_path.as_deref().context("model_name_or_path is not set")?;
    let cache = HubCache::from_env(|k| std::env::var(k).ok());
    let dir = resolve_model(id, &recipe.model.model_revision, &cache)?;
    let cfg = HfConfig::from_dir(&dir)?;
    Ok((dir, cfg))
}

/// Check the model and data a recipe names; logs what it found.
pub fn prepare(recipe: &Recipe) -> Result<()> {
    let (dir, cfg) = model(recipe)?;
    let ckpt = Checkpoint::open(&dir)?;
    ckpt.check_against(&cfg)?;
    tracing::info!(
        "model {}: {:?}, {} layers, {} tensors in {} shard(s), shapes match config.json",
        dir.display(),
        cfg.architecture,
        cfg.shape.layers,
        ckpt.names().count(),
        ckpt.shard_count()
    );
    let Some(data) = recipe.data.dataset_name.as_deref().filter(|d| Path::new(d).is_file()) else {
        tracing::warn!("only local JSON/JSONL dataset files are read so far; skipping the data check");
        return Ok(());
    };
    let rows = read_rows(Path::new(data), &recipe.training.dataset_text_field)?;
    tracing::info!("data {data}: {} rows", rows.len());
    if let Some(Example::Conversation { messages, tools, kwargs }) = rows.first() {
        let source = chat_template(recipe, &dir)?.context("conversational data needs a chat template")?;
        let template = ChatTemplate::new(&source)?;
        let mut ctx =
            serde_json::json!({"messages": messages, "tools": tools, "add_generation_prompt": false});
        if let (Some(obj), Some(kw)) = (ctx.as_object_mut(), kwargs) {
            obj.extend(kw.clone());
        }
        let first = template.render(&ctx)?;
        tracing::info!(
            "first row rendered with the chat template ({} chars): {:?}",
            first.text.len(),
            first.text
        );
    }
    Ok(())
}
