//! Attention transfer on a tiny random Llama: the teacher stays bit-identical, the student
//! learns (validation MSE falls from step 0), metrics and states are written, a run resumed
//! from a saved state ends with bit-identical student parameters, and the optional KL term is
//! the KL of the whole converted model computed here on its own.
use linearize_attention::feature_map::{FeatureMapConfig, FeatureMapInit};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_train::convert::{
    convert, ConversionConfig, ConvertedLayers, LayerSelection, LayerTypes,
};
use linearize_train::data::{Batcher, PackedSequences};
use linearize_train::metrics::{read_metrics, MetricsWriter, Split};
use linearize_train::schedule::ScheduleConfig;
use linearize_train::stage1::{run_stage1, Stage1Config, Stage1Data, Stage1Job, Stage1Summary};
use linearize_train::state::latest_valid_state;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

const VOCAB: i64 = 61;
const SEQ_LEN: usize = 24;
const HASH: &str = "test-recipe";

/// Tests seed torch's global generator and expect its sequence: they must not interleave.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn rng_lock() -> MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tiny_model() -> Model {
    let cfg = json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "initializer_range": 0.2,
    });
    tch::manual_seed(7);
    let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    Model::new(&cfg, Device::Cpu, Kind::Float).unwrap()
}

fn lolcats() -> AttentionConfig {
    AttentionConfig {
        feature_map: Some(FeatureMapConfig::Hedgehog {
            feature_dim: 4,
            half_space: false,
            bias: false,
            init: FeatureMapInit::Kaiming,
        }),
        window_size: Some(4),
        chunk_size: Some(8),
        ..AttentionConfig::new(Method::Lolcats)
    }
}

/// The tiny model with its layers converted; the student store is seeded by `student_seed`.
fn converted(
    attention: AttentionConfig,
    student_seed: i64,
) -> (Model, nn::VarStore, ConvertedLayers) {
    let mut model = tiny_model();
    let student = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(student_seed);
    let layers = convert(&mut model, &ConversionConfig::all(attention), &student).unwrap();
    (model, student, layers)
}

/// `count` random sequences of `SEQ_LEN` tokens.
fn sequences(count: usize, seed: i64) -> PackedSequences {
    tch::manual_seed(seed);
    let ids = Tensor::randint(
        VOCAB,
        [(count * SEQ_LEN) as i64],
        (Kind::Int64, Device::Cpu),
    );
    let tokens: Vec<u32> = Vec::<i64>::try_from(ids)
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    PackedSequences::from_tokens(SEQ_LEN, false, tokens).unwrap()
}

fn data() -> Stage1Data {
    Stage1Data {
        train: Batcher::new(sequences(12, 1), 2, 3).unwrap(),
        seq_len: SEQ_LEN,
        val: Some(sequences(4, 2)),
    }
}

fn config(max_steps: u64) -> Stage1Config {
    Stage1Config {
        max_steps: Some(max_steps),
        eval_every: 2,
        eval_batch_size: 2,
        log_every: 1,
        save_every: 4,
        schedule: ScheduleConfig::Constant { warmup_steps: 3 },
        ..Stage1Config::default()
    }
}

fn run(
    model: &mut Model,
    layers: &ConvertedLayers,
    cfg: &Stage1Config,
    run_dir: &Path,
    resume: bool,
) -> Stage1Summary {
    run_on(model, layers, cfg, run_dir, resume, data())
}

fn run_on(
    model: &mut Model,
    layers: &ConvertedLayers,
    cfg: &Stage1Config,
    run_dir: &Path,
    resume: bool,
    data: Stage1Data,
) -> Stage1Summary {
    let metrics_path = run_dir.join("metrics.jsonl");
    let loaded = resume.then(|| latest_valid_state(run_dir).unwrap().expect("a saved state"));
    let mut metrics = match &loaded {
        Some(l) => MetricsWriter::resume(&metrics_path, &cfg.name, l.state.step).unwrap(),
        None => MetricsWriter::create(&metrics_path).unwrap(),
    };
    let job = Stage1Job {
        run_dir,
        metrics: &mut metrics,
        recipe_hash: HASH,
        seed: 5,
        run_step_offset: 0,
        resume: loaded.as_ref(),
        preemption: None,
        group: None,
    };
    run_stage1(model, layers, data, cfg, job).unwrap()
}

