//! Quadratic reference: the L x L scores under the window-and-sinks mask (tests, short inputs).
use super::{check_inputs, SwaConfig};
use crate::error::Result;
use crate::tensors::{compute_kind, prepare};
use tch::{Kind, Tensor};

pub fn naive(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &SwaConfig) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(q, k, v)?;
    let kind = compute_kind("v", v)?;
    let pos = Tensor::arange(s.len, (Kind::Int64, v.device()));
    let (window_mask, _) =
        cfg.window()
            .masks_with_sinks(&pos.unsqueeze(1), &pos.unsqueeze(0), cfg.sinks);

    let scores = prepare(q, kind, s.heads).matmul(&prepare(k, kind, s.heads).transpose(-1, -2))
        / (s.head_dim as f64).sqrt();
    let weights = scores
        .masked_fill(&window_mask.logical_not(), f64::NEG_INFINITY)
        .softmax(-1, kind); // (b, h, L, L)
    Ok(weights.matmul(&prepare(v, kind, s.heads)).to_kind(v.kind()))
}
