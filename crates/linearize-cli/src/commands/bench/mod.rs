//! `linearize bench`: benchmarks that print a table and write JSON. `bench kernels` times the
//! forward and backward passes and measures the peak memory of each attention kernel's naive and
//! chunked forms; `bench stages` the training stages against the teacher's forward pass;
//! `bench decode` decoding at long contexts, teacher against student, each point beside its
//! memory roofline; `bench tokenize` the peak
//! memory of tokenising one large document.
mod case;
mod decode;
mod decode_plot;
mod harness;
mod kernels;
mod memory;
mod model;
mod roofline;
mod stages;
mod tokenize;

pub use case::{Form, Method};

use crate::runtime::RuntimeArgs;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Forward + backward time and peak memory of the attention kernels, naive vs chunked.
    Kernels(KernelArgs),
    /// Stage 1 and stage 2 tokens/s and memory beside the teacher's forward pass.
    Stages(stages::StageArgs),
    /// Decoding tokens/s and memory of teacher and student at long contexts.
    Decode(decode::DecodeArgs),
    /// Peak memory of tokenising one large document, beside its token count.
    Tokenize(tokenize::TokenizeArgs),
    /// Draw decode tokens/s and memory against context from `bench decode --json` reports.
    PlotDecode(decode_plot::PlotArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub struct KernelArgs {
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192,32768")]
    lengths: Vec<i64>,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    heads: i64,
    /// Key/value heads (GQA); defaults to --heads.
    #[arg(long)]
    kv_heads: Option<i64>,
    #[arg(long, default_value_t = 128)]
    head_dim: i64,
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Feature-map width f of the linear and LoLCATs kernels (Hedgehog: 2 x 64).
    #[arg(long, default_value_t = 128)]
    features: i64,
    /// Window size of the windowed kernels.
    #[arg(long, default_value_t = 64)]
    window: i64,
    /// Chunk size of the chunked forms.
    #[arg(long, default_value_t = 64)]
    chunk: i64,
    /// Sink tokens of the LoLCATs and Lizard cases (the first tokens, softmax keys of every
    /// query).
    #[arg(long, default_value_t = 0)]
    sinks: i64,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sdpa,linear,lolcats-sw,lolcats-tk,lizard-tk,swa,gla,liger,gated-deltanet"
    )]
    methods: Vec<Method>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "naive,chunked"
    )]
    forms: Vec<Form>,
    /// Timed iterations per case (default: 10 on CUDA, 3 on CPU), after one warm-up.
    #[arg(long)]
    iters: Option<usize>,
    /// Skip a naive case whose estimated memory exceeds this many GiB (default: 80% of the GPU's
    /// memory on CUDA, half the available memory on CPU).
    #[arg(long)]
    naive_max_gib: Option<f64>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run one `METHOD:FORM:LEN` case in this process and print its result as JSON.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Kernels(args) => kernels::run(args),
        Command::Stages(args) => stages::run(args),
        Command::Decode(args) => decode::run(args),
        Command::PlotDecode(args) => decode_plot::run(args),
        Command::Tokenize(args) => tokenize::run(args),
    }
}
