//! Process groups for data-parallel training.
//!
//! - [`Launch`]: where this process stands (rank, world size, rank on the node, rendezvous
//!   address), from torchrun's or SLURM's environment; without them a world of one.
//! - [`ProcessGroup::init`]: the rendezvous over TCP at `MASTER_ADDR:MASTER_PORT` (rank 0
//!   listens, the others connect; a missing rank is an error after the bootstrap timeout), then a
//!   backend: **NCCL** when the device is CUDA (collectives on the tensors' device memory, on
//!   libtorch's stream), or **TCP** on the CPU (collectives over the rendezvous connections: the
//!   CPU fallback that makes the whole data-parallel path testable without GPUs, not a fast
//!   transport). A world of one needs neither: every collective returns at once.
//! - Collectives: bucketed in-place [`ProcessGroup::all_reduce`] (sum or max) and
//!   [`ProcessGroup::all_reduce_mean`], [`ProcessGroup::broadcast`], [`ProcessGroup::barrier`],
//!   and host-value helpers: [`ProcessGroup::all_reduce_f64`], [`ProcessGroup::any`],
//!   [`ProcessGroup::broadcast_bytes`], [`ProcessGroup::ensure_same`].
//!
//! Settings (environment): `LINEARIZE_DIST_BOOTSTRAP_TIMEOUT` (seconds the rendezvous waits for
//! every rank, default 300), `LINEARIZE_DIST_TIMEOUT` (seconds one collective may take, default
//! 1800: ranks wait in a barrier while rank 0 writes states and exports), `LINEARIZE_DIST_BUCKET_MB`
//! (all-reduce bucket size, default 25), `LINEARIZE_NCCL_LIB` (see [`nccl`](crate) loading
//! notes in `src/nccl.rs`). `NCCL_NVLS_ENABLE` is set to 0 unless already set: NVLink SHARP
//! (multicast) stays off, as the GPU machines this runs on require.
mod bootstrap;
pub mod launch;
mod nccl;
mod tcp;
mod wire;

pub use launch::{first_node, Launch, LaunchSource, DEFAULT_MASTER_PORT};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// How a reduction combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// Settings of [`ProcessGroup::init`].
#[derive(Debug, Clone)]
pub struct Options {
    /// How long the rendezvous waits for every rank.
    pub bootstrap_timeout: Duration,
    /// How long one collective (or barrier) may take before the job is declared hung.
    pub timeout: Duration,
    /// Size of the buckets that all-reduces flatten tensors into.
    pub bucket_bytes: usize,
    /// What identifies the job (e.g. the recipe hash): ranks with another one are refused at
    /// the rendezvous, with an error naming them.
    pub fingerprint: String,
}

impl Options {
    pub const DEFAULT_BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
    pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

    /// The defaults, overridden by `LINEARIZE_DIST_BOOTSTRAP_TIMEOUT`, `LINEARIZE_DIST_TIMEOUT`
    /// (seconds) and `LINEARIZE_DIST_BUCKET_MB`.
    pub fn from_env(fingerprint: &str) -> Result<Self> {
        let seconds = |name: &str, default: Duration| -> Result<Duration> {
            match std::env::var(name) {
                Err(_) => Ok(default),
                Ok(v) => match v.trim().parse::<f64>() {
                    Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
                    _ => bail!("{name}={v:?} is not a positive number of seconds"),
                },
            }
        };
        let bucket_bytes = match std::env::var("LINEARIZE_DIST_BUCKET_MB") {
            Err(_) => Self::DEFAULT_BUCKET_BYTES,
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(mb) if mb.is_finite() && mb > 0.0 => (mb * (1u64 << 20) as f64) as usize,
                _ => bail!("LINEARIZE_DIST_BUCKET_MB={v:?} is not a positive number"),
            },
        };
        Ok(Self {
            bootstrap_timeout: seconds(
                "LINEARIZE_DIST_BOOTSTRAP_TIMEOUT",
                Self::DEFAULT_BOOTSTRAP_TIMEOUT,
            )?,
            timeout: seconds("LINEARIZE_DIST_TIMEOUT", Self::DEFAULT_TIMEOUT)?,
            bucket_bytes,
            fingerprint: fingerprint.to_owned(),
        })
    }
}

