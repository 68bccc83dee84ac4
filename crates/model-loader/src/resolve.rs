//! From `model_name_or_path` + `model_revision` to a directory on disk: a local directory as is,
//! or a snapshot in the Hugging Face hub cache (pyfiles' [`HubCache`]), with no network access.

use std::path::{Path, PathBuf};

pub use pyfiles::HubCache;
use pyfiles::RepoKind;

use crate::Error;

/// The directory holding the model's files (`config.json`, safetensors, tokenizer).
pub fn resolve_model(name_or_path: &str, revision: &str, cache: &HubCache) -> Result<PathBuf, Error> {
    let local = Path::new(name_or_path);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    cache
        .file(RepoKind::Model, name_or_path, revision, "config.json")
        .and_then(|config| config.parent().map(Path::to_path_buf))
        .ok_or_else(|| Error::NotInCache {
            id: name_or_path.to_owned(),
            revision: revision.to_owned(),
            searched: cache.repo_folder(RepoKind::Model, name_or_path),
        })
}
