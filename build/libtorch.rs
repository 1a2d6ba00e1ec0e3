//! Where libtorch is, as torch-sys found it, and the link settings every crate that uses it needs.
//!
//! rustc links with `--as-needed`, which drops `libtorch_cuda.so` because nothing references it
//! directly; without it `tch::Cuda::is_available()` is false even on a GPU machine. We force the
//! link, and embed libtorch's directory as an rpath so binaries and test executables run without
//! `LD_LIBRARY_PATH`.
use std::path::PathBuf;

/// Emits the link settings and returns libtorch's `lib` directory (`None` when torch-sys did not
/// say where it is).
pub fn link() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib_dir = PathBuf::from(std::env::var_os("DEP_TCH_LIBTORCH_LIB")?);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
    Some(lib_dir)
}
