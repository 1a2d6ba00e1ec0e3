//! One AdamW update of many tensors in a few kernels, as `torch.optim.AdamW(fused=True)` runs it.
use crate::call;
use anyhow::{ensure, Result};
use std::ffi::c_char;
use tch::Tensor;
use torch_sys::C_tensor;

mod ffi {
    use super::*;
    extern "C" {
        pub fn linearize_fused_adamw(
            params: *const *const C_tensor,
            grads: *const *const C_tensor,
            exp_avgs: *const *const C_tensor,
            exp_avg_sqs: *const *const C_tensor,
            steps: *const *const C_tensor,
            n: usize,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn linearize_foreach_copy(
            dst: *const *const C_tensor,
            src: *const *const C_tensor,
            n: usize,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
    }
}

/// The hyper-parameters of one update (torch's AdamW semantics: decoupled weight decay,
/// bias-corrected moments, `eps` added to the corrected root of the second moment).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

fn handles(tensors: &[&Tensor]) -> Vec<*const C_tensor> {
    tensors.iter().map(|t| t.as_ptr()).collect()
}

/// Updates `params[i]` in place from `grads[i]`, with the moments `exp_avgs[i]` and
/// `exp_avg_sqs[i]`, after advancing the step count `steps[i]` (an f32 scalar on the same device)
/// by one. Every tensor of the lists shares one device and one floating dtype, except the steps.
pub fn fused_adamw(
    params: &[&Tensor],
    grads: &[&Tensor],
    exp_avgs: &[&Tensor],
    exp_avg_sqs: &[&Tensor],
    steps: &[&Tensor],
    hyper: &AdamWStep,
) -> Result<()> {
    let n = params.len();
    ensure!(
        [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()] == [n; 4],
        "fused AdamW: {n} parameters but {} gradients, {} first moments, {} second moments and {} \
         step counts",
        grads.len(),
        exp_avgs.len(),
        exp_avg_sqs.len(),
        steps.len()
    );
    if n == 0 {
        return Ok(());
    }
    let [beta1, beta2] = hyper.betas;
    let (p, g, m, v, s) = (
        handles(params),
        handles(grads),
        handles(exp_avgs),
        handles(exp_avg_sqs),
        handles(steps),
    );
    call("fused AdamW step (_fused_adamw_)", |err, len| unsafe {
        ffi::linearize_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            hyper.lr,
            beta1,
            beta2,
            hyper.weight_decay,
            hyper.eps,
            err,
            len,
        )
    })
}

/// `dst[i].copy_(src[i])` for every i (converting dtypes), in as few kernels as libtorch manages.
pub fn foreach_copy(dst: &[&Tensor], src: &[&Tensor]) -> Result<()> {
    ensure!(
        dst.len() == src.len(),
        "foreach copy: {} destinations but {} sources",
        dst.len(),
        src.len()
    );
    if dst.is_empty() {
        return Ok(());
    }
    let (d, s) = (handles(dst), handles(src));
    call("multi-tensor copy (_foreach_copy_)", |err, len| unsafe {
        ffi::linearize_foreach_copy(d.as_ptr(), s.as_ptr(), dst.len(), err, len)
    })
}
