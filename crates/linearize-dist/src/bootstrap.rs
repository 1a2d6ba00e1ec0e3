//! The rendezvous: rank 0 listens on `MASTER_PORT` (all interfaces), every other rank connects to
//! `MASTER_ADDR:MASTER_PORT` (retrying until the timeout: ranks start in any order), says who it
//! is and what job it runs; rank 0 checks that every rank came once, with the same world size,
//! backend and job fingerprint, then sends each the payload (NCCL's unique id). A missing rank, a
//! duplicate or a different job is an error on every rank that names the rank.
//!
//! The connections stay open afterwards (a star through rank 0): the CPU backend moves tensors
//! over them, the NCCL backend watches them to notice a peer that died.
use crate::launch::Launch;
use crate::wire::{self, Kind, Received};
use anyhow::{bail, ensure, Context, Result};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"LNZDIST1";

/// What every rank must agree on.
#[derive(Debug, Clone)]
pub struct Hello {
    /// Which backend the rank will use (`nccl`, `tcp`).
    pub backend: String,
    /// Identifies the job (e.g. the recipe hash); ranks with another fingerprint are refused.
    pub fingerprint: String,
}

/// Open connections after the rendezvous: on rank 0 one per other rank (index = rank, `None` at
/// 0), on the others one to rank 0.
pub struct Links {
    pub rank: usize,
    pub world_size: usize,
    pub peers: Vec<Option<TcpStream>>,
}

impl Links {
    /// `(peer rank, stream)` of every open link.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut TcpStream)> {
        self.peers
            .iter_mut()
            .enumerate()
            .filter_map(|(r, s)| s.as_mut().map(|s| (r, s)))
    }
}

fn encode_hello(launch: &Launch, hello: &Hello) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for n in [launch.rank as u64, launch.world_size as u64] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    for s in [&hello.backend, &hello.fingerprint] {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out
}

fn decode_hello(bytes: &[u8]) -> Option<(usize, usize, String, String)> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let u64_at = |b: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    let rank = u64_at(rest, 0)? as usize;
    let world = u64_at(rest, 8)? as usize;
    let mut at = 16;
    let mut strings = Vec::new();
    for _ in 0..2 {
        let len = u64_at(rest, at)? as usize;
        at += 8;
        strings.push(String::from_utf8(rest.get(at..at + len)?.to_vec()).ok()?);
        at += len;
    }
    let fingerprint = strings.pop()?;
    let backend = strings.pop()?;
    Some((rank, world, backend, fingerprint))
}

