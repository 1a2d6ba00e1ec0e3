//! Flags shared by every command that runs a model (`--device`, `--dtype`) and loading the
//! model in any of the forms a run exports.
use anyhow::{bail, Result};
use linearize_models::source;
use linearize_train::export::{self, LoadedModel};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

#[derive(clap::Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// Where to run: `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype of the model weights: `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl RuntimeArgs {
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }

    pub fn kind(&self) -> Result<Kind> {
        parse_dtype(&self.dtype)
    }
}

/// Whether `s` names a device at all (`auto`, `cpu`, `cuda`, `cuda:N`), whatever this machine
/// has: what a dry run checks of a device it plans for.
pub fn check_device_spec(s: &str) -> Result<()> {
    match s {
        "auto" | "cpu" | "cuda" => Ok(()),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(_)) => Ok(()),
            _ => bail!("--device {other:?}: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: no CUDA device is available (libtorch sees none)");
            }
            Device::Cuda(0)
        }
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) if i < tch::Cuda::device_count() as usize => Device::Cuda(i),
            Some(Ok(i)) => bail!(
                "--device {other}: CUDA device {i} does not exist ({} visible)",
                tch::Cuda::device_count()
            ),
            _ => bail!("--device {other:?}: expected cpu, cuda, cuda:N or auto"),
        },
    })
}

/// The device of a job's process: `model.device` as [`parse_device`] reads it, except that under
/// a data-parallel launch `cuda` and `auto` (with CUDA) mean this process's GPU: `cuda:LOCAL_RANK`,
/// or `cuda:0` when the launcher gave each process a single visible GPU (SLURM's
/// `--gpus-per-task`). An explicit `cuda:N` is taken as it is.
pub fn job_device(spec: &str, launch: &linearize_dist::Launch) -> Result<Device> {
    let device = parse_device(spec)?;
    if !launch.is_distributed() || spec.starts_with("cuda:") {
        return Ok(device);
    }
    match device {
        Device::Cuda(_) => {
            let visible = tch::Cuda::device_count() as usize;
            let local = launch.local_rank;
            if local < visible {
                Ok(Device::Cuda(local))
            } else if visible == 1 {
                Ok(Device::Cuda(0))
            } else {
                bail!(
                    "model.device {spec}: rank {} has LOCAL_RANK {local}, but only {visible} CUDA \
                     devices are visible: start at most one process per GPU",
                    launch.rank
                )
            }
        }
        other => Ok(other),
    }
}

pub fn parse_dtype(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        other => bail!("--dtype {other:?}: expected f32, bf16 or f16"),
    })
}

/// Resolves `--model` (a local directory or a hub id) and loads it: a plain model, an exported
/// converted `model/` directory, or with `--adapters` the base model plus its
/// `adapters.safetensors`. Returns the model's directory (where its tokenizer is) too.
pub fn load_model(
    model: &str,
    adapters: Option<&Path>,
    runtime: &RuntimeArgs,
) -> Result<(PathBuf, LoadedModel)> {
    let dir = source::resolve(model)?;
    let loaded = export::load_model(&dir, adapters, runtime.device()?, runtime.kind()?)?;
    if let Some(converted) = &loaded.converted {
        tracing::info!(
            "{} of {} layers run converted attention:\n{}",
            converted.len(),
            loaded.model.num_layers(),
            converted.table()
        );
    }
    Ok((dir, loaded))
}
