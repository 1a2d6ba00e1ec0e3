//! The perplexity protocol with fake models whose NLL is known in closed form or computed by a
//! naive per-token loop.
use anyhow::Result;
use linearize_eval::perplexity::{compare, perplexity, perplexity_of_text, windows, WindowOptions};
use linearize_models::lm::CausalLm;
use linearize_models::tokenizer::Tokenizer;
use std::cell::RefCell;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn options(ctx: usize, max_windows: Option<usize>, batch_size: usize) -> WindowOptions {
    WindowOptions {
        ctx,
        max_windows,
        batch_size,
    }
}

/// Equal logits for every token.
struct Uniform {
    vocab: i64,
}

/// Logits = table[previous token]; records the id batches it is given.
struct Bigram {
    table: Tensor,
    seen: RefCell<Vec<Vec<Vec<i64>>>>,
}

/// Puts a logit of 100 on `next(token)` and 0 elsewhere.
struct Oracle {
    vocab: i64,
}

fn next(token: i64, vocab: i64) -> i64 {
    (token * 5 + 3) % vocab
}

impl CausalLm for Uniform {
    type Cache = ();
    fn new_cache(&self, _: i64) -> Result<()> {
        Ok(())
    }
    fn forward_cached(&self, ids: &Tensor, _: &mut ()) -> Result<Tensor> {
        let (b, l) = ids.size2()?;
        Ok(Tensor::zeros(
            [b, l, self.vocab],
            (Kind::Float, Device::Cpu),
        ))
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn max_context(&self) -> Option<i64> {
        None
    }
}

impl CausalLm for Bigram {
    type Cache = ();
    fn new_cache(&self, _: i64) -> Result<()> {
        Ok(())
    }
    fn forward_cached(&self, ids: &Tensor, _: &mut ()) -> Result<Tensor> {
        let (b, l) = ids.size2()?;
        self.seen.borrow_mut().push(Vec::<Vec<i64>>::try_from(ids)?);
        let v = self.table.size()[0];
        Ok(self
            .table
            .index_select(0, &ids.flatten(0, -1))
            .view([b, l, v]))
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn max_context(&self) -> Option<i64> {
        None
    }
}

impl CausalLm for Oracle {
    type Cache = ();
    fn new_cache(&self, _: i64) -> Result<()> {
        Ok(())
    }
    fn forward_cached(&self, ids: &Tensor, _: &mut ()) -> Result<Tensor> {
        let (b, l) = ids.size2()?;
        let targets = (ids * 5 + 3).remainder(self.vocab);
        let logits = Tensor::zeros([b, l, self.vocab], (Kind::Float, Device::Cpu));
        Ok(logits.scatter_value(-1, &targets.unsqueeze(-1), 100.0))
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn max_context(&self) -> Option<i64> {
        None
    }
}

/// A fixed pseudo-random logit table (not libtorch's RNG, which parallel tests share).
fn bigram(vocab: i64, seed: i64) -> Bigram {
    let values: Vec<f32> = (0..vocab * vocab)
        .map(|k| {
            2.0 * ((k as f32) * 12.9898 + seed as f32 * 78.233).sin() * ((k % 7) as f32 * 0.5 + 0.5)
        })
        .collect();
    Bigram {
        table: Tensor::from_slice(&values).view([vocab, vocab]),
        seen: RefCell::new(Vec::new()),
    }
}

fn tokens(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + i * i / 3) % vocab).collect()
}

/// Naive reference: per window, per position 1..ctx-1, -log softmax(table[w[j-1]])[w[j]].
fn naive_bigram_nll(table: &Tensor, windows: &[&[u32]]) -> (f64, usize) {
    let rows = Vec::<Vec<f32>>::try_from(table).unwrap();
    let (mut total, mut count) = (0.0, 0);
    for w in windows {
        for j in 1..w.len() {
            let row = &rows[w[j - 1] as usize];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            total += lse - row[w[j] as usize] as f64;
            count += 1;
        }
    }
    (total / count as f64, count)
}

#[test]
fn windows_are_consecutive_partial_dropped_and_capped() {
    let toks: Vec<u32> = (0..10).collect();
    let w = windows(&toks, &options(3, None, 1)).unwrap();
    assert_eq!(w, vec![&[0, 1, 2][..], &[3, 4, 5], &[6, 7, 8]]);
    let w = windows(&toks, &options(3, Some(2), 1)).unwrap();
    assert_eq!(w, vec![&[0, 1, 2][..], &[3, 4, 5]]);
    assert_eq!(windows(&toks, &options(5, Some(9), 1)).unwrap().len(), 2);
    assert_eq!(windows(&toks, &options(10, None, 1)).unwrap().len(), 1);
    let err = windows(&toks, &options(11, None, 1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("10 tokens") && err.contains("ctx = 11"),
        "{err}"
    );
    assert!(windows(&toks, &options(1, None, 1)).is_err());
    assert!(windows(&toks, &options(2, Some(0), 1)).is_err());
    assert!(windows(&toks, &options(2, None, 0)).is_err());
}

#[test]
fn uniform_model_has_perplexity_equal_to_vocab_size() {
    let report = perplexity(
        &Uniform { vocab: 37 },
        &tokens(103, 37),
        &options(10, None, 4),
    )
    .unwrap();
    // Log-probabilities are computed in f32.
    assert!(
        (report.perplexity - 37.0).abs() < 37.0 * 1e-6,
        "{}",
        report.perplexity
    );
    assert!((report.mean_nll - 37f64.ln()).abs() < 1e-6);
    assert_eq!(
        (
            report.windows,
            report.scored_tokens,
            report.total_tokens,
            report.ctx
        ),
        (10, 90, 103, 10)
    );
}

#[test]
fn perfect_model_has_perplexity_one() {
    let vocab = 23;
    let mut toks = vec![4u32];
    for _ in 1..60 {
        toks.push(next(*toks.last().unwrap() as i64, vocab) as u32);
    }
    let report = perplexity(&Oracle { vocab }, &toks, &options(12, Some(4), 3)).unwrap();
    assert!(
        (report.perplexity - 1.0).abs() < 1e-9,
        "{}",
        report.perplexity
    );
    assert_eq!((report.windows, report.scored_tokens), (4, 44));
}

#[test]
fn batched_scoring_matches_the_naive_per_token_reference() {
    let model = bigram(29, 1);
    let toks = tokens(250, 29);
    let opts = options(16, Some(13), 1);
    let (want, count) = naive_bigram_nll(&model.table, &windows(&toks, &opts).unwrap());
    for batch_size in [1, 4, 13, 50] {
        let report = perplexity(&model, &toks, &options(16, Some(13), batch_size)).unwrap();
        assert_eq!(report.scored_tokens, count);
        assert!(
            (report.mean_nll - want).abs() < 1e-6,
            "batch {batch_size}: {} vs {want}",
            report.mean_nll
        );
        assert!((report.perplexity - want.exp()).abs() < 1e-5 * want.exp());
    }
}

#[test]
fn each_window_is_scored_on_its_own() {
    let model = bigram(11, 2);
    let toks = tokens(47, 11);
    perplexity(&model, &toks, &options(5, Some(7), 3)).unwrap();
    let seen = model.seen.borrow();
    // 7 windows in batches of 3, 3, 1; each row is exactly one window of the text.
    assert_eq!(
        seen.iter().map(|b| b.len()).collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    let rows: Vec<Vec<i64>> = seen.iter().flatten().cloned().collect();
    for (i, row) in rows.iter().enumerate() {
        let want: Vec<i64> = toks[i * 5..(i + 1) * 5].iter().map(|&t| t as i64).collect();
        assert_eq!(row, &want, "window {i}");
    }
}

#[test]
fn compare_reports_both_models_kl_and_agreement() {
    let vocab = 13;
    let teacher = bigram(vocab, 3);
    let toks = tokens(130, vocab as u32);
    let opts = options(9, None, 5);

    let same = compare(&teacher, &teacher, &toks, &opts).unwrap();
    assert_eq!(same.teacher, same.student);
    assert!(same.kl_teacher_student.abs() < 1e-9);
    assert_eq!(same.top1_agreement, 1.0);
    assert_eq!(same.teacher, perplexity(&teacher, &toks, &opts).unwrap());

    // Against a uniform student: KL(p || u) = sum p log p + log V per position, and the uniform
    // argmax is token 0 (torch picks the first maximum).
    let cmp = compare(&teacher, &Uniform { vocab }, &toks, &opts).unwrap();
    assert!((cmp.student.perplexity - vocab as f64).abs() < vocab as f64 * 1e-6);
    let rows = Vec::<Vec<f32>>::try_from(&teacher.table).unwrap();
    let (mut kl, mut agree, mut n) = (0.0, 0, 0);
    for w in windows(&toks, &opts).unwrap() {
        for &prev in &w[..w.len() - 1] {
            let row = &rows[prev as usize];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            let p: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp() / z).collect();
            kl += p.iter().map(|&q| q * q.ln()).sum::<f64>() + (vocab as f64).ln();
            let argmax = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            agree += (argmax == 0) as usize;
            n += 1;
        }
    }
    assert!(
        (cmp.kl_teacher_student - kl / n as f64).abs() < 1e-6,
        "{} vs {}",
        cmp.kl_teacher_student,
        kl / n as f64
    );
    assert!((cmp.top1_agreement - agree as f64 / n as f64).abs() < 1e-12);
    assert!(cmp.kl_teacher_student > 0.1);
}

#[test]
fn text_is_encoded_without_special_tokens_and_reports_serialize() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../linearize-models/tests/fixtures/tokenizer/llama3");
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let plain = tokenizer.encode(&text, false).unwrap();
    assert_ne!(plain[0], tokenizer.bos_id().unwrap());
    let vocab = tokenizer.vocab_size() as i64;
    let report =
        perplexity_of_text(&Uniform { vocab }, &tokenizer, &text, &options(32, None, 8)).unwrap();
    assert_eq!(report.total_tokens, plain.len());
    assert_eq!(report.windows, plain.len() / 32);
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "perplexity",
        "mean_nll",
        "ctx",
        "windows",
        "scored_tokens",
        "total_tokens",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
}
