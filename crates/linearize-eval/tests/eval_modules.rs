//! Each evaluation module on tiny random models (a teacher and its LoLCATs conversion over the
//! same weights) and on a fake copying model, then the whole report written to a directory.
mod common;

use common::{converted, fixtures, lolcats, rng_lock, text, tiny_model, tokenizer, Copier};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_eval::attention_error::{attention_error, converted_layers};
use linearize_eval::kl::kl_report;
use linearize_eval::multiple_choice::{encode_pair, loglikelihood, score_task, McTask};
use linearize_eval::perplexity::{compare, WindowOptions};
use linearize_eval::plots::{render_png, Panel, Series};
use linearize_eval::recall::{
    mqar, mqar_samples, multikey, multikey_prompts, passkey, passkey_prompts, wilson, Interval,
    MqarConfig, MultiKeyConfig, PasskeyConfig,
};
use linearize_eval::report::{run_report, EvalConfig};
use linearize_eval::speed::{self, MemorySource, SpeedConfig};
use linearize_eval::training::read_metrics;
use linearize_models::lm::CausalLm;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const CONTEXT: i64 = 512;

fn options(ctx: usize, max_windows: Option<usize>, batch_size: usize) -> WindowOptions {
    WindowOptions {
        ctx,
        max_windows,
        batch_size,
    }
}

fn tokens() -> Vec<u32> {
    tokenizer().encode(&text(), false).unwrap()
}

/// Logits of the whole sequence `ids`.
fn logits(model: &impl CausalLm, ids: &[u32]) -> Tensor {
    let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    model
        .forward(&Tensor::from_slice(&ids).view([1, -1]))
        .unwrap()
}

#[test]
fn kl_is_zero_against_itself_and_consistent_across_buckets() {
    let _guard = rng_lock();
    let teacher = tiny_model(CONTEXT);
    let (student, _store) = converted(CONTEXT, &lolcats(), &[0, 1, 2], 3);
    let toks = tokens();
    let opts = options(32, Some(6), 4);

    let same = kl_report(&teacher, &teacher, &toks, &opts, 4).unwrap();
    assert!(same.comparison.kl_teacher_student.abs() < 1e-6);
    assert_eq!(same.comparison.top1_agreement, 1.0);
    assert!(same.kl_quantiles.max.abs() < 1e-5);

    let report = kl_report(&teacher, &student, &toks, &opts, 4).unwrap();
    let c = &report.comparison;
    assert!(c.kl_teacher_student > 1e-4, "{}", c.kl_teacher_student);
    assert!(c.top1_agreement < 1.0);
    assert_eq!(c.teacher, same.comparison.teacher);
    let q = &report.kl_quantiles;
    assert!(q.p50 <= q.p90 && q.p90 <= q.p99 && q.p99 <= q.max, "{q:?}");
    // Buckets tile positions 1..ctx and average back to the overall means.
    assert_eq!(report.by_position.len(), 4);
    assert_eq!(report.by_position[0].start, 1);
    assert_eq!(report.by_position[3].end, 32);
    for pair in report.by_position.windows(2) {
        assert_eq!(pair[0].end, pair[1].start);
    }
    let total: usize = report.by_position.iter().map(|b| b.tokens).sum();
    assert_eq!(total, c.student.scored_tokens);
    let mean_kl: f64 = report
        .by_position
        .iter()
        .map(|b| b.kl * b.tokens as f64)
        .sum::<f64>()
        / total as f64;
    assert!((mean_kl - c.kl_teacher_student).abs() < 1e-9);
    // The plain comparison is the same computation.
    assert_eq!(compare(&teacher, &student, &toks, &opts).unwrap(), *c);
    // More buckets than positions: one per position.
    let fine = kl_report(&teacher, &student, &toks, &options(5, Some(2), 1), 10).unwrap();
    assert_eq!(fine.by_position.len(), 4);
}

