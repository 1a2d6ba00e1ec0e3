//! Logging: to stderr at the level `-q` / `-v` / `RUST_LOG` choose, in colour only on a terminal
//! and never under `NO_COLOR`; and, once a job has a run directory, a plain copy at info level (or
//! `RUST_LOG`'s) appended to its `run.log`.
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// The job's log file in its run directory.
pub const RUN_LOG: &str = "run.log";

/// The open `run.log`, once a job has one; records before that go to stderr only.
static RUN_LOG_FILE: Mutex<Option<File>> = Mutex::new(None);

/// Writes to the open `run.log`, or nowhere.
struct RunLogWriter;

impl Write for RunLogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(file) = RUN_LOG_FILE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            file.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match RUN_LOG_FILE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

/// Whether stderr gets ANSI colour: a terminal, and no `NO_COLOR` (https://no-color.org).
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The stderr level: `RUST_LOG` if set, else `default` moved by `-q` (warnings and errors only)
/// or each `-v` (debug, then trace).
fn stderr_filter(default: &str, quiet: bool, verbose: u8) -> EnvFilter {
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        return filter;
    }
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => default,
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    EnvFilter::new(level)
}

/// Installs the subscriber; `default` is the stderr level without flags (`warn` for ranks other
/// than 0 of a data-parallel job).
pub fn init(default: &str, quiet: bool, verbose: u8) {
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .with_filter(stderr_filter(default, quiet, verbose));
    let file_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let file = fmt::layer()
        .with_writer(|| RunLogWriter)
        .with_ansi(false)
        .with_filter(file_filter);
    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .init();
}

/// From now on the log also goes to `run_dir/run.log` (appended: a resumed job continues it).
pub fn open_run_log(run_dir: &Path) -> Result<()> {
    let path = run_dir.join(RUN_LOG);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    *RUN_LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    Ok(())
}
