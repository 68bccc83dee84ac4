//! Compiles `csrc/shim.cpp` (c10d's TCPStore and ProcessGroupGloo behind C functions) against the
//! libtorch of `$LIBTORCH`, with `csrc/gloo_decl/` standing in for the gloo headers the wheel
//! does not ship; with the `cuda` feature also `csrc/nccl.cpp` (ProcessGroupNCCL, against the
//! wheel's CUDA and NCCL headers) and links libtorch's CUDA libraries.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from);
    let include = match libtorch.as_deref().map(|p| p.join("include")) {
        Some(inc) if inc.is_dir() => inc,
        _ => panic!("libtorch not set up: run `cargo xtask setup`"),
    };
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(false)
            .extra_warnings(false)
            .opt_level(2)
            .debug(false)
            .include("csrc")
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
            .flag("-DGLOG_USE_GLOG_EXPORT");
        b
    };
    base().include("csrc/gloo_decl").flag("-DUSE_C10D_GLOO").file("csrc/shim.cpp").compile("nibble_dist");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let torch = libtorch.expect("checked above");
        nccl(&torch, base());
    }
}

/// ProcessGroupNCCL: the wheel's `nvidia/` packages sit beside `torch/` in site-packages.
fn nccl(torch: &Path, mut build: cc::Build) {
    let nvidia = torch.parent().map(|p| p.join("nvidia")).unwrap_or_default();
    let (cuda_inc, nccl_inc) = (nvidia.join("cu13/include"), nvidia.join("nccl/include"));
    for dir in [&cuda_inc, &nccl_inc] {
        if !dir.join(if dir == &nccl_inc { "nccl.h" } else { "cuda_runtime_api.h" }).is_file() {
            panic!("dist's `cuda` feature needs {} (part of the CUDA torch wheel)", dir.display());
        }
    }
    build
        .include(&cuda_inc)
        .include(&nccl_inc)
        .flag("-DUSE_C10D_NCCL")
        .flag("-DUSE_CUDA")
        .file("csrc/nccl.cpp")
        .compile("nibble_dist_nccl");
    println!("cargo:rustc-link-search=native={}", torch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    // As in quant: keep libtorch_cuda in this package's own test binaries even where nothing
    // names it, so libtorch registers its CUDA backend (dependents add the same line).
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
}
