//! Quadratic reference: the full L x L matrix of feature dot products (tests, short sequences).
use super::{check_inputs, LinearAttnConfig};
use crate::error::Result;
use crate::tensors::{compute_kind, prepare};
use tch::{Kind, Tensor};

pub fn naive(phi_q: &Tensor, phi_k: &Tensor, v: &Tensor, cfg: &LinearAttnConfig) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(phi_q, phi_k, v)?;
    let kind = compute_kind("v", v)?;
    let q = prepare(phi_q, kind, s.heads);
    let k = prepare(phi_k, kind, s.heads);
    let values = prepare(v, kind, s.heads);

    let future = Tensor::ones([s.len, s.len], (Kind::Bool, v.device())).triu(1);
    let a = q.matmul(&k.transpose(-1, -2)).masked_fill(&future, 0.0); // (b, h, L, L)
    let y = a.matmul(&values) / (a.sum_dim_intlist(-1, true, kind) + cfg.eps);
    Ok(y.to_kind(v.kind()))
}
