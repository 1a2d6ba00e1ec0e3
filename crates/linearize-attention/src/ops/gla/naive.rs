//! Quadratic reference: `o_t = Σ_{s<=t} (q_t ⊙ exp(B_t − B_s))·k_s v_s` with `B` the cumulative
//! log-gates, materialising the (L, L, d_k) decays (tests, short inputs).
use super::check_inputs;
use crate::error::Result;
use crate::tensors::{compute_kind, prepare};
use tch::{Kind, Tensor};

pub fn naive(q: &Tensor, k: &Tensor, v: &Tensor, log_gates: &Tensor) -> Result<Tensor> {
    let s = check_inputs(q, k, v, log_gates)?;
    let kind = compute_kind("v", v)?;
    let h = s.heads;
    let (q, k, g) = (
        prepare(q, kind, h),
        prepare(k, kind, h),
        prepare(log_gates, kind, h),
    );
    let cum = g.cumsum(2, kind); // (b, h, L, d_k)

    let future = Tensor::ones([s.len, s.len], (Kind::Bool, v.device()))
        .triu(1)
        .unsqueeze(-1);
    let decay = (cum.unsqueeze(3) - cum.unsqueeze(2))
        .masked_fill(&future, f64::NEG_INFINITY)
        .exp();
    let a = (q.unsqueeze(3) * k.unsqueeze(2) * decay).sum_dim_intlist(-1, false, kind); // (b, h, L, L)
    Ok(a.matmul(&prepare(v, kind, h)).to_kind(v.kind()))
}
