//! LoRA on a tiny converted Llama: the validation loss falls, frozen weights stay bit-identical,
//! the KL loss runs the teacher on the fly and leaves the student in place, and a resumed run
//! ends bit-identical to a straight one.
mod common;

use common::{converted, probe_logits, rng_lock, sequences, SEQ_LEN};
use linearize_models::llama::Model;
use linearize_train::convert::ConvertedLayers;
use linearize_train::data::Batcher;
use linearize_train::lora::{LoraAdapters, LoraSettings};
use linearize_train::metrics::{read_metrics, MetricsWriter, Split};
use linearize_train::optim::AdamWConfig;
use linearize_train::schedule::ScheduleConfig;
use linearize_train::stage1::{run_stage1, Stage1Config, Stage1Data, Stage1Job};
use linearize_train::stage2::{
    run_stage2, LossMix, LossName, LossSpec, Stage2Config, Stage2Data, Stage2Job, Stage2Summary,
};
use linearize_train::state::latest_valid_state;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

const HASH: &str = "test-recipe";

fn data() -> Stage2Data {
    Stage2Data {
        train: Batcher::new(sequences(16, 1), 2, 3).unwrap(),
        seq_len: SEQ_LEN,
        val: Some(sequences(4, 2)),
    }
}

/// Cross-entropy unless a test asks for KL: most tests here check the text loss falls.
fn config(max_steps: u64) -> Stage2Config {
    Stage2Config {
        max_steps: Some(max_steps),
        loss: LossSpec::Name(LossName::Xent),
        optimizer: AdamWConfig::with_lr(1e-2),
        lora: LoraSettings {
            dropout: 0.1,
            targets: ["q_proj", "v_proj", "o_proj", "up_proj"]
                .map(String::from)
                .to_vec(),
            ..LoraSettings::default()
        },
        eval_every: 2,
        eval_batch_size: 2,
        log_every: 1,
        save_every: 4,
        schedule: ScheduleConfig::Constant { warmup_steps: 2 },
        ..Stage2Config::default()
    }
}

/// The converted tiny model with adapters installed (A drawn with `lora_seed`).
fn setup(
    student_seed: i64,
    cfg: &Stage2Config,
    lora_seed: u64,
) -> (Model, ConvertedLayers, LoraAdapters) {
    let (mut model, layers) = converted(student_seed);
    let lora = LoraAdapters::install(&mut model, &cfg.lora, lora_seed).unwrap();
    (model, layers, lora)
}

fn run(
    model: &mut Model,
    layers: &ConvertedLayers,
    lora: &LoraAdapters,
    cfg: &Stage2Config,
    run_dir: &Path,
    resume: bool,
) -> Stage2Summary {
    let metrics_path = run_dir.join("metrics.jsonl");
    let loaded = resume.then(|| latest_valid_state(run_dir).unwrap().expect("a saved state"));
    let mut metrics = match &loaded {
        Some(l) => MetricsWriter::resume(&metrics_path, &cfg.name, l.state.step).unwrap(),
        None => MetricsWriter::create(&metrics_path).unwrap(),
    };
    let job = Stage2Job {
        run_dir,
        metrics: &mut metrics,
        recipe_hash: HASH,
        seed: 5,
        run_step_offset: 0,
        resume: loaded.as_ref(),
        preemption: None,
        group: None,
    };
    run_stage2(model, layers, lora, data(), cfg, job).unwrap()
}

fn attention_transfer(model: &mut Model, layers: &ConvertedLayers) {
    let run_dir = tempfile::tempdir().unwrap();
    let mut metrics = MetricsWriter::create(&run_dir.path().join("metrics.jsonl")).unwrap();
    let job = Stage1Job {
        run_dir: run_dir.path(),
        metrics: &mut metrics,
        recipe_hash: HASH,
        seed: 5,
        run_step_offset: 0,
        resume: None,
        preemption: None,
        group: None,
    };
    let data = Stage1Data {
        train: Batcher::new(sequences(4, 9), 2, 3).unwrap(),
        seq_len: SEQ_LEN,
        val: None,
    };
    let cfg = Stage1Config {
        max_steps: Some(2),
        save_every: 0,
        ..Stage1Config::default()
    };
    run_stage1(model, layers, data, &cfg, job).unwrap();
}

