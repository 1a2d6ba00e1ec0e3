//! Fused LoLCATs attention on CUDA (`triton/lolcats.py`), both window shapes, with or without sink
//! tokens: whole sequences from the empty state (training, scoring), differentiable. Attention
//! transfer's backward (feature maps and window factors only) skips the passes that q, k and v
//! gradients need.
use crate::{call, triton};
use anyhow::Result;
use std::ffi::c_char;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

/// Tokens per chunk of the fused kernels; windows are whole chunks.
pub const CHUNK: i64 = 64;

/// The keys of a query's window: the last w tokens (`Sw`), or its terrace block of w tokens and
/// the block before (`Tk`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    Sw(i64),
    Tk(i64),
}

impl Window {
    fn parts(self) -> (&'static str, i64) {
        match self {
            Self::Sw(w) => ("sw", w),
            Self::Tk(w) => ("tk", w),
        }
    }
}

extern "C" {
    fn linearize_lolcats(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        phi_q: *const C_tensor,
        phi_k: *const C_tensor,
        gammas: *const C_tensor,
        terrace: i32,
        window: i64,
        sinks: i64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// One call's tensors: `q` (b, h, L, d), `k` (b, h_k, L, d), `v` (b, h_v, L, d), `phi_q` and
/// `phi_k` (b, h, L, f), `gammas` (h) the window factors γ (not their logits).
pub struct LolcatsInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub phi_q: &'a Tensor,
    pub phi_k: &'a Tensor,
    pub gammas: &'a Tensor,
}

/// Why the fused kernels cannot run `x` with `window`, or `None` when they can.
pub fn unsupported(x: &LolcatsInputs, window: Window) -> Option<String> {
    let (shape, window) = window.parts();
    let Device::Cuda(device) = x.q.device() else {
        return Some(format!("runs on CUDA, not {:?}", x.q.device()));
    };
    let tensors = [x.q, x.k, x.v, x.phi_q, x.phi_k];
    if tensors.iter().any(|t| t.kind() != Kind::BFloat16) {
        return Some("needs bf16 q, k, v and features".into());
    }
    if window < CHUNK || window % CHUNK != 0 {
        return Some(format!(
            "needs a window of whole {CHUNK}-token chunks, not {window}"
        ));
    }
    let [d, f] = [x.q.size()[3], x.phi_q.size()[3]];
    let heads = x.q.size()[1];
    if x.phi_q.size()[1] != heads || x.phi_k.size()[1] != heads || x.v.size()[3] != d {
        return Some("needs one feature map per query head and values of the head size".into());
    }
    let mut keys: Vec<String> = ["forward", "backward_phi_q", "backward_phi_k", "backward_kv"]
        .iter()
        .map(|k| format!("{k}/{shape}/d{d}/f{f}/bf16"))
        .collect();
    keys.push(format!("backward_q/{shape}/d{d}/bf16"));
    keys.push(format!("backward_sink_kv/{shape}/d{d}/bf16"));
    keys.push(format!("grad_terms/d{d}/bf16"));
    triton::missing_kernel(keys, device, "head sizes 64, 128; 64, 128, 256 features")
}

/// LoLCATs attention (b, h, L, d) in bf16 through the fused kernels, differentiable with respect
/// to every input. The first `sinks` tokens are softmax keys of every later query (under the same
/// max and γ as the window) and never linear keys: `phi_k`'s rows for them are not read, and get
/// no gradient. Call only when [`unsupported`] returns `None`.
pub fn attention(x: &LolcatsInputs, window: Window, sinks: i64) -> Result<Tensor> {
    anyhow::ensure!(
        (0..=i64::from(i32::MAX)).contains(&sinks),
        "fused LoLCATs attention: sinks must be in 0..=2^31 - 1, got {sinks}"
    );
    let terrace = i32::from(matches!(window, Window::Tk(_)));
    let (_, size) = window.parts();
    let [q, k, v, phi_q, phi_k] = [x.q, x.k, x.v, x.phi_q, x.phi_k].map(Tensor::contiguous);
    let gammas = x.gammas.to_kind(Kind::Float).contiguous();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    call("fused LoLCATs attention", |err, len| unsafe {
        linearize_lolcats(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            phi_q.as_ptr(),
            phi_k.as_ptr(),
            gammas.as_ptr(),
            terrace,
            size,
            sinks,
            &mut out,
            err,
            len,
        )
    })?;
    // SAFETY: on success the shim stored a new tensor, now owned here.
    Ok(unsafe { Tensor::from_ptr(out) })
}
