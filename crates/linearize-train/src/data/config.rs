//! The recipe's `data` section.
use super::encoder::TextEncoder;
use anyhow::{bail, ensure, Result};
use linearize_models::prompt_format::{read_prompts_file, TemplateChoice};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where training text comes from, how it is cut into sequences, batched, split for
/// validation and cached.
///
/// ```yaml
/// data:
///   sources:
///     - {kind: text, path: data/sotu}
///     - {kind: alpaca, path: data/alpaca_clean.jsonl}
///   val_fraction: 0.02
///   seq_len: 1024
///   batch_size: 1
///   max_tokens: 20000000
///   cache_dir: cache/tokens
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training sources, read in the order given. May be empty only when `teacher_samples` is
    /// set (data-free training).
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Validation sources kept apart from `sources`. Give either these or `val_fraction`.
    #[serde(default)]
    pub val_sources: Vec<SourceConfig>,
    /// Fraction of the training documents (not tokens) held out for validation, chosen by
    /// `seed`; at least one document goes each way. 0 (the default) holds nothing out.
    #[serde(default)]
    pub val_fraction: f64,
    /// Cap on the number of validation sequences kept (the first ones), to bound eval time.
    #[serde(default)]
    pub max_val_sequences: Option<usize>,
    /// Tokens per training sequence. Documents are joined (EOS after each, BOS before each
    /// per `bos`) into one stream that is cut into sequences; a last partial sequence is
    /// dropped.
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Sequences per micro-batch, all data-parallel ranks together: each of N ranks takes
    /// `batch_size / N` of them (so a job gives the same updates on any number of GPUs, and
    /// `batch_size` must be a multiple of N).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Store `seq_len + 1` tokens per sequence (consecutive sequences share one token) so that
    /// every one of the `seq_len` inputs has its next-token target. When false a sequence is
    /// exactly `seq_len` tokens and the last position has no target.
    #[serde(default = "default_true")]
    pub next_token_targets: bool,
    /// Seed of the document shuffle, the validation hold-out and the per-epoch order.
    #[serde(default)]
    pub seed: u64,
    /// Shuffle the documents before packing and the sequences at every epoch. When false,
    /// sources are packed and served in file order (the hold-out still uses `seed`).
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Whether documents start with the tokenizer's BOS token: `auto` (when the tokenizer
    /// has one), `always` (error if it has none) or `never`.
    #[serde(default)]
    pub bos: BosPolicy,
    /// Stop after this many training tokens (all ranks together; `seq_len` per sequence).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Stop after this many passes over the training sequences.
    #[serde(default)]
    pub max_epochs: Option<u64>,
    /// How `alpaca` and `chat` records become text: `alpaca` (Alpaca's plain instruction
    /// prompt), `chat` (the tokenizer's chat template, which must exist) or the path of a Jinja
    /// chat template file. Not set: the tokenizer's chat template, or `alpaca` when it has none
    /// (base models), as the log says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateChoice>,
    /// Directory for cached token ids, one file per source keyed by its files' paths, sizes
    /// and modification times and the tokenizer; none: tokenise on every run.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Sequences sampled from the teacher model (data-free training, or the teacher's chat
    /// answers beside the corpus). They are added, `weight` times each, to the sequences packed
    /// from `sources` (if any).
    #[serde(default)]
    pub teacher_samples: Option<TeacherSamplesConfig>,
}

/// One training or validation source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// How to read the files: `text`, `jsonl`, `alpaca` or `chat`.
    pub kind: SourceKind,
    /// A file, or a directory: searched recursively for `*.txt` (`text`) or `*.jsonl` (the
    /// other kinds) in path order, unless it holds a `manifest.json` from the text fetcher,
    /// which then names the files of `split` (its per-document files when it lists them).
    /// With `hub`: a file or folder of the dataset repository, read instead of `split`'s files.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    /// A dataset repository on the hub, `org/name[@revision]`: its JSON, JSONL and Parquet
    /// files of `split` (default `train`), fetched into the Hugging Face cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// JSON field holding the document: the text for `jsonl` (default `text`), the message
    /// list for `chat` (default `messages`). Not used by `text` or `alpaca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Split of a `manifest.json` directory or a `hub` dataset to read (default `train`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// `text` only: split each file into documents at this string (e.g. "\n\n\n");
    /// default: one document per file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub separator: Option<String>,
    /// Training sources only: how many times each of the source's training documents is used
    /// per epoch on average, to mix sources in chosen proportions. 2 repeats every document
    /// twice; 0.5 keeps half of them (chosen by `data.seed`); 1.5 repeats every document once
    /// and half of them twice. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// Source formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Plain UTF-8 text.
    Text,
    /// One JSON object per line; the document is the string under `field`.
    Jsonl,
    /// One JSON object per line with `instruction`, optional `input`, and `output`, rendered
    /// in the prompt format (`data.template`): through a chat template as a user turn
    /// (instruction, blank line, input) and an assistant turn (output).
    Alpaca,
    /// One JSON object per line whose `field` is a list of `{role, content}` messages,
    /// rendered in the prompt format (`data.template`).
    Chat,
}

