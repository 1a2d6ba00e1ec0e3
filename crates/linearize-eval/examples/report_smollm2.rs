//! The whole evaluation report for a LoLCATs conversion of the real SmolLM2-135M-Instruct
//! (offline cache; fetched and imported on first use), at CPU sizes. The student's feature maps
//! are freshly initialised (no attention transfer), so the report shows what an untrained
//! conversion loses; point it at a trained model directory to evaluate that instead.
//!
//! ```text
//! OMP_NUM_THREADS=2 cargo run --release -p linearize-eval --example report_smollm2 -- [OUT_DIR]
//! ```
use anyhow::{Context, Result};
use linearize_attention::linearized::{AttentionConfig, LayerShape, LinearizedMixer, Method};
use linearize_eval::report::{run_report, EvalConfig};
use linearize_models::llama::Model;
use linearize_models::offline::{ensure_smollm2, ensure_text, Split};
use linearize_models::tokenizer::Tokenizer;
use std::path::PathBuf;
use tch::{nn, Device, Kind};

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let out = std::env::args().nth(1).map_or_else(
        || PathBuf::from("checkpoints/eval-smollm2/report"),
        PathBuf::from,
    );
    let dir = ensure_smollm2(None)?;
    let validation = ensure_text()?.split_path(Split::Validation);
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let mut teacher = Model::load(&dir, Device::Cpu, Kind::Float)?;
    let mut student = Model::load(&dir, Device::Cpu, Kind::Float)?;
    let store = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(0);
    let shape = LayerShape::of(student.config());
    let attention = AttentionConfig::new(Method::Lolcats);
    for i in 0..student.num_layers() {
        let path = store
            .root()
            .sub("model")
            .sub("layers")
            .sub(i)
            .sub("self_attn");
        let mixer = LinearizedMixer::new(&path, &shape, &attention)?;
        student.set_mixer(i, Box::new(mixer))?;
    }
    let task = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sample_task.jsonl");
    let yaml = format!(
        "perplexity: {{files: [{}], ctx: 256, max_windows: 4}}
attention_error: {{ctx: 256, max_windows: 2}}
passkey: {{min_length: 256, max_length: 512, trials: 2}}
multikey: {{min_length: 256, max_length: 512, trials: 2}}
mqar: {{num_pairs: 16, trials: 2}}
multiple_choice: {{tasks: [{}]}}
speed: {{context_lengths: [256, 512, 1024], decode_tokens: 16}}
generations: {{max_new_tokens: 24}}
decode_check: {{new_tokens: 16}}
",
        validation.display(),
        task.display()
    );
    let cfg: EvalConfig = serde_yaml_ng::from_str(&yaml).context("example config")?;
    let report = run_report(&mut teacher, &mut student, &tokenizer, &cfg, &out, None)?;
    println!("{}", serde_json::to_string_pretty(&report.speed)?);
    println!("report in {}", out.display());
    Ok(())
}