fn values(named: impl IntoIterator<Item = (String, Tensor)>) -> BTreeMap<String, Tensor> {
    named.into_iter().map(|(n, t)| (n, t.copy())).collect()
}

#[test]
fn lora_lowers_validation_loss_and_keeps_the_base_frozen() {
    let _rng = rng_lock();
    let cfg = Stage2Config {
        eval_every: 10,
        ..config(30)
    };
    let (mut model, layers) = converted(1);
    let dir = tempfile::tempdir().unwrap();
    // A few updates of attention transfer first, as a run does: they leave the student
    // parameters with (zeroed) gradients, which the frozen check of stage 2 must accept.
    attention_transfer(&mut model, &layers);
    let lora = LoraAdapters::install(&mut model, &cfg.lora, 3).unwrap();
    let base_before = values(model.named_parameters());
    let student_before = values(layers.named_parameters());
    let lora_before = values(lora.named_parameters());
    let summary = run(&mut model, &layers, &lora, &cfg, dir.path(), false);

    for (name, param) in model.named_parameters() {
        assert!(!param.grad().defined(), "base '{name}' has a gradient");
        assert!(param.equal(&base_before[&name]), "base '{name}' changed");
    }
    for (name, param) in layers.named_parameters() {
        assert!(
            param.equal(&student_before[&name]),
            "student '{name}' changed"
        );
    }
    let changed = lora
        .named_parameters()
        .into_iter()
        .filter(|(name, t)| !t.equal(&lora_before[name]))
        .count();
    assert_eq!(
        changed,
        lora.named_parameters().len(),
        "every A and B trains"
    );
    // 3 layers x 4 targets, each with A and B.
    assert_eq!(lora.named_parameters().len(), 24);

    let initial = summary.initial_val.as_ref().unwrap();
    let last = summary.final_val.as_ref().unwrap();
    assert_eq!((initial.step, summary.steps), (0, 30));
    assert!(
        last.lm_loss < initial.lm_loss - 0.3,
        "validation lm loss {} -> {}",
        initial.lm_loss,
        last.lm_loss
    );
    assert!((last.ppl - last.lm_loss.exp()).abs() < 1e-9);
    assert_eq!(summary.best_val_loss, Some(last.loss));

    // The model ends with its converted layers and the trained adapters, and decodes.
    assert!(model.mixer(0).name().starts_with("lolcats-sw4"));
    assert_eq!(model.mixer(1).name(), "softmax");
    let mut cache = model.new_cache(1).unwrap();
    let ids = Tensor::from_slice(&[1i64, 8, 15]).view([1, 3]);
    let steps = tch::no_grad(|| model.forward(&ids, Some(&mut cache))).unwrap();
    let whole = tch::no_grad(|| model.forward(&ids, None)).unwrap();
    assert!(steps.allclose(&whole, 1e-4, 1e-4, false));

    let records = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    let val_steps: Vec<u64> = records
        .iter()
        .filter(|r| r.split == Split::Val)
        .map(|r| r.step)
        .collect();
    assert_eq!(val_steps, [0, 10, 20, 30]);
    let train = records.iter().find(|r| r.split == Split::Train).unwrap();
    assert_eq!(train.stage, "lora");
    assert_eq!(train.tokens, 2 * SEQ_LEN as u64);
    assert!(train.values.contains_key("lm_loss") && !train.values.contains_key("kl"));
    let val = records.iter().find(|r| r.split == Split::Val).unwrap();
    assert!(val.values.contains_key("ppl"));
}

