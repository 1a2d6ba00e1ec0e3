//! `linearize import gguf FILE --out DIR [--dtype f32|bf16|f16]`.
use anyhow::Result;
use linearize_models::gguf::{self, Dtype};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Convert a llama-architecture GGUF file (llama.cpp) into a Hugging Face model directory:
    /// config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    /// generation_config.json.
    Gguf(GgufArgs),
}

#[derive(clap::Args)]
pub struct GgufArgs {
    /// The .gguf file.
    file: PathBuf,
    /// Output directory; replaced only if an earlier import wrote it.
    #[arg(long)]
    out: PathBuf,
    /// dtype of the written weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Gguf(args) => {
            let summary = gguf::import(&args.file, &args.out, args.dtype)?;
            let types: Vec<String> = summary
                .source_types
                .iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect();
            println!(
                "imported {} tensors ({:.1}M parameters; source {}) as {} in {:.1}s",
                summary.tensors,
                summary.parameters as f64 / 1e6,
                types.join(", "),
                summary.dtype,
                summary.seconds
            );
            println!("model: {}", summary.out_dir.display());
            Ok(())
        }
    }
}
