//! Throughput and memory against context length: for each length L, a prompt of L tokens is
//! prefilled in blocks of `prefill_chunk` tokens through the cache (as servers prefill long
//! prompts: the prompt's activations and logits never exist for all L positions at once, so the
//! memory measured is that of the cache, not of one huge forward pass), then `decode_tokens` tokens are decoded greedily one at a time through
//! the model's cache (a KV cache for softmax layers, a recurrent state or window cache for
//! linear ones). Tokens are pseudo-random ids from the seed: speed does not depend on them.
//!
//! Memory is what the measurement adds on top of what the process held before it (weights
//! included there), at its peak:
//! - **CPU**: peak resident set size (`VmHWM` in /proc/self/status, reset through
//!   /proc/self/clear_refs before each phase) minus the resident size before the prefill. To make
//!   freed tensors leave the resident set, large allocations are served by mmap
//!   (`mallopt(M_MMAP_THRESHOLD)`, glibc only), a process-wide setting made on first use.
//! - **CUDA**: device memory in use (`cudaMemGetInfo`), sampled after the prefill and after every
//!   decoding step, minus the value before. It includes what libtorch's caching allocator keeps
//!   reserved, which never shrinks within a process: a later measurement cannot show less than an
//!   earlier peak, so measure the model with the smaller footprint first (the report measures
//!   the student before the teacher).
//!
//! Decode memory includes the cache the prefill left behind, which is what grows with L for
//! softmax attention and stays flat for linear attention.
use anyhow::{bail, ensure, Context, Result};
use linearize_models::lm::CausalLm;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpeedConfig {
    pub enabled: bool,
    /// Prompt lengths, tokens; lengths that with the decoded tokens exceed the model's context
    /// are skipped.
    pub context_lengths: Vec<usize>,
    /// Tokens decoded after each prompt.
    pub decode_tokens: usize,
    /// Tokens per prefill call.
    pub prefill_chunk: usize,
}

impl Default for SpeedConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            context_lengths: vec![128, 256, 512, 1024],
            decode_tokens: 32,
            prefill_chunk: 1024,
        }
    }
}

/// How memory was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemorySource {
    /// Peak resident set size of the process.
    CpuPeakRss,
    /// Device memory in use, sampled after each step.
    CudaDeviceUsed,
    /// Not measured on this device.
    Unavailable,
}