fn values(named: &[(String, Tensor)]) -> BTreeMap<String, Tensor> {
    named.iter().map(|(n, t)| (n.clone(), t.copy())).collect()
}

#[test]
fn teacher_stays_frozen_and_student_learns() {
    let _rng = rng_lock();
    let (mut model, _student, layers) = converted(lolcats(), 1);
    let teacher_before = values(&model.named_parameters().into_iter().collect::<Vec<_>>());
    let student_before = values(&layers.named_parameters());
    let dir = tempfile::tempdir().unwrap();
    let cfg = Stage1Config {
        max_steps: Some(30),
        eval_every: 10,
        ..config(30)
    };
    let summary = run(&mut model, &layers, &cfg, dir.path(), false);
    for (name, param) in model.named_parameters() {
        assert!(!param.grad().defined(), "teacher '{name}' has a gradient");
        assert!(
            param.equal(&teacher_before[&name]),
            "teacher '{name}' changed"
        );
    }
    for (name, param) in layers.named_parameters() {
        assert!(
            !param.equal(&student_before[&name]),
            "student '{name}' did not change"
        );
    }

    // A real decrease against the untrained student, in every layer (random tokens through a
    // random teacher are slow to learn: 150 steps reach about half).
    let initial = summary.initial_val.as_ref().unwrap();
    let last = summary.final_val.as_ref().unwrap();
    assert_eq!((initial.step, summary.steps), (0, 30));
    assert!(
        last.attn_mse < 0.9 * initial.attn_mse,
        "validation MSE {} -> {}",
        initial.attn_mse,
        last.attn_mse
    );
    for ((layer, before), (_, after)) in initial.per_layer.iter().zip(&last.per_layer) {
        assert!(after < before, "layer {layer}: {before} -> {after}");
    }
    assert_eq!(summary.best_val_loss, Some(last.attn_mse));
    assert_eq!((last.kl, last.loss), (None, last.attn_mse));

    // The model runs its trained converted layers again, and decodes.
    assert!(model.mixer(0).name().starts_with("lolcats-sw4"));
    let mut cache = model.new_cache(1).unwrap();
    let ids = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    let logits = tch::no_grad(|| model.forward(&ids, Some(&mut cache))).unwrap();
    assert_eq!(logits.size(), [1, 3, VOCAB]);

    let records = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    let val_steps: Vec<u64> = records
        .iter()
        .filter(|r| r.split == Split::Val)
        .map(|r| r.step)
        .collect();
    assert_eq!(val_steps, [0, 10, 20, 30]);
    let train = records.iter().find(|r| r.split == Split::Train).unwrap();
    assert_eq!(train.stage, "attention_transfer");
    assert_eq!(train.tokens, 2 * SEQ_LEN as u64);
    for key in ["attn_mse", "loss", "attn_mse/layer_00", "attn_mse/layer_02"] {
        assert!(train.values.contains_key(key), "missing {key}");
    }
    assert!(train.lr.is_some() && train.grad_norm.is_some());
}

