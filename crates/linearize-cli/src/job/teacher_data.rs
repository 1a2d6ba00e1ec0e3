//! What the job computes with the original model before any layer is converted:
//! - the sequences of `data.teacher_samples` (data-free training), sampled from the teacher in
//!   batches on its device and kept in `<run>/teacher-samples/` (so a resumed job reuses them and
//!   generates only what is missing), then added to the training sequences;
//! - the teacher's loss on the validation sequences, `<run>/teacher_val.json`, the reference the
//!   LoRA stage's validation perplexity is divided by in `linearize compare` (the stage logs
//!   only the student's).
use anyhow::{ensure, Context, Result};
use linearize_models::atomic;
use linearize_models::llama::Model;
use linearize_models::tokenizer::Tokenizer;
use linearize_train::data::{DataConfig, Datasets, PackedSequences, SampleSettings};
use linearize_train::data::{TeacherSampleStore, TeacherSamplesConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

/// File of the teacher's validation loss in a run directory.
pub const TEACHER_VAL: &str = "teacher_val.json";
/// Directory of the sampled sequences in a run directory.
pub const TEACHER_SAMPLES_DIR: &str = "teacher-samples";

/// The teacher's next-token loss on the run's validation sequences (same sequences, same
/// scoring as the LoRA stage's validation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherVal {
    pub split: String,
    pub sequences: usize,
    pub seq_len: usize,
    pub lm_loss: f64,
    pub ppl: f64,
}

/// Writes `<run>/teacher_val.json` once, when the recipe has a LoRA stage and validation data;
/// `model` must still be the unconverted teacher.
pub fn write_teacher_val(
    model: &Model,
    val: Option<&PackedSequences>,
    batch_size: usize,
    max_batches: Option<usize>,
    run_dir: &Path,
) -> Result<()> {
    let path = run_dir.join(TEACHER_VAL);
    let Some(val) = val else { return Ok(()) };
    if path.exists() {
        return Ok(());
    }
    let _no_grad = tch::no_grad_guard();
    let len = val.seq_len() as i64;
    let (mut sum, mut sequences) = (0.0, 0usize);
    for tokens in val
        .eval_batches(batch_size, 0, 1)?
        .take(max_batches.unwrap_or(usize::MAX))
    {
        linearize_models::stop::check()?;
        let n = tokens.size()[0] as usize;
        let width = tokens.size()[1];
        // As the LoRA stage scores: with next-token targets the (L+1)-token sequence gives
        // inputs [:L] and targets [1:]; without, positions 0..L-1 predict tokens 1..L.
        let inputs = tokens.narrow(1, 0, len).to_device(model.device());
        let targets = tokens.narrow(1, 1, width - 1).to_device(model.device());
        let logits = model.forward(&inputs, None)?.narrow(1, 0, width - 1);
        let vocab = logits.size()[2];
        let loss = logits.reshape([-1, vocab]).cross_entropy_loss::<Tensor>(
            &targets.reshape([-1]),
            None,
            Reduction::Mean,
            -100,
            0.0,
        );
        sum += loss.double_value(&[]) * n as f64;
        sequences += n;
    }
    ensure!(sequences > 0, "validation data holds no sequence");
    let lm_loss = sum / sequences as f64;
    let record = TeacherVal {
        split: "validation sequences of the recipe's data".into(),
        sequences,
        seq_len: val.seq_len(),
        lm_loss,
        ppl: lm_loss.exp(),
    };
    tracing::info!(
        ppl = record.ppl,
        sequences,
        "teacher perplexity on the validation sequences"
    );
    atomic::write_file(&path, serde_json::to_string_pretty(&record)?.as_bytes())
}

/// Samples what `data.teacher_samples` asks for (what the store lacks) and appends the stored
/// sequences to `datasets.train`. `model` must still be the unconverted teacher.
pub fn add_teacher_samples(
    model: &Model,
    tokenizer: &Tokenizer,
    data: &DataConfig,
    model_dir: &Path,
    run_dir: &Path,
    datasets: &mut Datasets,
) -> Result<()> {
    let Some(config) = &data.teacher_samples else {
        return Ok(());
    };
    let teacher = format!("{} ({:?})", model_dir.display(), model.kind());
    let settings = SampleSettings::from_config(data, teacher).expect("teacher_samples is set");
    let dir: PathBuf = run_dir.join(TEACHER_SAMPLES_DIR);
    let mut store = TeacherSampleStore::open(&dir, settings)?;
    if !store.is_complete() {
        generate(model, tokenizer, config, &mut store).context("sampling from the teacher")?;
    }
    let samples = store.read()?;
    tracing::info!(
        sequences = samples.len(),
        tokens = samples.len() * samples.seq_len(),
        "teacher samples added to the training data"
    );
    datasets.train.append(&samples).context("teacher samples")?;
    Ok(())
}

