//! Links libtorch like every other crate and compiles the C++ shim over libtorch's profiler
//! (`csrc/profiler.cpp`) against the headers next to libtorch's `lib` directory.
#[path = "../../build/libtorch.rs"]
mod libtorch;

fn main() {
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    let lib_dir = libtorch::link().expect(
        "torch-sys did not report libtorch's directory (DEP_TCH_LIBTORCH_LIB); \
         run scripts/setup.sh or set LIBTORCH",
    );
    let root = lib_dir
        .parent()
        .expect("libtorch's lib directory has a parent");
    let include = root.join("include");
    assert!(
        include
            .join("torch/csrc/autograd/profiler_kineto.h")
            .exists(),
        "libtorch's headers are missing under {}",
        include.display()
    );
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/profiler.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("linearize_profiler");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
