//! Links libtorch like every other crate and compiles the C++ shim (`csrc/*.cpp`) against the
//! headers next to libtorch's `lib` directory.
#[path = "../../build/libtorch.rs"]
mod libtorch;

const SOURCES: [&str; 1] = ["csrc/adamw.cpp"];

fn main() {
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    let lib_dir = libtorch::link().expect(
        "torch-sys did not report libtorch's directory (DEP_TCH_LIBTORCH_LIB); \
         run scripts/setup.sh or set LIBTORCH",
    );
    let include = lib_dir
        .parent()
        .expect("libtorch's lib directory has a parent")
        .join("include");
    assert!(
        include.join("ATen/ops/_fused_adamw.h").exists(),
        "libtorch's headers are missing under {}",
        include.display()
    );
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .files(SOURCES)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("linearize_torch_ext");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
