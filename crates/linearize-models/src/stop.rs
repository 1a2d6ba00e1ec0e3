//! A process-wide request to stop, which long loops anywhere poll between units of work (a
//! document tokenised, a batch evaluated or sampled, a tensor exported), so that a job stops
//! within one unit of a signal. linearize-train's `Preemption` guard raises it from its SIGTERM
//! and SIGINT handlers; without a guard it is never raised and [`check`] always passes.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

static REQUEST: LazyLock<Arc<AtomicUsize>> = LazyLock::new(|| Arc::new(AtomicUsize::new(0)));

/// The error a phase returns when it stops on a request; the binary maps it to exit status 75
/// (find it with `anyhow::Error::downcast_ref`: contexts added on the way keep it findable).
#[derive(Debug, thiserror::Error)]
#[error("stopped by {} after saving state; run the same command again to resume", signal_name(*.signal))]
pub struct Preempted {
    /// The signal number (SIGTERM = 15, SIGINT = 2).
    pub signal: i32,
}

/// The flag signal handlers store the signal number into (0: no request).
pub fn request_flag() -> Arc<AtomicUsize> {
    REQUEST.clone()
}

/// The signal that asked to stop, if one did.
pub fn requested() -> Option<i32> {
    match REQUEST.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal as i32),
    }
}

/// Fails with [`Preempted`] once a stop was requested.
pub fn check() -> Result<(), Preempted> {
    match requested() {
        Some(signal) => Err(Preempted { signal }),
        None => Ok(()),
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        15 => "SIGTERM".to_owned(),
        2 => "SIGINT".to_owned(),
        other => format!("signal {other}"),
    }
}
