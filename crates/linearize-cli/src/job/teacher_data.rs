//! What the job computes with the original model before any layer is converted:
//! - the sequences of `data.teacher_samples` (data-free training), sampled from the teacher in
//!   batches on its device and kept in `<run>/teacher-samples/` (so a resumed job reuses them and
//!   generates only what is missing), then added to the training sequences;
//! - the teacher's loss on the validation sequences, `<run>/teacher_val.json`, the reference the
//!   LoRA stage's validation perplexity is divided by in `linearize compare` (the stage logs
//!   only the student's).
use anyhow::{ensure, Context, Result};
use linearize_eval::generations::encode_prompt;
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
/// sequences, `weight` times each, to `datasets.train`. `model` must still be the unconverted
/// teacher; `tokenizer` is its own with `data.template` applied (chat prompts render through it).
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
    let settings =
        SampleSettings::from_config(data, teacher, tokenizer)?.expect("teacher_samples is set");
    let dir: PathBuf = run_dir.join(TEACHER_SAMPLES_DIR);
    let mut store = TeacherSampleStore::open(&dir, settings)?;
    if !store.is_complete() {
        generate(model, tokenizer, config, &mut store).context("sampling from the teacher")?;
    }
    let weight = config.weight.unwrap_or(1.0);
    let samples = store.read_weighted(weight)?;
    tracing::info!(
        sequences = samples.len(),
        weight,
        tokens = samples.len() * samples.seq_len(),
        corpus_sequences = datasets.train.len(),
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
    let chat = settings.chat_template.is_some();
    // Each prompt's ids, encoded once as `eval.generations` encodes its prompts: plain text with
    // the tokenizer's special tokens (so a BOS-using model sees the start of a document), or
    // with `chat` a user turn through the chat template with the generation prompt, so that the
    // teacher answers as the assistant.
    let encoded: Vec<Vec<u32>> = settings
        .prompts
        .iter()
        .map(|prompt| encode_prompt(tokenizer, prompt, chat))
        .collect::<Result<_>>()?;
    let start = tokenizer
        .bos_id()
        .or_else(|| tokenizer.eos_ids().first().copied());
    // No prompt (or one of no tokens): the sample starts from BOS alone.
    let ids_of = |prompt: Option<usize>| -> Result<Vec<u32>> {
        match prompt.map(|i| &encoded[i]) {
            Some(ids) if !ids.is_empty() => Ok(ids.clone()),
            _ => Ok(vec![start.context(
                "the tokenizer has neither BOS nor EOS to start a sample from",
            )?]),
        }
    };
    // The prompts sequence `index` is fed: its opening prompt (cut to the window) and, for chat
    // samples, the prompts of the conversations that follow each answer, until together they
    // could fill the window (a row can never be fed more).
    let conversations = |index: usize| -> Result<Vec<Vec<u32>>> {
        let mut first = ids_of(settings.prompt_index(index, 0))?;
        first.truncate(window);
        let mut total = first.len();
        let mut turns = vec![first];
        while chat && total < window {
            let ids = ids_of(settings.prompt_index(index, turns.len()))?;
            total += ids.len();
            turns.push(ids);
        }
        Ok(turns)
    };
    // A chat answer ends where generation stops (`eval.generations` stops there too): at the
    // end-of-turn / EOS ids. Plain samples continue through them, as a document stream does.
    let stop_ids: Vec<u32> = if chat {
        tokenizer.eos_ids().to_vec()
    } else {
        Vec::new()
    };
    if chat {
        ensure!(
            !stop_ids.is_empty(),
            "data.teacher_samples.chat: the tokenizer names no EOS or end-of-turn token, so an \
             answer's end cannot be told"
        );
    }
    let batch = batch_size(model.device());
    let started = Instant::now();
    let first = store.len();
    tracing::info!(
        remaining = store.remaining(),
        window,
        batch,
        chat,
        prompts = settings.prompts.len(),
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
        let rows = (begin..end)
            .map(conversations)
            .collect::<Result<Vec<_>>>()?;
        let sampling = Sampling {
            window,
            temperature: config.temperature,
            top_p: config.top_p,
            stop_ids: &stop_ids,
        };
        let tokens: Vec<u32> = sample_batch(model, &rows, &sampling)?
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

/// How [`sample_batch`] samples.
struct Sampling<'a> {
    /// Tokens per row.
    window: usize,
    temperature: f64,
    top_p: f64,
    /// Sampled ids that end a chat answer, after which the row is fed its next prompt; empty:
    /// rows are fed their first prompt only.
    stop_ids: &'a [u32],
}

/// One sequence of `window` tokens per row, all rows in one batch with the teacher's KV cache
/// on its device. A row is fed its first prompt (at most `window` tokens, at least one), then
/// continued by sampling; whenever it samples a stop id it is fed its next prompt (a new
/// conversation packed after the answer) and samples on. Rows differ in where they are fed, so
/// the batch runs in step: the tokens every first prompt has are one prefill, then each step
/// feeds a row its next prompt token while it has one and its sampled token otherwise (no
/// padding, so every row sees exactly its own prefix). The choice is made on the device (no
/// copy back per step), so decoding is not held up by the host.
fn sample_batch(model: &Model, rows: &[Vec<Vec<u32>>], s: &Sampling) -> Result<Vec<Vec<u32>>> {
    let (device, window, n) = (model.device(), s.window, rows.len());
    ensure!(
        rows.iter().all(
            |r| r.iter().all(|p| !p.is_empty()) && r.first().is_some_and(|p| p.len() <= window)
        ),
        "every row needs a first prompt of 1 to {window} tokens, and no prompt may be empty"
    );
    let shared = rows.iter().map(|r| r[0].len()).min().unwrap_or(0);
    // Every row's prompts back to back, padded (one column more than the longest, so a finished
    // row's read stays in bounds): the row reads its stream at `pos` while `left` > 0.
    let width = rows
        .iter()
        .map(|r| r.iter().map(Vec::len).sum::<usize>())
        .max()
        .unwrap_or(0)
        + 1;
    // `next_len[i, k]`: the length of row i's prompt k + 1; 0 past its last (the last column
    // always), so a row out of prompts samples on.
    let turns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut stream = vec![0i64; n * width];
    let mut next_len = vec![0i64; n * turns];
    for (i, row) in rows.iter().enumerate() {
        for (t, &id) in row.iter().flatten().enumerate() {
            stream[i * width + t] = i64::from(id);
        }
        for (k, prompt) in row.iter().enumerate().skip(1) {
            next_len[i * turns + k - 1] = prompt.len() as i64;
        }
    }
    let stream = Tensor::from_slice(&stream)
        .view([n as i64, width as i64])
        .to_device(device); // (n, width)
    let next_len = Tensor::from_slice(&next_len)
        .view([n as i64, turns as i64])
        .to_device(device); // (n, turns)
    let stops = Tensor::from_slice(&s.stop_ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>())
        .to_device(device);
    let first_len: Vec<i64> = rows.iter().map(|r| r[0].len() as i64).collect();
    let mut pos = Tensor::full([n as i64], shared as i64, (Kind::Int64, device)); // (n,)
    let mut left = Tensor::from_slice(&first_len).to_device(device) - shared as i64; // (n,)
    let mut turn = Tensor::zeros([n as i64], (Kind::Int64, device)); // (n,)

    let mut pieces = vec![stream.narrow(1, 0, shared as i64)]; // (n, shared)
    if shared < window {
        let mut cache = model.new_cache(n as i64)?;
        let mut logits = model.forward(&pieces[0], Some(&mut cache))?.select(1, -1);
        for t in shared..window {
            let sampled = sample_next(&logits, s.temperature, s.top_p).view([-1]); // (n,)
            let feeding = left.gt(0); // (n,)
            let fed = stream
                .gather(1, &pos.clamp_max(width as i64 - 1).unsqueeze(1), false)
                .view([-1]);
            let next = fed.f_where_self(&feeding, &sampled)?; // (n,)
            let fed_now = feeding.to_kind(Kind::Int64);
            pos += &fed_now;
            left -= &fed_now;
            if !s.stop_ids.is_empty() {
                // A sampled (not fed) stop id ends the answer: the next prompt follows.
                let ends =
                    Tensor::isin(&next, &stops, false, false).logical_and(&feeding.logical_not());
                let coming = next_len
                    .gather(1, &turn.clamp_max(turns as i64 - 1).unsqueeze(1), false)
                    .view([-1]);
                left = coming.f_where_self(&ends, &left)?;
                turn += ends.to_kind(Kind::Int64);
            }
            let next = next.unsqueeze(1); // (n, 1)
            pieces.push(next.shallow_clone());
            if t + 1 < window {
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
    use std::sync::{Mutex, MutexGuard};

    /// Tests seed and draw from torch's one global generator: one at a time, or a test running
    /// beside another draws from its sequence.
    fn rng_lock() -> MutexGuard<'static, ()> {
        static RNG: Mutex<()> = Mutex::new(());
        RNG.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tiny_teacher() -> Model {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 40, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "max_position_embeddings": 64}"#,
        )
        .unwrap();
        tch::manual_seed(0);
        Model::new(&cfg, Device::Cpu, Kind::Float).unwrap()
    }

    #[test]
    fn a_batch_of_prompts_of_different_lengths_keeps_each_prompt() {
        let _rng = rng_lock();
        let model = tiny_teacher();
        let prompts = vec![
            vec![5, 6, 7, 8],
            vec![9],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ];
        let rows: Vec<Vec<Vec<u32>>> = prompts.iter().map(|p| vec![p.clone()]).collect();
        let sampling = Sampling {
            window: 10,
            temperature: 1.0,
            top_p: 1.0,
            stop_ids: &[],
        };
        let samples = tch::no_grad(|| sample_batch(&model, &rows, &sampling)).unwrap();
        assert_eq!(samples.len(), 3);
        for (row, prompt) in samples.iter().zip(&prompts) {
            assert_eq!(row.len(), 10);
            assert_eq!(&row[..prompt.len()], &prompt[..]);
            assert!(row.iter().all(|&t| t < 40));
        }
        // With a fixed seed the same batch samples the same tokens again.
        tch::manual_seed(1);
        let again = tch::no_grad(|| sample_batch(&model, &rows, &sampling)).unwrap();
        tch::manual_seed(1);
        let third = tch::no_grad(|| sample_batch(&model, &rows, &sampling)).unwrap();
        assert_eq!(again, third);
    }

    /// Walks a sampled row: its first prompt, sampled tokens up to a stop id, the next prompt,
    /// and so on; panics where the row departs from that. Returns how many prompts followed an
    /// answer.
    fn follow(row: &[u32], prompts: &[Vec<u32>], stops: &[u32]) -> usize {
        let (mut t, mut k) = (0, 0);
        loop {
            let fed = prompts[k].len().min(row.len() - t);
            assert_eq!(&row[t..t + fed], &prompts[k][..fed], "prompt {k} at {t}");
            t += fed;
            loop {
                if t == row.len() {
                    return k;
                }
                t += 1;
                if stops.contains(&row[t - 1]) && k + 1 < prompts.len() {
                    break;
                }
            }
            k += 1;
        }
    }

    #[test]
    fn a_chat_row_is_fed_its_next_prompt_after_each_answer() {
        let _rng = rng_lock();
        let model = tiny_teacher();
        // Half the vocabulary ends an answer, so answers are short and rows take many prompts.
        // Stop ids inside a prompt (5, 6) are fed, not sampled: they start nothing.
        let stops: Vec<u32> = (0..20).collect();
        let rows = vec![
            vec![
                vec![30, 5, 31],
                vec![32, 33],
                vec![34, 6, 35, 36],
                vec![37],
                vec![38, 39],
            ],
            vec![vec![21], vec![22, 23, 24, 25, 26, 27], vec![28; 30]],
            // Out of prompts after the second: samples on through stop ids.
            vec![vec![29, 29, 29, 29, 29], vec![21]],
        ];
        let sampling = Sampling {
            window: 24,
            temperature: 1.0,
            top_p: 1.0,
            stop_ids: &stops,
        };
        let mut fed_after_answers = 0;
        for seed in 0..4 {
            tch::manual_seed(seed);
            let samples = tch::no_grad(|| sample_batch(&model, &rows, &sampling)).unwrap();
            for (row, prompts) in samples.iter().zip(&rows) {
                assert_eq!(row.len(), 24);
                fed_after_answers += follow(row, prompts, &stops);
            }
        }
        assert!(fed_after_answers >= 8, "{fed_after_answers}");
        // Without stop ids the same rows are fed their first prompt only.
        tch::manual_seed(0);
        let plain = Sampling {
            stop_ids: &[],
            ..sampling
        };
        let samples = tch::no_grad(|| sample_batch(&model, &rows, &plain)).unwrap();
        for (row, prompts) in samples.iter().zip(&rows) {
            assert_eq!(follow(row, &prompts[..1], &[]), 0);
        }
    }

    #[test]
    fn nucleus_keeps_only_the_likely_tokens() {
        let _rng = rng_lock();
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
