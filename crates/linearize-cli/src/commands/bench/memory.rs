//! Peak memory of one measurement, read from outside libtorch, which tch does not expose:
//! - CUDA: device memory in use from the driver (`cuMemGetInfo`). The caching allocator keeps what
//!   it has reserved until asked to empty its cache, so the growth in use over a run is the peak
//!   memory the allocator reserved for it (an upper bound of the peak of live tensors). Other
//!   processes on the same GPU would distort it.
//! - CPU: the process's resident-set high-water mark (`VmHWM`), reset before the run by writing
//!   `5` to `/proc/self/clear_refs` (Linux).
//!
//! Each measurement runs in its own process, so nothing from an earlier one is counted.
use anyhow::{bail, Context, Result};
use libloading::{Library, Symbol};
use std::ffi::{c_char, c_int, c_void};
use tch::Device;

type CuResult = c_int;

/// The CUDA driver library (`libcuda.so.1`), present wherever a CUDA device is usable.
pub struct CudaDriver {
    lib: Library,
}

impl CudaDriver {
    pub fn load() -> Result<Self> {
        // SAFETY: loading the system CUDA driver runs no initialisers with preconditions.
        let lib = unsafe { Library::new("libcuda.so.1") }
            .context("loading the CUDA driver libcuda.so.1")?;
        let driver = Self { lib };
        // SAFETY: cuInit(0) is the documented first driver call; repeating it is harmless.
        driver.check("cuInit", unsafe {
            driver.symbol::<unsafe extern "C" fn(u32) -> CuResult>(b"cuInit\0")?(0)
        })?;
        Ok(driver)
    }

    /// # Safety
    /// `T` must be the C signature of the driver function `name`.
    unsafe fn symbol<T>(&self, name: &[u8]) -> Result<Symbol<'_, T>> {
        let printable = String::from_utf8_lossy(&name[..name.len() - 1]).into_owned();
        unsafe { self.lib.get(name) }.with_context(|| format!("libcuda.so.1 has no {printable}"))
    }

    fn check(&self, call: &str, rc: CuResult) -> Result<()> {
        if rc != 0 {
            bail!("{call} failed with CUresult {rc}");
        }
        Ok(())
    }

    fn device(&self, ordinal: usize) -> Result<c_int> {
        let mut dev: c_int = 0;
        // SAFETY: signature of cuDeviceGet(CUdevice*, int); `dev` outlives the call.
        let rc = unsafe {
            self.symbol::<unsafe extern "C" fn(*mut c_int, c_int) -> CuResult>(b"cuDeviceGet\0")?(
                &mut dev,
                ordinal as c_int,
            )
        };
        self.check("cuDeviceGet", rc)?;
        Ok(dev)
    }

    pub fn device_name(&self, ordinal: usize) -> Result<String> {
        let dev = self.device(ordinal)?;
        let mut buf = [0 as c_char; 256];
        // SAFETY: signature of cuDeviceGetName(char*, int, CUdevice); the buffer holds 256 bytes.
        let rc = unsafe {
            self.symbol::<unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult>(
                b"cuDeviceGetName\0",
            )?(buf.as_mut_ptr(), buf.len() as c_int, dev)
        };
        self.check("cuDeviceGetName", rc)?;
        let bytes: Vec<u8> = buf
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn total_bytes(&self, ordinal: usize) -> Result<u64> {
        let dev = self.device(ordinal)?;
        let mut total: usize = 0;
        // SAFETY: signature of cuDeviceTotalMem_v2(size_t*, CUdevice).
        let rc = unsafe {
            self.symbol::<unsafe extern "C" fn(*mut usize, c_int) -> CuResult>(
                b"cuDeviceTotalMem_v2\0",
            )?(&mut total, dev)
        };
        self.check("cuDeviceTotalMem_v2", rc)?;
        Ok(total as u64)
    }

    /// Device memory in use on `ordinal`, queried in its primary context (the one libtorch uses).
    pub fn used_bytes(&self, ordinal: usize) -> Result<u64> {
        type Retain = unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult;
        type Push = unsafe extern "C" fn(*mut c_void) -> CuResult;
        type Pop = unsafe extern "C" fn(*mut *mut c_void) -> CuResult;
        type Release = unsafe extern "C" fn(c_int) -> CuResult;
        type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult;
        let dev = self.device(ordinal)?;
        let (mut ctx, mut popped) = (std::ptr::null_mut(), std::ptr::null_mut());
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: the signatures are the driver's; the context is retained before it is pushed
        // and released after it is popped, leaving the thread's context stack as it was.
        unsafe {
            self.check(
                "cuDevicePrimaryCtxRetain",
                self.symbol::<Retain>(b"cuDevicePrimaryCtxRetain\0")?(&mut ctx, dev),
            )?;
            self.check(
                "cuCtxPushCurrent",
                self.symbol::<Push>(b"cuCtxPushCurrent_v2\0")?(ctx),
            )?;
            let rc = self.symbol::<MemGetInfo>(b"cuMemGetInfo_v2\0")?(&mut free, &mut total);
            self.check(
                "cuCtxPopCurrent",
                self.symbol::<Pop>(b"cuCtxPopCurrent_v2\0")?(&mut popped),
            )?;
            self.check(
                "cuDevicePrimaryCtxRelease",
                self.symbol::<Release>(b"cuDevicePrimaryCtxRelease_v2\0")?(dev),
            )?;
            self.check("cuMemGetInfo", rc)?;
        }
        Ok((total - free) as u64)
    }
}

