//! nibble's one atomic writer: a reader sees the old file or the new one, never a part.

use std::io::Write;
use std::path::Path;

/// `write` fills a hidden temporary file beside `path` (named for this process), which is synced
/// to disk and renamed over `path`; on any failure the temporary file is removed and `path` is
/// untouched. nibble's single files go through it (adapters, reports, caches, safetensors files);
/// checkpoint folders and exported model folders are assembled beside their target from files
/// written here and renamed as a whole.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        write(&mut w)?;
        let file = w.into_inner().map_err(std::io::IntoInnerError::into_error)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic_with`] for bytes in memory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Flush a folder's entries to disk (after files were renamed into it, before the folder itself
/// is renamed into place), so a crash cannot leave a renamed folder with missing entries.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_or_leaves_it_untouched() {
        let dir = std::env::temp_dir().join(format!("pyfiles-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("f.json");
        write_atomic(&path, b"old").expect("first write");
        let failed = write_atomic_with(&path, |w| {
            w.write_all(b"half of the new")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        write_atomic(&path, b"new").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        sync_dir(&dir).expect("sync");
        let left: Vec<_> =
            std::fs::read_dir(&dir).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("f.json")], "no temporary file left");
        std::fs::remove_dir_all(&dir).ok();
    }
}
