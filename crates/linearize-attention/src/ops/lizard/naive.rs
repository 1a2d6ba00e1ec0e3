//! Quadratic reference: the L x L weights with the window (and sinks) and linear masks, the linear
//! ones decayed by `exp(G_t − G_s)` with `G` the cumulative log-gates (tests, short inputs).
use super::{check_gates, check_inputs, LizardConfig, LizardInputs};
use crate::error::Result;
use crate::ops::lolcats::gammas;
use crate::tensors::{compute_kind, prepare};
use tch::{Kind, Tensor};

pub fn naive(x: &LizardInputs, cfg: &LizardConfig) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    check_gates(x.log_gates)?;
    let kind = compute_kind("v", x.v)?;
    let h = s.heads;
    let pos = Tensor::arange(s.len, (Kind::Int64, x.v.device()));
    let (window_mask, linear_mask) =
        cfg.window()
            .masks_with_sinks(&pos.unsqueeze(1), &pos.unsqueeze(0), cfg.sinks);

    let scores = prepare(x.q, kind, h).matmul(&prepare(x.k, kind, h).transpose(-1, -2))
        / (s.head_dim as f64).sqrt();
    let scores = scores.masked_fill(&window_mask.logical_not(), f64::NEG_INFINITY); // (b, h, L, L)
    let max = scores.amax([-1i64].as_slice(), true);
    let a_window = (scores - max).exp() * gammas(x.window_factors, h, kind, 4);

    let cum = x.log_gates.to_kind(kind).cumsum(-1, kind); // G (b, h, L)
    let decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)) // G_t − G_s (b, h, L, L)
        .masked_fill(&linear_mask.logical_not(), f64::NEG_INFINITY)
        .exp();
    let a_linear =
        prepare(x.phi_q, kind, h).matmul(&prepare(x.phi_k, kind, h).transpose(-1, -2)) * decay;
    let a = a_window + a_linear;
    let y = a.matmul(&prepare(x.v, kind, h)) / a.sum_dim_intlist(-1, true, kind);
    Ok(y.to_kind(x.v.kind()))
}