/// Gemma 3 with local layers (window 6 of 24 tokens) and global ones: `layers: global` converts
/// only the global layers, the local ones keep their sliding-window softmax (also as stage 1's
/// teacher), attention transfer learns, and the converted model decodes as it runs whole.
#[test]
fn gemma3_global_layers_convert_and_learn() {
    let _rng = rng_lock();
    let cfg = json!({
        "model_type": "gemma3_text", "vocab_size": VOCAB, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
        "initializer_range": 0.2, "sliding_window": 6, "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 24, "rope_local_base_freq": 100.0,
    });
    tch::manual_seed(7);
    let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    let mut model = Model::new(&cfg, Device::Cpu, Kind::Float).unwrap();
    let student = nn::VarStore::new(Device::Cpu);
    let conversion = ConversionConfig {
        layers: LayerSelection::Type(LayerTypes::Global),
        ..ConversionConfig::all(lolcats())
    };
    let layers = convert(&mut model, &conversion, &student).unwrap();
    assert_eq!(layers.indices(), [1, 3]);
    let names: Vec<String> = (0..4).map(|i| model.mixer(i).name()).collect();
    assert_eq!(names[0], "softmax-sw6");
    assert_eq!(names[2], "softmax-sw6");
    assert!(names[1].starts_with("lolcats") && names[3].starts_with("lolcats"));

    let dir = tempfile::tempdir().unwrap();
    let summary = run(&mut model, &layers, &config(20), dir.path(), false);
    let (initial, last) = (
        summary.initial_val.as_ref().unwrap(),
        summary.final_val.as_ref().unwrap(),
    );
    assert_eq!(initial.per_layer.len(), 2);
    assert!(
        last.attn_mse < initial.attn_mse,
        "validation MSE {} -> {}",
        initial.attn_mse,
        last.attn_mse
    );
    let ids = Tensor::randint(VOCAB, [1, 20], (Kind::Int64, Device::Cpu));
    tch::no_grad(|| {
        let full = model.forward(&ids, None).unwrap();
        let mut cache = model.new_cache(1).unwrap();
        let mut pieces = vec![model
            .forward(&ids.narrow(1, 0, 9), Some(&mut cache))
            .unwrap()];
        for t in 9..20 {
            pieces.push(
                model
                    .forward(&ids.narrow(1, t, 1), Some(&mut cache))
                    .unwrap(),
            );
        }
        let diff = (&full - &Tensor::cat(&pieces, 1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-4, "full vs decoded differ by {diff:e}");
    });
}

#[test]
fn gated_deltanet_gates_are_trained_by_attention_transfer() {
    let _rng = rng_lock();
    let gdn = AttentionConfig {
        chunk_size: Some(8),
        ..AttentionConfig::new(Method::GatedDeltanet)
    };
    let (mut model, _student, layers) = converted(gdn, 1);
    let before = values(&layers.named_parameters());
    // a_proj, b_proj, A_log and dt_bias in each of the 3 layers.
    assert_eq!(before.len(), 12);
    trains_every_parameter_and_lowers_the_mse(&mut model, &layers, &before);

    assert_eq!(model.mixer(0).name(), "gated_deltanet");
    decodes_like_its_full_pass(&model, &[1i64, 5, 9, 2, 7, 3, 11, 4, 8, 6, 10]);
}

#[test]
fn gdn_window_gates_and_delta_scale_are_trained_by_attention_transfer() {
    let _rng = rng_lock();
    let gdn_window = AttentionConfig {
        window_size: Some(4),
        sinks: Some(2),
        chunk_size: Some(8),
        ..AttentionConfig::new(Method::GdnWindow)
    };
    let (mut model, _student, layers) = converted(gdn_window, 1);
    let before = values(&layers.named_parameters());
    // a_proj, b_proj, A_log, dt_bias and delta_scale in each of the 3 layers.
    assert_eq!(before.len(), 15);
    assert!(before.keys().any(|n| n.ends_with("delta_scale")));
    trains_every_parameter_and_lowers_the_mse(&mut model, &layers, &before);

    assert_eq!(model.mixer(0).name(), "gdn_window-sw4+sinks2");
    decodes_like_its_full_pass(&model, &[1i64, 5, 9, 2, 7, 3, 11, 4, 8, 6, 10, 12, 1, 3]);
}

#[test]
fn lizard_gates_train_with_the_feature_maps_by_attention_transfer() {
    let _rng = rng_lock();
    let lizard = AttentionConfig {
        sinks: Some(2),
        gate_normalizer: Some(1.0),
        ..AttentionConfig {
            method: Method::Lizard,
            ..lolcats()
        }
    };
    let (mut model, _student, layers) = converted(lizard, 1);
    let before = values(&layers.named_parameters());
    // feature_map_q.W, feature_map_k.W, window_factors, gate_proj.weight and gate_proj.bias in
    // each of the 3 layers.
    assert_eq!(before.len(), 15);
    assert!(before.keys().any(|n| n.ends_with("gate_proj.weight")));
    trains_every_parameter_and_lowers_the_mse(&mut model, &layers, &before);

    assert_eq!(model.mixer(0).name(), "lizard-sw4+hedgehog4+sinks2");
    decodes_like_its_full_pass(&model, &[1i64, 5, 9, 2, 7, 3, 11, 4, 8, 6, 10, 12, 1, 3]);
}

/// Twenty updates of stage 1 change every trainable parameter of `layers` (from `before`) and
/// lower the validation attention MSE.
fn trains_every_parameter_and_lowers_the_mse(
    model: &mut Model,
    layers: &ConvertedLayers,
    before: &BTreeMap<String, Tensor>,
) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Stage1Config {
        eval_every: 10,
        ..config(20)
    };
    let summary = run(model, layers, &cfg, dir.path(), false);
    for (name, param) in layers.named_parameters() {
        assert!(
            !param.equal(&before[&name]),
            "'{name}' did not change: stage 1 gave it no gradient"
        );
    }
    let (initial, last) = (
        summary.initial_val.as_ref().unwrap(),
        summary.final_val.as_ref().unwrap(),
    );
    assert!(
        last.attn_mse < initial.attn_mse,
        "validation MSE {} -> {}",
        initial.attn_mse,
        last.attn_mse
    );
}

