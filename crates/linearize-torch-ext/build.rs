//! Links libtorch like every other crate and compiles the C++ shim (`csrc/*.cpp`) against the
//! headers next to libtorch's `lib` directory. CUDA graphs are compiled in (`LINEARIZE_CUDA`)
//! when libtorch has CUDA and the CUDA runtime headers (with `crt/`, which `scripts/setup.sh`
//! adds to the pip wheel's) are found: `$CUDA_HOME/include`, the pip wheel's `nvidia/cu*/include`
//! beside torch, or `/usr/local/cuda/include`.
#[path = "../../build/libtorch.rs"]
mod libtorch;

use std::path::{Path, PathBuf};

const SOURCES: [&str; 3] = ["csrc/adamw.cpp", "csrc/cuda_graph.cpp", "csrc/profiler.cpp"];

fn cuda_include(torch_root: &Path) -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let mut candidates: Vec<PathBuf> = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("include"))
        .into_iter()
        .collect();
    // The pip layout: <site-packages>/torch and <site-packages>/nvidia/cu*/include (libtorch may
    // be reached through a symlink to the torch directory).
    let torch_root = torch_root
        .canonicalize()
        .unwrap_or_else(|_| torch_root.to_path_buf());
    if let Some(site) = torch_root.parent() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut wheels: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path().join("include"))
                .collect();
            wheels.sort();
            candidates.extend(wheels);
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.into_iter().find(|dir| {
        dir.join("cuda_runtime_api.h").exists() && dir.join("crt/host_config.h").exists()
    })
}

fn main() {
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    let lib_dir = libtorch::link().expect(
        "torch-sys did not report libtorch's directory (DEP_TCH_LIBTORCH_LIB); \
         run scripts/setup.sh or set LIBTORCH",
    );
    let root = lib_dir
        .parent()
        .expect("libtorch's lib directory has a parent");
    let include = root.join("include");
    assert!(
        include.join("ATen/ops/_fused_adamw.h").exists(),
        "libtorch's headers are missing under {}",
        include.display()
    );
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .files(SOURCES)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false);
    let cuda = lib_dir.join("libtorch_cuda.so").exists() && lib_dir.join("libc10_cuda.so").exists();
    match cuda.then(|| cuda_include(root)).flatten() {
        Some(cuda_include) => {
            build.define("LINEARIZE_CUDA", None).include(cuda_include);
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
        }
        None => println!(
            "cargo:warning=building without CUDA graphs: no CUDA libtorch or CUDA headers found"
        ),
    }
    build.compile("linearize_torch_ext");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
