//! Compiles `csrc/optim.cpp` (torch's fused AdamW step behind a C function) against the libtorch
//! of `$LIBTORCH`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let include = match std::env::var_os("LIBTORCH").map(PathBuf::from).map(|p| p.join("include")) {
        Some(inc) if inc.is_dir() => inc,
        _ => panic!("libtorch not set up: run `cargo xtask setup`"),
    };
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .extra_warnings(false)
        .opt_level(2)
        .debug(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/optim.cpp")
        .compile("nibble_sft");
}
