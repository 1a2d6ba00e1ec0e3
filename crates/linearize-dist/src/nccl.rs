//! The NCCL backend: collectives on the device memory of tch tensors, with a watchdog.
//!
//! ## Which libnccl, and why this module resolves NCCL's functions itself
//! The torch wheel ships `nvidia/nccl/lib/libnccl.so.2` and `libtorch_cuda.so` depends on it (its
//! RPATH finds it), so in a CUDA build of libtorch the library is already in the process before
//! this module runs. It must be that copy: two NCCL builds in one process (or a version other
//! than the one the wheel was tested with) is asking for trouble. cudarc's dynamic loader looks
//! for `libnccl.so`, `libnccl.so.13`, ..., `.so.1` — never `libnccl.so.2`, the only name the
//! wheel ships — so its `nccl::result` functions cannot find it. This module therefore takes
//! cudarc's NCCL ABI types (`ncclUniqueId`, `ncclComm_t`, data types, reduction ops) and resolves
//! the dozen NCCL functions from the library it locates, in this order:
//! 1. `LINEARIZE_NCCL_LIB` (a path to a libnccl.so.2), when set;
//! 2. the `libnccl.so.2` already loaded in the process (by libtorch_cuda);
//! 3. `<dir of libtorch>/../../nvidia/nccl/lib/libnccl.so.2` (the wheel's layout; libtorch's
//!    directory is read from /proc/self/maps);
//! 4. each directory of `LD_LIBRARY_PATH`, then the system's search for `libnccl.so.2`.
//!
//! Nothing is loaded until a NCCL process group is created, so the crate builds and runs on
//! machines without CUDA. The CUDA calls (current device, events) go through cudarc's driver
//! API, whose library (`libcuda.so.1`) is the one of the installed driver.
//!
//! ## Streams
//! tch never sets a stream, so libtorch runs every kernel on the device's default (legacy,
//! "null") stream. Collectives are enqueued on that same null stream: they are ordered after the
//! kernels that produced the gradients and before the ones that read the results, with no extra
//! synchronisation, and the caching allocator's stream-ordered reuse of the temporary buckets is
//! safe.
//!
//! ## A rank that dies
//! A collective whose peer is gone never completes on its own. After enqueuing, the host waits on
//! a CUDA event with a deadline (`LINEARIZE_DIST_TIMEOUT`) while watching the rendezvous
//! connections: a peer whose process ends closes its socket at once (even on SIGKILL), a peer
//! that fails first sends the reason. Either aborts the communicator (`ncclCommAbort`, which
//! ends the pending kernels) and returns an error naming the rank; rank 0 passes the news on to
//! the others, which only watch their link to rank 0.
use crate::bootstrap::Links;
use crate::wire::{self, Kind, Received};
use crate::ReduceOp;
use anyhow::{bail, ensure, Context as _, Result};
use cudarc::driver::result as cu;
use cudarc::driver::sys::{CUevent_flags, CUresult};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tch::{Kind as DType, Tensor};

/// The NCCL entry points used here, as exported by libnccl.so.2 (`ncclResult_t` is a C enum,
/// taken as `c_int` so that a code this build does not know is not undefined behaviour).
struct NcclLib {
    path: String,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        *mut c_void,
    ) -> c_int,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        *mut c_void,
    ) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
    /// Keeps the library loaded for the process's lifetime.
    _lib: libloading::Library,
}

const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;

static NCCL: OnceLock<std::result::Result<NcclLib, String>> = OnceLock::new();

