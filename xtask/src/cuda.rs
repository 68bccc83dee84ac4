//! `cargo xtask cuda [--check]`: nvcc for quant's `cuda` feature, pip-installed into the nibble
//! venv from xtask/python/cuda-requirements.lock (no GPU needed to compile), and the check that
//! the CUDA kernels compile and link (`--check`; kept out of `cargo xtask ci` for its nvcc time).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::setup::Setup;
use crate::{cargo, check_status, fnv};

/// The nvcc pins, relative to the workspace root.
const LOCK_FILE: &str = "xtask/python/cuda-requirements.lock";
/// Stamp inside the venv proving an install of the current nvcc lock.
const STAMP_FILE: &str = ".nibble-cuda-stamp";

/// The CUDA toolkit folder the pip wheels make: `site-packages/nvidia/cu13` beside torch.
pub fn cuda_home(env: &Setup) -> Result<PathBuf> {
    let site =
        env.torch_dir.parent().with_context(|| format!("{} has no parent", env.torch_dir.display()))?;
    Ok(site.join("nvidia").join("cu13"))
}

/// Installs nvcc into the venv when the lock changed or nvcc is missing; returns the CUDA home.
pub fn install(root: &Path, env: &Setup) -> Result<PathBuf> {
    let lock_path = root.join(LOCK_FILE);
    let lock = fs::read(&lock_path).with_context(|| format!("could not read {}", lock_path.display()))?;
    let home = cuda_home(env)?;
    let nvcc = home.join("bin").join("nvcc");
    let stamp_path = env.venv.join(STAMP_FILE);
    let hash = format!("{:016x}\n", fnv::hash_fields(&[lock.as_slice()]));
    if nvcc.is_file() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(hash.as_str()) {
        println!("nibble cuda: nvcc already installed at {}", nvcc.display());
        return Ok(home);
    }
    println!("nibble cuda: installing {} into {} with pip", lock_path.display(), env.venv.display());
    let status = Command::new(&env.python)
        .args(["-m", "pip", "install", "--disable-pip-version-check", "-r"])
        .arg(&lock_path)
        .status();
    check_status(status, "pip install -r xtask/python/cuda-requirements.lock")?;
    if !nvcc.is_file() {
        bail!("pip installed the nvcc wheels but {} is missing (a changed wheel layout?)", nvcc.display());
    }
    let out = Command::new(&nvcc).arg("--version").output().context("could not run nvcc")?;
    let version = String::from_utf8_lossy(&out.stdout);
    let release = version.lines().find(|l| l.contains("release")).unwrap_or("?").trim();
    println!("nibble cuda: {} ({release})", nvcc.display());
    fs::write(&stamp_path, hash).with_context(|| format!("could not write {}", stamp_path.display()))?;
    Ok(home)
}

/// `cargo xtask cuda [--check]`.
pub fn cuda(root: &Path, env: &Setup, check: bool) -> Result<()> {
    let home = install(root, env)?;
    println!(
        "nibble cuda: CUDA home {} (bin/nvcc, include/ with cuda_runtime.h); torch's CUDA headers \
         are in {}/include/ATen/cuda and c10/cuda",
        home.display(),
        env.torch_dir.display()
    );
    if !check {
        println!("nibble cuda: build with `cargo build -p quant --features cuda`");
        return Ok(());
    }
    // What CI would run for the feature: the kernels compile for sm_80/sm_90 + PTX and link.
    let steps: [&[&str]; 2] = [
        &["build", "-p", "quant", "--features", "cuda", "--all-targets"],
        &["clippy", "-p", "quant", "--features", "cuda", "--all-targets", "--", "-D", "warnings"],
    ];
    for args in steps {
        let shown = format!("cargo {}", args.join(" "));
        println!("\n==> {shown}");
        let started = Instant::now();
        // No CUDA_HOME here: build.rs finds the same nvcc by itself, and a changed CUDA_HOME
        // would rerun nvcc on the next plain build.
        let status = cargo(root, env).args(args).status();
        check_status(status, &shown)?;
        println!("ok: {shown} ({:.0?})", started.elapsed());
    }
    Ok(())
}
