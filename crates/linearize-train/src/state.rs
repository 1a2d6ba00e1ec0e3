//! Resumable training state under `<run>/state/`.
//!
//! ```text
//! state/step-000400/          one directory per saved state, named by the run-wide step
//!   params.safetensors        the trainable tensors
//!   optimizer.safetensors     the optimizer state (moments, step counts, master values)
//!   state.json                {"format": 1, "state": TrainState}
//!   SHA256SUMS                sha256 of every other file (`sha256sum -c SHA256SUMS` checks it)
//! state/best/                 the same layout, for the state with the best validation loss
//! ```
//! A directory is built under a temporary name and renamed into place once complete and fsynced,
//! so a job killed at any instant leaves complete states plus, at worst, a temporary directory
//! that the next scan removes. A state whose files do not match their checksums is skipped with a
//! warning and the previous one is used.
mod checksums;
mod preempt;
mod seeds;

pub use preempt::{Preempted, Preemption, EXIT_PREEMPTED};
pub use seeds::SeedStream;

use crate::schedule::ScheduleState;
use anyhow::{bail, ensure, Context, Result};
use linearize_models::atomic::AtomicDir;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

const STATE_FORMAT: u32 = 1;
const STATE_JSON: &str = "state.json";
const PARAMS_FILE: &str = "params.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const BEST_DIR: &str = "best";

/// Everything besides tensors that a resumed job needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// The stage's name in the recipe.
    pub stage: String,
    /// Optimizer updates completed in this stage.
    pub step: u64,
    /// Optimizer updates completed in the whole run, all stages; names the directory and orders
    /// the states (stage-local steps repeat from one stage to the next).
    pub run_step: u64,
    /// Training tokens consumed in this stage.
    pub tokens_seen: u64,
    /// Lowest validation loss of this stage so far.
    pub best_val_loss: Option<f64>,
    /// The learning-rate schedule's state.
    pub schedule: ScheduleState,
    /// The seed stream all random consumers draw from.
    pub rng: SeedStream,
    /// Where the data pipeline stands, in the pipeline's own format.
    pub data_cursor: serde_json::Value,
    /// [`recipe_hash`] of the resolved recipe that produced this state.
    pub recipe_hash: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    state: TrainState,
}

/// The tensors of a state: trainable parameters and optimizer state, each by name.
#[derive(Debug, Default)]
pub struct StateTensors {
    pub params: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
}

/// A verified state read back from disk (tensors on the CPU).
#[derive(Debug)]
pub struct LoadedState {
    pub dir: PathBuf,
    pub state: TrainState,
    pub tensors: StateTensors,
}

impl LoadedState {
    /// Fails unless the state was written by the recipe whose [`recipe_hash`] is `hash`: resuming
    /// under a changed recipe would silently mix two experiments.
    pub fn ensure_recipe(&self, hash: &str) -> Result<()> {
        ensure!(
            self.state.recipe_hash == hash,
            "{} was written by a different recipe (hash {}, this recipe {hash}); resume with the \
             original recipe or start a new run directory",
            self.dir.display(),
            self.state.recipe_hash
        );
        Ok(())
    }
}

/// The hash recorded in [`TrainState::recipe_hash`]: hex SHA-256 of the resolved recipe text.
pub fn recipe_hash(resolved_recipe: &str) -> String {
    checksums::hex(&Sha256::digest(resolved_recipe.as_bytes()))
}

/// `<run>/state`.
pub fn states_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("state")
}

/// Saves `state` as `<run>/state/step-<run_step>/`, then keeps only the `keep_last` most recent
/// states up to this one and removes states of later steps (left by a run line that was abandoned
/// when the job resumed from an earlier state). Returns the new directory.
pub fn save_state(
    run_dir: &Path,
    state: &TrainState,
    tensors: &StateTensors,
    keep_last: usize,
) -> Result<PathBuf> {
    ensure!(keep_last >= 1, "keep_last must be at least 1");
    let root = states_dir(run_dir);
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    clean_interrupted(&root)?;
    let dest = root.join(step_dir_name(state.run_step));
    write_state_dir(&dest, state, tensors)?;
    prune(&root, state.run_step, keep_last)?;
    tracing::info!(dir = %dest.display(), "saved training state");
    Ok(dest)
}

/// Saves `state` as `<run>/state/best/`, replacing the previous best.
pub fn save_best(run_dir: &Path, state: &TrainState, tensors: &StateTensors) -> Result<PathBuf> {
    let root = states_dir(run_dir);
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    clean_interrupted(&root)?;
    let dest = root.join(BEST_DIR);
    write_state_dir(&dest, state, tensors)?;
    Ok(dest)
}

/// The best state saved by [`save_best`], verified, if there is one. A damaged one is treated
/// as absent, with a warning naming it and the reason: the step states carry the run on, and
/// the next better validation loss saves a new best.
pub fn load_best(run_dir: &Path) -> Result<Option<LoadedState>> {
    let dir = states_dir(run_dir).join(BEST_DIR);
    if !dir.exists() {
        return Ok(None);
    }
    match load_state_dir(&dir) {
        Ok(best) => Ok(Some(best)),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "ignoring the damaged best state: {e:#}");
            Ok(None)
        }
    }
}