#[test]
fn attention_error_measures_converted_layers_and_restores_them() {
    let _guard = rng_lock();
    let teacher = tiny_model(CONTEXT);
    let (mut student, _store) = converted(CONTEXT, &lolcats(), &[0, 2], 3);
    assert_eq!(converted_layers(&teacher, &student).unwrap(), vec![0, 2]);
    let toks = tokens();
    let ids = &toks[..40];
    let before = logits(&student, ids);
    let names: Vec<String> = (0..3).map(|i| student.mixer(i).name()).collect();

    let report = attention_error(&teacher, &mut student, &toks, &options(32, Some(3), 2)).unwrap();
    assert_eq!((report.ctx, report.windows), (32, 3));
    let layers: Vec<usize> = report.layers.iter().map(|l| l.layer).collect();
    assert_eq!(layers, vec![0, 2]);
    for l in &report.layers {
        assert_eq!(l.method, names[l.layer]);
        assert!(l.mse > 0.0 && l.relative_error > 0.01, "{l:?}");
        assert!(l.relative_error.is_finite());
    }
    // The student is back as it was: same mixers, same logits, and it still decodes.
    let after: Vec<String> = (0..3).map(|i| student.mixer(i).name()).collect();
    assert_eq!(after, names);
    assert_eq!(logits(&student, ids), before);
    student.new_cache(1).unwrap();

    // A sliding window wider than the text is exact softmax: error at rounding level.
    let wide = AttentionConfig {
        window_size: Some(64),
        chunk_size: Some(16),
        ..AttentionConfig::new(Method::SlidingWindow)
    };
    let (mut exact, _store) = converted(CONTEXT, &wide, &[1], 3);
    let report = attention_error(&teacher, &mut exact, &toks, &options(32, Some(2), 1)).unwrap();
    assert_eq!(report.layers.len(), 1);
    assert!(
        report.layers[0].relative_error < 1e-5,
        "{:?}",
        report.layers
    );

    // Nothing converted: nothing to measure.
    let mut copy = tiny_model(CONTEXT);
    let none = attention_error(&teacher, &mut copy, &toks, &options(32, Some(1), 1)).unwrap();
    assert!(none.layers.is_empty());
}

#[test]
fn passkey_prompts_are_deterministic_and_a_copying_model_finds_every_key() {
    let tokenizer = tokenizer();
    let cfg = PasskeyConfig {
        min_length: 256,
        max_length: Some(600),
        depths: vec![0.2, 0.5, 0.8],
        trials: 1,
        ..PasskeyConfig::default()
    };
    assert_eq!(cfg.lengths(None).unwrap(), vec![256, 512, 600]);
    assert_eq!(cfg.lengths(Some(400)).unwrap(), vec![256, 400]);
    // By default the lengths run to the model's context.
    let to_context = PasskeyConfig::default();
    assert_eq!(
        to_context.lengths(Some(2048)).unwrap(),
        [256, 512, 1024, 2048]
    );
    assert!(to_context.lengths(None).is_err());
    let bad = PasskeyConfig {
        depths: vec![0.5, 1.5],
        ..PasskeyConfig::default()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("passkey.depths"));
    let prompts = passkey_prompts(&tokenizer, &cfg, 5, None).unwrap();
    assert_eq!(prompts.len(), 9);
    assert_eq!(prompts, passkey_prompts(&tokenizer, &cfg, 5, None).unwrap());
    let other = passkey_prompts(&tokenizer, &cfg, 6, None).unwrap();
    assert_ne!(
        prompts.iter().map(|p| p.passkey).collect::<Vec<_>>(),
        other.iter().map(|p| p.passkey).collect::<Vec<_>>()
    );
    for p in &prompts {
        assert!(p.ids.len() + p.answer_tokens <= p.length, "{}", p.ids.len());
        assert!(
            p.ids.len() > p.length * 3 / 4,
            "{} of {}",
            p.ids.len(),
            p.length
        );
        let text = tokenizer.decode(&p.ids, true).unwrap();
        assert!(text.contains(&format!("The pass key is {}.", p.passkey)));
        assert!(text.ends_with("What is the pass key? The pass key is"));
    }
    let depths: Vec<f64> = prompts[..3].iter().map(|p| p.depth).collect();
    assert!(depths[0] < depths[1] && depths[1] < depths[2], "{depths:?}");
    // The needle goes between whole filler sentences (a few dozen here): near its target.
    for p in &prompts {
        assert!((p.depth - p.target_depth).abs() < 0.15, "{p:?}");
    }

    let vocab = tokenizer.vocab_size() as i64;
    let report = passkey(&Copier { vocab }, &tokenizer, &prompts).unwrap();
    assert_eq!(report.accuracy, 1.0, "{:?}", report.trials);
    let lengths: Vec<usize> = report.by_length.iter().map(|b| b.length).collect();
    assert_eq!(lengths, vec![256, 512, 600]);
    assert!(report
        .by_length
        .iter()
        .all(|b| b.trials == 3 && b.correct == 3));
    // Every length at every depth, one trial each: 1 of 1 right.
    let cells: Vec<(usize, f64)> = report
        .by_depth
        .iter()
        .map(|c| (c.length, c.depth))
        .collect();
    assert_eq!(cells.len(), 9);
    assert_eq!(cells[..3], [(256, 0.2), (256, 0.5), (256, 0.8)]);
    assert!(report
        .by_depth
        .iter()
        .all(|c| c.trials == 1 && c.ci95 == wilson(1, 1)));
    assert_eq!((report.correct, report.ci95), (9, wilson(9, 9)));
    assert!(report.trials[0]
        .answer
        .trim_start()
        .starts_with(&prompts[0].passkey.to_string()));
}

