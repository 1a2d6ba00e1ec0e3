//! Linearized layers inside a real (tiny, random) decoder: every method converts every layer,
//! a full pass agrees with prefill + token-by-token decoding through the model's cache, the
//! `softmax` method reproduces the original model, and configs are checked field by field.
use linearize_attention::feature_map::{FeatureMapConfig, FeatureMapInit};
use linearize_attention::linearized::{AttentionConfig, LayerShape, LinearizedMixer, Method};
use linearize_attention::ops::gated_deltanet::{DeltaGates, QkActivation};
use linearize_attention::ops::window::WindowShape;
use linearize_models::config::ModelConfig;
use linearize_models::llama::{Model, ModelCache};
use linearize_models::mixer::{Mixer, MixerInput};
use serde_json::json;
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

const LEN: i64 = 29;

fn model_config(extra: serde_json::Value) -> ModelConfig {
    let mut cfg = json!({
        "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "initializer_range": 0.2,
    });
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    ModelConfig::from_json_str(&cfg.to_string()).unwrap()
}

/// Tests seed torch's global generator and expect its sequence (a model built twice from one seed
/// must be the same model): they must not interleave.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn rng_lock() -> MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tiny_model(extra: serde_json::Value) -> Model {
    tch::manual_seed(7);
    Model::new(&model_config(extra), Device::Cpu, Kind::Float).unwrap()
}

fn ids(batch: i64, len: i64) -> Tensor {
    tch::manual_seed(11);
    Tensor::randint(61, [batch, len], (Kind::Int64, Device::Cpu))
}

/// Replaces every layer's mixer by a [`LinearizedMixer`] with parameters in `student`.
fn convert_all(model: &mut Model, student: &nn::VarStore, cfg: &AttentionConfig) {
    let shape = LayerShape::of(model.config());
    for i in 0..model.num_layers() {
        let path = student
            .root()
            .sub("model")
            .sub("layers")
            .sub(i)
            .sub("self_attn");
        let mixer = LinearizedMixer::new(&path, &shape, cfg).unwrap();
        model.set_mixer(i, Box::new(mixer)).unwrap();
    }
}

fn hedgehog(feature_dim: i64) -> FeatureMapConfig {
    FeatureMapConfig::Hedgehog {
        feature_dim,
        half_space: false,
        bias: true,
        init: FeatureMapInit::Kaiming,
    }
}

/// Small windows and chunks so that 29 tokens cross several chunk and window boundaries.
fn methods() -> Vec<AttentionConfig> {
    let base = |method| AttentionConfig {
        chunk_size: Some(8),
        ..AttentionConfig::new(method)
    };
    vec![
        AttentionConfig {
            feature_map: Some(hedgehog(6)),
            eps: Some(1e-6),
            ..base(Method::Linear)
        },
        AttentionConfig {
            feature_map: Some(FeatureMapConfig::T2r {
                feature_dim: 8,
                bias: true,
                init: FeatureMapInit::Kaiming,
            }),
            eps: Some(1e-3),
            ..base(Method::Linear)
        },
        AttentionConfig {
            feature_map: Some(hedgehog(6)),
            window_size: Some(5),
            ..base(Method::Lolcats)
        },
        AttentionConfig {
            feature_map: Some(FeatureMapConfig::Elu),
            window_shape: Some(WindowShape::Tk),
            window_size: Some(4),
            ..base(Method::Lolcats)
        },
        AttentionConfig {
            window_size: Some(5),
            ..base(Method::SlidingWindow)
        },
        AttentionConfig {
            sub_chunk: Some(4),
            ..base(Method::LigerGla)
        },
        AttentionConfig {
            window_size: Some(6),
            sub_chunk: Some(2),
            ..base(Method::Liger)
        },
        // Sinks: each window method once, the terrace with more sinks than a block.
        AttentionConfig {
            feature_map: Some(hedgehog(6)),
            window_size: Some(5),
            sinks: Some(3),
            ..base(Method::Lolcats)
        },
        AttentionConfig {
            feature_map: Some(FeatureMapConfig::Elu),
            window_shape: Some(WindowShape::Tk),
            window_size: Some(4),
            sinks: Some(6),
            ..base(Method::Lolcats)
        },
        AttentionConfig {
            window_size: Some(5),
            sinks: Some(2),
            ..base(Method::SlidingWindow)
        },
        AttentionConfig {
            window_size: Some(6),
            sub_chunk: Some(2),
            sinks: Some(4),
            ..base(Method::Liger)
        },
        // Lizard: gates of normaliser 1 (about 0.993 per token untrained) over both windows.
        AttentionConfig {
            feature_map: Some(hedgehog(6)),
            window_size: Some(5),
            sinks: Some(3),
            gate_normalizer: Some(1.0),
            ..base(Method::Lizard)
        },
        AttentionConfig {
            feature_map: Some(FeatureMapConfig::Elu),
            window_shape: Some(WindowShape::Tk),
            window_size: Some(4),
            gate_normalizer: Some(1.0),
            ..base(Method::Lizard)
        },
        base(Method::GatedDeltanet),
        AttentionConfig {
            rope: Some(true),
            qk_activation: Some(QkActivation::Silu),
            ..base(Method::GatedDeltanet)
        },
        AttentionConfig {
            window_size: Some(5),
            sinks: Some(3),
            ..base(Method::GdnWindow)
        },
        AttentionConfig {
            window_size: Some(4),
            rope: Some(true),
            qk_activation: Some(QkActivation::Silu),
            ..base(Method::GdnWindow)
        },
    ]
}

