//! `cargo xtask setup`: ONE Python venv outside the repository holding the pinned reference stack
//! (xtask/python/requirements.lock), whose libtorch the Rust crates then build and run against,
//! through the git-ignored `.cargo/nibble-local.toml` this writes.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::fnv;

/// Lock file of the Python stack, relative to the workspace root.
const LOCK_FILE: &str = "xtask/python/requirements.lock";
/// Stamp file inside the venv: proves a completed install of the current lock.
const STAMP_FILE: &str = ".nibble-stamp";
/// The cargo config that `cargo xtask setup` owns, relative to the workspace root.
const LOCAL_CONFIG: &str = ".cargo/nibble-local.toml";
/// Convenience symlink to the torch package folder, relative to the workspace root.
const LIBTORCH_LINK: &str = ".libtorch";
/// The Python used to create the venv.
const BOOTSTRAP_PYTHON: &str = "python3";
/// Asks the venv's Python which torch it has and where.
const TORCH_PROBE: &str =
    "import os, torch; print(torch.__version__); print(os.path.dirname(torch.__file__))";

/// A ready Python environment and the libtorch inside it.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The venv folder (absolute).
    pub venv: PathBuf,
    /// The venv's Python interpreter.
    pub python: PathBuf,
    /// The torch package folder; its `lib/` holds libtorch (absolute).
    pub torch_dir: PathBuf,
    /// `torch.__version__`, e.g. `2.11.0+cu130`.
    pub torch_version: String,
}

/// What the stamp file records about a completed install.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    /// FNV-1a 64 of the lock file, the Python version and the venv path.
    hash: u64,
    /// `torch.__version__` found after the install.
    torch_version: String,
    /// The torch package folder found after the install.
    torch_dir: PathBuf,
}

/// Ensures the venv is installed and verified, then wires cargo to its libtorch. Idempotent: when
/// the stamp matches, it spawns nothing and only refreshes the config and the symlink.
pub fn setup(root: &Path, force: bool) -> Result<Setup> {
    let started = Instant::now();
    let lock_path = root.join(LOCK_FILE);
    let lock = fs::read(&lock_path)
        .with_context(|| format!("could not read the lock file {}", lock_path.display()))?;
    let wanted_torch = pinned_version(&String::from_utf8_lossy(&lock), "torch")
        .with_context(|| format!("{} pins no `torch==<version>`", lock_path.display()))?;

    let venv = cache_dir()?.join("venv");
    let python = venv.join("bin").join("python");
    let stamp_path = venv.join(STAMP_FILE);
    let previous_stamp = read_stamp(&stamp_path);

    let fresh =
        if force { None } else { up_to_date(&venv, &python, &lock, &wanted_torch, previous_stamp.as_ref()) };
    let (stamp, installed) = match fresh {
        Some(stamp) => (stamp, false),
        None => (install(&venv, &python, &lock_path, &lock, &wanted_torch, force)?, true),
    };
    let env = Setup { venv, python, torch_dir: stamp.torch_dir, torch_version: stamp.torch_version };

    let old_libtorch = previous_libtorch(&root.join(LOCAL_CONFIG));
    write_local_config(root, &env)?;
    refresh_symlink(root, &env.torch_dir)?;

    let torch_moved = old_libtorch.is_some_and(|old| Path::new(&old) != env.torch_dir);
    let torch_replaced =
        installed && previous_stamp.is_some_and(|old| old.torch_version != env.torch_version);
    if torch_moved || torch_replaced {
        clean_torch_sys(root);
    }

    let state = if installed { "ready" } else { "already set up" };
    println!(
        "nibble setup: torch {} in {}: {state} ({:.1?})",
        env.torch_version,
        env.venv.display(),
        started.elapsed()
    );
    Ok(env)
}

/// The cache folder by pyfiles' one rule (`$NIBBLE_HOME`, else `$XDG_CACHE_HOME/nibble`, else
/// `$HOME/.cache/nibble`), made absolute: the venv here, the tokenized-data cache of `sft`.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    let dir = pyfiles::cache::nibble_home(|k| std::env::var(k).ok())
        .context("cannot find a cache folder: set NIBBLE_HOME (or XDG_CACHE_HOME or HOME)")?;
    std::path::absolute(&dir)
        .with_context(|| format!("the cache folder {} is not a usable path", dir.display()))
}

