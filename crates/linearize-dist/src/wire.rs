//! Frames on the TCP links between ranks: `[kind: u8][length: u64 LE][payload]`. The rendezvous,
//! the CPU backend's collectives and the liveness messages of the NCCL backend all use them, so
//! a rank that failed can tell the others why (an [`Kind::Abort`] frame) instead of just
//! vanishing.
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

/// Largest frame a rank accepts (the CPU backend sends whole buckets; the rendezvous sends
/// fingerprints and the NCCL id).
const MAX_FRAME: u64 = 1 << 34;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Reject = 3,
    /// Tensor bytes of a collective (all-reduce, broadcast).
    Data = 4,
    /// A rank failed; the payload says why.
    Abort = 5,
    /// A rank closes its links on purpose (the job is over for it).
    Bye = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Reject,
            4 => Self::Data,
            5 => Self::Abort,
            6 => Self::Bye,
            _ => return None,
        })
    }
}

pub fn write_frame(stream: &mut TcpStream, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)?;
    stream.flush()
}

/// What reading a frame gave.
pub enum Received {
    Frame(Kind, Vec<u8>),
    /// The peer closed the connection (its process ended).
    Closed,
}

pub fn read_frame(stream: &mut TcpStream) -> std::io::Result<Received> {
    let mut header = [0u8; 9];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(Received::Closed)
        }
        Err(e) => return Err(e),
    }
    let kind = Kind::from_u8(header[0]).ok_or_else(|| {
        std::io::Error::new(
            ErrorKind::InvalidData,
            format!("unknown frame kind {}", header[0]),
        )
    })?;
    let len = u64::from_le_bytes(header[1..].try_into().expect("8 bytes"));
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok(Received::Frame(kind, payload))
}

/// Reads the next frame from `peer`, which must be of `kind`: an abort, a closed connection, a
/// timeout or another kind are errors that name the peer and what was awaited.
pub fn expect_frame(
    stream: &mut TcpStream,
    kind: Kind,
    me: usize,
    peer: usize,
    what: &str,
) -> Result<Vec<u8>> {
    match read_frame(stream) {
        Ok(Received::Frame(k, payload)) if k == kind => Ok(payload),
        Ok(Received::Frame(Kind::Abort, reason)) => bail!(
            "rank {me}: rank {peer} failed during {what}: {}",
            String::from_utf8_lossy(&reason)
        ),
        Ok(Received::Frame(Kind::Bye, _)) => bail!(
            "rank {me}: rank {peer} left the job during {what} (it finished or stopped early: \
             the ranks disagree about the work left)"
        ),
        Ok(Received::Frame(k, _)) => bail!(
            "rank {me}: protocol error during {what}: rank {peer} sent a {k:?} frame, expected \
             {kind:?} (the ranks run different builds or disagree about the training sequence)"
        ),
        Ok(Received::Closed) => bail!(
            "rank {me}: lost the connection to rank {peer} during {what}: its process ended \
             (killed, crashed or out of memory; see its log)"
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => bail!(
            "rank {me}: rank {peer} did not answer within the timeout during {what} (hung, or \
             its node is unreachable; LINEARIZE_DIST_TIMEOUT sets the limit)"
        ),
        Err(e) => {
            Err(e).with_context(|| format!("rank {me}: reading from rank {peer} during {what}"))
        }
    }
}

/// Writes a frame to `peer`; a peer that is gone (broken pipe, reset) is reported as such.
pub fn send(
    stream: &mut TcpStream,
    kind: Kind,
    payload: &[u8],
    me: usize,
    peer: usize,
    what: &str,
) -> Result<()> {
    match write_frame(stream, kind, payload) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) =>
        {
            bail!(
                "rank {me}: lost the connection to rank {peer} during {what}: its process ended \
                 (killed, crashed or out of memory; see its log)"
            )
        }
        Err(e) => Err(e).with_context(|| format!("rank {me}: sending {what} to rank {peer}")),
    }
}
