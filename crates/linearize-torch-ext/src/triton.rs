//! The Triton kernels compiled ahead of time by `triton/compile.py` at build time (when libtorch
//! has CUDA and Python finds Triton), embedded in the binary and handed to the C++ launcher once.
use std::ffi::{c_char, c_int, CString};
use std::sync::OnceLock;

/// One compiled kernel: its cubin and what a launch needs.
pub(crate) struct KernelImage {
    pub key: &'static str,
    pub symbol: &'static str,
    pub shared_bytes: c_int,
    pub warps: c_int,
    pub params: c_int,
    pub cubin: &'static [u8],
}

#[cfg(linearize_triton)]
include!(concat!(env!("OUT_DIR"), "/triton/kernels.rs"));

#[cfg(not(linearize_triton))]
pub(crate) const KERNELS: &[KernelImage] = &[];

extern "C" {
    fn linearize_triton_available(
        key: *const c_char,
        device: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn linearize_triton_register(
        key: *const c_char,
        symbol: *const c_char,
        cubin: *const u8,
        cubin_len: usize,
        shared_bytes: c_int,
        warps: c_int,
        params: c_int,
    ) -> c_int;
}

/// Why a fused op cannot run on CUDA device `device`: the first of its kernels `keys` not
/// compiled for it (`sizes` names the compiled head sizes), or why the device could not be asked;
/// `None` when every kernel is there.
pub(crate) fn missing_kernel(
    keys: impl IntoIterator<Item = String>,
    device: usize,
    sizes: &str,
) -> Option<String> {
    for key in keys {
        match has_kernel(&key, device) {
            Ok(true) => {}
            Ok(false) => {
                return Some(format!(
                    "has no kernel {key} for this GPU (compiled: sm_80/86/89 and sm_90; {sizes})"
                ))
            }
            Err(e) => return Some(format!("{e:#}")),
        }
    }
    None
}

/// Whether kernel `key` (`<kernel>/<variant>`, no architecture) was compiled for CUDA device
/// `device` and fits its shared memory; an error says why the device could not be asked.
pub(crate) fn has_kernel(key: &str, device: usize) -> anyhow::Result<bool> {
    static LAUNCHABLE: OnceLock<bool> = OnceLock::new();
    let launchable = *LAUNCHABLE.get_or_init(|| {
        KERNELS.iter().all(|k| {
            let (key, symbol) = (cstring(k.key), cstring(k.symbol));
            // SAFETY: the strings and the cubin outlive the call, which copies them.
            let registered = unsafe {
                linearize_triton_register(
                    key.as_ptr(),
                    symbol.as_ptr(),
                    k.cubin.as_ptr(),
                    k.cubin.len(),
                    k.shared_bytes,
                    k.warps,
                    k.params,
                )
            };
            registered == 1
        })
    });
    if !launchable {
        return Ok(false);
    }
    let key = cstring(key);
    let mut available = 0;
    crate::call("querying the CUDA device for Triton kernels", |err, len| {
        // SAFETY: `key` outlives the call; the shim writes at most `len` bytes of `err`.
        available = unsafe { linearize_triton_available(key.as_ptr(), device as c_int, err, len) };
        c_int::from(available < 0)
    })?;
    Ok(available == 1)
}

fn cstring(s: &str) -> CString {
    CString::new(s).expect("kernel keys and symbols have no NUL")
}