/// The stamp of a completed install of this exact lock, Python and venv, if there is one and its
/// libtorch is still on disk. Reads files only: no process is spawned on this path.
fn up_to_date(
    venv: &Path,
    python: &Path,
    lock: &[u8],
    wanted_torch: &str,
    stamp: Option<&Stamp>,
) -> Option<Stamp> {
    let stamp = stamp?;
    // `exists` follows the symlink: a venv whose base Python vanished is not up to date.
    if !python.exists() {
        return None;
    }
    let python_version = venv_python_version(venv)?;
    let ok = stamp.hash == stamp_hash(lock, &python_version, venv)
        && stamp.torch_version.starts_with(wanted_torch)
        && libtorch_cpu(&stamp.torch_dir).is_file();
    ok.then(|| Stamp {
        hash: stamp.hash,
        torch_version: stamp.torch_version.clone(),
        torch_dir: stamp.torch_dir.clone(),
    })
}

/// Creates the venv if needed (from scratch when `force`), installs the lock with pip, verifies
/// torch, and writes the stamp.
fn install(
    venv: &Path,
    python: &Path,
    lock_path: &Path,
    lock: &[u8],
    wanted_torch: &str,
    force: bool,
) -> Result<Stamp> {
    // A stale stamp must not survive an interrupted install.
    remove_if_exists(&venv.join(STAMP_FILE))?;
    if force || !python.exists() {
        create_venv(venv, force || venv.exists())?;
    }
    let python_version = venv_python_version(venv)
        .with_context(|| format!("{} has no readable `version` line", venv.join("pyvenv.cfg").display()))?;

    println!(
        "nibble setup: installing {} into {} with pip (the first time downloads several GB)",
        lock_path.display(),
        venv.display()
    );
    let status = Command::new(python)
        .args(["-m", "pip", "install", "--disable-pip-version-check", "-r"])
        .arg(lock_path)
        .status()
        .with_context(|| format!("could not run {}", python.display()))?;
    if !status.success() {
        let code = status.code().map_or_else(|| status.to_string(), |c| c.to_string());
        bail!("pip install failed with exit code {code} (its output is above)");
    }

    let (torch_version, torch_dir) = probe_torch(python)?;
    if !torch_version.starts_with(wanted_torch) {
        bail!(
            "the venv has torch {torch_version}, but {} pins torch=={wanted_torch}; \
             run `cargo xtask setup --force`",
            lock_path.display()
        );
    }
    if !libtorch_cpu(&torch_dir).is_file() {
        bail!(
            "torch {torch_version} has no {} (a torch wheel without libtorch?)",
            libtorch_cpu(&torch_dir).display()
        );
    }
    let stamp = Stamp { hash: stamp_hash(lock, &python_version, venv), torch_version, torch_dir };
    write_atomic(&venv.join(STAMP_FILE), &render_stamp(&stamp)?)?;
    Ok(stamp)
}

/// Runs `python3 -m venv [--clear] <venv>`.
fn create_venv(venv: &Path, clear: bool) -> Result<()> {
    println!("nibble setup: creating the venv {}", venv.display());
    if let Some(parent) = venv.parent() {
        fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
    }
    let mut cmd = Command::new(BOOTSTRAP_PYTHON);
    cmd.args(["-m", "venv"]);
    if clear {
        cmd.arg("--clear");
    }
    let status = match cmd.arg(venv).status() {
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "`{BOOTSTRAP_PYTHON}` is not on PATH: install Python 3 (with its venv module), \
             then rerun `cargo xtask setup`"
        ),
        other => other.with_context(|| format!("could not run `{BOOTSTRAP_PYTHON}`"))?,
    };
    if !status.success() {
        bail!(
            "`{BOOTSTRAP_PYTHON} -m venv {}` failed ({status}); on Debian/Ubuntu the venv module \
             comes with the `python3-venv` package",
            venv.display()
        );
    }
    Ok(())
}

/// Imports torch in the venv and returns its version and package folder.
fn probe_torch(python: &Path) -> Result<(String, PathBuf)> {
    let out = Command::new(python)
        .args(["-c", TORCH_PROBE])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not run {}", python.display()))?;
    if !out.status.success() {
        bail!("`import torch` failed in {} ({})", python.display(), out.status);
    }
    let stdout = String::from_utf8(out.stdout).context("torch's path is not valid UTF-8")?;
    let mut lines = stdout.lines().map(str::trim);
    match (lines.next(), lines.next()) {
        (Some(version), Some(dir)) if !version.is_empty() && !dir.is_empty() => {
            Ok((version.to_owned(), PathBuf::from(dir)))
        }
        _ => bail!("unexpected answer from the torch probe: {stdout:?}"),
    }
}

/// `<torch dir>/lib/libtorch_cpu.so`: present in every usable torch install.
fn libtorch_cpu(torch_dir: &Path) -> PathBuf {
    torch_dir.join("lib").join("libtorch_cpu.so")
}

