//! `linearize generate --model M --prompt TEXT [--chat [--system TEXT] [--template T]] ...`:
//! continues a prompt (or answers it as a chat turn in the model's prompt format) and streams
//! the text to stdout.
use crate::runtime::{self, RuntimeArgs};
use anyhow::{Context, Result};
use linearize_models::chat_template::ChatMessage;
use linearize_models::generate::{generate, GenerateConfig, SamplingConfig, StopReason};
use linearize_models::prompt_format::TemplateChoice;
use linearize_models::tokenizer::Tokenizer;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The model: a local Hugging Face-layout directory (a plain model or an exported converted
    /// `model/` directory) or a hub id `org/name[@revision]`.
    #[arg(long)]
    pub model: String,
    /// `adapters.safetensors` of a run, applied to the base model given by --model.
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// The text to continue, or with --chat the user's message.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user turn and generate the reply (in
    /// Alpaca's plain instruction prompt when the tokenizer has no chat template).
    #[arg(long)]
    pub chat: bool,
    /// With --chat, the prompt format: `alpaca`, `chat` (the tokenizer's template) or a Jinja
    /// chat template file.
    #[arg(long, requires = "chat")]
    pub template: Option<String>,
    /// A system message before the user turn.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Decode every token eagerly: no CUDA graph replays on a GPU.
    #[arg(long)]
    pub no_cuda_graphs: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: Args) -> Result<()> {
    let sampling = SamplingConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    };
    let (dir, loaded) = runtime::load_model(&args.model, args.adapters.as_deref(), &args.runtime)?;
    let model = loaded.model;
    let mut tokenizer = Tokenizer::from_dir(&dir)?;
    if let Some(choice) = args.template {
        tokenizer = tokenizer
            .with_template(&TemplateChoice::from(choice))
            .context("--template")?;
    }
    let prompt = if args.chat {
        tracing::info!(format = %tokenizer.describe_prompt_format(), "prompt format");
        let mut messages: Vec<ChatMessage> = args.system.iter().map(ChatMessage::system).collect();
        messages.push(ChatMessage::user(&args.prompt));
        tokenizer.encode_chat(&messages, true)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    if tokenizer.eos_ids().is_empty() {
        tracing::warn!(
            "the tokenizer declares no EOS token: generation stops only at --max-new-tokens"
        );
    }
    let config = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_ids: tokenizer.eos_ids().to_vec(),
        cuda_graphs: !args.no_cuda_graphs,
    };

    let start = Instant::now();
    let mut stream = tokenizer.text_stream(true);
    let mut stdout = std::io::stdout().lock();
    let out = generate(&model, &prompt, &config, |token| {
        if let Some(text) = stream.step(token)? {
            stdout
                .write_all(text.as_bytes())
                .and_then(|_| stdout.flush())
                .context("writing to stdout")?;
        }
        Ok(())
    })?;
    let rest = stream.finish()?;
    writeln!(stdout, "{rest}").context("writing to stdout")?;
    let seconds = start.elapsed().as_secs_f64();
    let stop = match out.stop {
        StopReason::Eos(id) => format!("end-of-sequence token {id}"),
        StopReason::MaxNewTokens => "--max-new-tokens reached".to_string(),
        StopReason::ContextFull => "the model's context is full".to_string(),
    };
    tracing::info!(
        "{} prompt tokens, {} generated in {seconds:.2} s ({:.1} tokens/s); stopped: {stop}",
        prompt.len(),
        out.tokens.len(),
        out.tokens.len() as f64 / seconds.max(1e-9)
    );
    Ok(())
}
