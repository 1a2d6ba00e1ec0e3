//! libtorch's Kineto profiler, which tch does not bind (`csrc/profiler.cpp`): [`Profiler::start`]
//! records every aten operator and, on CUDA, every kernel, copy and memset with its GPU time;
//! [`range`] marks a named span (a `record_function` range). The trace is Chrome's trace-event
//! JSON (chrome://tracing, Perfetto); `linearize-profile` summarises it.
use crate::call;
use anyhow::{ensure, Context, Result};
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

mod ffi {
    use super::*;
    extern "C" {
        pub fn linearize_profiler_start(
            cuda: c_int,
            memory: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn linearize_profiler_stop(
            trace_path: *const c_char,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn linearize_range_push(name: *const c_char) -> *mut c_void;
        pub fn linearize_range_pop(range: *mut c_void);
    }
}

/// One profiler per process: libtorch keeps its state in globals.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// A running profile; [`Profiler::finish`] writes its trace. Dropping it unfinished stops the
/// profiler and discards the trace.
pub struct Profiler {
    finished: bool,
}

impl Profiler {
    /// Starts recording operators (and GPU activity when `cuda`) on this process.
    pub fn start(cuda: bool) -> Result<Self> {
        Self::start_with(cuda, false)
    }

    /// [`Profiler::start`], also recording every allocation and free of this thread (and the
    /// threads its operators use) as a `[memory]` event with its size (`args.Bytes`, negative
    /// for a free) and device (`args["Device Type"]`, 0 for the CPU).
    pub fn start_recording_memory(cuda: bool) -> Result<Self> {
        Self::start_with(cuda, true)
    }

    fn start_with(cuda: bool, memory: bool) -> Result<Self> {
        ensure!(
            !RUNNING.swap(true, Ordering::SeqCst),
            "a profiler is already running in this process"
        );
        let started = call("starting libtorch's profiler", |err, len| unsafe {
            ffi::linearize_profiler_start(c_int::from(cuda), c_int::from(memory), err, len)
        });
        if started.is_err() {
            RUNNING.store(false, Ordering::SeqCst);
        }
        started.map(|()| Self { finished: false })
    }

    /// Stops recording and writes the trace to `path` (atomically: a temporary file in the same
    /// directory, renamed into place).
    pub fn finish(mut self, path: &Path) -> Result<()> {
        self.finished = true;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".trace")
            .suffix(".json.tmp")
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary trace in {}", dir.display()))?;
        let tmp_path = CString::new(tmp.path().as_os_str().as_encoded_bytes())
            .context("trace path contains a NUL byte")?;
        let stopped = call("stopping libtorch's profiler", |err, len| unsafe {
            ffi::linearize_profiler_stop(tmp_path.as_ptr(), err, len)
        });
        RUNNING.store(false, Ordering::SeqCst);
        stopped?;
        tmp.persist(path)
            .with_context(|| format!("writing the trace {}", path.display()))?;
        Ok(())
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if !self.finished {
            let discard = std::env::temp_dir().join(format!(
                "linearize-discarded-trace-{}.json",
                std::process::id()
            ));
            let Ok(path) = CString::new(discard.as_os_str().as_encoded_bytes()) else {
                return;
            };
            let _ = call("stopping libtorch's profiler", |err, len| unsafe {
                ffi::linearize_profiler_stop(path.as_ptr(), err, len)
            });
            let _ = std::fs::remove_file(discard);
            RUNNING.store(false, Ordering::SeqCst);
        }
    }
}

/// A named span, open until dropped. Costs one small allocation when no profiler runs.
#[must_use = "the range closes when this guard is dropped"]
pub struct Range(*mut c_void);

/// Opens a range named `name` on this thread (names with a NUL byte are cut at it).
pub fn range(name: &str) -> Range {
    let name = CString::new(name.split('\0').next().unwrap_or_default()).unwrap_or_default();
    Range(unsafe { ffi::linearize_range_push(name.as_ptr()) })
}

impl Drop for Range {
    fn drop(&mut self) {
        if !self.0.is_null() {
            unsafe { ffi::linearize_range_pop(self.0) }
        }
    }
}