#[test]
fn mqar_is_deterministic_scored_by_distance_and_solved_by_copying() {
    let tokenizer = tokenizer();
    let cfg = MqarConfig {
        num_pairs: 12,
        trials: 3,
        ..MqarConfig::default()
    };
    let samples = mqar_samples(&tokenizer, &cfg, 1).unwrap();
    assert_eq!(samples, mqar_samples(&tokenizer, &cfg, 1).unwrap());
    assert_ne!(samples, mqar_samples(&tokenizer, &cfg, 2).unwrap());
    for sample in &samples {
        assert_eq!(sample.queries.len(), 12);
        for q in &sample.queries {
            let at = &sample.ids[q.value_start..q.value_start + q.value.len()];
            assert_eq!(at, &q.value[..]);
            let first = q.value_start - q.distance;
            assert_eq!(&sample.ids[first..first + q.value.len()], &q.value[..]);
        }
    }
    let vocab = tokenizer.vocab_size() as i64;
    let perfect = mqar(&Copier { vocab }, &samples).unwrap();
    assert_eq!(perfect.accuracy, 1.0);
    assert_eq!(perfect.queries, 36);
    let counted: usize = perfect.by_distance.iter().map(|b| b.queries).sum();
    assert_eq!(counted, 36);
    for b in &perfect.by_distance {
        assert!(b.min_distance.is_power_of_two() && b.max_distance == 2 * b.min_distance);
    }

    assert_eq!((perfect.correct, perfect.ci95), (36, wilson(36, 36)));
    for b in &perfect.by_distance {
        assert_eq!(
            (b.correct, b.ci95),
            (b.queries, wilson(b.queries, b.queries))
        );
    }

    let _guard = rng_lock();
    let random = mqar(&tiny_model(CONTEXT), &samples).unwrap();
    assert!(random.accuracy < 0.5, "{}", random.accuracy);
    assert_eq!(random.queries, 36);
    let right: usize = random.by_distance.iter().map(|b| b.correct).sum();
    assert_eq!(right, random.correct);
    for b in &random.by_distance {
        assert_eq!(b.ci95, wilson(b.correct, b.queries));
        assert!(
            b.ci95.low <= b.accuracy && b.accuracy <= b.ci95.high,
            "{b:?}"
        );
    }
}

#[test]
fn wilson_intervals_match_hand_computed_values() {
    // 8 of 10: p = 0.8, z = 1.96, z²/n = 0.38415; centre (0.8 + 0.19207) / 1.38415 = 0.71673,
    // half-width 1.95996 / 1.38415 · sqrt(0.016 + 0.0096037) = 0.22658 (Wilson 1927; the
    // textbook value is [0.490, 0.943]).
    let close = |got: Interval, low: f64, high: f64| {
        assert!(
            (got.low - low).abs() < 5e-5 && (got.high - high).abs() < 5e-5,
            "{got:?} vs [{low}, {high}]"
        );
    };
    close(wilson(8, 10), 0.49016, 0.94331);
    // None and all right: one bound at the edge, the other 0.27753 (= 3.8415 / 13.8415) away.
    close(wilson(0, 10), 0.0, 0.27753);
    close(wilson(10, 10), 0.72247, 1.0);
    // Symmetric about one half, and narrower with more trials.
    close(wilson(50, 100), 0.40383, 0.59617);
    assert_eq!(
        wilson(0, 0),
        Interval {
            low: 0.0,
            high: 1.0
        }
    );
    let (wide, narrow) = (wilson(3, 4), wilson(75, 100));
    assert!(wide.high - wide.low > 2.0 * (narrow.high - narrow.low));
}