/// The trained layers decode `ids` (a prefix of 6, then one token at a time) as their full pass
/// computes.
fn decodes_like_its_full_pass(model: &Model, ids: &[i64]) {
    let ids = Tensor::from_slice(ids).view([1, -1]);
    tch::no_grad(|| {
        let full = model.forward(&ids, None).unwrap();
        let mut cache = model.new_cache(1).unwrap();
        let mut pieces = vec![model
            .forward(&ids.narrow(1, 0, 6), Some(&mut cache))
            .unwrap()];
        for t in 6..ids.size()[1] {
            pieces.push(
                model
                    .forward(&ids.narrow(1, t, 1), Some(&mut cache))
                    .unwrap(),
            );
        }
        let decoded = Tensor::cat(&pieces, 1);
        let diff = (&full - &decoded).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "full vs decoded differ by {diff:e}");
    });
}

#[test]
fn resumed_run_matches_a_straight_run_bit_for_bit() {
    resume_matches_a_straight_run(config);
}

#[test]
fn resumed_run_with_the_kl_term_matches_a_straight_run_bit_for_bit() {
    resume_matches_a_straight_run(|steps| Stage1Config {
        kl_factor: 0.5,
        ..config(steps)
    });
}

fn resume_matches_a_straight_run(config: impl Fn(u64) -> Stage1Config) {
    let _rng = rng_lock();
    let straight_dir = tempfile::tempdir().unwrap();
    let (mut model, _s, straight) = converted(lolcats(), 1);
    let full = run(
        &mut model,
        &straight,
        &config(8),
        straight_dir.path(),
        false,
    );

    let resumed_dir = tempfile::tempdir().unwrap();
    let (mut model, _s, first) = converted(lolcats(), 1);
    run(&mut model, &first, &config(4), resumed_dir.path(), false);
    // A fresh model and student (other initial values), as a new process would build them.
    let (mut model, _s, second) = converted(lolcats(), 99);
    let resumed = run(&mut model, &second, &config(8), resumed_dir.path(), true);

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
fn hedgehog_cross_entropy_trains_linear_layers_only() {
    let _rng = rng_lock();
    let linear = AttentionConfig {
        feature_map: Some(FeatureMapConfig::Hedgehog {
            feature_dim: 4,
            half_space: false,
            bias: false,
            init: FeatureMapInit::Kaiming,
        }),
        chunk_size: Some(8),
        ..AttentionConfig::new(Method::Linear)
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = Stage1Config {
        xent_factor: 1.0,
        ..config(3)
    };
    let (mut model, _s, layers) = converted(linear, 1);
    run(&mut model, &layers, &cfg, dir.path(), false);
    let records = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    let train = records.iter().find(|r| r.split == Split::Train).unwrap();
    let xent = train.values["attn_xent"];
    assert!(xent.is_finite() && xent > 0.0);

    let (mut model, _s, layers) = converted(lolcats(), 1);
    let mut metrics = MetricsWriter::create(&dir.path().join("m2.jsonl")).unwrap();
    let job = Stage1Job {
        run_dir: dir.path(),
        metrics: &mut metrics,
        recipe_hash: HASH,
        seed: 5,
        run_step_offset: 0,
        resume: None,
        preemption: None,
        group: None,
    };
    let e = run_stage1(&mut model, &layers, data(), &cfg, job)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`linear` method only") && e.contains("layer 0"),
        "{e}"
    );
    // The failed stage left the converted mixers in place.
    assert!(model.mixer(0).name().starts_with("lolcats"));
}

/// The ids `sequences(count, seed)` packs, as one (count, SEQ_LEN) batch.
fn sequence_ids(count: usize, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(
        VOCAB,
        [(count * SEQ_LEN) as i64],
        (Kind::Int64, Device::Cpu),
    )
    .view([count as i64, SEQ_LEN as i64])
}

/// KL(teacher || student) per token of two (b, L, V) logits, in f64: written here apart from
/// the trainer's.
fn kl_per_token(teacher: &Tensor, student: &Tensor) -> Tensor {
    let log_t = teacher.log_softmax(-1, Kind::Double);
    let log_s = student.log_softmax(-1, Kind::Double);
    (log_t.exp() * (&log_t - log_s))
        .sum_dim_intlist(-1, false, Kind::Double)
        .mean(Kind::Double)
}

/// The KL of the untrained converted model (student seed 1) to its teacher on `ids`.
fn untrained_kl(ids: &Tensor) -> f64 {
    let teacher = tiny_model();
    let (student, _s, _layers) = converted(lolcats(), 1);
    tch::no_grad(|| {
        let t = teacher.forward(ids, None).unwrap();
        let s = student.forward(ids, None).unwrap();
        kl_per_token(&t, &s).double_value(&[])
    })
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-5 * want.abs().max(1e-6),
        "{what}: {got} vs {want}"
    );
}

