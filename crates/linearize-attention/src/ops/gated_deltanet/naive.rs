//! Reference: the definition token by token, `S_t = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t`
//! with the (d_k, d_k) transition matrix built explicitly (tests, short inputs; exact in f64).
use super::{check_inputs, check_values};
use crate::error::Result;
use crate::tensors::{compute_kind, prepare};
use tch::Tensor;

pub fn naive(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let s = check_inputs(q, k, v, g, beta)?;
    check_values(g, beta)?;
    let kind = compute_kind("v", v)?;
    let h = s.heads;
    let (q, k, v) = (
        prepare(q, kind, h),
        prepare(k, kind, h),
        prepare(v, kind, h),
    );
    // (b, h, L, 1, 1): scalars per head and token, broadcast over the state.
    let per_token = |x: &Tensor| prepare(x, kind, h).unsqueeze(-1).unsqueeze(-1);
    let (alpha, beta) = (per_token(g).exp(), per_token(beta));
    let eye = Tensor::eye(s.key_dim, (kind, v.device()));
    let mut state = Tensor::zeros([s.batch, h, s.key_dim, s.value_dim], (kind, v.device()));
    let mut outputs = Vec::with_capacity(s.len as usize);
    for t in 0..s.len {
        let (q_t, k_t, v_t) = (q.narrow(2, t, 1), k.narrow(2, t, 1), v.narrow(2, t, 1)); // (b, h, 1, d)
        let (alpha_t, beta_t) = (alpha.select(2, t), beta.select(2, t)); // (b, h, 1, 1)
        let k_col = k_t.transpose(-1, -2); // (b, h, d_k, 1)
        let transition = &eye - &beta_t * k_col.matmul(&k_t); // (b, h, d_k, d_k)
        state = alpha_t * transition.matmul(&state) + beta_t * k_col.matmul(&v_t);
        outputs.push(q_t.matmul(&state)); // (b, h, 1, d_v)
    }
    Ok(Tensor::cat(&outputs, 2).to_kind(v.kind()))
}