/// Measures the peak memory of a run on one device.
pub enum MemoryProbe {
    Cuda { driver: CudaDriver, ordinal: usize },
    Cpu,
}

impl MemoryProbe {
    pub fn new(device: Device) -> Result<Self> {
        match device {
            Device::Cuda(ordinal) => Ok(Self::Cuda {
                driver: CudaDriver::load()?,
                ordinal,
            }),
            Device::Cpu => Ok(Self::Cpu),
            other => bail!("no memory probe for device {other:?}"),
        }
    }

    /// Starts a measurement and returns its baseline.
    pub fn start(&self) -> Result<u64> {
        match self {
            Self::Cuda { driver, ordinal } => driver.used_bytes(*ordinal),
            Self::Cpu => {
                std::fs::write("/proc/self/clear_refs", "5")
                    .context("resetting the RSS high-water mark (/proc/self/clear_refs)")?;
                proc_status_bytes("VmRSS")
            }
        }
    }

    /// Bytes a run may still take beyond `baseline` (from [`MemoryProbe::start`]): the device's
    /// memory not in use at the baseline (libtorch's cached blocks count as in use then, so
    /// start after the model is loaded and before anything else), or the host's available memory
    /// on the CPU.
    pub fn headroom(&self, baseline: u64) -> Result<u64> {
        match self {
            Self::Cuda { driver, ordinal } => {
                Ok(driver.total_bytes(*ordinal)?.saturating_sub(baseline))
            }
            Self::Cpu => available_host_bytes(),
        }
    }

    /// Peak bytes above `baseline` since [`MemoryProbe::start`].
    pub fn peak_since(&self, baseline: u64) -> Result<u64> {
        let now = match self {
            Self::Cuda { driver, ordinal } => driver.used_bytes(*ordinal)?,
            Self::Cpu => proc_status_bytes("VmHWM")?,
        };
        Ok(now.saturating_sub(baseline))
    }
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .and_then(|rest| rest.strip_prefix(':'))
        })
        .with_context(|| format!("/proc/self/status has no {field}"))?;
    let kib: u64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("/proc/self/status {field}: {line:?} is not a kB count"))?;
    Ok(kib * 1024)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn available_host_bytes() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .context("/proc/meminfo has no MemAvailable")?;
    let kib: u64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .context("/proc/meminfo MemAvailable")?;
    Ok(kib * 1024)
}