impl SourceKind {
    /// The recipe's name of the kind.
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Jsonl => "jsonl",
            Self::Alpaca => "alpaca",
            Self::Chat => "chat",
        }
    }
}

/// Whether each document starts with BOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BosPolicy {
    #[default]
    Auto,
    Always,
    Never,
}

/// Sampling of training sequences from the teacher (data-free mode, or teacher answers mixed
/// with the corpus).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSamplesConfig {
    /// Number of sequences to sample, each as long as a training sequence.
    pub num_sequences: usize,
    /// Prompts the samples continue, used in turn; empty: sample from BOS alone.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// A text file of prompts, one a line (blank lines and lines starting with `#` skipped),
    /// instead of `prompts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts_file: Option<PathBuf>,
    /// Render each prompt as a user turn through the tokenizer's chat template with the
    /// generation prompt, so that the teacher answers as the assistant; after the answer's
    /// end-of-turn the sequence goes on with the next prompt (sequences pack several answered
    /// prompts). Needs a teacher with a chat template.
    #[serde(default, skip_serializing_if = "is_false")]
    pub chat: bool,
    /// How many times each sampled sequence is used per epoch on average, as a source's
    /// `weight`: 2 repeats every one twice, 0.5 keeps half of them (chosen by `data.seed`).
    /// Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Sampling temperature (> 0).
    #[serde(default = "default_one")]
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    #[serde(default = "default_one")]
    pub top_p: f64,
}

fn path_is_empty(path: &Path) -> bool {
    path.as_os_str().is_empty()
}
fn default_seq_len() -> usize {
    1024
}
fn default_batch_size() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn is_false(value: &bool) -> bool {
    !value
}

impl DataConfig {
    /// Checks values and combinations serde cannot; errors name the offending key.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.seq_len > 0, "data.seq_len must be at least 1");
        ensure!(self.batch_size > 0, "data.batch_size must be at least 1");
        ensure!(
            (0.0..1.0).contains(&self.val_fraction),
            "data.val_fraction must be in [0, 1), got {}",
            self.val_fraction
        );
        ensure!(
            self.val_fraction == 0.0 || self.val_sources.is_empty(),
            "data: give either val_fraction or val_sources, not both"
        );
        ensure!(
            self.val_fraction == 0.0 || !self.sources.is_empty(),
            "data.val_fraction needs data.sources to hold documents out of"
        );
        ensure!(
            !self.sources.is_empty() || self.teacher_samples.is_some(),
            "data.sources is empty and data.teacher_samples is not set: no training data"
        );
        ensure!(
            self.max_tokens != Some(0),
            "data.max_tokens must be at least 1"
        );
        ensure!(
            self.max_epochs != Some(0),
            "data.max_epochs must be at least 1"
        );
        ensure!(
            self.max_val_sequences != Some(0),
            "data.max_val_sequences must be at least 1"
        );
        for (key, list) in [
            ("sources", &self.sources),
            ("val_sources", &self.val_sources),
        ] {
            for (i, source) in list.iter().enumerate() {
                source.validate(&format!("data.{key}[{i}]"))?;
            }
        }
        for (i, source) in self.sources.iter().enumerate() {
            if let Some(w) = source.weight {
                ensure!(
                    w.is_finite() && w > 0.0,
                    "data.sources[{i}].weight must be a positive number, got {w}"
                );
            }
        }
        if let Some(i) = self.val_sources.iter().position(|s| s.weight.is_some()) {
            bail!(
                "data.val_sources[{i}].weight: weights mix training sources; validation reads \
                 every document once"
            );
        }
        if let Some(samples) = &self.teacher_samples {
            samples.validate()?;
        }
        Ok(())
    }

    /// Makes relative source and cache paths relative to `base` (the recipe's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for source in self.sources.iter_mut().chain(self.val_sources.iter_mut()) {
            if source.path.is_relative() && source.hub.is_none() {
                source.path = base.join(&source.path);
            }
        }
        if let Some(dir) = self.cache_dir.as_mut().filter(|d| d.is_relative()) {
            *dir = base.join(&*dir);
        }
        if let Some(TemplateChoice::File(path)) = self.template.as_mut() {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        let prompts_file = self
            .teacher_samples
            .as_mut()
            .and_then(|t| t.prompts_file.as_mut());
        if let Some(path) = prompts_file.filter(|p| p.is_relative()) {
            *path = base.join(&*path);
        }
    }
}

