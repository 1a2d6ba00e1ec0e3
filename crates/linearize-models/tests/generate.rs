//! Generation and sampling with a fake bigram model whose next-token logits are a fixed table.
use anyhow::Result;
use linearize_models::generate::{
    generate, GenerateConfig, Generation, Sampler, SamplingConfig, StopReason,
};
use linearize_models::lm::CausalLm;
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

/// Logits of the next token = row `table[last token]`. Records the length of every
/// forward_cached call; its cache is the list of tokens it has seen.
struct Bigram {
    table: Tensor,
    calls: RefCell<Vec<i64>>,
    max_context: Option<i64>,
}

impl Bigram {
    fn new(rows: &[Vec<f32>]) -> Self {
        let v = rows.len() as i64;
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Self {
            table: Tensor::from_slice(&flat).view([v, v]),
            calls: RefCell::new(Vec::new()),
            max_context: None,
        }
    }

    /// Row i peaks at (i + 1) % v: greedy decoding counts upwards.
    fn counter(v: usize) -> Self {
        let rows = (0..v)
            .map(|i| {
                (0..v)
                    .map(|j| {
                        if j == (i + 1) % v {
                            3.0
                        } else {
                            (j as f32) * 0.1
                        }
                    })
                    .collect()
            })
            .collect::<Vec<_>>();
        Self::new(&rows)
    }
}

impl CausalLm for Bigram {
    type Cache = Vec<i64>;

    fn new_cache(&self, batch: i64) -> Result<Vec<i64>> {
        assert_eq!(batch, 1);
        Ok(Vec::new())
    }

    fn forward_cached(&self, ids: &Tensor, cache: &mut Vec<i64>) -> Result<Tensor> {
        let (b, l) = ids.size2()?;
        self.calls.borrow_mut().push(l);
        cache.extend(Vec::<i64>::try_from(ids.flatten(0, -1))?);
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
        self.max_context
    }
}

fn greedy(max_new_tokens: usize, stop_ids: Vec<u32>) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        sampling: SamplingConfig::greedy(),
        stop_ids,
        cuda_graphs: true,
    }
}

fn sampled(seed: u64, temperature: f64, top_p: f64, top_k: Option<usize>) -> SamplingConfig {
    SamplingConfig {
        temperature,
        top_p,
        top_k,
        seed,
    }
}

#[test]
fn greedy_follows_the_argmax_and_prefills_once() {
    let model = Bigram::counter(8);
    let mut streamed = Vec::new();
    let out = generate(&model, &[5, 2, 3], &greedy(6, vec![]), |t| {
        streamed.push(t);
        Ok(())
    })
    .unwrap();
    assert_eq!(
        out,
        Generation {
            tokens: vec![4, 5, 6, 7, 0, 1],
            stop: StopReason::MaxNewTokens
        }
    );
    assert_eq!(streamed, out.tokens);
    // One prefill call of the whole prompt, then one call per token except the last.
    assert_eq!(*model.calls.borrow(), vec![3, 1, 1, 1, 1, 1]);
}

#[test]
fn stops_at_any_eos_and_leaves_it_out() {
    let model = Bigram::counter(8);
    let out = generate(&model, &[1], &greedy(100, vec![9, 5]), |_| Ok(())).unwrap();
    assert_eq!(
        out,
        Generation {
            tokens: vec![2, 3, 4],
            stop: StopReason::Eos(5)
        }
    );
}

#[test]
fn zero_new_tokens_runs_nothing_and_context_limit_stops() {
    let model = Bigram::counter(8);
    let out = generate(&model, &[1], &greedy(0, vec![]), |_| Ok(())).unwrap();
    assert_eq!(
        out,
        Generation {
            tokens: vec![],
            stop: StopReason::MaxNewTokens
        }
    );
    assert!(model.calls.borrow().is_empty());

    let mut model = Bigram::counter(8);
    model.max_context = Some(4);
    let out = generate(&model, &[0, 1], &greedy(100, vec![]), |_| Ok(())).unwrap();
    assert_eq!(
        out,
        Generation {
            tokens: vec![2, 3],
            stop: StopReason::ContextFull
        }
    );
    let err = generate(&model, &[0, 1, 2, 3, 4], &greedy(1, vec![]), |_| Ok(())).unwrap_err();
    assert!(err.to_string().contains("context of 4"), "{err}");
}

