//! Compiles the C++ fast path (`csrc/*.cpp`: the codec ops and the quantized linears' autograd
//! Functions) against libtorch when the `torch` feature is on; does nothing without it. With the
//! `cuda` feature it also builds the CUDA kernels of `csrc/cuda/` with nvcc (`build/cuda.rs`).

use std::path::{Path, PathBuf};

#[path = "build/cuda.rs"]
mod cuda;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/cuda.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from);
    let include = match libtorch.as_deref().map(|p| p.join("include")) {
        Some(inc) if inc.is_dir() => inc,
        _ => panic!("libtorch not set up: run `cargo xtask setup`"),
    };

    let csrc = Path::new("csrc");
    println!("cargo:rerun-if-changed={}", csrc.display());
    let mut sources = Vec::new();
    let entries = std::fs::read_dir(csrc).unwrap_or_else(|e| panic!("reading {}: {e}", csrc.display()));
    for entry in entries.flatten() {
        let path = entry.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cpp") => sources.push(path),
            Some("h" | "hpp") => {}
            _ => continue,
        }
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    sources.sort();

    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .extra_warnings(false)
        .opt_level(3)
        .debug(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-fopenmp")
        // Bit-exactness with the reference codec: never fuse a product and a sum into one rounding.
        .flag("-ffp-contract=off")
        .flag("-fno-fast-math")
        .files(&sources)
        .compile("quant_ops");

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let libtorch = libtorch.expect("checked above");
        cuda::build(&libtorch, &include);
    }
}
