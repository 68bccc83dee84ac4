//! With the `cuda` feature, keeps libtorch_cuda linked into the `sft` binary: nothing calls into
//! it by name, so the linker's `--as-needed` would drop it and libtorch would never register its
//! CUDA backend (quant's build script does the same for quant's own binaries; link arguments do
//! not reach dependents).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