/// The newest `step-*` state whose checksums and contents verify. Damaged ones are reported with
/// a warning naming the directory and the reason, and skipped; leftovers of interrupted saves are
/// removed. `None` when there is no state yet; an error when states exist but none is valid (the
/// job must not silently start over).
pub fn latest_valid_state(run_dir: &Path) -> Result<Option<LoadedState>> {
    latest_fitting_state(run_dir, &|_| Ok(()))
}

/// Like [`latest_valid_state`], with the job's own checks (`fits`: the tensors it trains, the
/// steps its stage can have reached) run inside the selection, so a state that verifies but
/// does not fit is skipped for the one before it, with a warning, like a damaged one.
pub fn latest_fitting_state(
    run_dir: &Path,
    fits: &dyn Fn(&LoadedState) -> Result<()>,
) -> Result<Option<LoadedState>> {
    let root = states_dir(run_dir);
    if !root.exists() {
        return Ok(None);
    }
    clean_interrupted(&root)?;
    let dirs = step_dirs(&root)?;
    for (run_step, dir) in dirs.iter().rev() {
        match load_state_dir(dir).and_then(|loaded| {
            ensure!(
                loaded.state.run_step == *run_step,
                "state.json says run step {}, the directory name {run_step}",
                loaded.state.run_step
            );
            fits(&loaded)?;
            Ok(loaded)
        }) {
            Ok(loaded) => return Ok(Some(loaded)),
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                "skipping damaged training state, trying the previous one: {e:#}"
            ),
        }
    }
    if dirs.is_empty() {
        return Ok(None);
    }
    bail!(
        "none of the {} states in {} is valid (see the warnings above); remove the directory to \
         start the run over",
        dirs.len(),
        root.display()
    )
}

/// Verifies and reads one state directory.
pub fn load_state_dir(dir: &Path) -> Result<LoadedState> {
    let read = || -> Result<LoadedState> {
        checksums::verify(dir)?;
        let json =
            fs::read(dir.join(STATE_JSON)).with_context(|| format!("reading {STATE_JSON}"))?;
        let file: StateFile =
            serde_json::from_slice(&json).with_context(|| format!("parsing {STATE_JSON}"))?;
        ensure!(
            file.format == STATE_FORMAT,
            "{STATE_JSON} has format {}, this build reads format {STATE_FORMAT}",
            file.format
        );
        let tensors = StateTensors {
            params: Tensor::read_safetensors(dir.join(PARAMS_FILE))?,
            optimizer: Tensor::read_safetensors(dir.join(OPTIMIZER_FILE))?,
        };
        Ok(LoadedState {
            dir: dir.to_owned(),
            state: file.state,
            tensors,
        })
    };
    read().with_context(|| format!("training state {}", dir.display()))
}

fn step_dir_name(run_step: u64) -> String {
    format!("step-{run_step:06}")
}

fn write_state_dir(dest: &Path, state: &TrainState, tensors: &StateTensors) -> Result<()> {
    let dir = AtomicDir::new(dest)?;
    write_tensors(&dir.path().join(PARAMS_FILE), &tensors.params)?;
    write_tensors(&dir.path().join(OPTIMIZER_FILE), &tensors.optimizer)?;
    let json = serde_json::to_vec_pretty(&StateFile {
        format: STATE_FORMAT,
        state: state.clone(),
    })?;
    fs::write(dir.path().join(STATE_JSON), json)
        .with_context(|| format!("writing {STATE_JSON}"))?;
    checksums::write(dir.path())?;
    dir.commit()
        .with_context(|| format!("saving {}", dest.display()))
}

fn write_tensors(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let cpu = named
        .iter()
        .map(|(name, t)| {
            let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
            Ok((name.as_str(), t))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::write_safetensors(&cpu, path).with_context(|| format!("writing {}", path.display()))
}

/// `step-*` directories of `root`, oldest first.
fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let step = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<u64>().ok());
        if let (Some(step), true) = (step, entry.file_type()?.is_dir()) {
            dirs.push((step, entry.path()));
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Removes what interrupted saves leave behind: `.<name>.tmp-<pid>` build directories, and
/// `<name>.old.tmp`, a replaced directory moved aside (put back if its replacement never landed).
fn clean_interrupted(root: &Path) -> Result<()> {
    for entry in fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') && name.contains(".tmp-") {
            tracing::warn!(dir = %path.display(), "removing the leftover of an interrupted save");
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        } else if let Some(original) = name.strip_suffix(".old.tmp") {
            let original = root.join(original);
            if original.exists() {
                fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            } else {
                tracing::warn!(dir = %original.display(), "restoring a state an interrupted save moved aside");
                fs::rename(&path, &original)
                    .with_context(|| format!("restoring {}", original.display()))?;
            }
        }
    }
    Ok(())
}

fn prune(root: &Path, saved: u64, keep_last: usize) -> Result<()> {
    let dirs = step_dirs(root)?;
    let kept_from = dirs
        .iter()
        .filter(|(step, _)| *step <= saved)
        .count()
        .saturating_sub(keep_last);
    for (index, (step, dir)) in dirs.iter().enumerate() {
        if *step > saved {
            tracing::info!(dir = %dir.display(), "removing a state newer than the one just saved (abandoned after a resume)");
        } else if index >= kept_from {
            continue;
        }
        fs::remove_dir_all(dir).with_context(|| format!("removing old state {}", dir.display()))?;
    }
    Ok(())
}
