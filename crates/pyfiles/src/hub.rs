//! The Hugging Face hub cache as `huggingface_hub` lays it out on disk
//! (`models--org--name/refs/<revision>` -> `snapshots/<commit>/...`), read with no network access:
//! nibble never downloads; a model or dataset id is found in the cache or reported missing.

use std::path::{Path, PathBuf};

/// Where the hub cache is, from the same variables `huggingface_hub` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCache {
    /// The `hub` folder holding `models--*` and `datasets--*` repositories.
    pub path: PathBuf,
}

/// The two kinds of hub repository nibble reads, which the cache keeps in separate folders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// `models--org--name`.
    Model,
    /// `datasets--org--name`.
    Dataset,
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
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

    /// The cache of this process's environment.
    pub fn from_process_env() -> Self {
        Self::from_env(|k| std::env::var(k).ok())
    }

    fn repo(id: &str, kind: RepoKind, revision: &str) -> hf_hub::Repo {
        let t = match kind {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        };
        hf_hub::Repo::with_revision(id.to_owned(), t, revision.to_owned())
    }

    /// The repository's folder in the cache (whether or not it exists).
    pub fn repo_folder(&self, kind: RepoKind, id: &str) -> PathBuf {
        self.path.join(Self::repo(id, kind, "main").folder_name())
    }

    /// The snapshot folder of `revision` (a commit hash names it directly; a branch or tag goes
    /// through `refs/`), if the cache holds it.
    pub fn snapshot(&self, kind: RepoKind, id: &str, revision: &str) -> Option<PathBuf> {
        let folder = self.repo_folder(kind, id);
        let commit = if is_commit_hash(revision) {
            revision.to_owned()
        } else {
            std::fs::read_to_string(folder.join("refs").join(revision)).ok()?.trim().to_owned()
        };
        let snap = folder.join("snapshots").join(&commit);
        (!commit.is_empty() && snap.is_dir()).then_some(snap)
    }

    /// One file of a snapshot, if the cache holds it.
    pub fn file(&self, kind: RepoKind, id: &str, revision: &str, name: &str) -> Option<PathBuf> {
        let f = self.snapshot(kind, id, revision)?.join(name);
        f.is_file().then_some(f)
    }
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

    #[test]
    fn snapshots_are_found_by_branch_or_commit() {
        let root = std::env::temp_dir().join(format!("pyfiles-hub-{}", std::process::id()));
        let hub = HubCache { path: root.clone() };
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = hub.repo_folder(RepoKind::Dataset, "org/data");
        assert_eq!(repo, root.join("datasets--org--data"));
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).expect("snapshot");
        std::fs::create_dir_all(repo.join("refs")).expect("refs");
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).expect("ref");
        std::fs::write(repo.join("snapshots").join(commit).join("a.json"), "{}").expect("file");
        let snap = repo.join("snapshots").join(commit);
        assert_eq!(hub.snapshot(RepoKind::Dataset, "org/data", "main"), Some(snap.clone()));
        assert_eq!(hub.snapshot(RepoKind::Dataset, "org/data", commit), Some(snap.clone()));
        assert_eq!(hub.snapshot(RepoKind::Model, "org/data", "main"), None, "kinds live apart");
        assert_eq!(hub.snapshot(RepoKind::Dataset, "org/data", "dev"), None);
        assert_eq!(hub.file(RepoKind::Dataset, "org/data", "main", "a.json"), Some(snap.join("a.json")));
        assert_eq!(hub.file(RepoKind::Dataset, "org/data", commit, "a.json"), Some(snap.join("a.json")));
        assert_eq!(hub.file(RepoKind::Dataset, "org/data", "main", "b.json"), None);
        std::fs::remove_dir_all(&root).ok();
    }
}