/// Sequences sampled in one batch. Decoding one token per step is bound by the per-step
/// overhead, so a GPU batch is as large as memory comfortably allows (SmolLM2's bf16 KV cache
/// for 256 sequences of 1025 tokens is ~6 GB); on a CPU a batch only amortises that overhead.
fn batch_size(device: Device) -> usize {
    match device {
        Device::Cpu => 8,
        _ => 256,
    }
}

fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    config: &TeacherSamplesConfig,
    store: &mut TeacherSampleStore,
) -> Result<()> {
    let settings = store.settings().clone();
    let window = settings.window();
    // Sequence i continues prompt i % len (or starts from BOS alone). Prompts are encoded with
    // the tokenizer's special tokens, so a BOS-using model sees the start of a document.
    let start_ids = |index: usize| -> Result<Vec<u32>> {
        let mut ids = match settings.prompt_for(index) {
            Some(prompt) => tokenizer.encode(prompt, true)?,
            None => Vec::new(),
        };
        if ids.is_empty() {
            let start = tokenizer
                .bos_id()
                .or_else(|| tokenizer.eos_ids().first().copied())
                .context("the tokenizer has neither BOS nor EOS to start a sample from")?;
            ids.push(start);
        }
        ids.truncate(window);
        Ok(ids)
    };
    let batch = batch_size(model.device());
    let started = Instant::now();
    let first = store.len();
    tracing::info!(
        remaining = store.remaining(),
        window,
        batch,
        "sampling training sequences from the teacher"
    );
    let progress = linearize_train::progress::TaskProgress::new(
        "teacher samples",
        (store.remaining() * window) as u64,
        "tok",
    );
    let _no_grad = tch::no_grad_guard();
    while !store.is_complete() {
        // Whole batches only: a stopped job keeps every batch it appended.
        linearize_models::stop::check()?;
        let begin = store.len();
        let end = begin + store.remaining().min(batch);
        // Each chunk from its own seed: a resumed job samples the chunk it was in again the same
        // way (on the same device and build).
        tch::manual_seed(settings.seed.wrapping_add(begin as u64) as i64);
        let prompts = (begin..end).map(start_ids).collect::<Result<Vec<_>>>()?;
        let tokens: Vec<u32> = sample_batch(model, &prompts, window, config)?
            .into_iter()
            .flatten()
            .collect();
        store.append(&tokens)?;
        progress.inc(((end - begin) * window) as u64);
        let done = store.len() - first;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            sampled = store.len(),
            of = settings.num_sequences,
            tokens_per_s = (done * window) as f64 / secs.max(1e-9),
            "teacher samples"
        );
    }
    progress.finish();
    Ok(())
}

/// One sequence of `window` tokens per prompt: the prompt (at most `window` tokens, at least
/// one), continued by sampling, all rows in one batch with the teacher's KV cache on its device.
/// Prompts differ in length, so the batch runs in step: the tokens every prompt has are one
/// prefill, then each step feeds a row its next prompt token while it has one and its sampled
/// token afterwards (no padding, so every row sees exactly its own prefix).
fn sample_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    window: usize,
    config: &TeacherSamplesConfig,
) -> Result<Vec<Vec<u32>>> {
    let device = model.device();
    let n = prompts.len();
    ensure!(
        prompts.iter().all(|p| !p.is_empty() && p.len() <= window),
        "every prompt needs 1 to {window} tokens"
    );
    let shared = prompts.iter().map(Vec::len).min().unwrap_or(0);
    // Each row's prompt, padded to the window; `forced[i, t]` while t is inside row i's prompt.
    let mut padded = vec![0i64; n * window];
    let mut forced = vec![false; n * window];
    for (i, prompt) in prompts.iter().enumerate() {
        for (t, &id) in prompt.iter().enumerate() {
            padded[i * window + t] = i64::from(id);
            forced[i * window + t] = true;
        }
    }
    let padded = Tensor::from_slice(&padded)
        .view([n as i64, window as i64])
        .to_device(device);
    let forced = Tensor::from_slice(&forced)
        .view([n as i64, window as i64])
        .to_device(device);
    let mut pieces = vec![padded.narrow(1, 0, shared as i64)]; // (n, shared)
    if shared < window {
        let mut cache = model.new_cache(n as i64)?;
        let mut logits = model.forward(&pieces[0], Some(&mut cache))?.select(1, -1);
        for t in shared..window {
            let sampled = sample_next(&logits, config.temperature, config.top_p); // (n, 1)
            let t = t as i64;
            let next = padded
                .narrow(1, t, 1)
                .f_where_self(&forced.narrow(1, t, 1), &sampled)?;
            pieces.push(next.shallow_clone());
            if t + 1 < window as i64 {
                logits = model.forward(&next, Some(&mut cache))?.select(1, -1);
            }
        }
    }
    let all = Tensor::cat(&pieces, 1).to_device(Device::Cpu);
    ensure!(
        all.size() == [n as i64, window as i64],
        "sampled {:?}, expected ({n}, {window})",
        all.size()
    );
    let flat = Vec::<i64>::try_from(all.reshape([-1])).context("copying samples to the CPU")?;
    Ok(flat
        .chunks_exact(window)
        .map(|row| row.iter().map(|&t| t as u32).collect())
        .collect())
}