/// q, k, v (q and k also as the pre-RoPE projections) as the first tokens of a sequence.
fn fresh_input<'a>(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> MixerInput<'a> {
    MixerInput {
        q,
        k,
        v,
        q_raw: q,
        k_raw: k,
        offset: 0,
        position: None,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Logits of `ids` fed through the cache in pieces: a prefill, one-token steps, a multi-token
/// continuation from a non-empty state, and one-token steps to the end.
fn decoded_logits(model: &Model, ids: &Tensor) -> Tensor {
    let mut cache = model.new_cache(ids.size()[0]).unwrap();
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut lens = vec![11, 1, 1, 1, 7];
    lens.extend(std::iter::repeat_n(1, (LEN - 21) as usize));
    for len in lens {
        let piece = ids.narrow(1, start, len);
        pieces.push(model.forward(&piece, Some(&mut cache)).unwrap());
        start += len;
    }
    assert_eq!(start, LEN);
    Tensor::cat(&pieces, 1)
}

#[test]
fn every_method_decodes_like_its_full_pass() {
    let _rng = rng_lock();
    let ids = ids(2, LEN);
    for cfg in methods() {
        let mut model = tiny_model(json!({}));
        let teacher = model.forward(&ids, None).unwrap();
        let student = nn::VarStore::new(Device::Cpu);
        convert_all(&mut model, &student, &cfg);
        assert_eq!(model.mixer(1).name(), cfg.name());
        let full = tch::no_grad(|| model.forward(&ids, None).unwrap());
        let decoded = tch::no_grad(|| decoded_logits(&model, &ids));
        let diff = max_diff(&full, &decoded);
        assert!(
            diff <= 1e-4,
            "{}: full vs decoded differ by {diff:e}",
            cfg.name()
        );
        // The converted model really is a different model.
        assert!(
            max_diff(&full, &teacher) > 1e-3,
            "{}: converted model computes the teacher's logits",
            cfg.name()
        );
    }
}

#[test]
fn every_method_decodes_at_a_device_position_like_its_full_pass() {
    let _rng = rng_lock();
    // The step a CUDA graph captures (`decode_step_at`) reads its position from the device.
    let ids = ids(2, LEN);
    let prefix = 11;
    for cfg in methods() {
        let mut model = tiny_model(json!({}));
        let student = nn::VarStore::new(Device::Cpu);
        convert_all(&mut model, &student, &cfg);
        tch::no_grad(|| {
            let full = model.forward(&ids, None).unwrap();
            let mut cache = model.new_cache(2).unwrap();
            let _ = model
                .forward(&ids.narrow(1, 0, prefix), Some(&mut cache))
                .unwrap();
            let state_len = model.state_tensors(&cache).unwrap().len();
            assert!(state_len > 0, "{}: a state with no tensors", cfg.name());
            let addresses = |cache: &ModelCache| -> Vec<usize> {
                let state = model.state_tensors(cache).unwrap();
                state.iter().map(|t| t.data_ptr() as usize).collect()
            };
            let mut first = None;
            for t in prefix..LEN {
                let position = Tensor::from(t);
                let logits = model
                    .decode_step_at(&ids.narrow(1, t, 1), &mut cache, &position)
                    .unwrap();
                let diff = max_diff(&logits, &full.narrow(1, t, 1));
                assert!(
                    diff <= 1e-4,
                    "{} token {t}: differs by {diff:e}",
                    cfg.name()
                );
                // Every step updates the state in place, as the graph's replays need: its
                // tensors stay where the first step left them.
                match &first {
                    None => first = Some(addresses(&cache)),
                    Some(first) => assert_eq!(
                        first,
                        &addresses(&cache),
                        "{} token {t}: the step moved a state tensor",
                        cfg.name()
                    ),
                }
            }
            assert_eq!(cache.seen(), LEN);
            assert_eq!(model.state_tensors(&cache).unwrap().len(), state_len);
        });
    }
}

#[test]
fn graph_decoding_is_refused_for_a_kv_cache_and_off_the_gpu() {
    let _rng = rng_lock();
    let model = tiny_model(json!({}));
    let ids = ids(1, 4);
    let mut cache = model.new_cache(1).unwrap();
    let _ = model.forward(&ids, Some(&mut cache)).unwrap();
    let err = model
        .decode_step_at(&ids.narrow(1, 3, 1), &mut cache, &Tensor::from(4i64))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot be captured into a CUDA graph"),
        "{err:#}"
    );
    let err = linearize_models::graph_decode::GraphDecoder::new(
        &model,
        model.new_cache(1).unwrap(),
        &ids.narrow(1, 0, 1),
    )
    .err()
    .expect("a CPU model cannot decode with CUDA graphs");
    assert!(format!("{err:#}").contains("need a CUDA device"), "{err:#}");
}

#[test]
fn steps_become_capturable_once_the_window_cache_is_full() {
    let _rng = rng_lock();
    let model = tiny_model(json!({}));
    let shape = LayerShape::of(model.config());
    let inputs = |len: i64| {
        tch::manual_seed(5);
        let q = Tensor::randn([1, 4, len, 8], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([1, 2, len, 8], (Kind::Float, Device::Cpu));
        let v = Tensor::randn([1, 2, len, 8], (Kind::Float, Device::Cpu));
        (q, k, v)
    };
    let feed = |mixer: &LinearizedMixer, state: &mut linearize_models::mixer::MixerState, len| {
        let (q, k, v) = inputs(len);
        let input = fresh_input(&q, &k, &v);
        let _ = tch::no_grad(|| mixer.forward(&input, Some(state))).unwrap();
    };
    for cfg in methods() {
        let store = nn::VarStore::new(Device::Cpu);
        let mixer = LinearizedMixer::new(&store.root(), &shape, &cfg).unwrap();
        let windowed = cfg.window_size.is_some();
        let mut state = mixer.new_state(1).unwrap();
        assert!(
            !mixer.step_capturable(&state),
            "{}: empty state",
            cfg.name()
        );
        feed(&mixer, &mut state, 1);
        assert_eq!(
            mixer.step_capturable(&state),
            !windowed,
            "{}: after one token",
            cfg.name()
        );
        // Sinks: capturable once the window has passed them (the sinks a step sees are fixed).
        let sinks = cfg.sinks.unwrap_or(0);
        if sinks > 0 {
            let w = cfg.window_size.unwrap();
            let reach = match cfg.window_shape {
                Some(WindowShape::Tk) => 2 * w - 1,
                _ => w - 1,
            };
            // A full window cache, one token short of the window passing the last sink.
            let mut state = mixer.new_state(1).unwrap();
            feed(&mixer, &mut state, reach + sinks - 1);
            assert!(!mixer.step_capturable(&state), "{}: sinks", cfg.name());
        }
        let mut state = mixer.new_state(1).unwrap();
        feed(&mixer, &mut state, 2 * cfg.window_size.unwrap_or(1) + sinks);
        assert!(
            mixer.step_capturable(&state),
            "{}: a full window",
            cfg.name()
        );
    }
    let teacher = linearize_models::mixer::SoftmaxMixer::new(None);
    let mut state = teacher.new_state(1).unwrap();
    let (q, k, v) = inputs(3);
    let input = fresh_input(&q, &k, &v);
    let _ = teacher.forward(&input, Some(&mut state)).unwrap();
    assert!(!teacher.step_capturable(&state), "a KV cache grows");
}

/// The replay itself needs CUDA; the CPU tests above check its pieces (device positions,
/// readiness). On a GPU machine:
/// `cargo test --release -p linearize-attention --test linearized -- --ignored`.
#[test]
#[ignore = "needs a CUDA device"]
fn generation_by_graph_replays_matches_eager_generation_on_cuda() {
    let _rng = rng_lock();
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device: this test is for a GPU machine"
    );
    use linearize_models::generate::{generate, GenerateConfig, SamplingConfig};
    use linearize_models::lm::CausalLm;
    let device = Device::Cuda(0);
    for cfg in methods() {
        tch::manual_seed(7);
        let mut model = Model::new(&model_config(json!({})), device, Kind::Float).unwrap();
        let student = nn::VarStore::new(device);
        convert_all(&mut model, &student, &cfg);
        let prompt: Vec<u32> = (0..9).map(|i| (i * 7 % 61) as u32).collect();
        let run = |cuda_graphs| {
            let config = GenerateConfig {
                max_new_tokens: 40,
                sampling: SamplingConfig::greedy(),
                stop_ids: vec![],
                cuda_graphs,
            };
            generate(&model, &prompt, &config, |_| Ok(()))
                .unwrap()
                .tokens
        };
        let mut cache = model.new_cache(1).unwrap();
        let ids = Tensor::from_slice(&[1i64; 20])
            .view([1, 20])
            .to_device(device);
        let _ = model.forward_cached(&ids, &mut cache).unwrap();
        assert!(model.graph_ready(&cache), "{}: not graph-ready", cfg.name());
        assert_eq!(run(true), run(false), "{}", cfg.name());
    }
}

#[test]
fn softmax_method_reproduces_the_original_model() {
    let _rng = rng_lock();
    for extra in [
        json!({}),
        json!({"model_type": "mistral", "sliding_window": 5}),
    ] {
        let mut model = tiny_model(extra);
        let ids = ids(2, LEN);
        let original = model.forward(&ids, None).unwrap();
        let original_decoded = decoded_logits(&model, &ids);
        let student = nn::VarStore::new(Device::Cpu);
        convert_all(&mut model, &student, &AttentionConfig::new(Method::Softmax));
        assert!(student.variables().is_empty(), "softmax adds no parameters");
        assert!(model.forward(&ids, None).unwrap().equal(&original));
        assert!(decoded_logits(&model, &ids).equal(&original_decoded));
    }
}

#[test]
fn parameters_are_named_under_the_layer_path_and_shared_by_shallow_clones() {
    let _rng = rng_lock();
    let mut model = tiny_model(json!({}));
    let student = nn::VarStore::new(Device::Cpu);
    let cfg = AttentionConfig {
        feature_map: Some(hedgehog(6)),
        ..AttentionConfig::new(Method::Lolcats)
    };
    convert_all(&mut model, &student, &cfg);
    let mut names: Vec<String> = student.variables().into_keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.feature_map_k.W",
            "model.layers.0.self_attn.feature_map_k.b",
            "model.layers.0.self_attn.feature_map_q.W",
            "model.layers.0.self_attn.feature_map_q.b",
            "model.layers.0.self_attn.window_factors",
            "model.layers.1.self_attn.feature_map_k.W",
            "model.layers.1.self_attn.feature_map_k.b",
            "model.layers.1.self_attn.feature_map_q.W",
            "model.layers.1.self_attn.feature_map_q.b",
            "model.layers.1.self_attn.window_factors",
        ]
    );
    assert!(student.trainable_variables().len() == 10);
    let w = &student.variables()["model.layers.0.self_attn.feature_map_q.W"];
    assert_eq!(w.size(), [4, 8, 6]);

    // A shallow clone computes with the very same tensors: changing them changes both.
    let path = student.root().sub("extra");
    let shape = LayerShape::of(model.config());
    // A window shorter than the input, so that the window factors matter.
    let short = AttentionConfig {
        window_size: Some(3),
        ..cfg
    };
    let mixer = LinearizedMixer::new(&path, &shape, &short).unwrap();
    let clone = mixer.shallow_clone();
    tch::manual_seed(3);
    let q = Tensor::randn([1, 4, 9, 8], (Kind::Float, Device::Cpu));
    let k = Tensor::randn([1, 2, 9, 8], (Kind::Float, Device::Cpu));
    let v = Tensor::randn([1, 2, 9, 8], (Kind::Float, Device::Cpu));
    let input = fresh_input(&q, &k, &v);
    let before = clone.forward(&input, None).unwrap();
    assert!(mixer.forward(&input, None).unwrap().equal(&before));
    tch::no_grad(|| {
        let _ = student.variables()["extra.window_factors"]
            .shallow_clone()
            .fill_(1.0);
    });
    let after = clone.forward(&input, None).unwrap();
    assert!(max_diff(&before, &after) > 1e-4);
    assert!(mixer.forward(&input, None).unwrap().equal(&after));
}

