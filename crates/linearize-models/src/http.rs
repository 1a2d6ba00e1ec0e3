//! HTTP downloads that are checked before they are kept: the body streams into a temporary
//! sibling of the destination while its size is counted and its SHA-256 computed, and only a
//! body of the expected size and digest is renamed into place. Nothing downloaded is read,
//! unpacked or run before that.
use crate::atomic;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

/// How long a read may stall before the download counts as failed.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// An HTTP client that trusts the system's certificate store (so a site's or a proxy's own CA,
/// as pip and curl see it, works too) and gives up connecting after `connect_timeout`.
pub fn agent(connect_timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(connect_timeout)
        .timeout_read(READ_TIMEOUT)
        .build()
}

/// What a download must be to be kept.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// Exact length in bytes; the download stops one byte past it.
    pub size: Option<u64>,
    /// Lower-case hex SHA-256.
    pub sha256: Option<&'a str>,
}

/// Lower-case hex of 64 digits, as a SHA-256 is written.
pub fn is_sha256_hex(s: &str) -> bool {
    is_lower_hex(s, 64)
}

/// `s` is exactly `len` lower-case hex digits (git commit and blob ids: 40).
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Sends `request` and writes the body to `dest` atomically if it matches `expected`; else
/// nothing is written and the error names `name` (the file as the user knows it).
pub fn download_verified(
    request: ureq::Request,
    dest: &Path,
    name: &str,
    expected: Expected,
) -> Result<()> {
    let response = request.call().map_err(|e| match e {
        ureq::Error::Status(code, _) => anyhow::anyhow!("{name}: the server answered HTTP {code}"),
        // Kept as it is, so that callers can tell an unreachable server from a refusal.
        ureq::Error::Transport(t) => anyhow::Error::new(t),
    })?;
    let announced = response
        .header("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok());
    let bar = progress_bar(name, expected.size.or(announced));
    // One byte past the expected size is enough to know it is too long.
    let limit = expected.size.map_or(u64::MAX, |size| size + 1);
    let mut body = response.into_reader().take(limit);
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    // Set when the body is refused, so the error names the file rather than its temporary name.
    let mut refused = None;
    let result = atomic::write_file_with(dest, |file| {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = body
                .read(&mut buf)
                .with_context(|| format!("{name}: reading the download"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])?;
            written += n as u64;
            if let Some(bar) = &bar {
                bar.set_position(written);
            }
        }
        if let Some(size) = expected.size.filter(|&s| s != written) {
            let got = if written > size {
                format!("more than {size}")
            } else {
                written.to_string()
            };
            refused = Some(format!(
                "{name}: downloaded {got} bytes, the server listed {size}; refused"
            ));
        }
        if let Some(want) = expected.sha256 {
            let got = hex(&hasher.clone().finalize());
            if refused.is_none() && got != want {
                refused = Some(format!(
                    "{name}: SHA-256 of the download is {got}, expected {want}; refused"
                ));
            }
        }
        match &refused {
            Some(why) => bail!("{why}"),
            None => Ok(()),
        }
    });
    if let Some(why) = refused {
        bail!("{why}");
    }
    result?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

fn progress_bar(name: &str, len: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        tracing::info!("downloading {name}");
        return None;
    }
    let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("the template is valid")
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(name.to_owned());
    Some(bar)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whitespace (newlines included) collapsed to single spaces: errors stay on one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
