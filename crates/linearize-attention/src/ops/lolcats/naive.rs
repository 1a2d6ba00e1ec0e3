//! Quadratic reference: the L x L weights with the window (and sinks) and linear masks (tests,
//! short inputs).
use super::{check_inputs, gammas, LolcatsConfig, LolcatsInputs};
use crate::error::Result;
use crate::tensors::{compute_kind, prepare};
use tch::{Kind, Tensor};

pub fn naive(x: &LolcatsInputs, cfg: &LolcatsConfig) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(x)?;
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
    let a_linear = prepare(x.phi_q, kind, h)
        .matmul(&prepare(x.phi_k, kind, h).transpose(-1, -2))
        .masked_fill(&linear_mask.logical_not(), 0.0);
    let a = a_window + a_linear;
    let y = a.matmul(&prepare(x.v, kind, h)) / a.sum_dim_intlist(-1, true, kind);
    Ok(y.to_kind(x.v.kind()))
}