#[test]
fn kl_to_the_teacher_trains_attention_too_and_restores_the_student() {
    let _rng = rng_lock();
    let cfg = Stage2Config {
        loss: LossSpec::Mix(LossMix { xent: 0.5, kl: 1.0 }),
        train_attention: true,
        eval_every: 0,
        ..config(6)
    };
    let (mut model, layers, lora) = setup(1, &cfg, 3);
    let base_before = values(model.named_parameters());
    let student_before = values(layers.named_parameters());
    let dir = tempfile::tempdir().unwrap();
    let summary = run(&mut model, &layers, &lora, &cfg, dir.path(), false);

    for (name, param) in model.named_parameters() {
        assert!(param.equal(&base_before[&name]), "base '{name}' changed");
    }
    for (name, param) in layers.named_parameters() {
        assert!(
            !param.equal(&student_before[&name]),
            "student '{name}' did not train"
        );
    }
    let (initial, last) = (summary.initial_val.unwrap(), summary.final_val.unwrap());
    let (kl0, kl1) = (initial.kl.unwrap(), last.kl.unwrap());
    assert!(kl0 > 0.0 && kl1 < kl0, "validation KL {kl0} -> {kl1}");
    assert!((last.loss - (0.5 * last.lm_loss + kl1)).abs() < 1e-9);
    assert!(model.mixer(2).name().starts_with("lolcats-sw4"));

    let records = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    let train = records.iter().find(|r| r.split == Split::Train).unwrap();
    assert!(train.values["kl"] > 0.0);

    // The teacher passes left the adapters installed: removing them changes the logits.
    let with = probe_logits(&model);
    lora.detach(&mut model);
    assert!(!probe_logits(&model).allclose(&with, 1e-4, 1e-4, false));
}

#[test]
fn resumed_run_matches_a_straight_run_bit_for_bit() {
    let _rng = rng_lock();
    let straight_dir = tempfile::tempdir().unwrap();
    let (mut model, layers, straight) = setup(1, &config(8), 3);
    let full = run(
        &mut model,
        &layers,
        &straight,
        &config(8),
        straight_dir.path(),
        false,
    );

    let resumed_dir = tempfile::tempdir().unwrap();
    let (mut model, layers, first) = setup(1, &config(4), 3);
    run(
        &mut model,
        &layers,
        &first,
        &config(4),
        resumed_dir.path(),
        false,
    );
    // A fresh model and adapters (other initial values), as a new process would build them.
    let (mut model, layers, second) = setup(1, &config(8), 99);
    let resumed = run(
        &mut model,
        &layers,
        &second,
        &config(8),
        resumed_dir.path(),
        true,
    );

    let want = straight.named_parameters();
    let got = second.named_parameters();
    assert_eq!(want.len(), got.len());
    for ((name, a), (other, b)) in want.iter().zip(&got) {
        assert_eq!(name, other);
        assert!(a.equal(b), "'{name}' differs after resuming");
    }
    assert_eq!((resumed.steps, resumed.tokens), (full.steps, full.tokens));
    assert_eq!(resumed.final_val, full.final_val);
    assert_eq!(resumed.best_val_loss, full.best_val_loss);
    let records = read_metrics(&resumed_dir.path().join("metrics.jsonl")).unwrap();
    let train_steps: Vec<u64> = records
        .iter()
        .filter(|r| r.split == Split::Train)
        .map(|r| r.step)
        .collect();
    assert_eq!(train_steps, (1..=8).collect::<Vec<_>>());
}

#[test]
fn config_is_strict_with_lolcats_defaults() {
    let cfg: Stage2Config = serde_yaml_ng::from_str("max_tokens: 1000\n").unwrap();
    assert_eq!(cfg.name, "lora");
    assert_eq!(cfg.optimizer.lr, 1e-4);
    assert_eq!(
        (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout),
        (8, 16.0, 0.0)
    );
    assert_eq!(cfg.lora.targets, ["q_proj", "k_proj", "v_proj", "o_proj"]);
    // KL to the teacher by default (issue 21): the student learns the teacher, not the corpus.
    assert_eq!(cfg.loss.weights(), (0.0, 1.0));
    cfg.validate().unwrap();
    let cfg: Stage2Config =
        serde_yaml_ng::from_str("max_steps: 3\nloss: {xent: 0.2, kl: 0.8}\n").unwrap();
    assert_eq!(cfg.loss.weights(), (0.2, 0.8));
    let e = Stage2Config::default().validate().unwrap_err().to_string();
    assert!(e.contains("max_steps or max_tokens"), "{e}");
    let e = serde_yaml_ng::from_str::<Stage2Config>("max_steps: 3\nrank: 4\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `rank`"), "{e}");
    let e = serde_yaml_ng::from_str::<Stage2Config>("max_steps: 3\nlora: {targets: [lm_head]}\n")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.targets") && e.contains("lm_head"), "{e}");
    let e = serde_yaml_ng::from_str::<Stage2Config>("max_steps: 3\nlora: {rank: 0}\n")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.rank"), "{e}");
    let e = serde_yaml_ng::from_str::<Stage2Config>("max_steps: 3\nloss_chunk: 0\n")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("loss_chunk must be >= 1"), "{e}");
    assert!(serde_yaml_ng::from_str::<Stage2Config>("max_steps: 3\nloss_chunk: -1\n").is_err());
}