fn nccl() -> Result<&'static NcclLib> {
    NCCL.get_or_init(|| NcclLib::load().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

impl NcclLib {
    fn load() -> Result<Self> {
        let (lib, path) = open_library()?;
        // SAFETY: the symbols are NCCL's public C API with these signatures (nccl.h, 2.x).
        unsafe {
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes())
                        .with_context(|| format!("{path}: no symbol {}", $name))?
                };
            }
            let nccl = Self {
                get_version: sym!("ncclGetVersion"),
                get_unique_id: sym!("ncclGetUniqueId"),
                comm_init_rank: sym!("ncclCommInitRank"),
                all_reduce: sym!("ncclAllReduce"),
                broadcast: sym!("ncclBroadcast"),
                group_start: sym!("ncclGroupStart"),
                group_end: sym!("ncclGroupEnd"),
                comm_abort: sym!("ncclCommAbort"),
                comm_destroy: sym!("ncclCommDestroy"),
                comm_get_async_error: sym!("ncclCommGetAsyncError"),
                get_error_string: sym!("ncclGetErrorString"),
                get_last_error: sym!("ncclGetLastError"),
                path,
                _lib: lib,
            };
            Ok(nccl)
        }
    }

    fn version(&self) -> Result<c_int> {
        let mut v = 0;
        self.check(
            unsafe { (self.get_version)(&mut v) },
            None,
            "ncclGetVersion",
        )?;
        Ok(v)
    }

    /// `code` as a result, the error naming the call, NCCL's message and its last error.
    fn check(&self, code: c_int, comm: Option<ncclComm_t>, call: &str) -> Result<()> {
        if code == NCCL_SUCCESS || code == NCCL_IN_PROGRESS {
            return Ok(());
        }
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: NCCL returns NUL-terminated static or per-comm strings.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let message = text(unsafe { (self.get_error_string)(code) });
        let last = comm
            .map(|c| text(unsafe { (self.get_last_error)(c) }))
            .filter(|s| !s.is_empty())
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        bail!("{call} failed: NCCL error {code}: {message}{last}")
    }
}

fn open_library() -> Result<(libloading::Library, String)> {
    use libc::{RTLD_GLOBAL, RTLD_NOLOAD, RTLD_NOW};
    use libloading::os::unix::Library;
    let open = |path: &str, flags| -> std::result::Result<libloading::Library, String> {
        // SAFETY: loading libnccl runs its initialisers, which have no preconditions.
        unsafe { Library::open(Some(path), flags) }
            .map(libloading::Library::from)
            .map_err(|e| e.to_string())
    };
    if let Ok(path) = std::env::var("LINEARIZE_NCCL_LIB") {
        return open(&path, RTLD_NOW | RTLD_GLOBAL)
            .map(|lib| (lib, path.clone()))
            .map_err(|e| anyhow::anyhow!("LINEARIZE_NCCL_LIB={path}: {e}"));
    }
    if let Ok(lib) = open("libnccl.so.2", RTLD_NOW | RTLD_NOLOAD) {
        let path = loaded_path("libnccl.so.2").unwrap_or_else(|| "libnccl.so.2".into());
        return Ok((lib, path));
    }
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(torch) = loaded_path("libtorch_cpu.so").or_else(|| loaded_path("libtorch.so")) {
        if let Some(lib_dir) = Path::new(&torch).parent() {
            candidates.push(lib_dir.join("../../nvidia/nccl/lib/libnccl.so.2"));
        }
    }
    if let Ok(paths) = std::env::var("LD_LIBRARY_PATH") {
        candidates.extend(
            paths
                .split(':')
                .filter(|d| !d.is_empty())
                .map(|d| Path::new(d).join("libnccl.so.2")),
        );
    }
    for candidate in candidates {
        if candidate.exists() {
            let path = candidate.display().to_string();
            match open(&path, RTLD_NOW | RTLD_GLOBAL) {
                Ok(lib) => return Ok((lib, path)),
                Err(e) => tried.push(format!("{path}: {e}")),
            }
        } else {
            tried.push(format!("{}: not found", candidate.display()));
        }
    }
    match open("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL) {
        Ok(lib) => Ok((lib, "libnccl.so.2".into())),
        Err(e) => {
            tried.push(format!("libnccl.so.2 (system search): {e}"));
            bail!(
                "cannot load NCCL (libnccl.so.2); tried:\n  {}\nInstall the torch wheel's \
                 nvidia-nccl package, add its lib directory to LD_LIBRARY_PATH, or point \
                 LINEARIZE_NCCL_LIB at a libnccl.so.2",
                tried.join("\n  ")
            )
        }
    }
}

/// The path of a shared library mapped into this process whose file name is `name`.
fn loaded_path(name: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| Path::new(path).file_name().is_some_and(|f| f == name))
        .map(str::to_owned)
}

fn nccl_type(kind: DType) -> Result<ncclDataType_t> {
    Ok(match kind {
        DType::Float => ncclDataType_t::ncclFloat32,
        DType::Double => ncclDataType_t::ncclFloat64,
        DType::Half => ncclDataType_t::ncclFloat16,
        DType::BFloat16 => ncclDataType_t::ncclBfloat16,
        DType::Int64 => ncclDataType_t::ncclInt64,
        DType::Int => ncclDataType_t::ncclInt32,
        DType::Int8 => ncclDataType_t::ncclInt8,
        DType::Uint8 => ncclDataType_t::ncclUint8,
        other => bail!("NCCL cannot reduce tensors of dtype {other:?}"),
    })
}

