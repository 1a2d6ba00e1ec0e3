//! Fused normalised linear attention on CUDA (`triton/lolcats.py`: the LoLCATs kernels' linear
//! terms with no window): whole sequences from the empty state (training, scoring),
//! differentiable with respect to φq, φk and v. The math is linearize-attention's
//! `ops::linear_attn`.
use crate::{call, triton};
use anyhow::Result;
use std::ffi::c_char;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn linearize_linear_attn(
        phi_q: *const C_tensor,
        phi_k: *const C_tensor,
        v: *const C_tensor,
        eps: f64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Why the fused kernels cannot run `phi_q` (b, h, L, f), `phi_k` (b, h_k, L, f) and `v`
/// (b, h_v, L, d), or `None` when they can. The caller has checked the shapes as
/// `ops::linear_attn` does (batch and length agree, h_k and h_v divide h).
pub fn unsupported(phi_q: &Tensor, phi_k: &Tensor, v: &Tensor) -> Option<String> {
    let Device::Cuda(device) = v.device() else {
        return Some(format!("runs on CUDA, not {:?}", v.device()));
    };
    if [phi_q, phi_k].iter().any(|t| t.device() != v.device()) {
        return Some("needs φq, φk and v on one device".into());
    }
    let dtype = match v.kind() {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        other => return Some(format!("needs bf16 or f16 values, not {other:?}")),
    };
    let (f, d) = (phi_q.size()[3], v.size()[3]);
    // The kernels one call runs, forward then backward.
    let keys = [
        format!("chunk_sums/d{d}/f{f}/forward/{dtype}"),
        format!("linear_forward/d{d}/f{f}/{dtype}"),
        format!("grad_terms/d{d}/{dtype}"),
        format!("backward_phi_q/sw/d{d}/f{f}/{dtype}"),
        format!("chunk_sums/d{d}/f{f}/reverse/{dtype}"),
        format!("backward_phi_k/sw/d{d}/f{f}/{dtype}"),
        format!("linear_backward_v/d{d}/f{f}/{dtype}"),
    ];
    triton::missing_kernel(keys, device, "head sizes 64, 128; 64, 128, 256 features")
}

/// Normalised linear attention (b, h, L, d) in v's dtype through the fused kernels, with `eps`
/// added to the normaliser: φq and φk are taken in v's dtype, and φk's heads repeated to one per
/// query head (the kernels read a key feature row per query head). Call only when
/// [`unsupported`] returns `None`.
pub fn attention(phi_q: &Tensor, phi_k: &Tensor, v: &Tensor, eps: f64) -> Result<Tensor> {
    let kind = v.kind();
    let heads = phi_q.size()[1];
    let phi_k = match heads / phi_k.size()[1] {
        1 => phi_k.shallow_clone(),
        group => phi_k.repeat_interleave_self_int(group, 1, None),
    };
    let [phi_q, phi_k] = [phi_q, &phi_k].map(|t| t.to_kind(kind).contiguous());
    let v = v.contiguous();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    call("fused linear attention", |err, len| unsafe {
        linearize_linear_attn(
            phi_q.as_ptr(),
            phi_k.as_ptr(),
            v.as_ptr(),
            eps,
            &mut out,
            err,
            len,
        )
    })?;
    // SAFETY: on success the shim stored a new tensor, now owned here.
    Ok(unsafe { Tensor::from_ptr(out) })
}
