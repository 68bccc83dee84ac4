//! The `cuda` feature's half of the build script: compiles `csrc/cuda/*.cu` with nvcc for sm_80
//! and sm_90 plus PTX, archives them into `libquant_cuda.a`, and links libtorch's CUDA libraries.
//!
//! nvcc and the CUDA headers come from the pip wheels next to torch (`cargo xtask cuda` installs
//! the pinned nvcc set into the venv; the torch cu130 wheel already ships the runtime headers in
//! `site-packages/nvidia/cu13`), or from `CUDA_HOME` (e.g. a system toolkit on a GPU machine).

use std::path::{Path, PathBuf};
use std::process::Command;

/// GPU targets: Ampere (A100) and Hopper (H100/H200) machine code, plus Hopper PTX so newer GPUs
/// JIT-compile it.
const GENCODE: [&str; 6] = [
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=sm_90",
    "-gencode",
    "arch=compute_90,code=compute_90",
];

/// The CUDA toolkit folder: `CUDA_HOME`, else the torch wheel's `site-packages/nvidia/cu13`.
fn cuda_home(libtorch: &Path) -> PathBuf {
    if let Some(home) = std::env::var_os("CUDA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    libtorch.parent().map(|sp| sp.join("nvidia").join("cu13")).unwrap_or_default()
}

/// Builds and links the CUDA ops; panics with a one-line instruction when nvcc is missing.
pub fn build(libtorch: &Path, include: &Path) {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let home = cuda_home(libtorch);
    let nvcc = home.join("bin").join("nvcc");
    if !nvcc.is_file() {
        panic!(
            "the `cuda` feature needs nvcc, not found at {} (run `cargo xtask cuda`, or set CUDA_HOME)",
            nvcc.display()
        );
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let csrc = Path::new("csrc/cuda");
    println!("cargo:rerun-if-changed={}", csrc.display());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(csrc)
        .unwrap_or_else(|e| panic!("reading {}: {e}", csrc.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));

    // One nvcc per file, all at once (each is mostly single-threaded front-end work).
    let started = std::time::Instant::now();
    let jobs: Vec<(PathBuf, std::process::Child)> = sources
        .iter()
        .map(|src| {
            let stem = src.file_stem().and_then(|s| s.to_str()).expect("a .cu file name");
            let obj = out_dir.join(format!("{stem}.o"));
            let child = Command::new(&nvcc)
                .args(["-c", "-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC"])
                .args(["-D_GLIBCXX_USE_CXX11_ABI=1", "-DGLOG_USE_GLOG_EXPORT"])
                .arg("-I")
                .arg(include)
                .arg("-I")
                .arg(home.join("include"))
                .args(GENCODE)
                .arg("-o")
                .arg(&obj)
                .arg(src)
                .spawn()
                .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
            (obj, child)
        })
        .collect();
    let mut objects = Vec::new();
    for (obj, mut child) in jobs {
        let status = child.wait().unwrap_or_else(|e| panic!("waiting for nvcc: {e}"));
        assert!(status.success(), "nvcc failed for {} ({status})", obj.display());
        objects.push(obj);
    }
    println!("cargo:warning=nvcc: {} CUDA files in {:.0?}", objects.len(), started.elapsed());

    let lib = out_dir.join("libquant_cuda.a");
    let _ = std::fs::remove_file(&lib);
    let status = Command::new(std::env::var_os("AR").unwrap_or_else(|| "ar".into()))
        .arg("crs")
        .arg(&lib)
        .args(&objects)
        .status()
        .unwrap_or_else(|e| panic!("running ar: {e}"));
    assert!(status.success(), "ar failed ({status})");

    let torch_lib = libtorch.join("lib");
    let cuda_lib = home.join("lib");
    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static=quant_cuda");
    println!("cargo:rustc-link-search=native={}", torch_lib.display());
    println!("cargo:rustc-link-search=native={}", cuda_lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    // The wheel ships only the versioned runtime (no libcudart.so development link).
    let cudart = if cuda_lib.join("libcudart.so").exists() { "cudart" } else { "libcudart.so.13" };
    if cudart == "cudart" {
        println!("cargo:rustc-link-lib=dylib=cudart");
    } else {
        println!("cargo:rustc-link-lib=dylib:+verbatim={cudart}");
    }
    // The linker's --as-needed would drop libtorch_cuda (nothing calls into it by name), and
    // then libtorch never registers its CUDA backend. These link args reach this package's own
    // binaries, tests and benches only: a dependent binary that wants CUDA adds the same line
    // (rustc's `as-needed` link modifier is still unstable).
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    // libcudart.so.13 lives beside the wheel's other nvidia libraries, not in torch/lib.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cuda_lib.display());
}