#[test]
fn callback_errors_stop_generation() {
    let model = Bigram::counter(8);
    let mut seen = 0;
    let err = generate(&model, &[0], &greedy(10, vec![]), |_| {
        seen += 1;
        anyhow::ensure!(seen < 3, "reader went away");
        Ok(())
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "reader went away");
    assert_eq!(seen, 3);
}

#[test]
fn seeds_reproduce_and_differ() {
    let model = Bigram::new(&vec![vec![0.0; 16]; 16]);
    let run = |seed| {
        let config = GenerateConfig {
            max_new_tokens: 40,
            sampling: sampled(seed, 1.0, 1.0, None),
            stop_ids: vec![],
            cuda_graphs: true,
        };
        generate(&model, &[0], &config, |_| Ok(())).unwrap().tokens
    };
    let a = run(7);
    assert_eq!(a, run(7));
    assert_ne!(a, run(8));
    // Independent of libtorch's global RNG.
    tch::manual_seed(123);
    let _ = Tensor::rand([10], (Kind::Float, Device::Cpu));
    assert_eq!(a, run(7));
}

/// Naive reference: softmax(logits / t) in f64.
fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
    let max = logits
        .iter()
        .map(|&x| x as f64 / t)
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 / t - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

#[test]
fn temperature_scales_the_softmax() {
    let logits = [1.0f32, 3.0, -2.0, 0.5];
    for t in [0.5, 1.0, 2.0] {
        let dist = Sampler::new(sampled(0, t, 1.0, None))
            .unwrap()
            .distribution(&logits)
            .unwrap();
        let want = softmax(&logits, t);
        assert_eq!(
            dist.iter().map(|d| d.0).collect::<Vec<_>>(),
            vec![1, 0, 3, 2]
        );
        for (token, p) in dist {
            assert!(
                (p - want[token as usize]).abs() < 1e-12,
                "t={t} token {token}"
            );
        }
    }
}

#[test]
fn top_p_keeps_the_smallest_nucleus_and_never_samples_the_tail() {
    // Probabilities 0.5, 0.3, 0.15, 0.05: the first three reach 0.95 >= 0.9, the tail is out.
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let mut sampler = Sampler::new(sampled(3, 1.0, 0.9, None)).unwrap();
    let dist = sampler.distribution(&logits).unwrap();
    let tokens: Vec<u32> = dist.iter().map(|d| d.0).collect();
    assert_eq!(tokens, vec![0, 1, 2]);
    for (token, p) in &dist {
        let want = [0.5, 0.3, 0.15][*token as usize] / 0.95;
        assert!((p - want).abs() < 1e-6, "token {token}: {p} vs {want}");
    }
    let n = 20_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[sampler.sample(&logits).unwrap() as usize] += 1;
    }
    assert_eq!(counts[3], 0, "the tail was sampled");
    for (token, p) in dist {
        let freq = counts[token as usize] as f64 / n as f64;
        assert!(
            (freq - p).abs() < 0.015,
            "token {token}: frequency {freq} vs probability {p}"
        );
    }
    // A top token above top_p on its own is kept alone.
    let dist = Sampler::new(sampled(0, 1.0, 0.4, None))
        .unwrap()
        .distribution(&logits)
        .unwrap();
    assert_eq!(dist, vec![(0, 1.0)]);
}

#[test]
fn top_k_keeps_the_k_most_likely() {
    let logits = [0.1f32, 2.0, -1.0, 1.5, 0.7];
    let mut sampler = Sampler::new(sampled(11, 1.0, 1.0, Some(2))).unwrap();
    let dist = sampler.distribution(&logits).unwrap();
    assert_eq!(dist.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 3]);
    let want = softmax(&[2.0, 1.5], 1.0);
    assert!((dist[0].1 - want[0]).abs() < 1e-12 && (dist[1].1 - want[1]).abs() < 1e-12);
    for _ in 0..1000 {
        assert!(matches!(sampler.sample(&logits).unwrap(), 1 | 3));
    }
}

#[test]
fn greedy_picks_the_first_maximum_and_rejects_nan() {
    let mut sampler = Sampler::new(SamplingConfig::greedy()).unwrap();
    assert_eq!(sampler.sample(&[0.0, 2.0, 2.0, 1.0]).unwrap(), 1);
    assert_eq!(
        sampler
            .sample(&[f32::NEG_INFINITY, -1e30, f32::NEG_INFINITY])
            .unwrap(),
        1
    );
    let err = sampler.sample(&[0.0, f32::NAN]).unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
}

#[test]
fn invalid_sampling_settings_are_rejected() {
    for (config, what) in [
        (sampled(0, -1.0, 1.0, None), "temperature"),
        (sampled(0, f64::NAN, 1.0, None), "temperature"),
        (sampled(0, 1.0, 0.0, None), "top-p"),
        (sampled(0, 1.0, 1.5, None), "top-p"),
        (sampled(0, 1.0, 1.0, Some(0)), "top-k"),
    ] {
        let err = Sampler::new(config).err().unwrap().to_string();
        assert!(err.contains(what), "{err}");
    }
}
