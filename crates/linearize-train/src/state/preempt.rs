//! Graceful preemption. Clusters preempt a job with SIGTERM (and users stop it with Ctrl-C); while
//! a [`Preemption`] guard is alive the first SIGTERM/SIGINT only raises the process-wide stop
//! request ([`linearize_models::stop`]), which the training loop polls between steps to save a
//! state and stop with [`Preempted`], and every other long phase between its units of work. The binary then exits
//! with [`EXIT_PREEMPTED`]. A second signal while the first is being handled ends the process at
//! once with the shell's usual `128 + signal` status; outside the guard the signals keep their
//! default action.
use anyhow::{ensure, Result};
pub use linearize_models::stop::Preempted;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Exit status of a job stopped by a signal after saving its state: `EX_TEMPFAIL` from
/// sysexits.h, "temporary failure, run me again". Schedulers and wrapper scripts can requeue on
/// it; running the same command again resumes from the saved state.
pub const EXIT_PREEMPTED: i32 = 75;

/// Process-wide handler state, registered once: signal-hook cannot restore a default action, so
/// instead the handlers consult `inactive` and emulate the default action while no guard lives.
struct Handlers {
    inactive: Arc<AtomicBool>,
    armed: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    guard_alive: AtomicBool,
}

static HANDLERS: OnceLock<Handlers> = OnceLock::new();
static REGISTERING: Mutex<()> = Mutex::new(());

fn handlers() -> Result<&'static Handlers> {
    let _registering = REGISTERING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handlers) = HANDLERS.get() {
        return Ok(handlers);
    }
    let handlers = Handlers {
        inactive: Arc::new(AtomicBool::new(true)),
        armed: Arc::new(AtomicBool::new(false)),
        received: linearize_models::stop::request_flag(),
        guard_alive: AtomicBool::new(false),
    };
    // Order matters: each action sees the flags as the previous ones left them.
    for signal in [SIGTERM, SIGINT] {
        flag::register_conditional_default(signal, handlers.inactive.clone())?;
        flag::register_conditional_shutdown(signal, 128 + signal, handlers.armed.clone())?;
        flag::register(signal, handlers.armed.clone())?;
        flag::register_usize(signal, handlers.received.clone(), signal as usize)?;
    }
    Ok(HANDLERS.get_or_init(|| handlers))
}

/// While alive, SIGTERM and SIGINT request a graceful stop instead of killing the process.
pub struct Preemption {
    handlers: &'static Handlers,
}

impl Preemption {
    /// Starts catching SIGTERM and SIGINT. Only one guard may be alive at a time.
    pub fn install() -> Result<Self> {
        let handlers = handlers()?;
        ensure!(
            !handlers.guard_alive.swap(true, Ordering::SeqCst),
            "a preemption guard is already installed"
        );
        handlers.received.store(0, Ordering::SeqCst);
        handlers.armed.store(false, Ordering::SeqCst);
        handlers.inactive.store(false, Ordering::SeqCst);
        Ok(Self { handlers })
    }

    /// The signal that asked the job to stop, if one arrived.
    pub fn requested(&self) -> Option<i32> {
        match self.handlers.received.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal as i32),
        }
    }
}

impl Drop for Preemption {
    fn drop(&mut self) {
        self.handlers.inactive.store(true, Ordering::SeqCst);
        self.handlers.received.store(0, Ordering::SeqCst);
        self.handlers.guard_alive.store(false, Ordering::SeqCst);
    }
}