#[test]
fn kl_term_adds_kl_factor_times_the_models_kl() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let (mut model, _s, layers) = converted(lolcats(), 1);
    run(&mut model, &layers, &config(1), dir.path(), false);
    let off = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (mut model, _s, layers) = converted(lolcats(), 1);
    let on = Stage1Config {
        kl_factor: 0.5,
        ..config(1)
    };
    let summary = run(&mut model, &layers, &on, dir.path(), false);
    let on = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();

    // Without the term, today's loss and records: no KL anywhere, loss = 1000 * MSE exactly.
    let train_off = off.iter().find(|r| r.split == Split::Train).unwrap();
    let mse = train_off.values["attn_mse"];
    assert_eq!(train_off.values["loss"], 1000.0 * mse);
    assert!(off.iter().all(|r| !r.values.contains_key("kl")));

    // The first update's loss is on the first batch, before any update: the same MSE to the bit
    // (the KL pass comes after the transfer pass and changes nothing in it), plus 0.5 * the KL
    // of the untrained converted model to its teacher on that batch.
    let mut batches = Batcher::new(sequences(12, 1), 2, 3).unwrap();
    let first = batches.next_batch().unwrap().inputs();
    let want_kl = untrained_kl(&first);
    let train_on = on.iter().find(|r| r.split == Split::Train).unwrap();
    assert_eq!(train_on.values["attn_mse"], mse);
    let kl = train_on.values["kl"];
    close(kl, want_kl, "training KL");
    close(
        train_on.values["loss"],
        1000.0 * mse + 0.5 * want_kl,
        "loss",
    );

    // Validation at step 0 scores the 4 validation sequences with the same KL.
    let initial = summary.initial_val.as_ref().unwrap();
    let want_val_kl = untrained_kl(&sequence_ids(4, 2));
    close(initial.kl.unwrap(), want_val_kl, "validation KL");
    close(
        initial.loss,
        1000.0 * initial.attn_mse + 0.5 * want_val_kl,
        "validation loss",
    );
    let val = on.iter().find(|r| r.split == Split::Val).unwrap();
    assert_eq!(val.values["kl"], initial.kl.unwrap());
    assert_eq!(val.values["loss"], initial.loss);
}

