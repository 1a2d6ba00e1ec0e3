//! `--dry-run`: what a recipe would do, worked out without loading weights or data.
use crate::recipe::PlannedRecipe;
use anyhow::Result;
use linearize_attention::linearized::{LayerShape, LinearizedMixer, Method};
use linearize_models::llama::parameter_shapes;
use linearize_models::tokenizer::Tokenizer;
use linearize_train::data::SourceKind;
use linearize_train::selection::{HeadScoring, HeadUnit, LayerScoring};
use linearize_train::stage::StageShape;
use std::fmt::Write as _;
use std::path::Path;
use tch::{nn, Device};

/// The plan as text: model, layers and methods, trainable parameters, token budget, a memory
/// estimate, the output paths, and what could not be checked on this machine.
pub fn describe(planned: &PlannedRecipe, run_dir: &Path) -> Result<String> {
    let recipe = &planned.recipe;
    let mut out = String::new();
    writeln!(out, "recipe      {}", recipe.name)?;
    writeln!(out, "recipe hash {}", planned.hash)?;
    let here = match tch::Cuda::device_count() {
        0 => "this machine has no CUDA device".to_string(),
        n => format!("this machine has {n} CUDA device(s)"),
    };
    writeln!(
        out,
        "runs on     {} in {} (planned for that device; {here})",
        recipe.model.device, recipe.model.dtype
    )?;
    match &planned.model {
        Some((dir, cfg)) => model_plan(&mut out, recipe, dir, cfg)?,
        None => writeln!(
            out,
            "model       {} (config.json not available here: no layer plan, parameter counts or memory estimate)",
            recipe.model.source
        )?,
    }
    writeln!(out, "output      {}", run_dir.display())?;
    for (what, path) in [
        ("resolved recipe", "recipe.resolved.yaml"),
        ("metrics", "metrics.jsonl"),
        ("states", "state/"),
        ("trained tensors", "adapters.safetensors"),
        ("merged model", "model/"),
        ("PEFT adapters", "peft/"),
        ("report", "report/"),
    ] {
        writeln!(out, "  {what:<16} {}", run_dir.join(path).display())?;
    }
    if planned.unchecked.is_empty() {
        writeln!(out, "checks      all passed on this machine")?;
    } else {
        writeln!(
            out,
            "not checked on this machine ({}; the run checks them and fails if they still do not hold):",
            planned.unchecked.len()
        )?;
        for line in &planned.unchecked {
            writeln!(out, "  - {line}")?;
        }
    }
    Ok(out)
}

