//! Append-only store of sequences sampled from the teacher (data-free training), so that a
//! resumed job reuses what was generated and continues generating where it stopped.
//!
//! A directory with `samples.json` (format and generation settings, written atomically) and
//! `samples.u32` (the sequences back to back, `window` little-endian u32 ids each, only ever
//! appended). A partial record at the end, left by a crash mid-append, is cut off on open.
use super::config::DataConfig;
use super::packing::PackedSequences;
use super::shuffle::{weighted_copies, Stream};
use anyhow::{bail, ensure, Context, Result};
use linearize_models::atomic;
use linearize_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const HEADER_FILE: &str = "samples.json";
pub const DATA_FILE: &str = "samples.u32";
const FORMAT: u32 = 1;

/// How the stored sequences were generated; a store only continues under the same settings
/// (`num_sequences` aside, which may grow or shrink).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSettings {
    /// Identity of the sampling model (e.g. its path and a hash of its weights).
    pub teacher: String,
    pub seq_len: usize,
    /// Sequences hold `seq_len + 1` tokens.
    pub next_token_targets: bool,
    /// Sequences wanted in all.
    pub num_sequences: usize,
    /// Prompts continued in turn; empty: sampled from BOS alone.
    pub prompts: Vec<String>,
    /// With `chat`: the chat template the prompts are rendered through as user turns (its
    /// text, so that another template is another set of samples); none: plain-text prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: u32,
    settings: SampleSettings,
}

impl SampleSettings {
    /// The settings the recipe's `teacher_samples` asks for, if it does, with the prompts of
    /// its `prompts_file` read. `tokenizer` is the teacher's (with `data.template` applied):
    /// `chat` needs its chat template, and an error naming `data.teacher_samples.chat` and
    /// `teacher` says when it has none.
    pub fn from_config(
        config: &DataConfig,
        teacher: impl Into<String>,
        tokenizer: &Tokenizer,
    ) -> Result<Option<Self>> {
        let Some(samples) = config.teacher_samples.as_ref() else {
            return Ok(None);
        };
        let teacher = teacher.into();
        let chat_template = samples
            .chat
            .then(|| chat_template_of(&teacher, tokenizer))
            .transpose()?;
        Ok(Some(Self {
            teacher,
            seq_len: config.seq_len,
            next_token_targets: config.next_token_targets,
            num_sequences: samples.num_sequences,
            prompts: samples.all_prompts()?,
            chat_template,
            temperature: samples.temperature,
            top_p: samples.top_p,
            seed: config.seed,
        }))
    }

    /// Tokens per stored sequence.
    pub fn window(&self) -> usize {
        self.seq_len + usize::from(self.next_token_targets)
    }

    /// The index in `prompts` of the prompt that conversation `turn` of sequence `sequence`
    /// starts from; `None`: no prompts (sampled from BOS). Sequence i opens with prompt
    /// `i % prompts` (prompts used in turn, each opening as many sequences as the others); a
    /// chat sample's later conversations (turn >= 1) take prompts drawn by a hash of `(seed,
    /// sequence, turn)`, so a resumed job draws the same ones and consecutive sequences do not
    /// repeat each other's order.
    pub fn prompt_index(&self, sequence: usize, turn: usize) -> Option<usize> {
        let n = self.prompts.len();
        if n == 0 {
            return None;
        }
        if turn == 0 {
            return Some(sequence % n);
        }
        let key = splitmix64(splitmix64(self.seed ^ sequence as u64) ^ turn as u64);
        Some((key % n as u64) as usize)
    }

    /// The first setting (other than `num_sequences`) that differs, as "key: stored vs wanted"
    /// (a setting left out of one, such as `chat_template` of plain samples, reads as null;
    /// long values are cut).
    fn difference(&self, wanted: &Self) -> Option<String> {
        let as_map = |s: &Self| match serde_json::to_value(s) {
            Ok(Value::Object(map)) => map,
            other => panic!("settings serialise to an object, got {other:?}"),
        };
        let (stored, wanted) = (as_map(self), as_map(wanted));
        let brief = |value: Option<&Value>| {
            let text = value.unwrap_or(&Value::Null).to_string();
            match text.char_indices().nth(60) {
                Some((cut, _)) => format!("{}... ({} chars)", &text[..cut], text.chars().count()),
                None => text,
            }
        };
        let keys: BTreeSet<&String> = stored.keys().chain(wanted.keys()).collect();
        let key = keys
            .into_iter()
            .filter(|key| key.as_str() != "num_sequences")
            .find(|key| stored.get(key.as_str()) != wanted.get(key.as_str()))?;
        Some(format!(
            "{key}: {} stored vs {} wanted",
            brief(stored.get(key.as_str())),
            brief(wanted.get(key.as_str()))
        ))
    }
}

/// An open sample store: read what is there, append what is generated next.
#[derive(Debug)]
pub struct TeacherSampleStore {
    dir: PathBuf,
    settings: SampleSettings,
    data: File,
    len: usize,
}

