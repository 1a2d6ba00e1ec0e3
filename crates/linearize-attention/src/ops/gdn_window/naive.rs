//! Reference: the definition as written. The softmax term from the L x L window-and-sinks mask;
//! the delta rule token by token with its (d_k, d_k) transition matrix built explicitly, every
//! state kept, and query t reading the state after token t−w aged by the sum of the w gates
//! since (tests, short inputs; exact in f64).
use super::{check_inputs, without_sink_writes, GdnWindowConfig, GdnWindowInputs};
use crate::error::Result;
use crate::ops::gated_deltanet::check_values;
use crate::ops::swa;
use crate::tensors::{compute_kind, prepare};
use tch::Tensor;

pub fn naive(x: &GdnWindowInputs, cfg: &GdnWindowConfig) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    check_values(x.g, x.beta)?;
    let kind = compute_kind("v", x.v)?;
    let (h, len, w) = (s.heads(), s.window.len, cfg.window_size);
    let window = swa::naive(x.q, x.k, x.v, &cfg.swa())?.to_kind(kind); // (b, h, L, d_v)

    let (q, k, v) = (
        prepare(x.delta_q, kind, h),
        prepare(x.delta_k, kind, h),
        prepare(x.v, kind, h),
    );
    let g = prepare(x.g, kind, h); // (b, h, L)
    let per_token = |t: &Tensor| t.unsqueeze(-1).unsqueeze(-1); // (b, h, L, 1, 1)
    let alpha = per_token(&g).exp();
    let beta = per_token(&prepare(
        &without_sink_writes(x.beta, 0, cfg.sinks),
        kind,
        h,
    ));
    let eye = Tensor::eye(s.delta.key_dim, (kind, v.device()));
    let mut state = Tensor::zeros(
        [s.delta.batch, h, s.delta.key_dim, s.delta.value_dim],
        (kind, v.device()),
    );
    let mut states = Vec::with_capacity(len as usize); // S_s after token s
    let mut memory = Vec::with_capacity(len as usize);
    for t in 0..len {
        if t >= w {
            // The tokens up to t−w, aged by the gates of t−w+1 ..= t.
            let lag = g.narrow(2, t - w + 1, w).sum_dim_intlist(-1, false, kind); // (b, h)
            let aged = lag.exp().unsqueeze(-1).unsqueeze(-1) * &states[(t - w) as usize];
            memory.push(q.narrow(2, t, 1).matmul(&aged)); // (b, h, 1, d_v)
        } else {
            memory.push(Tensor::zeros(
                [s.delta.batch, h, 1, s.delta.value_dim],
                (kind, v.device()),
            ));
        }
        let (k_t, v_t) = (k.narrow(2, t, 1), v.narrow(2, t, 1)); // (b, h, 1, d)
        let (alpha_t, beta_t) = (alpha.select(2, t), beta.select(2, t)); // (b, h, 1, 1)
        let k_col = k_t.transpose(-1, -2); // (b, h, d_k, 1)
        let transition = &eye - &beta_t * k_col.matmul(&k_t); // (b, h, d_k, d_k)
        state = alpha_t * transition.matmul(&state) + beta_t * k_col.matmul(&v_t);
        states.push(state.shallow_clone());
    }
    let memory = Tensor::cat(&memory, 2); // (b, h, L, d_v)
    let scale = x.delta_scale.to_kind(kind).reshape([1, h, 1, 1]);
    Ok((window + scale * memory).to_kind(x.v.kind()))
}