#[test]
fn misuse_of_decoding_state_is_an_error() {
    let _rng = rng_lock();
    let mut model = tiny_model(json!({}));
    let student = nn::VarStore::new(Device::Cpu);
    convert_all(&mut model, &student, &methods()[0]);
    let ids = ids(2, 5);
    let mut stale = tiny_model(json!({})).new_cache(2).unwrap();
    let e = format!("{:#}", model.forward(&ids, Some(&mut stale)).unwrap_err());
    assert!(e.contains("another mixer"), "{e}");
    let mut cache = model.new_cache(1).unwrap();
    let e = format!("{:#}", model.forward(&ids, Some(&mut cache)).unwrap_err());
    assert!(e.contains("batch of 2"), "{e}");
}

#[test]
fn config_fields_must_belong_to_the_method() {
    let _rng = rng_lock();
    let e = AttentionConfig {
        window_size: Some(32),
        ..AttentionConfig::new(Method::Linear)
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("attention.window_size") && e.contains("`linear`"),
        "{e}"
    );
    let e = AttentionConfig {
        feature_map: Some(hedgehog(8)),
        ..AttentionConfig::new(Method::Liger)
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("attention.feature_map"), "{e}");
    let e = AttentionConfig {
        chunk_size: Some(12),
        ..AttentionConfig::new(Method::LigerGla)
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("sub_chunk (16) must divide"), "{e}");
    let e = AttentionConfig {
        window_size: Some(0),
        ..AttentionConfig::new(Method::Lolcats)
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("window_size must be >= 1"), "{e}");
    // Lizard has no fused kernels and no sub-chunks; its gate normaliser must be positive.
    for (field, cfg) in [
        (
            "fused_kernels",
            AttentionConfig {
                fused_kernels: Some(true),
                ..AttentionConfig::new(Method::Lizard)
            },
        ),
        (
            "sub_chunk",
            AttentionConfig {
                sub_chunk: Some(8),
                ..AttentionConfig::new(Method::Lizard)
            },
        ),
        (
            "gate_normalizer",
            AttentionConfig {
                gate_normalizer: Some(0.0),
                ..AttentionConfig::new(Method::Lizard)
            },
        ),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("attention.{field}")), "{e}");
    }
    let resolved = AttentionConfig::new(Method::Lizard).resolved();
    assert_eq!(
        (
            resolved.gate_normalizer,
            resolved.sinks,
            resolved.fused_kernels
        ),
        (Some(16.0), Some(0), None)
    );
    for cfg in methods() {
        cfg.validate().unwrap();
    }
}

