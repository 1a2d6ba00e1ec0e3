//! The CPU backend: collectives over the rendezvous connections, a star through rank 0 (rank 0
//! gathers, reduces in rank order, sends the result back). It exists so that the whole
//! data-parallel path (sharding, gradient averaging, consensus on stopping, rank-0-only writes,
//! resuming with another world size) runs and is tested on machines without GPUs; it is the
//! fallback for CPU devices, not a fast transport.
use crate::bootstrap::Links;
use crate::wire::{self, Kind};
use crate::ReduceOp;
use anyhow::{ensure, Result};
use std::sync::Mutex;
use std::time::Duration;
use tch::{Device, Tensor};

pub(crate) struct TcpBackend {
    rank: usize,
    world_size: usize,
    links: Mutex<Links>,
}

/// The bytes of a contiguous CPU tensor.
fn bytes_of(t: &Tensor) -> Result<&[u8]> {
    ensure!(
        t.device() == Device::Cpu && t.is_contiguous(),
        "the TCP backend moves contiguous CPU tensors only"
    );
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: the tensor is contiguous on the CPU, so `len` bytes from its data pointer are its
    // elements; the slice does not outlive the borrow of the tensor handle.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) })
}

impl TcpBackend {
    pub fn new(links: Links, timeout: Duration) -> Result<Self> {
        let mut links = links;
        for (_, stream) in links.iter_mut() {
            // A peer that hangs (or a node that vanished) turns into an error after `timeout`.
            stream.set_read_timeout(Some(timeout))?;
        }
        Ok(Self {
            rank: links.rank,
            world_size: links.world_size,
            links: Mutex::new(links),
        })
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// In place over `t` (contiguous, CPU): every rank ends with the reduction of all ranks'
    /// values, summed (or maxed) in rank order on rank 0.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp, what: &str) -> Result<()> {
        let mut links = self.links();
        let me = self.rank;
        if me == 0 {
            let mut acc = t.shallow_clone();
            for peer in 1..self.world_size {
                let stream = links.peers[peer].as_mut().expect("rank 0 links every rank");
                let bytes = wire::expect_frame(stream, Kind::Data, me, peer, what)?;
                let other = self.tensor_from(&bytes, t, peer, what)?;
                match op {
                    ReduceOp::Sum => {
                        let _ = acc.f_add_(&other)?;
                    }
                    ReduceOp::Max => {
                        acc.f_copy_(&acc.f_maximum(&other)?)?;
                    }
                }
            }
            let result = bytes_of(t)?;
            for (peer, stream) in links.iter_mut() {
                wire::send(stream, Kind::Data, result, 0, peer, what)?;
            }
        } else {
            let stream = links.peers[0].as_mut().expect("linked to rank 0");
            wire::send(stream, Kind::Data, bytes_of(t)?, me, 0, what)?;
            let bytes = wire::expect_frame(stream, Kind::Data, me, 0, what)?;
            let result = self.tensor_from(&bytes, t, 0, what)?;
            t.shallow_clone().f_copy_(&result)?;
        }
        Ok(())
    }

    /// `t` of rank `root` copied into `t` on every rank.
    pub fn broadcast(&self, t: &Tensor, root: usize, what: &str) -> Result<()> {
        ensure!(
            root < self.world_size,
            "broadcast root {root} is not a rank"
        );
        let mut links = self.links();
        let me = self.rank;
        if me == 0 {
            if root != 0 {
                let stream = links.peers[root].as_mut().expect("rank 0 links every rank");
                let bytes = wire::expect_frame(stream, Kind::Data, me, root, what)?;
                let value = self.tensor_from(&bytes, t, root, what)?;
                t.shallow_clone().f_copy_(&value)?;
            }
            let value = bytes_of(t)?;
            for (peer, stream) in links.iter_mut().filter(|(p, _)| *p != root) {
                wire::send(stream, Kind::Data, value, 0, peer, what)?;
            }
        } else {
            let stream = links.peers[0].as_mut().expect("linked to rank 0");
            if me == root {
                wire::send(stream, Kind::Data, bytes_of(t)?, me, 0, what)?;
            } else {
                let bytes = wire::expect_frame(stream, Kind::Data, me, 0, what)?;
                let value = self.tensor_from(&bytes, t, 0, what)?;
                t.shallow_clone().f_copy_(&value)?;
            }
        }
        Ok(())
    }

    fn tensor_from(&self, bytes: &[u8], like: &Tensor, peer: usize, what: &str) -> Result<Tensor> {
        let expected = like.numel() * like.kind().elt_size_in_bytes();
        ensure!(
            bytes.len() == expected,
            "rank {}: during {what} rank {peer} sent {} bytes, expected {expected}: the ranks \
             disagree about the tensors (different models or trainable sets?)",
            self.rank,
            bytes.len()
        );
        Ok(Tensor::f_from_data_size(bytes, &like.size(), like.kind())?)
    }

    /// Tells the peers this rank failed and why (best effort: they may be gone already).
    pub fn abort(&self, reason: &str) {
        let mut links = self.links();
        for (_, stream) in links.iter_mut() {
            let _ = wire::write_frame(stream, Kind::Abort, reason.as_bytes());
        }
    }

    /// Says goodbye and closes the links.
    pub fn close(&self) {
        let mut links = self.links();
        for (_, stream) in links.iter_mut() {
            let _ = wire::write_frame(stream, Kind::Bye, &[]);
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}