/// The Python version recorded in `<venv>/pyvenv.cfg` (read, not asked of Python).
fn venv_python_version(venv: &Path) -> Option<String> {
    let cfg = fs::read_to_string(venv.join("pyvenv.cfg")).ok()?;
    let field = |wanted: &str| {
        cfg.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == wanted).then(|| value.trim().to_owned())
        })
    };
    field("version").or_else(|| field("version_info"))
}

/// The stamp hash of a lock file content, Python version and venv path.
fn stamp_hash(lock: &[u8], python_version: &str, venv: &Path) -> u64 {
    fnv::hash_fields(&[lock, python_version.as_bytes(), venv.as_os_str().as_encoded_bytes()])
}

/// The text of a stamp file.
fn render_stamp(stamp: &Stamp) -> Result<String> {
    Ok(format!(
        "# Written by `cargo xtask setup` after a verified install; delete it to reinstall.\n\
         hash = {:016x}\ntorch_version = {}\ntorch_dir = {}\n",
        stamp.hash,
        stamp.torch_version,
        utf8(&stamp.torch_dir)?
    ))
}

/// Parses a stamp file's text; `None` when anything is missing or malformed.
fn parse_stamp(text: &str) -> Option<Stamp> {
    let field = |wanted: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(" = ")?;
            (key == wanted).then_some(value)
        })
    };
    Some(Stamp {
        hash: u64::from_str_radix(field("hash")?, 16).ok()?,
        torch_version: field("torch_version")?.to_owned(),
        torch_dir: PathBuf::from(field("torch_dir")?),
    })
}

/// Reads and parses the stamp file, if any.
fn read_stamp(path: &Path) -> Option<Stamp> {
    parse_stamp(&fs::read_to_string(path).ok()?)
}

/// The version a requirements file pins for `package` (`package==X`, markers ignored).
fn pinned_version(lock: &str, package: &str) -> Option<String> {
    lock.lines().find_map(|line| {
        let line = line.split('#').next()?.split(';').next()?.trim();
        let (name, version) = line.split_once("==")?;
        name.trim().eq_ignore_ascii_case(package).then(|| version.trim().to_owned())
    })
}

/// The text of `.cargo/nibble-local.toml` for `env`.
///
/// LIBTORCH is a `{ value, relative }` table because nibble-defaults.toml sets it as one (for
/// `relative = true`), and cargo refuses to merge a plain string over a table.
fn render_local_config(env: &Setup) -> Result<String> {
    let torch = utf8(&env.torch_dir)?;
    let venv = utf8(&env.venv)?;
    let python = utf8(&env.python)?;
    Ok(format!(
        "# Written by `cargo xtask setup`; machine-specific, git-ignored.\n\
         [env]\n\
         LIBTORCH = {{ value = {}, relative = false }}\n\
         NIBBLE_PYTHON = {}\n\
         NIBBLE_VENV = {}\n\
         [build]\n\
         rustflags = [\"-C\", {}]\n",
        toml_string(torch),
        toml_string(python),
        toml_string(venv),
        toml_string(&format!("link-arg=-Wl,-rpath,{torch}/lib")),
    ))
}

/// Writes `.cargo/nibble-local.toml`, only when its content changes (cargo's fingerprints are
/// left alone otherwise).
fn write_local_config(root: &Path, env: &Setup) -> Result<()> {
    let path = root.join(LOCAL_CONFIG);
    let text = render_local_config(env)?;
    if fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    write_atomic(&path, &text)?;
    println!("nibble setup: wrote {}", path.display());
    Ok(())
}

/// The LIBTORCH value of an existing `.cargo/nibble-local.toml`, if any.
fn previous_libtorch(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix("LIBTORCH")?.trim_start().strip_prefix('=')?.trim();
        // `{ value = "...", relative = false }`, or a plain string.
        let value = match value.strip_prefix('{') {
            Some(table) => table.trim_start().strip_prefix("value")?.trim_start(),
            None => value,
        };
        parse_toml_string(value.strip_prefix('=').unwrap_or(value).trim_start())
    })
}

/// Reads a TOML basic string as written by [`toml_string`] (`"`-quoted, `\` escapes).
fn parse_toml_string(quoted: &str) -> Option<String> {
    let mut chars = quoted.strip_prefix('"')?.chars();
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                'n' => out.push('\n'),
                't' => out.push('\t'),
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
}

/// torch-sys only reruns its build script when LIBTORCH's *value* changes, not when the library
/// behind it does, so after a torch change its cached build is dropped (or the user is told to).
fn clean_torch_sys(root: &Path) {
    println!("nibble setup: libtorch changed; running `cargo clean -p torch-sys`");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let cleaned = Command::new(cargo)
        .args(["clean", "-p", "torch-sys"])
        .current_dir(root)
        .status()
        .is_ok_and(|s| s.success());
    if !cleaned {
        println!(
            "nibble setup: hint: that did not work; run `cargo clean -p torch-sys` before the \
             next build so that torch-sys links the new libtorch"
        );
    }
}