fn cuda(result: std::result::Result<(), cudarc::driver::DriverError>, call: &str) -> Result<()> {
    result.map_err(|e| anyhow::anyhow!("{call} failed: {e:?}"))
}

/// `device`'s primary context (the one libtorch uses), made current on this thread: NCCL binds
/// a communicator to the current device. Retained once; it lives as long as the process.
fn primary_context(device: usize) -> Result<Context> {
    cuda(cu::init(), "cuInit")?;
    let dev = cu::device::get(device as c_int)
        .map_err(|e| anyhow::anyhow!("cuDeviceGet({device}) failed: {e:?}"))?;
    // SAFETY: `dev` is a valid device handle; retaining the primary context is what the runtime
    // (and so libtorch) does too, and the handle stays valid while retained.
    let ctx = unsafe { cu::primary_ctx::retain(dev) }
        .map_err(|e| anyhow::anyhow!("cuDevicePrimaryCtxRetain({device}) failed: {e:?}"))?;
    let ctx = Context(ctx);
    ctx.make_current()?;
    Ok(ctx)
}

/// A retained primary context.
struct Context(cudarc::driver::sys::CUcontext);

impl Context {
    fn make_current(&self) -> Result<()> {
        // SAFETY: the context is retained for the process's lifetime.
        cuda(unsafe { cu::ctx::set_current(self.0) }, "cuCtxSetCurrent")
    }
}

/// The first problem the watcher threads saw, if any.
type Failure = Arc<Mutex<Option<String>>>;

pub(crate) struct NcclBackend {
    rank: usize,
    device: usize,
    context: Context,
    comm: ncclComm_t,
    timeout: Duration,
    failure: Failure,
    /// Set when this rank leaves on purpose: a closing link is then no failure.
    closing: Arc<AtomicBool>,
    aborted: AtomicBool,
    /// Write ends of the links, for abort and goodbye messages.
    writers: Arc<Vec<(usize, Mutex<TcpStream>)>>,
}

// SAFETY: the communicator is used from one thread at a time (collectives take `&self` but the
// training loop calls them sequentially; NCCL communicators may be used from any thread).
unsafe impl Send for NcclBackend {}
unsafe impl Sync for NcclBackend {}

