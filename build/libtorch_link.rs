//! Shared build script of every crate that links libtorch.
//!
//! rustc links with `--as-needed`, which drops `libtorch_cuda.so` because nothing references it
//! directly; without it `tch::Cuda::is_available()` is false even on a GPU machine. We force the
//! link, and embed libtorch's directory as an rpath so binaries and test executables run without
//! `LD_LIBRARY_PATH`.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
}