#[test]
fn kl_alone_gives_the_kl_gradient_and_lowers_the_kl() {
    let _rng = rng_lock();
    let fixed = || Stage1Data {
        train: Batcher::new(sequences(2, 1), 2, 3).unwrap(),
        seq_len: SEQ_LEN,
        val: Some(sequences(2, 1)),
    };
    let cfg = |steps| Stage1Config {
        mse_factor: 0.0,
        kl_factor: 2.0,
        max_grad_norm: None,
        eval_every: 0,
        ..config(steps)
    };

    // The first update's gradient norm is that of 2 * KL of the converted model, worked out
    // here by autograd through a plain forward pass.
    let ids = sequence_ids(2, 1);
    let teacher = tch::no_grad(|| tiny_model().forward(&ids, None).unwrap());
    let (student, _s, layers) = converted(lolcats(), 1);
    let kl = kl_per_token(&teacher, &student.forward(&ids, None).unwrap());
    (kl * 2.0).backward();
    let want_norm = layers
        .named_parameters()
        .iter()
        .map(|(_, p)| p.grad().square().sum(Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt();
    // The same with the KL pass checkpointed.
    for checkpointed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (mut model, _s, layers) = converted(lolcats(), 1);
        let cfg = Stage1Config {
            kl_activation_checkpointing: checkpointed,
            ..cfg(1)
        };
        run_on(&mut model, &layers, &cfg, dir.path(), false, fixed());
        let records = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
        let train = records.iter().find(|r| r.split == Split::Train).unwrap();
        let what = format!("gradient norm, checkpointed {checkpointed}");
        close(train.grad_norm.unwrap(), want_norm, &what);
        close(train.values["loss"], 2.0 * train.values["kl"], "loss");
    }

    // A few updates on the one batch lower its KL; the teacher stays frozen (verify_frozen).
    let dir = tempfile::tempdir().unwrap();
    let (mut model, _s, layers) = converted(lolcats(), 1);
    let summary = run_on(&mut model, &layers, &cfg(10), dir.path(), false, fixed());
    let (initial, last) = (
        summary.initial_val.unwrap().kl.unwrap(),
        summary.final_val.unwrap().kl.unwrap(),
    );
    assert!(last < 0.9 * initial, "KL {initial} -> {last}");
    for (name, param) in model.named_parameters() {
        assert!(!param.grad().defined(), "teacher '{name}' has a gradient");
    }
}

#[test]
fn config_is_strict_and_needs_a_budget() {
    let cfg: Stage1Config = serde_yaml_ng::from_str("max_tokens: 1000\n").unwrap();
    assert_eq!(cfg.optimizer.lr, 1e-2);
    assert_eq!(cfg.mse_factor, 1000.0);
    assert_eq!(cfg.optimizer.weight_decay, 0.0);
    cfg.validate().unwrap();
    let e = Stage1Config::default().validate().unwrap_err().to_string();
    assert!(e.contains("max_steps or max_tokens"), "{e}");
    let e = serde_yaml_ng::from_str::<Stage1Config>("max_steps: 3\nlr: 0.1\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `lr`"), "{e}");
    let e = serde_yaml_ng::from_str::<Stage1Config>("max_steps: 3\ngrad_accum: 0\n")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("grad_accum"), "{e}");

    // kl_factor: off by default and then absent from the resolved recipe (its hash stays).
    assert_eq!(cfg.kl_factor, 0.0);
    assert!(!serde_yaml_ng::to_string(&cfg)
        .unwrap()
        .contains("kl_factor"));
    let kl: Stage1Config = serde_yaml_ng::from_str(
        "max_steps: 3
mse_factor: 0
kl_factor: 0.5
",
    )
    .unwrap();
    kl.validate().unwrap();
    assert!(serde_yaml_ng::to_string(&kl)
        .unwrap()
        .contains("kl_factor: 0.5"));
    let e = Stage1Config {
        kl_factor: -1.0,
        ..kl.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert_eq!(e, "kl_factor must be >= 0, got -1");
    let e = Stage1Config {
        kl_factor: 0.0,
        ..kl
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("nothing to train"), "{e}");
    let e = serde_yaml_ng::from_str::<Stage1Config>(
        "max_steps: 3\nkl_activation_checkpointing: true\n",
    )
    .unwrap()
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("kl_activation_checkpointing is set but kl_factor is 0"),
        "{e}"
    );
}