/// Points `<repo>/.libtorch` at the torch folder (a convenience for humans). A real file or
/// folder in its way is left alone, with a warning.
fn refresh_symlink(root: &Path, torch_dir: &Path) -> Result<()> {
    let link = root.join(LIBTORCH_LINK);
    match fs::symlink_metadata(&link) {
        Ok(meta) if meta.file_type().is_symlink() => {
            if fs::read_link(&link).ok().as_deref() == Some(torch_dir) {
                return Ok(());
            }
        }
        Ok(_) => {
            eprintln!("warning: {} exists and is not a symlink; leaving it alone", link.display());
            return Ok(());
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("could not inspect {}", link.display())),
    }
    let tmp = root.join(format!("{LIBTORCH_LINK}.tmp"));
    remove_if_exists(&tmp)?;
    symlink(torch_dir, &tmp)?;
    fs::rename(&tmp, &link).with_context(|| format!("could not move {} to {}", tmp.display(), link.display()))
}

/// Creates the symlink `link` -> `target`.
#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("could not create the symlink {}", link.display()))
}

/// Symlinks need privileges on Windows; there is no libtorch wiring there anyway.
#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> Result<()> {
    Ok(())
}

/// Writes `text` to `path` atomically (pyfiles' one atomic writer).
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    pyfiles::write_atomic(path, text.as_bytes())
        .with_context(|| format!("could not write {}", path.display()))
}

/// Removes a file or symlink; a missing one is fine.
fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("could not remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The path as UTF-8 (cargo configs are TOML, which holds only UTF-8).
fn utf8(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("path {} is not valid UTF-8", path.display()))
}

/// `s` as a TOML basic string, quoted and escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Setup {
        Setup {
            venv: PathBuf::from("/c/venv"),
            python: PathBuf::from("/c/venv/bin/python"),
            torch_dir: PathBuf::from("/c/venv/lib/python3.11/site-packages/torch"),
            torch_version: "2.11.0+cu130".to_owned(),
        }
    }

    #[test]
    fn stamp_round_trips() -> Result<()> {
        let env = sample();
        let stamp =
            Stamp { hash: 0x0123_4567_89ab_cdef, torch_version: env.torch_version, torch_dir: env.torch_dir };
        assert_eq!(parse_stamp(&render_stamp(&stamp)?), Some(stamp));
        assert_eq!(parse_stamp("hash = zz\n"), None);
        Ok(())
    }

    #[test]
    fn local_config_has_the_agreed_shape() -> Result<()> {
        let text = render_local_config(&sample())?;
        let torch = "/c/venv/lib/python3.11/site-packages/torch";
        assert_eq!(
            text,
            format!(
                "# Written by `cargo xtask setup`; machine-specific, git-ignored.\n[env]\n\
                 LIBTORCH = {{ value = \"{torch}\", relative = false }}\nNIBBLE_PYTHON = \"/c/venv/bin/python\"\n\
                 NIBBLE_VENV = \"/c/venv\"\n[build]\n\
                 rustflags = [\"-C\", \"link-arg=-Wl,-rpath,{torch}/lib\"]\n"
            )
        );
        Ok(())
    }

    #[test]
    fn previous_libtorch_reads_back_what_was_written() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-test-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let path = dir.join("nibble-local.toml");
        let mut env = sample();
        env.torch_dir = PathBuf::from("/we\"ird\\dir/torch");
        fs::write(&path, render_local_config(&env)?)?;
        let table = previous_libtorch(&path);
        fs::write(&path, "[env]\nLIBTORCH = \"/plain\"\n")?;
        let plain = previous_libtorch(&path);
        fs::remove_dir_all(&dir)?;
        assert_eq!(table.as_deref(), Some("/we\"ird\\dir/torch"));
        assert_eq!(plain.as_deref(), Some("/plain"));
        Ok(())
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("x\ny"), r#""x\u000Ay""#);
        for s in [r#"a"b\c"#, "x\ny", "plain", ""] {
            assert_eq!(parse_toml_string(&toml_string(s)).as_deref(), Some(s));
        }
    }

    #[test]
    fn finds_pins_ignoring_comments_and_markers() {
        let lock = "# torch==0.0 in a comment\nTorch==2.11.0 ; platform_system == \"Linux\"\n";
        assert_eq!(pinned_version(lock, "torch").as_deref(), Some("2.11.0"));
        assert_eq!(pinned_version(lock, "peft"), None);
    }
}
