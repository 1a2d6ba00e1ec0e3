//! A tiny random Llama on disk with SmolLM2's tokenizer, a little real text and a recipe that
//! converts and trains it in seconds: the fixture of the end-to-end tests of the binary.
#![allow(dead_code)]
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_models::offline::{ensure_smollm2, ensure_text, Split};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

pub const LAYERS: i64 = 3;

/// Writes the tiny model to `dir/model` and train/validation text to `dir/*.txt`.
pub fn tiny_job(dir: &Path) -> PathBuf {
    let smollm2 = ensure_smollm2(None).unwrap();
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.1,
    });
    std::fs::write(model_dir.join("config.json"), cfg.to_string()).unwrap();
    tch::manual_seed(3);
    let config = ModelConfig::from_file(&model_dir.join("config.json")).unwrap();
    let model = Model::new(&config, Device::Cpu, Kind::Float).unwrap();
    let named = model.named_parameters();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, model_dir.join("model.safetensors")).unwrap();
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(smollm2.join(file), model_dir.join(file)).unwrap();
    }
    let corpus = ensure_text().unwrap();
    for (split, name, bytes) in [
        (Split::Train, "train.txt", 60_000),
        (Split::Validation, "val.txt", 8_000),
    ] {
        let text = std::fs::read_to_string(corpus.split_path(split)).unwrap();
        let end = text
            .char_indices()
            .nth(bytes)
            .map_or(text.len(), |(i, _)| i);
        std::fs::write(dir.join(name), &text[..end]).unwrap();
    }
    model_dir
}

/// A recipe over [`tiny_job`]'s files, with `extra` YAML appended at the top level.
pub fn write_recipe(dir: &Path, extra: &str) -> PathBuf {
    let recipe = format!(
        r#"name: tiny
output: {out}
seed: 1
model: {{source: {model}, device: cpu, dtype: f32}}
conversion:
  attention:
    method: lolcats
    window_size: 8
    chunk_size: 16
    feature_map: {{kind: hedgehog, feature_dim: 8}}
data:
  sources: [{{kind: text, path: {train}}}]
  val_sources: [{{kind: text, path: {val}}}]
  seq_len: 64
  batch_size: 2
  max_val_sequences: 4
attention_transfer:
  max_steps: 24
  eval_every: 10
  save_every: 2
  keep_last: 3
  schedule: {{kind: cosine, warmup_steps: 4}}
lora:
  optimizer: {{lr: 0.001}}
  max_steps: 6
  eval_every: 3
  save_every: 2
export: {{dtype: f32}}
{extra}"#,
        out = dir.join("runs").display(),
        model = dir.join("model").display(),
        train = dir.join("train.txt").display(),
        val = dir.join("val.txt").display(),
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, recipe).unwrap();
    path
}

pub fn linearize(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_linearize"));
    command.args(args).env("RUST_LOG", "warn");
    command
}

pub fn run(args: &[&str]) -> Output {
    linearize(args).output().unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The trained tensors (feature maps, window factors, LoRA) a finished job exported.
pub fn stage_tensors(run_dir: &Path) -> Vec<(String, Tensor)> {
    let mut named = Tensor::read_safetensors(run_dir.join("adapters.safetensors")).unwrap();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Exit status of a job stopped by SIGTERM/SIGINT after saving a state (docs/clusters.md).
pub const EXIT_PREEMPTED: i32 = 75;

/// The tiny job in a temporary directory, with its recipe; run directories go beside it.
pub struct TinyJob {
    pub dir: tempfile::TempDir,
    pub recipe: PathBuf,
}

impl TinyJob {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        tiny_job(dir.path());
        let recipe = write_recipe(dir.path(), "");
        Self { dir, recipe }
    }

    /// A run directory of the job.
    pub fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The training records in `run_dir/metrics.jsonl` so far (a record still being written is
/// skipped).
pub fn train_records(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["split"] == "train")
        .collect()
}

/// Sends `signal` (`TERM`, `KILL`, ...) to process `pid`.
pub fn send_signal(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}