impl SourceConfig {
    pub fn new(kind: SourceKind, path: impl Into<PathBuf>) -> Self {
        Self {
            kind,
            path: path.into(),
            hub: None,
            field: None,
            split: None,
            separator: None,
            weight: None,
        }
    }

    /// The JSON field read by `jsonl` and `chat` sources.
    pub fn field_name(&self) -> &str {
        match (&self.field, self.kind) {
            (Some(field), _) => field,
            (None, SourceKind::Chat) => "messages",
            (None, _) => "text",
        }
    }

    /// What the source reads, for logs and errors: its path, or its hub dataset (and the path in
    /// it).
    pub fn describe(&self) -> String {
        match &self.hub {
            None => self.path.display().to_string(),
            Some(hub) if path_is_empty(&self.path) => format!("dataset {hub}"),
            Some(hub) => format!("dataset {hub}:{}", self.path.display()),
        }
    }

    fn validate(&self, key: &str) -> Result<()> {
        match &self.hub {
            None => ensure!(
                !path_is_empty(&self.path),
                "{key}: give `path` (a file or directory) or `hub` (a dataset repository)"
            ),
            Some(hub) => {
                linearize_models::source::HubId::parse(hub)
                    .map_err(|e| anyhow::anyhow!("{key}.hub: {e:#}"))?;
                ensure!(
                    self.kind != SourceKind::Text,
                    "{key}.hub: text sources read local files; hub datasets are read by the \
                     jsonl, alpaca and chat kinds"
                );
                ensure!(
                    self.path.is_relative(),
                    "{key}.path: with `hub` it names a file or folder of the repository, not {}",
                    self.path.display()
                );
            }
        }
        if self.field.is_some() && !matches!(self.kind, SourceKind::Jsonl | SourceKind::Chat) {
            bail!("{key}.field is only read by jsonl and chat sources");
        }
        if let Some(separator) = &self.separator {
            ensure!(
                self.kind == SourceKind::Text,
                "{key}.separator is only read by text sources"
            );
            ensure!(!separator.is_empty(), "{key}.separator must not be empty");
        }
        Ok(())
    }
}

impl BosPolicy {
    /// The BOS id to write at document starts under this policy.
    pub fn resolve(self, encoder: &dyn TextEncoder) -> Result<Option<u32>> {
        match self {
            Self::Auto => Ok(encoder.bos_id()),
            Self::Never => Ok(None),
            Self::Always => match encoder.bos_id() {
                Some(id) => Ok(Some(id)),
                None => bail!("data.bos is `always` but the tokenizer has no BOS token"),
            },
        }
    }
}

impl TeacherSamplesConfig {
    fn validate(&self) -> Result<()> {
        ensure!(
            self.num_sequences > 0,
            "data.teacher_samples.num_sequences must be at least 1"
        );
        ensure!(
            self.prompts.is_empty() || self.prompts_file.is_none(),
            "data.teacher_samples: give either prompts or prompts_file, not both"
        );
        ensure!(
            !self.chat || !self.prompts.is_empty() || self.prompts_file.is_some(),
            "data.teacher_samples.chat needs prompts or prompts_file: the user turns the teacher \
             answers"
        );
        if let Some(w) = self.weight {
            ensure!(
                w.is_finite() && w > 0.0,
                "data.teacher_samples.weight must be a positive number, got {w}"
            );
        }
        ensure!(
            self.temperature > 0.0 && self.temperature.is_finite(),
            "data.teacher_samples.temperature must be > 0, got {}",
            self.temperature
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "data.teacher_samples.top_p must be in (0, 1], got {}",
            self.top_p
        );
        Ok(())
    }

    /// The prompts: `prompts`, or those of `prompts_file`.
    pub fn all_prompts(&self) -> Result<Vec<String>> {
        match &self.prompts_file {
            Some(path) => read_prompts_file(path)
                .map_err(|e| anyhow::anyhow!("data.teacher_samples.prompts_file: {e:#}")),
            None => Ok(self.prompts.clone()),
        }
    }
}