#[test]
fn multikey_prompts_hold_every_needle_and_copying_finds_the_asked_one() {
    let tokenizer = tokenizer();
    // The test tokenizer spends many tokens on a needle: longer prompts than the passkey's.
    let cfg = MultiKeyConfig {
        min_length: 512,
        max_length: Some(1024),
        keys: 4,
        trials: 3,
        ..MultiKeyConfig::default()
    };
    let prompts = multikey_prompts(&tokenizer, &cfg, 2, None).unwrap();
    assert_eq!(prompts.len(), 6);
    assert_eq!(
        prompts,
        multikey_prompts(&tokenizer, &cfg, 2, None).unwrap()
    );
    for p in &prompts {
        assert!(p.ids.len() + p.answer_tokens <= p.length);
        let text = tokenizer.decode(&p.ids, true).unwrap();
        assert_eq!(p.keys.len(), 4);
        let mut at = Vec::new();
        for key in &p.keys {
            let needle = format!(" pass key is {key}. Remember it. {key} is the ");
            at.push(text.find(&needle).expect("every needle is in the prompt"));
        }
        assert!(at.windows(2).all(|w| w[0] < w[1]), "needles in order");
        let asked = &text[at[p.asked]..];
        let name = text[..at[p.asked]].rsplit(' ').next().unwrap();
        assert!(asked.contains(&p.keys[p.asked].to_string()));
        assert!(
            text.ends_with(&format!(
                "What is the {name} pass key? The {name} pass key is"
            )),
            "{name}: {text}"
        );
    }
    let asked: std::collections::BTreeSet<usize> = prompts.iter().map(|p| p.asked).collect();
    assert!(asked.len() > 1, "the asked needle varies: {asked:?}");
    let bad = MultiKeyConfig {
        keys: 9,
        ..MultiKeyConfig::default()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("multikey.keys"));

    let vocab = tokenizer.vocab_size() as i64;
    let report = multikey(&Copier { vocab }, &tokenizer, &prompts).unwrap();
    assert_eq!(report.accuracy, 1.0, "{:?}", report.trials);
    assert_eq!((report.correct, report.other_key), (6, 0));
    let lengths: Vec<(usize, usize)> = report
        .by_length
        .iter()
        .map(|b| (b.length, b.trials))
        .collect();
    assert_eq!(lengths, [(512, 3), (1024, 3)]);
    assert_eq!(report.by_length[0].ci95, wilson(3, 3));
}