#[test]
fn sinks_are_read_checked_named_and_counted_in_the_cache() {
    let _rng = rng_lock();
    let e = AttentionConfig {
        sinks: Some(4),
        ..AttentionConfig::new(Method::Linear)
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("attention.sinks") && e.contains("`linear`"),
        "{e}"
    );
    let e = AttentionConfig {
        sinks: Some(-1),
        ..AttentionConfig::new(Method::SlidingWindow)
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("attention.sinks must be >= 0"), "{e}");
    let cfg: AttentionConfig = serde_yaml_ng::from_str(
        "method: sliding_window
sinks: 4
",
    )
    .unwrap();
    assert_eq!(cfg.name(), "sliding_window-64+sinks4");
    assert_eq!(cfg.resolved().sinks, Some(4));
    assert_eq!(cfg.swa_config().sinks, 4);
    assert_eq!(
        AttentionConfig::new(Method::Lolcats).resolved().sinks,
        Some(0)
    );
    assert_eq!(AttentionConfig::new(Method::Linear).resolved().sinks, None);

    // The decoding cache holds the sinks' keys and values: 3 tokens x (2 kv heads x 8) x 2 x f32.
    let model = tiny_model(json!({}));
    let shape = LayerShape::of(model.config());
    let bytes = |sinks: i64| {
        let cfg = AttentionConfig {
            window_size: Some(5),
            sinks: Some(sinks),
            ..AttentionConfig::new(Method::SlidingWindow)
        };
        let store = nn::VarStore::new(Device::Cpu);
        let mixer = LinearizedMixer::new(&store.root(), &shape, &cfg).unwrap();
        let mut state = mixer.new_state(1).unwrap();
        tch::manual_seed(6);
        let q = Tensor::randn([1, 4, 20, 8], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([1, 2, 20, 8], (Kind::Float, Device::Cpu));
        let v = Tensor::randn([1, 2, 20, 8], (Kind::Float, Device::Cpu));
        let _ = tch::no_grad(|| mixer.forward(&fresh_input(&q, &k, &v), Some(&mut state))).unwrap();
        mixer.state_bytes(&state).unwrap()
    };
    assert_eq!(bytes(3) - bytes(0), 3 * (2 * 8) * 2 * 4);
}

#[test]
fn recipes_parse_strictly_and_resolve_defaults() {
    let _rng = rng_lock();
    let cfg: AttentionConfig = serde_yaml_ng::from_str(
        "method: lolcats\nfeature_map: {kind: hedgehog, feature_dim: 32}\nwindow_shape: tk\n",
    )
    .unwrap();
    assert_eq!(cfg.name(), "lolcats-tk64+hedgehog32");
    let resolved = cfg.resolved();
    assert_eq!(resolved.window_size, Some(64));
    assert_eq!(resolved.chunk_size, Some(64));
    assert_eq!(resolved.eps, None);
    let lolcats =
        serde_yaml_ng::to_string(&AttentionConfig::new(Method::Lolcats).resolved()).unwrap();
    let back: AttentionConfig = serde_yaml_ng::from_str(&lolcats).unwrap();
    assert_eq!(back.name(), "lolcats-sw64+hedgehog64");
    back.validate().unwrap();
    assert_eq!(
        AttentionConfig::new(Method::Liger)
            .resolved()
            .gate_normalizer,
        Some(16.0)
    );

    let e = serde_yaml_ng::from_str::<AttentionConfig>("method: linear\nwindow: 3\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `window`"), "{e}");
    let e = serde_yaml_ng::from_str::<AttentionConfig>("method: mamba\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("mamba"), "{e}");
}

/// Every converted layer of `model` replaced by its mixer's `window_only` form.
fn window_only_all(model: &mut Model, student: &nn::VarStore, cfg: &AttentionConfig) -> bool {
    let shape = LayerShape::of(model.config());
    for i in 0..model.num_layers() {
        let path = student
            .root()
            .sub("model")
            .sub("layers")
            .sub(i)
            .sub("self_attn");
        let Some(mixer) = LinearizedMixer::new(&path, &shape, cfg)
            .unwrap()
            .window_only()
        else {
            return false;
        };
        model.set_mixer(i, Box::new(mixer)).unwrap();
    }
    true
}

#[test]
fn window_only_keeps_the_window_softmax_alone() {
    let _rng = rng_lock();
    let ids = ids(2, LEN);
    let logits_of = |cfg: &AttentionConfig, window_only: bool| {
        let mut model = tiny_model(json!({}));
        let student = nn::VarStore::new(Device::Cpu);
        if window_only {
            if !window_only_all(&mut model, &student, cfg) {
                return None;
            }
        } else {
            convert_all(&mut model, &student, cfg);
        }
        let full = tch::no_grad(|| model.forward(&ids, None).unwrap());
        let decoded = tch::no_grad(|| decoded_logits(&model, &ids));
        assert!(
            max_diff(&full, &decoded) <= 1e-4,
            "{}",
            model.mixer(0).name()
        );
        Some((full, model.mixer(0).name()))
    };
    let swa = |window, sinks| AttentionConfig {
        chunk_size: Some(8),
        window_size: Some(window),
        sinks,
        ..AttentionConfig::new(Method::SlidingWindow)
    };
    for cfg in methods() {
        let ablated = logits_of(&cfg, true);
        match cfg.method {
            // No window to keep.
            Method::Linear | Method::LigerGla | Method::GatedDeltanet => {
                assert!(ablated.is_none(), "{}", cfg.name())
            }
            // Without its linear terms LoLCATs (or Lizard) sw is softmax over the same sliding
            // window (the window factor cancels), Liger its window half alone, and gdn_window
            // its window-and-sinks softmax.
            Method::Lolcats
            | Method::Lizard
            | Method::Liger
            | Method::SlidingWindow
            | Method::GdnWindow
                if cfg.window_shape != Some(WindowShape::Tk) =>
            {
                let (ablated, name) = ablated.unwrap();
                let (reference, _) =
                    logits_of(&swa(cfg.window_size.unwrap(), cfg.sinks), false).unwrap();
                let diff = max_diff(&ablated, &reference);
                assert!(diff <= 1e-4, "{name}: {diff:e} from the sliding window");
                let (whole, _) = logits_of(&cfg, false).unwrap();
                if cfg.method != Method::SlidingWindow {
                    assert!(
                        max_diff(&whole, &ablated) > 1e-3,
                        "{name}: nothing switched off"
                    );
                }
            }
            _ => {
                let (ablated, name) = ablated.unwrap();
                assert!(name.ends_with("-window_only"), "{name}");
                let (whole, _) = logits_of(&cfg, false).unwrap();
                assert!(
                    max_diff(&whole, &ablated) > 1e-3,
                    "{name}: nothing switched off"
                );
            }
        }
    }
}

#[test]
fn gated_deltanet_layers_own_their_gates_and_start_with_slow_decays() {
    let _rng = rng_lock();
    let mut model = tiny_model(json!({}));
    let student = nn::VarStore::new(Device::Cpu);
    let cfg = AttentionConfig::new(Method::GatedDeltanet);
    convert_all(&mut model, &student, &cfg);
    let vars = student.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let layer0: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_prefix("model.layers.0.self_attn."))
        .collect();
    assert_eq!(layer0, ["A_log", "a_proj", "b_proj", "dt_bias"]);
    assert_eq!(names.len(), 8);
    // The gate input is every head of q, k and v: (4 + 2 + 2) x 8 values per token.
    assert_eq!(vars["model.layers.0.self_attn.a_proj"].size(), [4, 64]);
    assert_eq!(vars["model.layers.0.self_attn.dt_bias"].size(), [4]);

    // Untrained: β = 1/2 everywhere, per-head decays from e^-0.001 to e^-0.1 per token,
    // whatever the input.
    let path = student.root().sub("probe");
    let gates = DeltaGates::new(&path, 4, 64);
    tch::manual_seed(3);
    let q = Tensor::randn([2, 4, 5, 8], (Kind::Float, Device::Cpu));
    let kv = Tensor::randn([2, 2, 5, 8], (Kind::Float, Device::Cpu));
    let (g, beta) = gates.forward(&q, &kv, &kv).unwrap();
    assert_eq!(g.size(), [2, 4, 5]);
    assert!(beta.allclose(&beta.full_like(0.5), 1e-6, 1e-6, false));
    let first = g.select(0, 0).select(1, 0); // (4): token 0 of sequence 0
    let per_head = Vec::<f64>::try_from(&first).unwrap();
    for (i, got) in per_head.iter().enumerate() {
        let want = -(1e-3f64 * 100f64.powf(i as f64 / 3.0));
        assert!((got - want).abs() < 1e-5 * want.abs(), "{per_head:?}");
    }
    assert!(
        max_diff(&g, &first.view([1, 4, 1])) < 1e-7,
        "untrained decays depend on the input"
    );

    // Its keys: resolved defaults, names, and refusal for other methods.
    let resolved = cfg.resolved();
    assert_eq!(
        (resolved.rope, resolved.qk_activation, resolved.chunk_size),
        (Some(false), Some(QkActivation::Identity), Some(64))
    );
    assert_eq!(cfg.name(), "gated_deltanet");
    let parsed: AttentionConfig =
        serde_yaml_ng::from_str("method: gated_deltanet\nrope: true\nqk_activation: silu\n")
            .unwrap();
    assert_eq!(parsed.name(), "gated_deltanet+rope+silu");
    let e = AttentionConfig {
        rope: Some(true),
        ..AttentionConfig::new(Method::Liger)
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("attention.rope") && e.contains("gated_deltanet"),
        "{e}"
    );
    let e =
        serde_yaml_ng::from_str::<AttentionConfig>("method: gated_deltanet\nqk_activation: relu\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("relu"), "{e}");
}

#[test]
fn gated_deltanet_state_is_one_matrix_per_query_head_whatever_the_length() {
    let _rng = rng_lock();
    let mut model = tiny_model(json!({}));
    let student = nn::VarStore::new(Device::Cpu);
    convert_all(
        &mut model,
        &student,
        &AttentionConfig::new(Method::GatedDeltanet),
    );
    let bytes = |len: i64| {
        let mut cache = model.new_cache(2).unwrap();
        let _ = tch::no_grad(|| model.forward(&ids(2, len), Some(&mut cache))).unwrap();
        model.cache_bytes(&cache).unwrap()
    };
    // Two layers of (batch 2, 4 heads, 8 x 8) f32.
    assert_eq!(bytes(3), 2 * 2 * 4 * 8 * 8 * 4);
    assert_eq!(bytes(3), bytes(LEN));
}

#[test]
fn gdn_window_layers_own_gates_and_a_delta_scale_and_every_one_gets_gradients_at_init() {
    let _rng = rng_lock();
    let mut model = tiny_model(json!({}));
    let student = nn::VarStore::new(Device::Cpu);
    let cfg = AttentionConfig {
        window_size: Some(5),
        sinks: Some(2),
        ..AttentionConfig::new(Method::GdnWindow)
    };
    convert_all(&mut model, &student, &cfg);
    let vars = student.variables();
    let mut layer0: Vec<&str> = vars
        .keys()
        .filter_map(|n| n.strip_prefix("model.layers.0.self_attn."))
        .collect();
    layer0.sort();
    assert_eq!(
        layer0,
        ["A_log", "a_proj", "b_proj", "delta_scale", "dt_bias"]
    );
    assert_eq!(vars.len(), 10);
    let scale = &vars["model.layers.0.self_attn.delta_scale"];
    assert!(scale.allclose(&scale.full_like(0.1), 0.0, 0.0, false));

    // The untrained layer passes gradients to every parameter: the scale is not zero, so the
    // gates get theirs from the first step.
    let layer = LinearizedMixer::new(
        &student.root().sub("probe"),
        &LayerShape::of(model.config()),
        &cfg,
    )
    .unwrap();
    tch::manual_seed(5);
    let q = Tensor::randn([2, 4, 17, 8], (Kind::Float, Device::Cpu));
    let kv = Tensor::randn([2, 2, 17, 8], (Kind::Float, Device::Cpu));
    let y = layer.forward(&fresh_input(&q, &kv, &kv), None).unwrap();
    let loss = (&y * y.randn_like()).sum(Kind::Float);
    let probe_vars: Vec<(String, Tensor)> = student
        .variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with("probe."))
        .collect();
    let leaves: Vec<Tensor> = probe_vars.iter().map(|(_, t)| t.shallow_clone()).collect();
    let grads = Tensor::run_backward(&[loss], &leaves, false, false);
    assert_eq!(grads.len(), 5);
    for ((name, _), grad) in probe_vars.iter().zip(&grads) {
        let size = grad.abs().max().double_value(&[]);
        assert!(size > 1e-8, "{name}: no gradient at init ({size:e})");
    }

    assert_eq!(cfg.name(), "gdn_window-sw5+sinks2");
    let resolved = cfg.resolved();
    assert_eq!(
        (resolved.window_shape, resolved.rope, resolved.qk_activation),
        (None, Some(false), Some(QkActivation::Identity))
    );
    let parsed: AttentionConfig = serde_yaml_ng::from_str(
        "method: gdn_window\nwindow_size: 32\nrope: true\nqk_activation: silu\n",
    )
    .unwrap();
    assert_eq!(parsed.name(), "gdn_window-sw32+rope+silu");
    // The sliding window only: the terrace is refused, naming the key.
    let e = AttentionConfig {
        window_shape: Some(WindowShape::Tk),
        ..cfg.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("attention.window_shape") && e.contains("gdn_window"),
        "{e}"
    );
}

