//! What the benchmarks share: the machine's description, device synchronisation and timing,
//! child processes that measure one case each, and the JSON output.
use super::memory::CudaDriver;
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use tch::Device;

pub const GIB: f64 = (1u64 << 30) as f64;
pub const MIB: f64 = (1u64 << 20) as f64;

pub fn device_arg(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    }
}

/// The machine, in words.
pub fn machine(device: Device) -> Result<String> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let host = format!(
        "{cpu}, {cores} logical cores, {} torch threads",
        tch::get_num_threads()
    );
    Ok(match device {
        Device::Cuda(i) => format!(
            "{} (cuda:{i}); host {host}",
            CudaDriver::load()?.device_name(i)?
        ),
        _ => host,
    })
}

pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median wall time of `iters` runs of `f`, each bracketed by device synchronisation.
pub fn median_ms(iters: usize, device: Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        synchronize(device);
        let start = Instant::now();
        f()?;
        synchronize(device);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// This binary, to run one case in a child process.
pub fn self_command() -> Result<Command> {
    let exe = std::env::current_exe().context("locating the linearize binary")?;
    Ok(Command::new(exe))
}

/// Runs a child that prints its report as the last line of stdout: the report, or why the
/// child failed (its last line of stderr and its exit status).
pub fn run_child(mut cmd: Command, what: &str) -> Result<std::result::Result<Value, String>> {
    let out = cmd
        .output()
        .with_context(|| format!("running a benchmark child for {what}"))?;
    if !out.status.success() {
        let reason = failure_reason(&String::from_utf8_lossy(&out.stderr));
        return Ok(Err(format!("{reason} ({})", out.status)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("benchmark child for {what} printed nothing"))?;
    let report = serde_json::from_str(line)
        .with_context(|| format!("benchmark child for {what} printed {line:?}"))?;
    Ok(Ok(report))
}

/// The line of a failed child's stderr that says why: an out-of-memory message, else a panic's
/// message (the line after "panicked at"), else the last line that is not a backtrace note.
fn failure_reason(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let oom = lines.iter().find(|l| l.contains("out of memory"));
    let panic = lines
        .iter()
        .position(|l| l.contains("panicked at"))
        .and_then(|i| lines.get(i + 1));
    let last = lines.iter().rev().find(|l| {
        !l.starts_with("note:") && !l.starts_with("stack backtrace") && !l.starts_with("at ")
    });
    let reason = oom.or(panic).or(last).copied().unwrap_or("no output");
    reason.chars().take(200).collect()
}

/// Writes a report as pretty JSON, atomically.
pub fn write_json(path: &Path, report: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(report)? + "\n";
    linearize_models::atomic::write_file(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(path = %path.display(), "wrote results");
    Ok(())
}

/// A number for a table: `value / scale` with `digits` decimals, or a dash.
pub fn cell(value: &Value, scale: f64, digits: usize) -> String {
    value
        .as_f64()
        .map(|x| format!("{:.*}", digits, x / scale))
        .unwrap_or_else(|| "–".into())
}

/// A throughput with the batch size that reached it, `tokens/s (batch)`, or a dash when either
/// was not measured.
pub fn with_batch(tokens_per_s: &Value, batch: &Value, digits: usize) -> String {
    match (tokens_per_s.as_f64(), batch.as_u64()) {
        (Some(t), Some(b)) => format!("{t:.digits$} ({b})"),
        _ => "–".into(),
    }
}

/// A child's `--worker` spec `CASE:LENGTH`: one value of a case enum and a length.
pub fn parse_worker_spec<E: clap::ValueEnum>(spec: &str) -> Result<(E, i64)> {
    let (case, len) = spec
        .split_once(':')
        .with_context(|| format!("--worker {spec:?}: expected CASE:LENGTH"))?;
    let case =
        E::from_str(case, false).map_err(|e| anyhow::anyhow!("--worker case {case:?}: {e}"))?;
    let len = len
        .parse()
        .with_context(|| format!("--worker length {len:?}"))?;
    Ok((case, len))
}

#[cfg(test)]
mod tests {
    use super::{failure_reason, with_batch};
    use serde_json::json;

    #[test]
    fn unmeasured_cells_are_a_dash_not_null() {
        assert_eq!(with_batch(&json!(812.4), &json!(16), 0), "812 (16)");
        assert_eq!(with_batch(&json!(null), &json!(null), 0), "–");
        assert_eq!(with_batch(&json!(812.4), &json!(null), 0), "–");
    }

    #[test]
    fn failure_reasons_name_memory_then_panics_then_the_last_line() {
        let oom = "thread 'main' panicked at src/x.rs:1:2:\nTorch(\"CUDA out of memory. Tried to \
                   allocate 2.00 GiB\")\nnote: run with `RUST_BACKTRACE=1`";
        assert!(failure_reason(oom).starts_with("Torch(\"CUDA out of memory"));
        let panic = "thread 'main' panicked at src/x.rs:1:2:\nindex out of range\n\
                     stack backtrace:\n   0: foo\n             at src/x.rs:1\n\
                     note: Some details are omitted";
        assert_eq!(failure_reason(panic), "index out of range");
        assert_eq!(
            failure_reason("Error: no such file\n"),
            "Error: no such file"
        );
        assert_eq!(failure_reason(""), "no output");
    }
}