#[test]
fn multiple_choice_follows_the_harness() {
    let tokenizer = tokenizer();
    let task = McTask::load(&fixtures().join("sample_task.jsonl"), None).unwrap();
    assert_eq!((task.name.as_str(), task.docs.len()), ("sample_task", 5));
    assert_eq!(
        McTask::load(&fixtures().join("sample_task.jsonl"), Some(2))
            .unwrap()
            .docs
            .len(),
        2
    );

    // Trailing space moves into the continuation; an empty context conditions on BOS.
    let (ctx, cont) = encode_pair(&tokenizer, "degrees ", "Celsius").unwrap();
    assert_eq!(ctx, tokenizer.encode("degrees", false).unwrap());
    let whole = tokenizer.encode("degrees  Celsius", false).unwrap();
    assert_eq!([ctx.clone(), cont].concat(), whole);
    let (ctx, cont) = encode_pair(&tokenizer, "", "Paris").unwrap();
    assert_eq!(ctx, vec![tokenizer.bos_id().unwrap()]);
    assert_eq!(cont, tokenizer.encode(" Paris", false).unwrap());

    let _guard = rng_lock();
    let model = tiny_model(CONTEXT);
    // Log-likelihood against a per-token sum over the full logits.
    let (ctx, cont) = encode_pair(&tokenizer, "The opposite of hot is", "cold").unwrap();
    let ll = loglikelihood(&model, &ctx, &cont).unwrap();
    let all = [ctx.clone(), cont.clone()].concat();
    let logp = logits(&model, &all).log_softmax(-1, Kind::Double);
    let want: f64 = (0..cont.len())
        .map(|j| logp.double_value(&[0, (ctx.len() + j - 1) as i64, cont[j] as i64]))
        .sum();
    assert!((ll - want).abs() < 1e-4, "{ll} vs {want}");

    // acc and acc_norm by their definitions from per-choice log-likelihoods.
    let report = score_task(&model, &tokenizer, &task).unwrap();
    let (mut acc, mut acc_norm) = (0.0, 0.0);
    for doc in &task.docs {
        let lls: Vec<f64> = doc
            .choices
            .iter()
            .map(|c| {
                let (ctx, cont) = encode_pair(&tokenizer, &doc.context, c).unwrap();
                loglikelihood(&model, &ctx, &cont).unwrap()
            })
            .collect();
        let argmax = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
        let normed: Vec<f64> = lls
            .iter()
            .zip(&doc.choices)
            .map(|(l, c)| l / c.len() as f64)
            .collect();
        acc += (argmax(&lls) == doc.gold) as u8 as f64 / 5.0;
        acc_norm += (argmax(&normed) == doc.gold) as u8 as f64 / 5.0;
    }
    assert!((report.acc - acc).abs() < 1e-12 && (report.acc_norm - acc_norm).abs() < 1e-12);
    let p: f64 = report.acc;
    let stderr = (p * (1.0 - p) * 5.0 / 4.0 / 5.0).sqrt();
    assert!((report.acc_stderr - stderr).abs() < 1e-12);

    // Bad files say where.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"context\": \"a\", \"choices\": [\"b\"], \"gold\": 0}\n{\"context\": \"a\", \"choices\": [\"b\"], \"gold\": 3}\n").unwrap();
    let err = format!("{:#}", McTask::load(&bad, None).unwrap_err());
    assert!(err.contains("bad.jsonl:2") && err.contains("gold"), "{err}");
    std::fs::write(
        &bad,
        "{\"context\": \"a\", \"choices\": [\"b\"], \"gold\": 0, \"answer\": 1}\n",
    )
    .unwrap();
    let err = format!("{:#}", McTask::load(&bad, None).unwrap_err());
    assert!(err.contains("answer"), "{err}");
}

#[test]
fn speed_reports_every_length_that_fits() {
    let _guard = rng_lock();
    let (student, _store) = converted(64, &lolcats(), &[0, 1, 2], 3);
    let cfg = SpeedConfig {
        context_lengths: vec![16, 48, 60],
        decode_tokens: 6,
        ..SpeedConfig::default()
    };
    let vocab = student.config().vocab_size as usize;
    let report = speed::measure(&student, vocab, &cfg, 0).unwrap();
    assert_eq!(report.memory, MemorySource::CpuPeakRss);
    assert_eq!(report.skipped_lengths, vec![60]);
    let contexts: Vec<usize> = report.points.iter().map(|p| p.context).collect();
    assert_eq!(contexts, vec![16, 48]);
    for p in &report.points {
        assert!(
            p.prefill_tokens_per_s > 0.0 && p.decode_tokens_per_s > 0.0,
            "{p:?}"
        );
        assert!(p.decode_peak_bytes.is_some() && p.prefill_peak_bytes.is_some());
    }
    // The cache after decoding is what the model reports for a cache that saw as many tokens.
    let mut cache = student.new_cache(1).unwrap();
    let ids = Tensor::zeros([1, 16 + 6], (Kind::Int64, Device::Cpu));
    let _ = CausalLm::forward_cached(&student, &ids, &mut cache).unwrap();
    assert_eq!(
        report.points[0].cache_bytes,
        Some(student.cache_bytes(&cache).unwrap())
    );
}