enum Backend {
    Single,
    Tcp(tcp::TcpBackend),
    Nccl(nccl::NcclBackend),
}

/// The ranks of a data-parallel job and the collectives between them.
pub struct ProcessGroup {
    launch: Launch,
    device: Device,
    backend: Backend,
    bucket_bytes: usize,
    closed: AtomicBool,
}

impl ProcessGroup {
    /// A world of one: every collective is a no-op.
    pub fn single(device: Device) -> Self {
        Self {
            launch: Launch::single(),
            device,
            backend: Backend::Single,
            bucket_bytes: Options::DEFAULT_BUCKET_BYTES,
            closed: AtomicBool::new(false),
        }
    }

    /// A shared world of one, for callers without a group.
    pub fn single_ref() -> &'static Self {
        static SINGLE: OnceLock<ProcessGroup> = OnceLock::new();
        SINGLE.get_or_init(|| Self::single(Device::Cpu))
    }

    /// Joins the job `launch` describes, with its collectives on `device`: NCCL for
    /// `Device::Cuda(i)` (this process's GPU), TCP for the CPU. A world of one returns
    /// [`ProcessGroup::single`] without touching the network.
    pub fn init(launch: &Launch, device: Device, options: &Options) -> Result<Self> {
        if !launch.is_distributed() {
            return Ok(Self::single(device));
        }
        let rank = launch.rank;
        let backend_name = match device {
            Device::Cuda(_) => "nccl",
            Device::Cpu => "tcp",
            other => bail!("rank {rank}: no data-parallel backend for device {other:?}"),
        };
        if let Device::Cuda(_) = device {
            if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
                // NVLink multicast (NVLS) must stay off on the GPU machines this runs on; NCCL
                // reads the variable when it initialises, which happens below.
                std::env::set_var("NCCL_NVLS_ENABLE", "0");
            }
            let (path, version) = nccl::preload().with_context(|| format!("rank {rank}"))?;
            tracing::info!(rank, library = %path, version, "NCCL");
        }
        let hello = bootstrap::Hello {
            backend: backend_name.to_owned(),
            fingerprint: format!("{}/{}", env!("CARGO_PKG_VERSION"), options.fingerprint),
        };
        let is_nccl = matches!(device, Device::Cuda(_));
        let (links, payload) =
            bootstrap::rendezvous(launch, &hello, options.bootstrap_timeout, || {
                if is_nccl {
                    nccl::unique_id()
                } else {
                    Ok(Vec::new())
                }
            })?;
        let backend = match device {
            Device::Cuda(index) => Backend::Nccl(nccl::NcclBackend::new(
                links,
                &payload,
                index,
                options.timeout,
            )?),
            _ => Backend::Tcp(tcp::TcpBackend::new(links, options.timeout)?),
        };
        let group = Self {
            launch: launch.clone(),
            device,
            backend,
            bucket_bytes: options.bucket_bytes.max(1),
            closed: AtomicBool::new(false),
        };
        // The first collective proves the backend works end to end before any real work.
        group.barrier("the first barrier after the rendezvous")?;
        tracing::info!(
            rank,
            world_size = launch.world_size,
            backend = backend_name,
            ?device,
            "process group ready"
        );
        Ok(group)
    }

    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    pub fn world_size(&self) -> usize {
        self.launch.world_size
    }

    pub fn local_rank(&self) -> usize {
        self.launch.local_rank
    }

    /// Rank 0: the one that writes files.
    pub fn is_main(&self) -> bool {
        self.launch.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        !matches!(self.backend, Backend::Single)
    }

    /// Where this group's collectives run (and where host values are staged).
    pub fn device(&self) -> Device {
        self.device
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Single => "single",
            Backend::Tcp(_) => "tcp",
            Backend::Nccl(_) => "nccl",
        }
    }

    /// Reduces `tensors` across ranks, in place. Tensors of one dtype are flattened into buckets
    /// of about `LINEARIZE_DIST_BUCKET_MB` and reduced bucket by bucket (one call for many small
    /// tensors); every rank must pass the same shapes and dtypes in the same order.
    pub fn all_reduce(&self, tensors: &mut [Tensor], op: ReduceOp) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        self.bucketed(tensors, "all-reduce", |buffers| match &self.backend {
            Backend::Single => Ok(()),
            Backend::Tcp(b) => buffers
                .iter()
                .try_for_each(|t| b.all_reduce(t, op, "all-reduce")),
            Backend::Nccl(b) => b.all_reduce(buffers, op, "all-reduce"),
        })
    }

    /// The mean over ranks, in place (floating-point tensors).
    pub fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        for t in tensors.iter() {
            ensure!(
                t.is_floating_point(),
                "all_reduce_mean needs floating-point tensors, got {:?}",
                t.kind()
            );
        }
        self.all_reduce(tensors, ReduceOp::Sum)?;
        let scale = 1.0 / self.world_size() as f64;
        tch::no_grad(|| {
            for t in tensors.iter_mut() {
                let _ = t.f_mul_scalar_(scale)?;
            }
            Ok(())
        })
    }

    /// `tensors` of rank `root`, copied into every rank's, in place.
    pub fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        ensure!(
            root < self.world_size(),
            "broadcast root {root} is not a rank"
        );
        self.bucketed(tensors, "broadcast", |buffers| match &self.backend {
            Backend::Single => Ok(()),
            Backend::Tcp(b) => buffers
                .iter()
                .try_for_each(|t| b.broadcast(t, root, "broadcast")),
            Backend::Nccl(b) => b.broadcast(buffers, root, "broadcast"),
        })
    }

    /// Returns once every rank has called it (`what` names the point in errors).
    pub fn barrier(&self, what: &str) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        let t = Tensor::f_zeros([1], (Kind::Float, self.device))?;
        self.collective(std::slice::from_ref(&t), what, |b, ts| match b {
            Backend::Single => Ok(()),
            Backend::Tcp(b) => b.all_reduce(&ts[0], ReduceOp::Sum, what),
            Backend::Nccl(b) => b.all_reduce(ts, ReduceOp::Sum, what),
        })
    }

    /// Reduces host values across ranks (in f64), in place.
    pub fn all_reduce_f64(&self, values: &mut [f64], op: ReduceOp) -> Result<()> {
        if !self.is_distributed() || values.is_empty() {
            return Ok(());
        }
        let t = Tensor::f_from_slice(values)?.f_to_device(self.device)?;
        self.collective(
            std::slice::from_ref(&t),
            "reducing host values",
            |b, ts| match b {
                Backend::Single => Ok(()),
                Backend::Tcp(b) => b.all_reduce(&ts[0], op, "reducing host values"),
                Backend::Nccl(b) => b.all_reduce(ts, op, "reducing host values"),
            },
        )?;
        let reduced = Vec::<f64>::try_from(t.f_to_device(Device::Cpu)?)?;
        values.copy_from_slice(&reduced);
        Ok(())
    }

    /// Whether `flag` is true on any rank (every rank gets the same answer).
    pub fn any(&self, flag: bool) -> Result<bool> {
        let mut v = [if flag { 1.0 } else { 0.0 }];
        self.all_reduce_f64(&mut v, ReduceOp::Max)?;
        Ok(v[0] > 0.0)
    }

    /// Rank 0's `bytes` on every rank (the others' argument is ignored).
    pub fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        if !self.is_distributed() {
            return Ok(bytes.to_vec());
        }
        let mut len = [if self.is_main() {
            bytes.len() as f64
        } else {
            0.0
        }];
        // The length travels as a sum in which only rank 0 contributes.
        self.all_reduce_f64(&mut len, ReduceOp::Sum)?;
        let len = len[0] as usize;
        if len == 0 {
            return Ok(Vec::new());
        }
        let t = if self.is_main() {
            Tensor::f_from_slice(bytes)?.f_to_device(self.device)?
        } else {
            Tensor::f_zeros([len as i64], (Kind::Uint8, self.device))?
        };
        self.collective(
            std::slice::from_ref(&t),
            "broadcasting bytes",
            |b, ts| match b {
                Backend::Single => Ok(()),
                Backend::Tcp(b) => b.broadcast(&ts[0], 0, "broadcasting bytes"),
                Backend::Nccl(b) => b.broadcast(ts, 0, "broadcasting bytes"),
            },
        )?;
        Ok(Vec::<u8>::try_from(t.f_to_device(Device::Cpu)?)?)
    }

    /// Fails on every rank unless every rank passed the same `bytes` (compared by SHA-256); the
    /// error names `what` and the ranks that differ from rank 0.
    pub fn ensure_same(&self, what: &str, bytes: &[u8]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        let digest = Sha256::digest(bytes);
        let world = self.world_size();
        // Every rank fills its own row; a sum gathers all rows everywhere.
        let mut table = vec![0f64; world * 32];
        for (i, b) in digest.iter().enumerate() {
            table[self.rank() * 32 + i] = f64::from(*b);
        }
        self.all_reduce_f64(&mut table, ReduceOp::Sum)?;
        let hex = |r: usize| -> String {
            table[r * 32..r * 32 + 8]
                .iter()
                .map(|&b| format!("{:02x}", b as u8))
                .collect()
        };
        let differ: Vec<usize> = (1..world)
            .filter(|&r| table[r * 32..(r + 1) * 32] != table[..32])
            .collect();
        if !differ.is_empty() {
            let list: Vec<String> = differ
                .iter()
                .map(|&r| format!("rank {r} has {}", hex(r)))
                .collect();
            bail!(
                "rank {}: {what} differs between ranks: rank 0 has {}, {} (sha256 prefixes); \
                 every rank must start from the same values",
                self.rank(),
                hex(0),
                list.join(", ")
            );
        }
        Ok(())
    }

    /// Tells the other ranks this one failed, and why, so that they stop with that reason
    /// instead of a lost connection (best effort).
    pub fn abort(&self, reason: &str) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let reason = format!("rank {} failed: {reason}", self.rank());
        match &self.backend {
            Backend::Single => {}
            Backend::Tcp(b) => b.abort(&reason),
            Backend::Nccl(b) => b.abort(&reason),
        }
    }

    /// Leaves the group on purpose (the peers' watchers then take the closed links for what
    /// they are). Also done on drop.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        match &self.backend {
            Backend::Single => {}
            Backend::Tcp(b) => b.close(),
            Backend::Nccl(b) => b.close(),
        }
    }

    fn collective(
        &self,
        tensors: &[Tensor],
        what: &str,
        run: impl FnOnce(&Backend, &[Tensor]) -> Result<()>,
    ) -> Result<()> {
        ensure!(
            !self.closed.load(Ordering::SeqCst),
            "rank {}: {what} after the process group was closed",
            self.rank()
        );
        run(&self.backend, tensors)
    }

    /// Flattens `tensors` into per-dtype buckets, runs `reduce` over all buckets, copies the
    /// results back.
    fn bucketed(
        &self,
        tensors: &mut [Tensor],
        what: &str,
        reduce: impl FnOnce(&[Tensor]) -> Result<()>,
    ) -> Result<()> {
        for (i, t) in tensors.iter().enumerate() {
            ensure!(
                t.defined() && t.device() == self.device,
                "rank {}: {what}: tensor {i} is {} (the group's device is {:?})",
                self.rank(),
                if t.defined() {
                    format!("on {:?}", t.device())
                } else {
                    "undefined".to_owned()
                },
                self.device
            );
        }
        let plan = plan_buckets(tensors, self.bucket_bytes);
        tch::no_grad(|| {
            let buffers = plan
                .iter()
                .map(|bucket| match bucket.as_slice() {
                    [single] if tensors[*single].is_contiguous() => {
                        Ok(tensors[*single].shallow_clone())
                    }
                    members => {
                        let flat: Vec<Tensor> = members
                            .iter()
                            .map(|&i| tensors[i].f_reshape([-1]))
                            .collect::<std::result::Result<_, _>>()?;
                        Ok(Tensor::f_cat(&flat, 0)?)
                    }
                })
                .collect::<Result<Vec<Tensor>>>()?;
            ensure!(
                !self.closed.load(Ordering::SeqCst),
                "rank {}: {what} after the process group was closed",
                self.rank()
            );
            reduce(&buffers)?;
            for (bucket, buffer) in plan.iter().zip(&buffers) {
                if let [single] = bucket.as_slice() {
                    if tensors[*single].is_contiguous() {
                        continue;
                    }
                }
                let mut offset = 0i64;
                for &i in bucket {
                    let n = tensors[i].numel() as i64;
                    let part = buffer
                        .f_narrow(0, offset, n)?
                        .f_view(tensors[i].size().as_slice())?;
                    tensors[i].f_copy_(&part)?;
                    offset += n;
                }
            }
            Ok(())
        })
    }
}