impl TeacherSampleStore {
    /// Opens the store in `dir`, creating it if needed; errors when it was generated with
    /// other settings.
    pub fn open(dir: &Path, settings: SampleSettings) -> Result<Self> {
        ensure!(
            settings.seq_len > 0,
            "teacher samples: seq_len must be at least 1"
        );
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let header_path = dir.join(HEADER_FILE);
        let data_path = dir.join(DATA_FILE);
        let stored = if header_path.exists() {
            Some(read_header(&header_path)?)
        } else {
            None
        };
        if let Some(diff) = stored.as_ref().and_then(|s| s.difference(&settings)) {
            bail!(
                "{}: the samples there were generated with other settings ({diff}); point \
                 the job at another directory or delete this one",
                header_path.display()
            );
        }
        let data = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&data_path)
            .with_context(|| format!("opening {}", data_path.display()))?;
        if stored.is_none() {
            // Sequences without a header belong to unknown settings: start over.
            data.set_len(0)
                .with_context(|| format!("truncating {}", data_path.display()))?;
            data.sync_all()?;
        }
        if stored.as_ref() != Some(&settings) {
            let header = serde_json::to_vec_pretty(&Header {
                format: FORMAT,
                settings: settings.clone(),
            })?;
            atomic::write_file(&header_path, &header)?;
        }

        let record = (settings.window() * 4) as u64;
        let bytes = data.metadata()?.len();
        if bytes % record != 0 {
            tracing::warn!(
                "{}: cutting off a partial sequence ({} bytes) left by an interrupted write",
                data_path.display(),
                bytes % record
            );
            data.set_len(bytes - bytes % record)?;
            data.sync_all()?;
        }
        let len = (bytes / record) as usize;
        tracing::info!(dir = %dir.display(), stored = len, wanted = settings.num_sequences, "teacher samples");
        Ok(Self {
            dir: dir.to_path_buf(),
            settings,
            data,
            len,
        })
    }

    pub fn settings(&self) -> &SampleSettings {
        &self.settings
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequences stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequences still to generate.
    pub fn remaining(&self) -> usize {
        self.settings.num_sequences.saturating_sub(self.len)
    }

    pub fn is_complete(&self) -> bool {
        self.remaining() == 0
    }

    /// Appends whole sequences (`window` tokens each, back to back) and syncs them to disk.
    pub fn append(&mut self, tokens: &[u32]) -> Result<()> {
        let window = self.settings.window();
        ensure!(
            !tokens.is_empty() && tokens.len() % window == 0,
            "teacher samples: {} tokens are not whole sequences of {window}",
            tokens.len()
        );
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let path = self.dir.join(DATA_FILE);
        self.data
            .write_all(&bytes)
            .with_context(|| format!("appending to {}", path.display()))?;
        self.data
            .sync_data()
            .with_context(|| format!("syncing {}", path.display()))?;
        self.len += tokens.len() / window;
        Ok(())
    }

    /// The stored sequences (at most `num_sequences`) for training.
    pub fn read(&self) -> Result<PackedSequences> {
        let path = self.dir.join(DATA_FILE);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let keep = self.len.min(self.settings.num_sequences) * self.settings.window();
        ensure!(
            bytes.len() >= keep * 4,
            "{}: shorter than the {} sequences stored",
            path.display(),
            self.len
        );
        let tokens = bytes[..keep * 4]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4-byte chunk")))
            .collect();
        PackedSequences::from_tokens(
            self.settings.seq_len,
            self.settings.next_token_targets,
            tokens,
        )
    }

    /// The stored sequences for training, each used `weight` times on average as a source's
    /// documents are (`teacher_samples.weight`): `floor(weight)` copies of every one and one
    /// more of a `fract(weight)` share chosen by the settings' seed, in stored order. Weight 1 is
    /// [`read`](Self::read).
    pub fn read_weighted(&self, weight: f64) -> Result<PackedSequences> {
        ensure!(
            weight.is_finite() && weight > 0.0,
            "teacher samples: weight must be a positive number, got {weight}"
        );
        let stored = self.read()?;
        if weight == 1.0 {
            return Ok(stored);
        }
        let copies = weighted_copies(
            stored.len(),
            weight,
            self.settings.seed,
            Stream::TeacherWeight,
            0,
        );
        let mut tokens = Vec::with_capacity(copies.iter().sum::<usize>() * self.settings.window());
        for (i, &n) in copies.iter().enumerate() {
            for _ in 0..n {
                tokens.extend_from_slice(stored.sequence(i));
            }
        }
        PackedSequences::from_tokens(
            self.settings.seq_len,
            self.settings.next_token_targets,
            tokens,
        )
    }
}

/// The text of the chat template `tokenizer` renders chat prompts with; an error naming
/// `data.teacher_samples.chat` and the teacher when it has none.
pub fn chat_template_of(teacher: &str, tokenizer: &Tokenizer) -> Result<String> {
    ensure!(
        tokenizer.has_chat_template(),
        "data.teacher_samples.chat: the teacher {teacher} has no chat template to render the \
         prompts as user turns (its prompt format: {}); give data.template a template file, or \
         sample plain text without chat",
        tokenizer.describe_prompt_format()
    );
    Ok(tokenizer.prompt_identity())
}

/// SplitMix64's output function: a fixed, well-mixed hash of a u64 (the same in every build).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn read_header(path: &Path) -> Result<SampleSettings> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let header: Header = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a teacher-samples header", path.display()))?;
    ensure!(
        header.format == FORMAT,
        "{}: format {} (this build reads {FORMAT})",
        path.display(),
        header.format
    );
    Ok(header.settings)
}