#[test]
fn activation_checkpointing_trains_the_same_adapters() {
    let _rng = rng_lock();
    let base = config(4);
    let plain = Stage2Config {
        eval_every: 0,
        lora: LoraSettings {
            dropout: 0.0,
            ..base.lora.clone()
        },
        ..base.clone()
    };
    let checkpointed = Stage2Config {
        activation_checkpointing: true,
        ..plain.clone()
    };
    let mut adapters = Vec::new();
    for cfg in [&plain, &checkpointed] {
        let (mut model, layers, lora) = setup(1, cfg, 3);
        let dir = tempfile::tempdir().unwrap();
        run(&mut model, &layers, &lora, cfg, dir.path(), false);
        adapters.push(values(lora.named_parameters()));
    }
    for (name, a) in &adapters[0] {
        let b = &adapters[1][name];
        assert!(a.allclose(b, 1e-4, 1e-6, false), "'{name}' differs");
    }

    // With LoRA dropout the recomputed layers draw the first pass's masks (checked inside the
    // backward), and training still lowers the validation loss.
    let dropout = Stage2Config {
        activation_checkpointing: true,
        ..base
    };
    let (mut model, layers, lora) = setup(1, &dropout, 3);
    let dir = tempfile::tempdir().unwrap();
    let summary = run(&mut model, &layers, &lora, &dropout, dir.path(), false);
    let (first, last) = (summary.initial_val.unwrap(), summary.final_val.unwrap());
    assert!(last.loss < first.loss, "{} -> {}", first.loss, last.loss);
}

/// The loss in chunks of 7 tokens (not dividing a micro-batch's 48) trains the same adapters
/// and feature maps, and measures the same validation losses, as the loss in one piece: with
/// and without activation checkpointing, on a mix of cross-entropy and KL to the teacher.
#[test]
fn chunked_loss_trains_as_the_loss_in_one_piece() {
    let _rng = rng_lock();
    for checkpointing in [false, true] {
        let whole = Stage2Config {
            loss: LossSpec::Mix(LossMix { xent: 0.5, kl: 1.0 }),
            train_attention: true,
            activation_checkpointing: checkpointing,
            loss_chunk: 1000,
            ..config(3)
        };
        let chunked = Stage2Config {
            loss_chunk: 7,
            ..whole.clone()
        };
        let mut runs = Vec::new();
        for cfg in [&whole, &chunked] {
            let (mut model, layers, lora) = setup(1, cfg, 3);
            let dir = tempfile::tempdir().unwrap();
            let summary = run(&mut model, &layers, &lora, cfg, dir.path(), false);
            let mut trained = values(lora.named_parameters());
            trained.extend(values(layers.named_parameters()));
            runs.push((summary, trained));
        }
        let ((a, trained_a), (b, trained_b)) = (&runs[0], &runs[1]);
        for (va, vb) in [
            (
                a.initial_val.as_ref().unwrap(),
                b.initial_val.as_ref().unwrap(),
            ),
            (a.final_val.as_ref().unwrap(), b.final_val.as_ref().unwrap()),
        ] {
            assert!(
                (va.loss - vb.loss).abs() <= 1e-5 * va.loss
                    && (va.kl.unwrap() - vb.kl.unwrap()).abs() <= 1e-5 * va.kl.unwrap(),
                "checkpointing {checkpointing}: validation {va:?} vs {vb:?}"
            );
        }
        assert_eq!(trained_a.len(), trained_b.len());
        // Against the tensor's largest entry: AdamW's normalised update turns rounding in
        // near-zero gradient entries into relative differences there.
        for (name, ta) in trained_a {
            let scale = ta.abs().max().double_value(&[]);
            let diff = (ta - &trained_b[name]).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-4 * scale,
                "checkpointing {checkpointing}: '{name}' differs by {diff:e} (of {scale:e})"
            );
        }
    }
}