#[test]
fn training_curves_skip_bookkeeping_layers_and_a_truncated_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    let lines = [
        r#"{"stage":"attention_transfer","step":1,"tokens":64,"split":"train","lr":0.01,"attn_mse":2.0,"attn_mse/layer_00":1.0}"#,
        r#"{"stage":"attention_transfer","step":2,"tokens":128,"split":"train","lr":0.01,"attn_mse":1.0}"#,
        r#"{"stage":"attention_transfer","step":2,"tokens":128,"split":"val","attn_mse":1.5}"#,
        r#"{"stage":"finetune","step":1,"tokens":64,"split":"train","lm_loss":3.0,"grad_norm":null}"#,
        r#"{"stage":"finetune","step":2,"tok"#,
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    let stages = read_metrics(&path).unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(names, vec!["attention_transfer", "finetune"]);
    let at = &stages[0];
    assert_eq!((at.steps, at.tokens), (2, 128));
    assert_eq!(at.names(), vec!["attn_mse"]);
    assert_eq!(
        at.curves[&("attn_mse".to_string(), "train".to_string())],
        vec![(1, 2.0), (2, 1.0)]
    );
    let summary = at.summary();
    assert_eq!(summary.last["attn_mse/val"], 1.5);
    assert_eq!(stages[1].names(), vec!["lm_loss"]);

    // A broken line that is not the last one is an error naming it.
    std::fs::write(&path, [lines[4], lines[0]].join("\n")).unwrap();
    let err = format!("{:#}", read_metrics(&path).unwrap_err());
    assert!(err.contains("metrics.jsonl:1"), "{err}");
}

fn decode_png(bytes: &[u8]) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    // Something besides the white background was drawn.
    assert!(pixels.iter().any(|&b| b < 128));
    (info.width, info.height)
}

#[test]
fn plots_render_with_log_axes_and_awkward_data() {
    let panels = vec![
        Panel {
            title: "log-log".into(),
            series: vec![
                Series::new(
                    "a",
                    vec![(0.0, 1.0), (10.0, 0.0), (100.0, 5.0), (1000.0, 2.0)],
                ),
                Series::new("empty", vec![]),
            ],
            log_x: true,
            log_y: true,
            ..Panel::default()
        },
        Panel {
            title: "constant".into(),
            series: vec![Series::new("c", vec![(1.0, 3.0), (2.0, 3.0)])],
            y_range: Some((0.0, 1.05)),
            ..Panel::default()
        },
        Panel {
            title: "nothing".into(),
            ..Panel::default()
        },
    ];
    let png = render_png(&panels, 2).unwrap();
    assert_eq!(decode_png(&png), (1280, 840));
}

#[test]
fn eval_config_parts_are_optional_and_unknown_keys_rejected() {
    let cfg: EvalConfig =
        serde_yaml_ng::from_str("seed: 3\nspeed: {context_lengths: [64]}\n").unwrap();
    assert_eq!(cfg.seed, 3);
    assert_eq!(cfg.speed.context_lengths, vec![64]);
    assert_eq!(
        cfg.speed.decode_tokens,
        SpeedConfig::default().decode_tokens
    );
    assert_eq!(cfg.passkey, PasskeyConfig::default());
    let off: EvalConfig = serde_yaml_ng::from_str("mqar: {enabled: false}").unwrap();
    assert!(!off.mqar.enabled);
    let err = serde_yaml_ng::from_str::<EvalConfig>("speed: {lengths: [64]}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("lengths"), "{err}");
    assert!(serde_yaml_ng::from_str::<EvalConfig>("perplexty: {}").is_err());
    let round: EvalConfig =
        serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&EvalConfig::default()).unwrap())
            .unwrap();
    assert_eq!(round, EvalConfig::default());
}