#[test]
fn gdn_window_state_is_its_window_sinks_and_one_matrix_per_head_whatever_the_length() {
    let _rng = rng_lock();
    let mut model = tiny_model(json!({}));
    let student = nn::VarStore::new(Device::Cpu);
    let cfg = AttentionConfig {
        window_size: Some(5),
        sinks: Some(2),
        ..AttentionConfig::new(Method::GdnWindow)
    };
    convert_all(&mut model, &student, &cfg);
    let bytes = |len: i64| {
        let mut cache = model.new_cache(2).unwrap();
        let _ = tch::no_grad(|| model.forward(&ids(2, len), Some(&mut cache))).unwrap();
        model.cache_bytes(&cache).unwrap()
    };
    // Per layer, f32, batch 2: the window's 4 cached keys and values (2 key / value heads of 8)
    // and 2 sinks' keys and values; the 4 cached tokens' memory keys (2 heads of 8), gates and
    // write strengths (4 heads); the delta-rule state (4 heads, 8 x 8).
    let window = 2 * (2 * 2 * 4 * 8) + 2 * (2 * 2 * 2 * 8);
    let memory = 2 * 2 * 4 * 8 + 2 * (2 * 4 * 4) + 2 * 4 * 8 * 8;
    assert_eq!(bytes(7), 2 * (window + memory) * 4);
    assert_eq!(bytes(7), bytes(LEN));
}