/// Rank 0's part of the rendezvous: a fresh NCCL unique id (128 bytes).
pub(crate) fn unique_id() -> Result<Vec<u8>> {
    let lib = nccl()?;
    let mut id = std::mem::MaybeUninit::<ncclUniqueId>::uninit();
    lib.check(
        unsafe { (lib.get_unique_id)(id.as_mut_ptr()) },
        None,
        "ncclGetUniqueId",
    )?;
    let id = unsafe { id.assume_init() };
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// Loads NCCL (before the rendezvous, so a missing library fails fast and identically on every
/// rank) and returns its path and version.
pub(crate) fn preload() -> Result<(String, c_int)> {
    let lib = nccl()?;
    Ok((lib.path.clone(), lib.version()?))
}

impl NcclBackend {
    pub fn new(links: Links, id: &[u8], device: usize, timeout: Duration) -> Result<Self> {
        let lib = nccl()?;
        ensure!(
            id.len() == 128,
            "the NCCL unique id from rank 0 has {} bytes, expected 128",
            id.len()
        );
        let mut unique = ncclUniqueId { internal: [0; 128] };
        for (dst, &src) in unique.internal.iter_mut().zip(id) {
            *dst = src as c_char;
        }
        let context = primary_context(device)?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; every rank passes the same id and world.
        lib.check(
            unsafe {
                (lib.comm_init_rank)(
                    &mut comm,
                    links.world_size as c_int,
                    unique,
                    links.rank as c_int,
                )
            },
            None,
            "ncclCommInitRank",
        )
        .with_context(|| {
            format!(
                "rank {}: creating the NCCL communicator on cuda:{device}",
                links.rank
            )
        })?;
        let failure: Failure = Arc::new(Mutex::new(None));
        let closing = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        let mut links = links;
        for (peer, stream) in links.iter_mut() {
            stream.set_read_timeout(None)?;
            writers.push((peer, Mutex::new(stream.try_clone()?)));
            readers.push((peer, stream.try_clone()?));
        }
        let writers = Arc::new(writers);
        for (peer, stream) in readers {
            let watcher = Watcher {
                rank: links.rank,
                peer,
                failure: failure.clone(),
                closing: closing.clone(),
                writers: writers.clone(),
            };
            std::thread::Builder::new()
                .name(format!("dist-watch-{peer}"))
                .spawn(move || watcher.run(stream))
                .context("starting a link watcher thread")?;
        }
        Ok(Self {
            rank: links.rank,
            device,
            context,
            comm,
            timeout,
            failure,
            closing,
            aborted: AtomicBool::new(false),
            writers,
        })
    }

    fn lib(&self) -> &'static NcclLib {
        nccl().expect("loaded when the backend was created")
    }

    /// Enqueues `ops` (NCCL calls on the null stream) as one group and waits for them.
    fn run(&self, what: &str, ops: impl FnOnce(&NcclLib) -> Result<()>) -> Result<()> {
        self.ensure_alive(what)?;
        // libtorch may have switched devices on this thread (it does not here: one GPU per
        // process), and the event below must belong to the communicator's context.
        self.context.make_current()?;
        let lib = self.lib();
        lib.check(
            unsafe { (lib.group_start)() },
            Some(self.comm),
            "ncclGroupStart",
        )?;
        let enqueued = ops(lib);
        let ended = lib.check(
            unsafe { (lib.group_end)() },
            Some(self.comm),
            "ncclGroupEnd",
        );
        enqueued
            .and(ended)
            .with_context(|| format!("rank {}: {what}", self.rank))?;
        self.wait(what)
    }

    fn ensure_alive(&self, what: &str) -> Result<()> {
        ensure!(
            !self.aborted.load(Ordering::SeqCst),
            "rank {}: {what}: the NCCL communicator was aborted after an earlier failure",
            self.rank
        );
        Ok(())
    }

    /// Waits for everything enqueued on the null stream so far, up to the timeout, watching for
    /// a failed peer and for NCCL's asynchronous errors.
    fn wait(&self, what: &str) -> Result<()> {
        let event = cu::event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| anyhow::anyhow!("cuEventCreate failed: {e:?}"))?;
        let result = self.wait_event(event, what);
        // SAFETY: the event was created above and is destroyed once (destroying a pending event
        // is allowed: its resources are released on completion).
        unsafe {
            let _ = cu::event::destroy(event);
        }
        result
    }

    fn wait_event(&self, event: cudarc::driver::sys::CUevent, what: &str) -> Result<()> {
        // SAFETY: recording on the null stream of the current (primary) context.
        cuda(
            unsafe { cu::event::record(event, std::ptr::null_mut()) },
            "cuEventRecord",
        )?;
        let started = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: `event` is a live event.
            match unsafe { cu::event::query(event) } {
                Ok(()) => return Ok(()),
                Err(e) if e.0 == CUresult::CUDA_ERROR_NOT_READY => {}
                Err(e) => bail!(
                    "rank {}: {what}: CUDA error while waiting: {e:?}",
                    self.rank
                ),
            }
            let lib = self.lib();
            let mut state = NCCL_SUCCESS;
            lib.check(
                unsafe { (lib.comm_get_async_error)(self.comm, &mut state) },
                Some(self.comm),
                "ncclCommGetAsyncError",
            )?;
            if state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS {
                let error = lib
                    .check(state, Some(self.comm), "a collective")
                    .expect_err("state is an error");
                self.abort_comm();
                bail!("rank {}: {what}: {error:#}", self.rank);
            }
            if let Some(reason) = self
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                self.abort_comm();
                bail!("rank {}: {what} abandoned: {reason}", self.rank);
            }
            if started.elapsed() > self.timeout {
                self.abort_comm();
                let reason = format!(
                    "rank {} timed out after {} s in {what} (a peer hung or its node is \
                     unreachable; LINEARIZE_DIST_TIMEOUT sets the limit)",
                    self.rank,
                    self.timeout.as_secs()
                );
                self.tell_peers(Kind::Abort, &reason);
                bail!("{reason}");
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    fn abort_comm(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            let lib = self.lib();
            // SAFETY: the communicator is valid and aborted once.
            unsafe {
                (lib.comm_abort)(self.comm);
            }
        }
    }

    /// In place over each tensor (contiguous, on this rank's device).
    pub fn all_reduce(&self, tensors: &[Tensor], op: ReduceOp, what: &str) -> Result<()> {
        let op = match op {
            ReduceOp::Sum => ncclRedOp_t::ncclSum,
            ReduceOp::Max => ncclRedOp_t::ncclMax,
        };
        let comm = self.comm;
        let check = self.prepare(tensors)?;
        self.run(what, |lib| {
            for (t, dtype) in tensors.iter().zip(check) {
                let ptr = t.data_ptr();
                // SAFETY: `ptr` addresses `numel` elements of `dtype` on this rank's device
                // (checked by `prepare`), and the tensors outlive the wait in `run`.
                lib.check(
                    unsafe {
                        (lib.all_reduce)(ptr, ptr, t.numel(), dtype, op, comm, std::ptr::null_mut())
                    },
                    Some(comm),
                    "ncclAllReduce",
                )?;
            }
            Ok(())
        })
    }

    /// `tensors` of rank `root` copied into every rank's.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize, what: &str) -> Result<()> {
        let comm = self.comm;
        let check = self.prepare(tensors)?;
        self.run(what, |lib| {
            for (t, dtype) in tensors.iter().zip(check) {
                let ptr = t.data_ptr();
                // SAFETY: as in `all_reduce`.
                lib.check(
                    unsafe {
                        (lib.broadcast)(
                            ptr,
                            ptr,
                            t.numel(),
                            dtype,
                            root as c_int,
                            comm,
                            std::ptr::null_mut(),
                        )
                    },
                    Some(comm),
                    "ncclBroadcast",
                )?;
            }
            Ok(())
        })
    }

    fn prepare(&self, tensors: &[Tensor]) -> Result<Vec<ncclDataType_t>> {
        tensors
            .iter()
            .map(|t| {
                ensure!(
                    t.device() == tch::Device::Cuda(self.device) && t.is_contiguous(),
                    "rank {}: NCCL collectives need contiguous tensors on cuda:{}, got one on {:?}",
                    self.rank,
                    self.device,
                    t.device()
                );
                nccl_type(t.kind())
            })
            .collect()
    }

    fn tell_peers(&self, kind: Kind, message: &str) {
        for (_, stream) in self.writers.iter() {
            let mut stream = stream.lock().unwrap_or_else(|e| e.into_inner());
            let _ = wire::write_frame(&mut stream, kind, message.as_bytes());
        }
    }

    /// Tells the peers this rank failed and why, and aborts the communicator.
    pub fn abort(&self, reason: &str) {
        self.closing.store(true, Ordering::SeqCst);
        self.tell_peers(Kind::Abort, reason);
        self.abort_comm();
    }

    /// Leaves the job: goodbye to the peers, communicator destroyed (everything enqueued has
    /// completed: every collective waits).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.tell_peers(Kind::Bye, "");
        for (_, stream) in self.writers.iter() {
            let stream = stream.lock().unwrap_or_else(|e| e.into_inner());
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        if !self.aborted.swap(true, Ordering::SeqCst) {
            let lib = self.lib();
            // SAFETY: the communicator is valid, idle and destroyed once.
            unsafe {
                (lib.comm_destroy)(self.comm);
            }
        }
    }
}

