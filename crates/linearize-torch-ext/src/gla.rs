//! Fused gated linear attention on CUDA (`triton/gla.py`): per-key-dim log-gates, whole sequences
//! from the empty state (training, scoring), differentiable with respect to q, k, v and the
//! log-gates. The math is linearize-attention's `ops::gla`.
use crate::{call, triton};
use anyhow::Result;
use std::ffi::c_char;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn linearize_gla(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        g: *const C_tensor,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// The kernels one call runs, per head size `d` and q/k/v dtype.
const KERNELS: [(&str, bool); 10] = [
    ("chunk_cumsum", false),
    ("forward_states", true),
    ("forward_scores", true),
    ("forward_output", true),
    ("backward_states", true),
    ("backward_scores", true),
    ("backward_intra", true),
    ("backward_dv", true),
    ("backward_inter", true),
    ("reverse_cumsum", false),
];

/// Why the fused kernels cannot run `q` (b, h, L, d), `k` (b, h_k, L, d), `v` (b, h_v, L, d) and
/// the log-gates `g` (b, h_g, L, d), or `None` when they can. The caller has checked the shapes
/// as `ops::gla` does (batch and length agree, h_k, h_v, h_g divide h).
pub fn unsupported(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor) -> Option<String> {
    let Device::Cuda(device) = q.device() else {
        return Some(format!("runs on CUDA, not {:?}", q.device()));
    };
    let dtype = match v.kind() {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        other => return Some(format!("needs bf16 or f16 values, not {other:?}")),
    };
    let d = q.size()[3];
    if v.size()[3] != d {
        return Some(format!(
            "needs values of the key size {d}, not {}",
            v.size()[3]
        ));
    }
    if [k, v, g].iter().any(|t| t.device() != q.device()) {
        return Some("needs q, k, v and the log-gates on one device".into());
    }
    let keys = KERNELS.iter().map(|&(name, kind)| match kind {
        true => format!("gla/{name}/d{d}/{dtype}"),
        false => format!("gla/{name}/d{d}"),
    });
    triton::missing_kernel(keys, device, "head sizes 64, 128")
}

/// Gated linear attention (b, h, L, d) in v's dtype through the fused kernels: q and k are taken
/// in v's dtype, the log-gates in f32. Call only when [`unsupported`] returns `None`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor) -> Result<Tensor> {
    let kind = v.kind();
    let [q, k] = [q, k].map(|t| t.to_kind(kind).contiguous());
    let v = v.contiguous();
    let g = g.to_kind(Kind::Float).contiguous();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    call("fused GLA", |err, len| unsafe {
        linearize_gla(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            g.as_ptr(),
            &mut out,
            err,
            len,
        )
    })?;
    // SAFETY: on success the shim stored a new tensor, now owned here.
    Ok(unsafe { Tensor::from_ptr(out) })
}
