//! From `model_name_or_path` + `model_revision` to a directory on disk: a local directory as is,
//! or a snapshot in the Hugging Face hub cache, found the way `huggingface_hub` lays it out
//! (`models--org--name/refs/<revision>` -> `snapshots/<commit>`), with no network access.

use std::path::{Path, PathBuf};

use crate::Error;

/// Where the hub cache is, from the same variables `huggingface_hub` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCache {
    /// The `hub` folder holding `models--*` repositories.
    pub path: PathBuf,
}

impl HubCache {
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`; `var` looks variables up (pass `std::env::var`).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Self {
        let path = if let Some(p) = var("HF_HUB_CACHE") {
            PathBuf::from(p)
        } else if let Some(home) = var("HF_HOME") {
            Path::new(&home).join("hub")
        } else if let Some(xdg) = var("XDG_CACHE_HOME") {
            Path::new(&xdg).join("huggingface/hub")
        } else {
            Path::new(&var("HOME").unwrap_or_default()).join(".cache/huggingface/hub")
        };
        HubCache { path }
    }
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The directory holding the model's files (`config.json`, safetensors, tokenizer).
pub fn resolve_model(name_or_path: &str, revision: &str, cache: &HubCache) -> Result<PathBuf, Error> {
    let local = Path::new(name_or_path);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    let repo =
        hf_hub::Repo::with_revision(name_or_path.to_owned(), hf_hub::RepoType::Model, revision.to_owned());
    let folder = cache.path.join(repo.folder_name());
    let not_found = || Error::NotInCache {
        id: name_or_path.to_owned(),
        revision: revision.to_owned(),
        searched: folder.clone(),
    };
    // A commit hash names a snapshot directly; a branch or tag goes through refs/.
    if is_commit_hash(revision) {
        let snap = folder.join("snapshots").join(revision);
        return if snap.join("config.json").is_file() { Ok(snap) } else { Err(not_found()) };
    }
    let config =
        hf_hub::Cache::new(cache.path.clone()).repo(repo).get("config.json").ok_or_else(not_found)?;
    config.parent().map(Path::to_path_buf).ok_or_else(not_found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_location_follows_huggingface_hub_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(
            HubCache::from_env(env(&[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b")])).path,
            PathBuf::from("/a")
        );
        assert_eq!(HubCache::from_env(env(&[("HF_HOME", "/b")])).path, PathBuf::from("/b/hub"));
        assert_eq!(
            HubCache::from_env(env(&[("XDG_CACHE_HOME", "/x")])).path,
            PathBuf::from("/x/huggingface/hub")
        );
        assert_eq!(
            HubCache::from_env(env(&[("HOME", "/h")])).path,
            PathBuf::from("/h/.cache/huggingface/hub")
        );
    }
}