/// Runs the rendezvous of `launch` within `timeout`. Rank 0 calls `payload` once every rank is
/// there and checked, and sends its bytes to all; every rank returns them with its links.
pub fn rendezvous(
    launch: &Launch,
    hello: &Hello,
    timeout: Duration,
    payload: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<(Links, Vec<u8>)> {
    ensure!(
        launch.world_size > 1,
        "a rendezvous needs at least two ranks"
    );
    if launch.is_main() {
        serve(launch, hello, timeout, payload)
    } else {
        join(launch, hello, timeout)
    }
}

fn serve(
    launch: &Launch,
    hello: &Hello,
    timeout: Duration,
    payload: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<(Links, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let bind: SocketAddr = if launch.master_addr.contains(':') {
        SocketAddr::from(([0u16; 8], launch.master_port))
    } else {
        SocketAddr::from(([0u8; 4], launch.master_port))
    };
    let listener = TcpListener::bind(bind).with_context(|| {
        format!(
            "rank 0: cannot listen on {bind} (MASTER_PORT={}): is another job using the port? \
             Pick another one (`linearize launch --master-port`, or MASTER_PORT)",
            launch.master_port
        )
    })?;
    // Non-blocking accept, so the wait ends at the deadline.
    listener.set_nonblocking(true)?;
    tracing::info!(%bind, world_size = launch.world_size, "rank 0: waiting for the other ranks");
    let mut peers: Vec<Option<TcpStream>> = (0..launch.world_size).map(|_| None).collect();
    let mut connected = 1;
    let fail = |peers: &mut [Option<TcpStream>], message: String| -> anyhow::Error {
        for stream in peers.iter_mut().flatten() {
            let _ = wire::write_frame(stream, Kind::Reject, message.as_bytes());
        }
        anyhow::anyhow!(message)
    };
    while connected < launch.world_size {
        let (mut stream, addr) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (1..launch.world_size)
                        .filter(|&r| peers[r].is_none())
                        .collect();
                    let message = format!(
                        "rank 0: timed out after {} s waiting for rank(s) {missing:?} of {} to \
                         connect to port {} (were they started, with MASTER_ADDR={} and the same \
                         MASTER_PORT? LINEARIZE_DIST_BOOTSTRAP_TIMEOUT sets the wait)",
                        timeout.as_secs(),
                        launch.world_size,
                        launch.master_port,
                        launch.master_addr,
                    );
                    return Err(fail(&mut peers, message));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("rank 0: accepting a rank's connection"),
        };
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        stream.set_read_timeout(Some(left))?;
        let decoded = match wire::read_frame(&mut stream) {
            Ok(Received::Frame(Kind::Hello, bytes)) => decode_hello(&bytes),
            _ => None,
        };
        let Some((rank, world, backend, fingerprint)) = decoded else {
            // Not one of ours (a port scanner, a stale client): ignore it.
            tracing::warn!(%addr, "rank 0: ignoring a connection that did not introduce itself as a rank");
            continue;
        };
        let problem = if world != launch.world_size {
            Some(format!(
                "rank {rank} (from {addr}) was started with a world size of {world}, rank 0 with \
                 {}: all ranks must be launched with the same WORLD_SIZE",
                launch.world_size
            ))
        } else if rank == 0 || rank >= world {
            Some(format!(
                "a process at {addr} claims rank {rank}, which is not in 1..{world}: two jobs \
                 share MASTER_ADDR/MASTER_PORT, or RANK is wrong"
            ))
        } else if peers[rank].is_some() {
            Some(format!(
                "rank {rank} connected twice (again from {addr}): two processes were given \
                 RANK={rank}, or two jobs share MASTER_ADDR/MASTER_PORT"
            ))
        } else if backend != hello.backend {
            Some(format!(
                "rank {rank} uses the {backend} backend, rank 0 the {} backend: run every rank \
                 on the same kind of device",
                hello.backend
            ))
        } else if fingerprint != hello.fingerprint {
            Some(format!(
                "rank {rank} runs a different job than rank 0 (fingerprint {fingerprint} vs \
                 {}): every rank must be started with the same recipe, --set overrides and \
                 build",
                hello.fingerprint
            ))
        } else {
            None
        };
        if let Some(message) = problem {
            let _ = wire::write_frame(&mut stream, Kind::Reject, message.as_bytes());
            return Err(fail(&mut peers, message));
        }
        tracing::debug!(rank, %addr, "rank 0: rank connected");
        peers[rank] = Some(stream);
        connected += 1;
    }
    let bytes = match payload() {
        Ok(bytes) => bytes,
        Err(e) => return Err(fail(&mut peers, format!("rank 0: {e:#}"))),
    };
    for (rank, stream) in peers.iter_mut().enumerate() {
        if let Some(stream) = stream {
            stream.set_read_timeout(None)?;
            wire::write_frame(stream, Kind::Welcome, &bytes)
                .with_context(|| format!("rank 0: sending the rendezvous answer to rank {rank}"))?;
        }
    }
    tracing::info!(
        world_size = launch.world_size,
        "rank 0: all ranks connected"
    );
    Ok((
        Links {
            rank: 0,
            world_size: launch.world_size,
            peers,
        },
        bytes,
    ))
}

fn join(launch: &Launch, hello: &Hello, timeout: Duration) -> Result<(Links, Vec<u8>)> {
    let rank = launch.rank;
    let master = launch.master();
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        let last_error = match connect_once(&master, deadline) {
            Ok(stream) => break stream,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!(
                "rank {rank}: could not reach rank 0 at {master} within {} s (last error: \
                 {last_error}); is rank 0 running, and are MASTER_ADDR/MASTER_PORT right? \
                 LINEARIZE_DIST_BOOTSTRAP_TIMEOUT sets the wait",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stream.set_nodelay(true)?;
    wire::write_frame(&mut stream, Kind::Hello, &encode_hello(launch, hello))
        .with_context(|| format!("rank {rank}: introducing itself to rank 0 at {master}"))?;
    // Rank 0 answers once every rank is there; it gives up at its own deadline and then says
    // so, which the grace period leaves time to hear.
    stream.set_read_timeout(Some(timeout + Duration::from_secs(30)))?;
    let answer = match wire::read_frame(&mut stream) {
        Ok(Received::Frame(Kind::Welcome, bytes)) => bytes,
        Ok(Received::Frame(Kind::Reject, message)) => bail!(
            "rank {rank}: refused by rank 0: {}",
            String::from_utf8_lossy(&message)
        ),
        Ok(Received::Frame(kind, _)) => {
            bail!("rank {rank}: rank 0 answered the rendezvous with a {kind:?} frame")
        }
        Ok(Received::Closed) => bail!(
            "rank {rank}: rank 0 at {master} closed the connection during the rendezvous (it \
             failed; see its log)"
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => bail!(
            "rank {rank}: connected to rank 0 at {master}, but the other ranks did not all \
             arrive within {} s",
            timeout.as_secs()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("rank {rank}: reading rank 0's answer"));
        }
    };
    stream.set_read_timeout(None)?;
    let mut peers: Vec<Option<TcpStream>> = (0..launch.world_size).map(|_| None).collect();
    peers[0] = Some(stream);
    Ok((
        Links {
            rank,
            world_size: launch.world_size,
            peers,
        },
        answer,
    ))
}

/// One connection attempt to every address `master` resolves to; the error says why not.
fn connect_once(master: &str, deadline: Instant) -> std::result::Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = master
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {master}: {e}"))?
        .collect();
    let mut last = format!("{master} resolves to no address");
    for addr in addrs {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        match TcpStream::connect_timeout(&addr, left) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        let mut launch = Launch::single();
        launch.rank = 3;
        launch.world_size = 4;
        let hello = Hello {
            backend: "tcp".into(),
            fingerprint: "abc".into(),
        };
        let decoded = decode_hello(&encode_hello(&launch, &hello)).unwrap();
        assert_eq!(decoded, (3, 4, "tcp".into(), "abc".into()));
        assert!(decode_hello(b"garbage").is_none());
    }
}
