//! libtorch operations that tch does not bind, through a small C++ shim (`csrc/`): the fused
//! multi-tensor AdamW step (`_fused_adamw_`), the multi-tensor copy (`_foreach_copy_`), CUDA
//! graphs (`at::cuda::CUDAGraph`) and the Kineto profiler; and the fused LoLCATs, normalised
//! linear attention and GLA kernels, written in Triton and compiled ahead of time.
pub mod adamw;
pub mod cuda_graph;
pub mod gla;
pub mod linear_attn;
pub mod lolcats;
pub mod profiler;
pub mod torch_error;
mod triton;

pub use adamw::{foreach_copy, fused_adamw, AdamWStep};
pub use cuda_graph::CudaGraph;

use anyhow::{bail, Result};
use std::ffi::{c_char, c_int};

/// Runs a shim call that reports failure by a non-zero return and a message in its buffer.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut err = vec![0u8; 2048];
    if f(err.as_mut_ptr().cast(), err.len()) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    bail!("{what}: {}", String::from_utf8_lossy(&err[..end]).trim())
}