/// One token per row from logits (n, V): softmax at `temperature`, restricted to the nucleus of
/// mass `top_p` (the most likely tokens whose preceding mass is below it; at least one).
fn sample_next(logits: &Tensor, temperature: f64, top_p: f64) -> Tensor {
    let probs = (logits.to_kind(Kind::Float) / temperature).softmax(-1, Kind::Float);
    if top_p >= 1.0 {
        return probs.multinomial(1, false);
    }
    let (sorted, order) = probs.sort(-1, true);
    let before = sorted.cumsum(-1, Kind::Float) - &sorted;
    // multinomial renormalises the kept mass itself.
    let kept = &sorted * before.lt(top_p).to_kind(Kind::Float);
    let choice = kept.multinomial(1, false);
    order.gather(-1, &choice, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use linearize_models::config::ModelConfig;

    #[test]
    fn a_batch_of_prompts_of_different_lengths_keeps_each_prompt() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 40, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "max_position_embeddings": 64}"#,
        )
        .unwrap();
        tch::manual_seed(0);
        let model = Model::new(&cfg, Device::Cpu, Kind::Float).unwrap();
        let config: TeacherSamplesConfig =
            serde_yaml_ng::from_str("num_sequences: 3\ntemperature: 1.0\ntop_p: 1.0\n").unwrap();
        let prompts = vec![
            vec![5, 6, 7, 8],
            vec![9],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ];
        let rows = tch::no_grad(|| sample_batch(&model, &prompts, 10, &config)).unwrap();
        assert_eq!(rows.len(), 3);
        for (row, prompt) in rows.iter().zip(&prompts) {
            assert_eq!(row.len(), 10);
            assert_eq!(&row[..prompt.len()], &prompt[..]);
            assert!(row.iter().all(|&t| t < 40));
        }
        // Each row continues its own prefix: row 1 past its one-token prompt is sampled, so
        // with a fixed seed the same batch samples the same tokens again.
        tch::manual_seed(1);
        let again = tch::no_grad(|| sample_batch(&model, &prompts, 10, &config)).unwrap();
        tch::manual_seed(1);
        let third = tch::no_grad(|| sample_batch(&model, &prompts, 10, &config)).unwrap();
        assert_eq!(again, third);
    }

    #[test]
    fn nucleus_keeps_only_the_likely_tokens() {
        tch::manual_seed(3);
        // p = [0.6, 0.3, 0.1] over tokens 2, 0, 1: top_p 0.5 keeps token 2 alone, 0.8 adds 0.
        let logits = Tensor::from_slice(&[0.3f32.ln(), 0.1f32.ln(), 0.6f32.ln()])
            .view([1, 3])
            .expand([400, 3], false)
            .contiguous();
        let only = Vec::<i64>::try_from(sample_next(&logits, 1.0, 0.5).reshape([-1])).unwrap();
        assert!(only.iter().all(|&t| t == 2));
        let two = Vec::<i64>::try_from(sample_next(&logits, 1.0, 0.8).reshape([-1])).unwrap();
        assert!(two.iter().all(|&t| t == 2 || t == 0));
        assert!(two.contains(&0) && two.contains(&2));
        let all = Vec::<i64>::try_from(sample_next(&logits, 1.0, 1.0).reshape([-1])).unwrap();
        assert!(all.contains(&1));
    }
}