#[test]
fn report_writes_every_section_and_valid_plots() {
    let _guard = rng_lock();
    let mut teacher = tiny_model(CONTEXT);
    let (mut student, _store) = converted(CONTEXT, &lolcats(), &[0, 1, 2], 3);
    let dir = tempfile::tempdir().unwrap();
    let text_path = dir.path().join("val.txt");
    std::fs::write(&text_path, text()).unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(
        &metrics,
        "{\"stage\":\"attention_transfer\",\"step\":1,\"tokens\":64,\"split\":\"train\",\"attn_mse\":2.0}\n\
         {\"stage\":\"attention_transfer\",\"step\":2,\"tokens\":128,\"split\":\"train\",\"attn_mse\":1.0}\n\
         {\"stage\":\"attention_transfer\",\"step\":2,\"tokens\":128,\"split\":\"val\",\"attn_mse\":1.2}\n",
    )
    .unwrap();
    let yaml = format!(
        "seed: 1
perplexity: {{files: [{text}], ctx: 32, max_windows: 3, batch_size: 2, position_buckets: 4}}
attention_error: {{ctx: 32, max_windows: 2}}
passkey: {{min_length: 256, max_length: 512, trials: 2}}
multikey: {{min_length: 512, max_length: 512, keys: 2, trials: 2}}
mqar: {{num_pairs: 8, trials: 2}}
retrieval_heads: {{passkey_length: 256, passkey_probes: 2, mqar_probes: 1, mqar_pairs: 8, top: 5}}
multiple_choice: {{tasks: [{task}], limit: 3}}
speed: {{context_lengths: [16, 64], decode_tokens: 4}}
generations: {{prompts: [Hello there, The sea], max_new_tokens: 6}}
decode_check: {{new_tokens: 12}}
",
        text = text_path.display(),
        task = fixtures().join("sample_task.jsonl").display()
    );
    let cfg: EvalConfig = serde_yaml_ng::from_str(&yaml).unwrap();
    let out = dir.path().join("report");
    let tokenizer = tokenizer();
    let report = run_report(
        &mut teacher,
        &mut student,
        &tokenizer,
        &cfg,
        &out,
        Some(&metrics),
    )
    .unwrap();
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(report.converted_layers, vec![0, 1, 2]);
    assert!(report.decode_check.as_ref().unwrap().agree);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    for key in [
        "teacher",
        "student",
        "config",
        "perplexity",
        "attention_error",
        "passkey",
        "multikey",
        "mqar",
        "retrieval_heads",
        "multiple_choice",
        "speed",
        "generations",
        "decode_check",
        "training",
    ] {
        assert!(
            json.get(key).is_some_and(|v| !v.is_null()),
            "{key} missing from eval.json"
        );
    }
    assert!(json["perplexity"][0]["comparison"]["student"]["perplexity"].is_number());
    // Recall: every point has its n and a 95% interval; the passkey ran at both lengths and the
    // three default depths, 2 prompts each.
    let cells = json["passkey"]["student"]["by_depth"].as_array().unwrap();
    assert_eq!(cells.len(), 2 * 3);
    for cell in cells {
        assert_eq!(cell["trials"], 2);
        let (low, high) = (
            cell["ci95"]["low"].as_f64().unwrap(),
            cell["ci95"]["high"].as_f64().unwrap(),
        );
        let acc = cell["accuracy"].as_f64().unwrap();
        assert!(low <= acc && acc <= high && high - low > 0.3, "{cell}");
    }
    assert_eq!(json["passkey"]["teacher"]["by_length"][1]["trials"], 6);
    assert!(json["multikey"]["teacher"]["by_length"][0]["ci95"]["high"].is_number());
    assert!(json["mqar"]["student"]["by_distance"][0]["ci95"]["low"].is_number());
    assert_eq!(
        json["attention_error"]["layers"].as_array().unwrap().len(),
        3
    );

    let plots = [
        "kl_by_position.png",
        "layer_error.png",
        "recall.png",
        "retrieval_heads.png",
        "speed.png",
        "training-attention_transfer.png",
    ];
    assert_eq!(report.plots, plots);
    for plot in plots {
        let bytes = std::fs::read(out.join(plot)).unwrap();
        let (w, h) = decode_png(&bytes);
        assert!(w >= 640 && h >= 420, "{plot}: {w}x{h}");
    }
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    for needle in [
        "## Perplexity",
        "## Attention output error",
        "Passkey",
        "Passkey by needle depth",
        "Multi-key needle",
        "associative recall",
        "95% Wilson interval",
        "## Retrieval heads (teacher)",
        "## Multiple choice",
        "## Speed and memory",
        "## Recurrent decoding",
        "## Generations",
        "## Training",
        "(layer_error.png)",
        // Tables keep their columns and alignment (numbers right-aligned).
        "| layer | method | MSE | relative error |\n|---:|---|---:|---:|\n| ",
        "| distance (tokens) | teacher | student |\n|---|---:|---:|\n| ",
    ] {
        assert!(md.contains(needle), "{needle} missing from eval.md");
    }
    // Human names, not Rust's debug names.
    assert!(
        md.contains("f32 on CPU") && md.contains("memory: peak RSS (CPU)"),
        "{md}"
    );
    for debug in ["Float", "Cpu", "PeakRss", "null", "None", "Some("] {
        assert!(!md.contains(debug), "{debug} in eval.md:\n{md}");
    }
    // Only the report's files are there, nothing temporary.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = plots.iter().map(|s| s.to_string()).collect();
    want.extend(["eval.json".to_string(), "eval.md".to_string()]);
    want.sort();
    assert_eq!(names, want);

    // The student is unchanged and still decodes through its own mixers.
    assert!((0..3).all(|i| student.mixer(i).name().starts_with("lolcats")));

    // With nothing configured that needs files, those parts are skipped with a reason.
    let minimal: EvalConfig = serde_yaml_ng::from_str(
        "passkey: {enabled: false}\nmultikey: {enabled: false}\nmqar: {enabled: false}\n\
         retrieval_heads: {enabled: false}\n\
         speed: {enabled: false}\n\
         generations: {enabled: false}\ndecode_check: {enabled: false}",
    )
    .unwrap();
    let out = dir.path().join("minimal");
    let report = run_report(&mut teacher, &mut student, &tokenizer, &minimal, &out, None).unwrap();
    assert!(report.perplexity.is_none() && report.attention_error.is_none());
    assert!(report.skipped["perplexity"].contains("no text files"));
    assert!(report.skipped.contains_key("training"));
    assert!(report.plots.is_empty());
    assert!(Path::new(&out.join("eval.md")).is_file());
}

