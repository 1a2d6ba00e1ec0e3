//! CUDA graphs: the kernels one piece of work launches, captured once and replayed with a single
//! launch. Replays read and write the very tensors the capture saw, so inputs change by copying
//! into them and the captured code must not depend on host values that change between replays.
use crate::call;
use crate::torch_error;
use anyhow::{anyhow, bail, Result};
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

mod ffi {
    use super::*;
    pub type Body = unsafe extern "C" fn(ctx: *mut c_void) -> c_int;
    extern "C" {
        pub fn linearize_cuda_graph_capture(
            device: c_int,
            body: Body,
            ctx: *mut c_void,
            graph: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn linearize_cuda_graph_replay(
            graph: *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn linearize_cuda_graph_free(graph: *mut c_void);
    }
}

/// A captured graph (`at::cuda::CUDAGraph`). Tensors allocated while capturing live in the
/// graph's private memory pool, which it keeps while it lives.
pub struct CudaGraph {
    raw: NonNull<c_void>,
}

// The graph is a handle to device work; libtorch allows replaying it from any thread.
unsafe impl Send for CudaGraph {}

/// What the capture runs, and how it ended.
struct Body<'a> {
    run: &'a mut dyn FnMut() -> Result<()>,
    outcome: Option<Result<()>>,
}

unsafe extern "C" fn run_body(ctx: *mut c_void) -> c_int {
    let body = &mut *ctx.cast::<Body>();
    let outcome = catch_unwind(AssertUnwindSafe(|| (body.run)())).unwrap_or_else(|panic| {
        let message = torch_error::panic_message(panic.as_ref()).unwrap_or("unknown panic");
        match torch_error::libtorch_first_line(message) {
            Some(line) => Err(anyhow!("libtorch: {line}")),
            None => Err(anyhow!("{message}")),
        }
    });
    let failed = outcome.is_err();
    body.outcome = Some(outcome);
    c_int::from(failed)
}

impl CudaGraph {
    /// Captures the work `run` launches on CUDA device `device`. `run` executes once, on a side
    /// stream in capture mode, where nothing it launches actually runs: it must not read device
    /// values on the host (that would wait for work that is never done) and should follow an
    /// eager run of the same work, which does libtorch's and cuBLAS's lazy set-up.
    pub fn capture(device: usize, mut run: impl FnMut() -> Result<()>) -> Result<Self> {
        let mut body = Body {
            run: &mut run,
            outcome: None,
        };
        let mut raw: *mut c_void = std::ptr::null_mut();
        let device = c_int::try_from(device)?;
        let ctx: *mut c_void = (&mut body as *mut Body).cast();
        let captured = call("capturing a CUDA graph", |err, len| unsafe {
            ffi::linearize_cuda_graph_capture(device, run_body, ctx, &mut raw, err, len)
        });
        // A failed body (the shim's return 2) carries its own error.
        if let Some(Err(e)) = body.outcome {
            return Err(e.context("the work captured into a CUDA graph failed"));
        }
        captured?;
        match NonNull::new(raw) {
            Some(raw) => Ok(Self { raw }),
            None => bail!("capturing a CUDA graph returned no graph"),
        }
    }

    /// Launches the captured work once on the current stream.
    pub fn replay(&self) -> Result<()> {
        call("replaying a CUDA graph", |err, len| unsafe {
            ffi::linearize_cuda_graph_replay(self.raw.as_ptr(), err, len)
        })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        unsafe { ffi::linearize_cuda_graph_free(self.raw.as_ptr()) }
    }
}
