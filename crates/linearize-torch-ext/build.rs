//! Links libtorch like every other crate and compiles the C++ shim (`csrc/*.cpp`) against the
//! headers next to libtorch's `lib` directory. CUDA graphs are compiled in (`LINEARIZE_CUDA`)
//! when libtorch has CUDA and the CUDA runtime headers (with `crt/`, which `scripts/setup.sh`
//! adds to the pip wheel's) are found: `$CUDA_HOME/include`, the pip wheel's `nvidia/cu*/include`
//! beside torch, or `/usr/local/cuda/include`. With CUDA, the Triton kernels (`triton/*.py`) are
//! compiled ahead of time by the Python beside libtorch (`$LINEARIZE_PYTHON` overrides it) when
//! it finds Triton, which the CUDA torch wheel installs; without it the fused kernels are left out.
#[path = "../../build/libtorch.rs"]
mod libtorch;

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: [&str; 6] = [
    "csrc/adamw.cpp",
    "csrc/cuda_graph.cpp",
    "csrc/gla.cpp",
    "csrc/lolcats.cpp",
    "csrc/profiler.cpp",
    "csrc/triton_launch.cpp",
];
/// Headers the sources include (a change to one rebuilds them).
const HEADERS: [&str; 2] = ["csrc/ffi_error.h", "csrc/triton_launch.h"];
const TRITON_SOURCES: [&str; 3] = ["triton/compile.py", "triton/gla.py", "triton/lolcats.py"];

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

/// The Python that can import Triton: `$LINEARIZE_PYTHON`, the virtual environment's that holds
/// torch (`<venv>/lib/pythonX.Y/site-packages/torch`), or `python3`.
fn triton_python(torch_root: &Path) -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=LINEARIZE_PYTHON");
    let venv = torch_root
        .canonicalize()
        .ok()
        .and_then(|t| Some(t.ancestors().nth(4)?.join("bin/python3")));
    let candidates = std::env::var_os("LINEARIZE_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(venv.filter(|p| p.exists()))
        .chain([PathBuf::from("python3")]);
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import triton"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Compiles the Triton kernels into `$OUT_DIR/triton` and turns on `cfg(linearize_triton)`.
fn compile_triton(torch_root: &Path) {
    let Some(python) = triton_python(torch_root) else {
        println!("cargo:warning=building without the fused Triton kernels: no Python with Triton");
        return;
    };
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("triton");
    let status = Command::new(&python)
        .arg("triton/compile.py")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        status.success(),
        "triton/compile.py failed ({status}) with {}",
        python.display()
    );
    println!("cargo:rustc-cfg=linearize_triton");
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(linearize_triton)");
    for source in SOURCES.iter().chain(&HEADERS).chain(&TRITON_SOURCES) {
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
            compile_triton(root);
        }
        None => println!(
            "cargo:warning=building without CUDA graphs: no CUDA libtorch or CUDA headers found"
        ),
    }
    build.compile("linearize_torch_ext");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=dl");
}