#[test]
fn retrieval_heads_score_every_teacher_head_and_restore_its_attention() {
    use linearize_eval::retrieval_heads::{retrieval_heads, RetrievalHeadsConfig};
    let _guard = rng_lock();
    let mut teacher = tiny_model(CONTEXT);
    let tokenizer = tokenizer();
    let ids: Vec<u32> = tokens()[..40].to_vec();
    let before = logits(&teacher, &ids);
    let names: Vec<String> = (0..teacher.num_layers())
        .map(|i| teacher.mixer(i).name())
        .collect();
    let cfg = RetrievalHeadsConfig {
        passkey_length: 256,
        passkey_probes: 2,
        mqar_probes: 2,
        mqar_pairs: 6,
        top: 4,
        ..RetrievalHeadsConfig::default()
    };
    let report = retrieval_heads(&mut teacher, &tokenizer, &cfg, 3).unwrap();
    // One row per answer token: the pass key's tokens, and every MQAR value's tokens.
    let prompts = passkey_prompts(
        &tokenizer,
        &PasskeyConfig {
            min_length: 256,
            max_length: Some(256),
            depths: vec![0.25, 0.75],
            trials: 1,
            ..PasskeyConfig::default()
        },
        3,
        None,
    )
    .unwrap();
    let key_tokens: usize = prompts
        .iter()
        .map(|p| {
            tokenizer
                .encode(&format!(" {}", p.passkey), false)
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(report.passkey_queries, key_tokens);
    assert_eq!(report.passkey_skipped, 0);
    let samples = mqar_samples(
        &tokenizer,
        &MqarConfig {
            num_pairs: 6,
            trials: 2,
            ..MqarConfig::default()
        },
        3,
    )
    .unwrap();
    let value_tokens: usize = samples
        .iter()
        .flat_map(|s| s.queries.iter().map(|q| q.value.len()))
        .sum();
    assert_eq!(report.mqar_queries, value_tokens);
    // Every layer, every query head; shares of attention.
    let heads = teacher.config().num_attention_heads as usize;
    assert_eq!(report.scores.len(), teacher.num_layers());
    for (scores, (p, m)) in report
        .scores
        .iter()
        .zip(report.passkey.iter().zip(&report.mqar))
    {
        assert_eq!(scores.len(), heads);
        for h in 0..heads {
            assert!((0.0..=1.0).contains(&p[h]) && (0.0..=1.0).contains(&m[h]));
            assert!((scores[h] - (p[h] + m[h]) / 2.0).abs() < 1e-12);
        }
    }
    assert_eq!(report.top.len(), 4);
    assert!(report.top.windows(2).all(|w| w[0].score >= w[1].score));
    let best = report.scores.iter().flatten().copied().fold(0.0, f64::max);
    assert_eq!(report.top[0].score, best);
    assert!(best > 0.0);
    // The teacher's own attention is back, computing what it did.
    let after: Vec<String> = (0..teacher.num_layers())
        .map(|i| teacher.mixer(i).name())
        .collect();
    assert_eq!(after, names);
    assert!(logits(&teacher, &ids).equal(&before));
}
