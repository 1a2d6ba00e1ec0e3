//! Attention transfer on a tiny random Llama: the teacher stays bit-identical, the student
//! learns (validation MSE falls from step 0), metrics and states are written, and a run resumed
//! from a saved state ends with bit-identical student parameters.
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
    run_stage1(model, layers, data(), cfg, job).unwrap()
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
    assert_eq!(summary.best_val_mse, Some(last.attn_mse));

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
    let dir = tempfile::tempdir().unwrap();
    let cfg = Stage1Config {
        eval_every: 10,
        ..config(20)
    };
    let summary = run(&mut model, &layers, &cfg, dir.path(), false);
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

    // The trained layers decode as their full pass computes.
    assert_eq!(model.mixer(0).name(), "gated_deltanet");
    let ids = Tensor::from_slice(&[1i64, 5, 9, 2, 7, 3, 11, 4, 8, 6, 10]).view([1, 11]);
    tch::no_grad(|| {
        let full = model.forward(&ids, None).unwrap();
        let mut cache = model.new_cache(1).unwrap();
        let mut pieces = vec![model
            .forward(&ids.narrow(1, 0, 6), Some(&mut cache))
            .unwrap()];
        for t in 6..11 {
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
    let dir = tempfile::tempdir().unwrap();
    let cfg = Stage1Config {
        eval_every: 10,
        ..config(20)
    };
    let summary = run(&mut model, &layers, &cfg, dir.path(), false);
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

    // The trained layers decode as their full pass computes.
    assert_eq!(model.mixer(0).name(), "lizard-sw4+hedgehog4+sinks2");
    let ids = Tensor::from_slice(&[1i64, 5, 9, 2, 7, 3, 11, 4, 8, 6, 10, 12, 1, 3]).view([1, 14]);
    tch::no_grad(|| {
        let full = model.forward(&ids, None).unwrap();
        let mut cache = model.new_cache(1).unwrap();
        let mut pieces = vec![model
            .forward(&ids.narrow(1, 0, 6), Some(&mut cache))
            .unwrap()];
        for t in 6..14 {
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
    assert_eq!(resumed.best_val_mse, full.best_val_mse);
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
}