/// Watches one link: a goodbye ends the watch, an abort message or a closed connection records
/// the failure (unless this rank is leaving itself); rank 0 passes failures on to the others.
struct Watcher {
    rank: usize,
    peer: usize,
    failure: Failure,
    closing: Arc<AtomicBool>,
    writers: Arc<Vec<(usize, Mutex<TcpStream>)>>,
}

impl Watcher {
    fn run(self, mut stream: TcpStream) {
        let reason = loop {
            match wire::read_frame(&mut stream) {
                Ok(Received::Frame(Kind::Bye, _)) => return,
                Ok(Received::Frame(Kind::Abort, message)) => {
                    let message = String::from_utf8_lossy(&message).into_owned();
                    // Rank 0 forwards its own view; a forwarded message already names its origin.
                    break if message.starts_with("rank ") {
                        message
                    } else {
                        format!("rank {} failed: {message}", self.peer)
                    };
                }
                Ok(Received::Frame(_, _)) => continue,
                Ok(Received::Closed) | Err(_) => {
                    break format!(
                        "lost the connection to rank {}: its process ended (killed, crashed or \
                         out of memory; see its log)",
                        self.peer
                    )
                }
            }
        };
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        tracing::error!(rank = self.rank, peer = self.peer, "{reason}");
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(reason.clone());
        }
        drop(failure);
        if self.rank == 0 {
            let forwarded = match reason.strip_prefix("lost") {
                Some(rest) => format!("rank 0 lost{rest}"),
                None => reason,
            };
            for (peer, stream) in self.writers.iter() {
                if *peer != self.peer {
                    let mut stream = stream.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = wire::write_frame(&mut stream, Kind::Abort, forwarded.as_bytes());
                }
            }
        }
    }
}
