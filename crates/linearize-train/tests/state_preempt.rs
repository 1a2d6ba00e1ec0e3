//! SIGTERM/SIGINT handling. Signal handlers are process-wide, so these tests live in their own
//! binary; the cases that end the process run in a child process.
use linearize_train::state::{Preempted, Preemption, EXIT_PREEMPTED};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::low_level::raise;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};

const CHILD_ENV: &str = "LINEARIZE_PREEMPT_CHILD";

#[test]
fn first_signal_only_raises_the_flag() {
    let guard = Preemption::install().unwrap();
    assert_eq!(guard.requested(), None);
    raise(SIGTERM).unwrap();
    assert_eq!(guard.requested(), Some(SIGTERM));
    assert!(Preemption::install().is_err(), "one guard at a time");
    drop(guard);

    let guard = Preemption::install().unwrap();
    assert_eq!(guard.requested(), None, "a new guard starts clear");
    raise(SIGINT).unwrap();
    assert_eq!(guard.requested(), Some(SIGINT));

    let err = anyhow::Error::from(Preempted { signal: SIGINT });
    assert!(err.to_string().contains("stopped by SIGINT"));
    assert_eq!(
        err.downcast_ref::<Preempted>().map(|p| p.signal),
        Some(SIGINT)
    );
    assert_eq!(EXIT_PREEMPTED, 75);
}

/// In a child process (re-running one test of this binary), does what `mode` says; a child
/// that is still alive afterwards exits 0.
fn child(mode: &str) -> ! {
    match mode {
        "twice" => {
            let _guard = Preemption::install().unwrap();
            raise(SIGTERM).unwrap();
            raise(SIGTERM).unwrap();
        }
        "after-guard" => {
            drop(Preemption::install().unwrap());
            raise(SIGTERM).unwrap();
        }
        other => panic!("unknown mode {other}"),
    }
    std::process::exit(0)
}

fn run_in_child(test: &str, mode: &str) -> ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .status()
        .unwrap()
}

#[test]
fn second_signal_stops_the_process_at_once() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
    }
    let status = run_in_child("second_signal_stops_the_process_at_once", "twice");
    assert_eq!(status.code(), Some(128 + SIGTERM), "{status:?}");
}

#[test]
fn signals_have_their_default_action_without_a_guard() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
    }
    let status = run_in_child(
        "signals_have_their_default_action_without_a_guard",
        "after-guard",
    );
    assert_eq!(status.signal(), Some(SIGTERM), "{status:?}");
}
