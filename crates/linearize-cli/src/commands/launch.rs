//! `linearize launch --nproc-per-node N [--master-port P] -- <linearize args>`: data-parallel
//! training on the GPUs of one machine, like `torchrun --standalone`.
//!
//! Starts N copies of this binary with torchrun's environment (`RANK = LOCAL_RANK = i`,
//! `WORLD_SIZE = LOCAL_WORLD_SIZE = N`, `MASTER_ADDR = 127.0.0.1`, `MASTER_PORT`), each in its own
//! process group so that a Ctrl-C at the terminal reaches the launcher alone, which forwards
//! SIGTERM/SIGINT to every rank exactly once (a second forwarded signal still stops them at once,
//! as for a single process). The children die with the launcher (`PR_SET_PDEATHSIG`).
//!
//! When a rank exits with a non-zero status, the others normally stop by themselves within
//! moments (their collectives fail naming that rank, or they reached the same preemption point);
//! any still running after `--grace` seconds are killed. The launcher exits with the first
//! failing rank's status (75 for a preempted job, 128 + signal for a killed rank), 0 when all
//! succeed.
use anyhow::{ensure, Context, Result};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Processes to start on this machine: one per GPU.
    #[arg(long)]
    nproc_per_node: usize,
    /// Port of rank 0's rendezvous socket (default: a free port).
    #[arg(long)]
    master_port: Option<u16>,
    /// Seconds the other ranks get to stop by themselves after one fails, before they are killed.
    #[arg(long, default_value_t = 15.0)]
    grace: f64,
    /// The arguments of every rank's `linearize` (after `--`), e.g. `--recipe FILE`.
    #[arg(last = true, required = true, num_args = 1..)]
    args: Vec<String>,
}

/// Runs the ranks; returns the exit status the launcher should end with.
pub fn run(args: Args) -> Result<i32> {
    ensure!(
        args.nproc_per_node >= 1,
        "--nproc-per-node must be at least 1"
    );
    ensure!(
        args.grace.is_finite() && args.grace >= 0.0,
        "--grace must be a number of seconds"
    );
    let exe = std::env::current_exe().context("locating the linearize binary")?;
    let port = match args.master_port {
        Some(port) => port,
        None => free_port()?,
    };
    // Registered before the children start, so that no signal is lost in between.
    let pending = Arc::new(AtomicUsize::new(0));
    for signal in [libc::SIGTERM, libc::SIGINT] {
        signal_hook::flag::register_usize(signal, pending.clone(), signal as usize)
            .context("installing the signal handlers")?;
    }
    let n = args.nproc_per_node;
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut command = Command::new(&exe);
        command
            .args(&args.args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child when
        // the launcher dies, so no rank outlives it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        match command.spawn() {
            Ok(child) => children.push(Some(child)),
            Err(e) => {
                kill_all(&mut children, libc::SIGKILL);
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        }
    }
    eprintln!(
        "linearize launch: {n} ranks on 127.0.0.1:{port} (pids {})",
        children
            .iter()
            .flatten()
            .map(|c| c.id().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let grace = Duration::from_secs_f64(args.grace);
    let mut first_failure: Option<i32> = None;
    let mut kill_at: Option<Instant> = None;
    loop {
        let signal = pending.swap(0, Ordering::SeqCst);
        if signal != 0 {
            eprintln!(
                "linearize launch: forwarding {} to every rank",
                signal_name(signal as i32)
            );
            kill_all(&mut children, signal as i32);
        }
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let Some(status) = child.try_wait().context("waiting for a rank")? else {
                continue;
            };
            let code = exit_code(status);
            if code != 0 {
                eprintln!(
                    "linearize launch: rank {rank} (pid {}) {}",
                    child.id(),
                    describe(status)
                );
                if first_failure.is_none() {
                    first_failure = Some(code);
                    kill_at = Some(Instant::now() + grace);
                }
            }
            *slot = None;
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            let left: Vec<usize> = (0..n).filter(|&r| children[r].is_some()).collect();
            eprintln!(
                "linearize launch: ranks {left:?} did not stop within {} s of the failure: killing them",
                args.grace
            );
            kill_all(&mut children, libc::SIGKILL);
            kill_at = None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(first_failure.unwrap_or(0))
}

fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free rendezvous port")?;
    Ok(listener.local_addr()?.port())
}

fn kill_all(children: &mut [Option<Child>], signal: i32) {
    for child in children.iter().flatten() {
        // SAFETY: plain kill(2) on a child we have not reaped yet (its pid is still ours).
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
    }
}

/// The shell's convention: the exit code, or 128 + the signal that ended the process.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(75), _) => "stopped after saving its state (status 75: preempted)".to_owned(),
        (Some(code), _) => format!("failed with status {code}"),
        (None, Some(signal)) => format!("was killed by {}", signal_name(signal)),
        _ => "ended abnormally".to_owned(),
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGKILL => "SIGKILL (signal 9)".into(),
        libc::SIGSEGV => "SIGSEGV (signal 11)".into(),
        libc::SIGABRT => "SIGABRT (signal 6)".into(),
        other => format!("signal {other}"),
    }
}
