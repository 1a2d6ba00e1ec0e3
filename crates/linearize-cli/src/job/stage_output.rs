//! What a finished stage leaves in `stages/`: its trained tensors and how far it went, with the
//! tensors' SHA-256 in the record. A stage whose output exists and verifies is done and is not
//! run again when the job resumes; a damaged one is reported and its stage runs again (from its
//! newest state), as a damaged state is skipped for the one before it.
use anyhow::{ensure, Context, Result};
use linearize_models::atomic;
use linearize_models::offline::sha256_file;
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

/// `stages/<stage>.json` on disk: the record and the SHA-256 of `<stage>.safetensors` (absent
/// in runs of earlier versions, whose outputs are taken as they are).
#[derive(Serialize, Deserialize)]
struct RecordFile {
    #[serde(flatten)]
    record: StageRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
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

    /// The record of a finished stage, `None` when the stage has not finished or its output is
    /// damaged (reported with a warning: the stage runs again).
    pub fn finished(&self) -> Result<Option<StageRecord>> {
        if !self.tensors.exists() {
            return Ok(None);
        }
        match self.verified_record() {
            Ok(record) => Ok(Some(record)),
            Err(e) => {
                tracing::warn!(
                    file = %self.tensors.display(),
                    "the stage's output is damaged, running the stage again: {e:#}"
                );
                Ok(None)
            }
        }
    }

    fn verified_record(&self) -> Result<StageRecord> {
        let text = std::fs::read_to_string(&self.record)
            .with_context(|| format!("reading {}", self.record.display()))?;
        let file: RecordFile = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", self.record.display()))?;
        if let Some(expected) = &file.sha256 {
            let actual = sha256_file(&self.tensors)?;
            ensure!(
                &actual == expected,
                "checksum mismatch: {} records sha256 {expected}, the file has {actual}",
                self.record.display()
            );
        }
        Ok(file.record)
    }

    /// Copies the stage's tensors into `params`, checking names and shapes.
    pub fn load_into(&self, params: Vec<(String, Tensor)>) -> Result<()> {
        let saved = Tensor::read_safetensors(&self.tensors)
            .with_context(|| format!("reading {}", self.tensors.display()))?;
        Trainable::new(params)?
            .load(&saved)
            .with_context(|| format!("loading {}", self.tensors.display()))
    }

    /// Writes the tensors beside their final name, then the record with their checksum, then
    /// renames the tensors into place (their presence marks the stage finished), each step
    /// atomic: a job killed in between runs the stage's last state again, nothing more.
    pub fn save(&self, params: &[(String, Tensor)], record: StageRecord) -> Result<()> {
        let dir = self
            .tensors
            .parent()
            .context("stage output has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let refs: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        // safetensors writes to a path: write beside the final name, sync, rename.
        let tmp = self.tensors.with_extension("safetensors.partial");
        Tensor::write_safetensors(&refs, &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        let file = RecordFile {
            record,
            sha256: Some(sha256_file(&tmp)?),
        };
        atomic::write_file(&self.record, serde_json::to_string(&file)?.as_bytes())?;
        std::fs::rename(&tmp, &self.tensors)
            .with_context(|| format!("renaming {} into place", tmp.display()))
    }
}
