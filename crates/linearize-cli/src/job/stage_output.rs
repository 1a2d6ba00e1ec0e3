//! What a finished stage leaves in `stages/`: its trained tensors and how far it went. A stage
//! whose output exists is done and is not run again when the job resumes.
use anyhow::{Context, Result};
use linearize_models::atomic;
use linearize_train::optim::Trainable;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// `stages/<stage>.json`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Optimizer updates the stage made (run-wide step numbers of later stages follow them).
    pub steps: u64,
    /// Training tokens it consumed.
    pub tokens: u64,
}

pub struct StageOutput {
    tensors: PathBuf,
    record: PathBuf,
}

impl StageOutput {
    pub fn new(run_dir: &Path, stage: &str) -> Self {
        let dir = run_dir.join("stages");
        Self {
            tensors: dir.join(format!("{stage}.safetensors")),
            record: dir.join(format!("{stage}.json")),
        }
    }

    /// The record of a finished stage, `None` when the stage has not finished.
    pub fn finished(&self) -> Result<Option<StageRecord>> {
        if !self.tensors.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.record)
            .with_context(|| format!("reading {}", self.record.display()))?;
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("parsing {}", self.record.display()))
    }

    /// Copies the stage's tensors into `params`, checking names and shapes.
    pub fn load_into(&self, params: Vec<(String, Tensor)>) -> Result<()> {
        let saved = Tensor::read_safetensors(&self.tensors)
            .with_context(|| format!("reading {}", self.tensors.display()))?;
        Trainable::new(params)?
            .load(&saved)
            .with_context(|| format!("loading {}", self.tensors.display()))
    }

    /// Writes the record, then the tensors (whose presence marks the stage finished), each
    /// atomically: a job killed in between runs the stage's last state again, nothing more.
    pub fn save(&self, params: &[(String, Tensor)], record: StageRecord) -> Result<()> {
        let dir = self
            .tensors
            .parent()
            .context("stage output has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        atomic::write_file(&self.record, serde_json::to_string(&record)?.as_bytes())?;
        let refs: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        // safetensors writes to a path: write beside the final name, sync, rename.
        let tmp = self.tensors.with_extension("safetensors.partial");
        Tensor::write_safetensors(&refs, &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.tensors)
            .with_context(|| format!("renaming {} into place", tmp.display()))
    }
}