/// Indices of `tensors` grouped into buckets: same dtype, in order, at most `bucket_bytes` each
/// (a larger tensor is a bucket of its own); empty tensors are left out.
fn plan_buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut kinds: Vec<Kind> = Vec::new();
    for t in tensors {
        if !kinds.contains(&t.kind()) {
            kinds.push(t.kind());
        }
    }
    let mut buckets = Vec::new();
    for kind in kinds {
        let mut current: Vec<usize> = Vec::new();
        let mut bytes = 0usize;
        for (i, t) in tensors.iter().enumerate() {
            if t.kind() != kind || t.numel() == 0 {
                continue;
            }
            let size = t.numel() * kind.elt_size_in_bytes();
            if !current.is_empty() && bytes + size > bucket_bytes {
                buckets.push(std::mem::take(&mut current));
                bytes = 0;
            }
            current.push(i);
            bytes += size;
        }
        if !current.is_empty() {
            buckets.push(current);
        }
    }
    buckets
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_group_by_dtype_and_size() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let h = |n: i64| Tensor::zeros([n], (Kind::BFloat16, Device::Cpu));
        // 40-byte buckets: 4 floats = 16 bytes, 8 floats = 32 bytes.
        let tensors = vec![f(4), h(4), f(4), f(8), f(0), f(20), h(2)];
        let plan = plan_buckets(&tensors, 40);
        assert_eq!(plan, vec![vec![0, 2], vec![3], vec![5], vec![1, 6]]);
    }

    #[test]
    fn a_world_of_one_is_a_no_op() {
        let group = ProcessGroup::single(Device::Cpu);
        let mut t = [Tensor::from_slice(&[1.0f32, 2.0])];
        group.all_reduce_mean(&mut t).unwrap();
        group.barrier("test").unwrap();
        assert_eq!(Vec::<f32>::try_from(&t[0]).unwrap(), [1.0, 2.0]);
        assert!(!group.any(false).unwrap());
        assert!(group.any(true).unwrap());
        assert_eq!(group.broadcast_bytes(b"abc").unwrap(), b"abc");
        group.ensure_same("x", b"y").unwrap();
        assert!(group.is_main() && !group.is_distributed());
    }
}