impl MemorySource {
    /// What the report calls the measure.
    pub fn name(self) -> &'static str {
        match self {
            Self::CpuPeakRss => "peak RSS (CPU)",
            Self::CudaDeviceUsed => "device memory in use (CUDA)",
            Self::Unavailable => "not measured on this device",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeedPoint {
    pub context: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Peak memory added during the prefill, bytes.
    pub prefill_peak_bytes: Option<u64>,
    /// Peak memory added during decoding (the cache of the prefill included), bytes.
    pub decode_peak_bytes: Option<u64>,
    /// Bytes the model's cache holds after the last decoded token (KV cache or recurrent state),
    /// where the model reports it: unlike the peaks, independent of allocator caching.
    #[serde(default)]
    pub cache_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeedReport {
    pub device: String,
    pub memory: MemorySource,
    pub decode_tokens: usize,
    pub points: Vec<SpeedPoint>,
    /// Lengths left out because they do not fit the model's context.
    pub skipped_lengths: Vec<usize>,
}

/// Measures `model` at each length of `cfg`; ids are drawn below `vocab_size` from `seed`.
pub fn measure<M: CausalLm>(
    model: &M,
    vocab_size: usize,
    cfg: &SpeedConfig,
    seed: u64,
) -> Result<SpeedReport> {
    ensure!(
        !cfg.context_lengths.is_empty(),
        "speed needs at least one context length"
    );
    ensure!(
        cfg.context_lengths.iter().all(|&l| l >= 1),
        "context lengths must be at least 1"
    );
    ensure!(cfg.decode_tokens >= 1, "decode_tokens must be at least 1");
    ensure!(cfg.prefill_chunk >= 1, "prefill_chunk must be at least 1");
    ensure!(vocab_size >= 1, "vocabulary is empty");
    let device = model.device();
    let meter = Meter::new(device)?;
    let _no_grad = tch::no_grad_guard();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut points, mut skipped_lengths) = (Vec::new(), Vec::new());
    // One short untimed run first: kernel selection and allocator warm-up would otherwise be
    // charged to the first length.
    run_once(
        model,
        &random_ids(&mut rng, 8, vocab_size),
        2,
        8,
        &Meter::Off,
    )?;
    for &context in &cfg.context_lengths {
        linearize_models::stop::check()?;
        let fits = model
            .max_context()
            .is_none_or(|max| (context + cfg.decode_tokens) as i64 <= max);
        if !fits {
            skipped_lengths.push(context);
            continue;
        }
        let ids = random_ids(&mut rng, context, vocab_size);
        let point = run_once(model, &ids, cfg.decode_tokens, cfg.prefill_chunk, &meter)
            .with_context(|| format!("speed at context {context}"))?;
        tracing::info!(
            "context {context}: prefill {:.0} tok/s, decode {:.1} tok/s, decode memory {}, \
             cache {}",
            point.prefill_tokens_per_s,
            point.decode_tokens_per_s,
            mib(point.decode_peak_bytes),
            mib(point.cache_bytes)
        );
        points.push(point);
    }
    Ok(SpeedReport {
        device: linearize_models::names::device_name(device),
        memory: meter.source(),
        decode_tokens: cfg.decode_tokens,
        points,
        skipped_lengths,
    })
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn random_ids(rng: &mut ChaCha8Rng, n: usize, vocab_size: usize) -> Vec<i64> {
    (0..n)
        .map(|_| rng.random_range(0..vocab_size) as i64)
        .collect()
}

fn run_once<M: CausalLm>(
    model: &M,
    ids: &[i64],
    decode: usize,
    prefill_chunk: usize,
    meter: &Meter,
) -> Result<SpeedPoint> {
    let device = model.device();
    let prompt = Tensor::from_slice(ids).view([1, -1]).to_device(device);
    sync(device);
    let baseline = meter.start()?;
    let started = Instant::now();
    let mut cache = model.new_cache(1)?;
    let mut next = None;
    for block in prompt.split(prefill_chunk as i64, 1) {
        // Only the last position's choice is kept: each block's logits are freed at once.
        next = Some(
            model
                .forward_cached(&block, &mut cache)?
                .select(1, -1)
                .argmax(-1, true), // (1, 1)
        );
    }
    let mut next = next.context("empty prompt")?;
    sync(device);
    let prefill_s = started.elapsed().as_secs_f64();
    let prefill_peak = meter.peak_since(baseline)?;
    meter.reset()?;
    let mut decode_peak = meter.peak_since(baseline)?;
    let started = Instant::now();
    for _ in 0..decode {
        next = model
            .forward_cached(&next, &mut cache)?
            .select(1, -1)
            .argmax(-1, true);
        if meter.samples_each_step() {
            sync(device);
            decode_peak = decode_peak.max(meter.peak_since(baseline)?);
        }
    }
    // Reading the last token waits for the device, so the timing covers all steps.
    let _ = next.to_kind(Kind::Int64).int64_value(&[0, 0]);
    let decode_s = started.elapsed().as_secs_f64();
    decode_peak = decode_peak.max(meter.peak_since(baseline)?);
    let cache_bytes = model.cache_bytes(&cache)?;
    Ok(SpeedPoint {
        context: ids.len(),
        prefill_tokens_per_s: ids.len() as f64 / prefill_s,
        decode_tokens_per_s: decode as f64 / decode_s,
        prefill_peak_bytes: prefill_peak,
        decode_peak_bytes: decode_peak,
        cache_bytes,
    })
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

type CudaMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;

/// Reads the memory in use on the measured device.
enum Meter {
    Cpu,
    Cuda(libloading::os::unix::Symbol<CudaMemGetInfo>),
    Off,
}

impl Meter {
    fn new(device: Device) -> Result<Self> {
        match device {
            Device::Cpu => {
                limit_malloc_retention();
                Ok(Self::Cpu)
            }
            Device::Cuda(_) => {
                // libtorch_cuda already loaded the CUDA runtime into the process.
                let this = libloading::os::unix::Library::this();
                // SAFETY: cudaMemGetInfo has this signature in every CUDA runtime; the library
                // is the running process and is never unloaded.
                match unsafe { this.get::<CudaMemGetInfo>(b"cudaMemGetInfo\0") } {
                    Ok(symbol) => Ok(Self::Cuda(symbol)),
                    Err(err) => {
                        tracing::warn!(
                            "CUDA memory not measured: cudaMemGetInfo not found ({err})"
                        );
                        Ok(Self::Off)
                    }
                }
            }
            _ => Ok(Self::Off),
        }
    }

    fn source(&self) -> MemorySource {
        match self {
            Self::Cpu => MemorySource::CpuPeakRss,
            Self::Cuda(_) => MemorySource::CudaDeviceUsed,
            Self::Off => MemorySource::Unavailable,
        }
    }

    fn samples_each_step(&self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// Resets the peak and returns the memory in use now.
    fn start(&self) -> Result<Option<u64>> {
        self.reset()?;
        match self {
            Self::Cpu => Ok(Some(proc_status_kib("VmRSS")? * 1024)),
            Self::Cuda(get) => Ok(Some(cuda_used(get)?)),
            Self::Off => Ok(None),
        }
    }

    fn reset(&self) -> Result<()> {
        if let Self::Cpu = self {
            // "5" resets the peak resident set size to the current one (Linux >= 4.0).
            std::fs::write("/proc/self/clear_refs", "5")
                .context("resetting the peak RSS through /proc/self/clear_refs")?;
        }
        Ok(())
    }

    /// Peak (CPU) or current (CUDA) memory in use above `baseline`.
    fn peak_since(&self, baseline: Option<u64>) -> Result<Option<u64>> {
        let Some(baseline) = baseline else {
            return Ok(None);
        };
        let now = match self {
            Self::Cpu => proc_status_kib("VmHWM")? * 1024,
            Self::Cuda(get) => cuda_used(get)?,
            Self::Off => return Ok(None),
        };
        Ok(Some(now.saturating_sub(baseline)))
    }
}

fn cuda_used(get: &CudaMemGetInfo) -> Result<u64> {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both pointers are valid for writes; the runtime writes two size_t values.
    let status = unsafe { get(&mut free, &mut total) };
    if status != 0 {
        bail!("cudaMemGetInfo failed with CUDA error {status}");
    }
    Ok((total - free) as u64)
}

/// A `kB` field of /proc/self/status.
fn proc_status_kib(field: &str) -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}

/// glibc keeps freed memory for reuse and raises its mmap threshold after large frees, so RSS
/// would stop tracking live tensors; a fixed threshold sends every large buffer to mmap, which
/// munmap returns at once.
fn limit_malloc_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters.
            let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024) };
            if ok != 1 {
                tracing::warn!("mallopt(M_MMAP_THRESHOLD) failed: CPU memory may be overstated");
            }
        });
    }
}
