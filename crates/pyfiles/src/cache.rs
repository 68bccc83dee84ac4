//! nibble's own cache folder (the Python venv of `cargo xtask setup`, tokenized datasets, bench
//! files), found by one rule that `sft` and `xtask` both call.

use std::path::{Path, PathBuf};

/// `$NIBBLE_HOME`, else `$XDG_CACHE_HOME/nibble` when absolute (the XDG spec ignores a relative
/// one), else `$HOME/.cache/nibble`; `None` when none is set. Empty variables count as unset.
pub fn nibble_home(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("NIBBLE_HOME")
        .or_else(|| var("XDG_CACHE_HOME").filter(|p| p.is_absolute()).map(|x| x.join("nibble")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("nibble")))
}

/// Where tokenized datasets are cached: `$NIBBLE_CACHE/tokenized`, else [`nibble_home`]`/tokenized`.
pub fn tokenized_dir(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = match var("NIBBLE_CACHE").filter(|v| !v.is_empty()) {
        Some(c) => PathBuf::from(c),
        None => nibble_home(var)?,
    };
    Some(Path::new(&base).join("tokenized"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_cache_folder_follows_nibble_home_then_xdg_then_home() {
        assert_eq!(nibble_home(env(&[("NIBBLE_HOME", "/n"), ("XDG_CACHE_HOME", "/x")])), Some("/n".into()));
        assert_eq!(nibble_home(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])), Some("/x/nibble".into()));
        assert_eq!(
            nibble_home(env(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")])),
            Some("/h/.cache/nibble".into())
        );
        assert_eq!(nibble_home(env(&[("NIBBLE_HOME", ""), ("HOME", "/h")])), Some("/h/.cache/nibble".into()));
        assert_eq!(nibble_home(env(&[])), None);
        assert_eq!(
            tokenized_dir(env(&[("NIBBLE_CACHE", "/c"), ("HOME", "/h")])),
            Some("/c/tokenized".into())
        );
        assert_eq!(tokenized_dir(env(&[("HOME", "/h")])), Some("/h/.cache/nibble/tokenized".into()));
    }
}