/// The lines that need the model's config: model, conversion, data, stages, memory.
fn model_plan(
    out: &mut String,
    recipe: &crate::recipe::Recipe,
    model_dir: &Path,
    cfg: &linearize_models::config::ModelConfig,
) -> Result<()> {
    let plan = recipe.conversion.plan(&cfg.layer_types)?;
    let base_params: i64 = parameter_shapes(cfg)
        .values()
        .map(|shape| shape.iter().product::<i64>())
        .sum();
    let shape = LayerShape::of(cfg);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut layer_lines = String::new();
    for (i, attention) in plan.iter().enumerate() {
        let path = vs.root().sub("layers").sub(i);
        LinearizedMixer::new(&path, &shape, attention)?;
        writeln!(layer_lines, "  {i:>3}  {}", attention.name())?;
    }
    let new_params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    let converted = plan.iter().filter(|a| a.method != Method::Softmax).count();
    let dtype_bytes = match recipe.model.dtype.as_str() {
        "f32" | "float32" => 4,
        _ => 2,
    };
    let data = &recipe.data;
    writeln!(
        out,
        "model       {} ({}; {} layers, {} heads / {} kv heads, head dim {}, hidden {}, {:.1} M parameters)",
        recipe.model.source,
        model_dir.display(),
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.hidden_size,
        base_params as f64 / 1e6
    )?;
    writeln!(
        out,
        "conversion  {converted} of {} layers converted; new trainable parameters: {new_params} ({:.3}% of the model)",
        plan.len(),
        100.0 * new_params as f64 / base_params as f64
    )?;
    out.push_str(&layer_lines);
    if let Some(selector) = recipe.conversion.layer_selector() {
        let by = match selector.by {
            LayerScoring::Mse => "the largest validation attention MSE".to_string(),
            LayerScoring::Kl => format!(
                "the largest KL drop when each alone is softmax again ({} validation batches)",
                selector.kl_batches()
            ),
        };
        writeln!(
            out,
            "hybrid      after stage 1 the {} converted layers with {by} go back to softmax",
            selector.count
        )?;
    }
    if let Some(selector) = &recipe.conversion.softmax_heads {
        let per_layer = match selector.unit() {
            HeadUnit::QueryHeads => cfg.num_attention_heads,
            HeadUnit::KvHeads => cfg.num_key_value_heads,
        } as usize;
        let total = cfg.num_hidden_layers as usize * per_layer;
        let count = selector.count_of(total, converted * per_layer)?;
        let group = (cfg.num_attention_heads / cfg.num_key_value_heads) as usize;
        let (what, cache) = match selector.unit() {
            HeadUnit::QueryHeads => (
                "query heads",
                format!(
                    "their KV cache: {} to {} key/value heads",
                    count.div_ceil(group),
                    count
                ),
            ),
            HeadUnit::KvHeads => (
                "key/value heads (each with its query heads)",
                format!("their KV cache: {count} key/value heads"),
            ),
        };
        let by = match selector.by {
            HeadScoring::Retrieval => {
                "before stage 1 by the teacher's retrieval scores (passkey and MQAR probes)"
                    .to_string()
            }
            HeadScoring::Kl => format!(
                "after stage 1 by the KL drop when each alone is softmax again ({} validation \
                 batches)",
                selector.kl_batches()
            ),
        };
        writeln!(
            out,
            "heads       {count} of {total} {what} ({:.1}%) keep softmax inside converted layers, chosen {by}; {cache}; kept in <run>/selection.json",
            100.0 * count as f64 / total as f64
        )?;
    }
    writeln!(
        out,
        "data        {} source(s), seq_len {}, batch {}{}{}",
        data.sources.len(),
        data.seq_len,
        data.batch_size,
        data.max_tokens
            .map_or(String::new(), |t| format!(", data.max_tokens {t}")),
        data.teacher_samples
            .as_ref()
            .map_or(String::new(), |t| format!(
                "; plus {} sequences sampled from the teacher before stage 1 ({} tokens){}{}{}",
                t.num_sequences,
                t.num_sequences * (data.seq_len + usize::from(data.next_token_targets)),
                match (&t.prompts_file, t.prompts.len()) {
                    (Some(file), _) => format!(", prompts of {}", file.display()),
                    (None, 0) => String::new(),
                    (None, n) => format!(", {n} prompt(s)"),
                },
                if t.chat {
                    ", rendered as user turns the teacher answers (chat)"
                } else {
                    ""
                },
                t.weight.map_or(String::new(), |w| format!(
                    ", each used {w} times per epoch"
                ))
            ))
    )?;
    let instructions = data
        .sources
        .iter()
        .chain(&data.val_sources)
        .any(|s| matches!(s.kind, SourceKind::Alpaca | SourceKind::Chat));
    for source in data.sources.iter().chain(&data.val_sources) {
        if source.hub.is_some() {
            if let Ok(files) = linearize_train::data::list_hub_files(source) {
                writeln!(
                    out,
                    "  {}: {} file(s): {}",
                    source.describe(),
                    files.len(),
                    files.join(", ")
                )?;
            }
        }
    }
    // A template that cannot be used here is already among the unchecked lines.
    let tokenizer = Tokenizer::from_dir(model_dir).and_then(|t| match &data.template {
        Some(choice) => t.with_template(choice),
        None => Ok(t),
    });
    if let (true, Ok(tokenizer)) = (instructions, tokenizer) {
        writeln!(
            out,
            "prompts     instruction and chat records render in the {}",
            tokenizer.describe_prompt_format()
        )?;
    }
    // A stage with its own sequence length or batch says so.
    let own_shape = |shape: StageShape| {
        if (shape.seq_len, shape.batch_size) == (data.seq_len, data.batch_size) {
            String::new()
        } else {
            format!(
                " (this stage: seq_len {}, batch {})",
                shape.seq_len, shape.batch_size
            )
        }
    };
    if let Some(stage) = &recipe.attention_transfer {
        let shape = stage.shape(data);
        let per_step = stage.grad_accum * shape.tokens();
        let budget = [
            stage.max_steps.map(|s| s * per_step),
            stage.max_tokens,
            data.max_tokens,
        ]
        .into_iter()
        .flatten()
        .min();
        // The KL term is a whole-model training pass per micro-batch: worth seeing in the plan.
        let kl = if stage.kl_factor > 0.0 {
            format!(
                ", kl_factor {} (a whole-model pass per micro-batch)",
                stage.kl_factor
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "stage 1     {}{}: {} of {per_step} tokens; token budget {}; lr {}, mse_factor {}{kl}",
            stage.name,
            own_shape(shape),
            updates(stage.max_steps),
            budget.map_or_else(|| "unbounded".into(), |t| t.to_string()),
            stage.optimizer.lr,
            stage.mse_factor
        )?;
    } else {
        writeln!(out, "stage 1     none")?;
    }
    if let Some(stage) = &recipe.lora {
        let shape = stage.shape(data);
        let per_step = stage.grad_accum * shape.tokens();
        let (q, kv) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        let per_layer: i64 = stage
            .lora
            .targets
            .iter()
            .map(|target| {
                let (input, output) = match target.as_str() {
                    "q_proj" => (cfg.hidden_size, q),
                    "k_proj" | "v_proj" => (cfg.hidden_size, kv),
                    "o_proj" => (q, cfg.hidden_size),
                    "gate_proj" | "up_proj" => (cfg.hidden_size, cfg.intermediate_size),
                    _ => (cfg.intermediate_size, cfg.hidden_size),
                };
                stage.lora.rank * (input + output)
            })
            .sum();
        writeln!(
            out,
            "stage 2     {}{}: LoRA r {} alpha {} on {}: {} trainable parameters; {} of {per_step} tokens, max_tokens {}; lr {}",
            stage.name,
            own_shape(shape),
            stage.lora.rank,
            stage.lora.alpha,
            stage.lora.targets.join(" "),
            per_layer * cfg.num_hidden_layers,
            updates(stage.max_steps),
            stage
                .max_tokens
                .map_or_else(|| "none".into(), |t| t.to_string()),
            stage.optimizer.lr
        )?;
    } else {
        writeln!(out, "stage 2     none")?;
    }
    let weights = base_params as f64 * dtype_bytes as f64;
    // Trainable tensors in f32 with their gradient and two AdamW moments.
    let trainable = new_params as f64 * 4.0 * 4.0;
    // Activations of the stage that needs most, in f32 (an upper bound for bf16 runs); checked
    // against the GPU in session 11, where a SmolLM2 LoRA micro-batch of 8 x 1024 with its loss
    // in one piece peaked at 20-28 GiB: 30 layers of 0.3 GB plus seven (tokens, vocab) f32
    // tensors of 1.6 GB (logits of both models, log-softmaxes, their product, the gradient).
    let (hidden, vocab) = (cfg.hidden_size as f64, cfg.vocab_size as f64);
    // One layer's: the residual stream, q/k/v/o, the MLP's three projections and the student's
    // chunked intermediates.
    let layer = |tokens: f64| tokens * (8.0 * hidden + 3.0 * cfg.intermediate_size as f64) * 4.0;
    // A whole-model pass with its graph: every layer's, or with activation checkpointing one
    // layer's plus each layer's input.
    let model_pass = |tokens: f64, checkpointed: bool| {
        let layers = cfg.num_hidden_layers as f64;
        if checkpointed {
            layer(tokens) + layers * tokens * hidden * 4.0
        } else {
            layers * layer(tokens)
        }
    };
    let logits = |tokens: f64, copies: f64| tokens * vocab * 4.0 * copies;
    let stage1 = recipe.attention_transfer.as_ref().map(|stage| {
        let tokens = stage.shape(data).tokens() as f64;
        // Layer by layer; the KL term adds a whole-model pass and both models' logits.
        let kl = if stage.kl_factor > 0.0 {
            model_pass(tokens, stage.kl_activation_checkpointing) + logits(tokens, 7.0)
        } else {
            0.0
        };
        layer(tokens) + logits(tokens, 1.0) + kl
    });
    let stage2 = recipe.lora.as_ref().map(|stage| {
        let tokens = stage.shape(data).tokens() as f64;
        // The loss runs over chunks of `loss_chunk` positions (lora.loss_chunk).
        let chunk = tokens.min(stage.loss_chunk as f64);
        model_pass(tokens, stage.activation_checkpointing)
            + logits(chunk, 7.0)
            + 2.0 * tokens * hidden * 4.0
    });
    let activations = [stage1, stage2]
        .into_iter()
        .flatten()
        .fold(layer((data.batch_size * data.seq_len) as f64), f64::max);
    writeln!(
        out,
        "memory      about {:.2} GiB (weights {:.2} GiB, trainable + optimizer {:.3} GiB, activations {:.2} GiB; a rough estimate)",
        (weights + trainable + activations) / GIB,
        weights / GIB,
        trainable / GIB,
        activations / GIB
    )?;
    Ok(())
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// "up to N updates", or "updates without a step limit".
fn updates(max_steps: Option<u64>) -> String {
    max_steps.map_or_else(
        || "updates without a step limit".into(),
        |s| format!("up to {s} updates"),
    )
}
