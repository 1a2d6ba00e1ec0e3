//! Head-level hybrids (`softmax_heads`): inside a converted layer the chosen query heads keep the
//! teacher's softmax. In a tiny random decoder (4 query heads, 2 key/value heads): a hybrid of
//! every method decodes like its full pass, with all heads softmax it is the teacher, with none
//! it is the plain converted layer, its chosen heads' rows are the teacher's and the others the
//! plain layer's, and its KV cache holds only the key/value heads the chosen heads read.
use linearize_attention::feature_map::{FeatureMapConfig, FeatureMapInit};
use linearize_attention::linearized::{AttentionConfig, LayerShape, LinearizedMixer, Method};
use linearize_attention::ops::window::WindowShape;
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_models::mixer::{Mixer, MixerInput, SoftmaxMixer};
use serde_json::json;
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

const LEN: i64 = 29;

/// Tests seed torch's global generator and expect its sequence: they must not interleave.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn rng_lock() -> MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tiny_model(extra: serde_json::Value) -> Model {
    let mut cfg = json!({
        "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "initializer_range": 0.2,
    });
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    tch::manual_seed(7);
    let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    Model::new(&cfg, Device::Cpu, Kind::Float).unwrap()
}

fn ids(batch: i64, len: i64) -> Tensor {
    tch::manual_seed(11);
    Tensor::randint(61, [batch, len], (Kind::Int64, Device::Cpu))
}

/// Every layer converted to `cfg` with parameters in `student` (seeded: the same parameters for
/// the same config), the layer's own teacher window in its shape.
fn convert_all(model: &mut Model, student: &nn::VarStore, cfg: &AttentionConfig) {
    convert_all_with(model, student, cfg, |m| m);
}

/// [`convert_all`] installing `edit(mixer)` in each layer.
fn convert_all_with(
    model: &mut Model,
    student: &nn::VarStore,
    cfg: &AttentionConfig,
    edit: impl Fn(LinearizedMixer) -> LinearizedMixer,
) {
    tch::manual_seed(3);
    for i in 0..model.num_layers() {
        let shape = LayerShape {
            sliding_window: model.config().layer_window(i),
            ..LayerShape::of(model.config())
        };
        let path = student
            .root()
            .sub("model")
            .sub("layers")
            .sub(i)
            .sub("self_attn");
        let mixer = LinearizedMixer::new(&path, &shape, cfg).unwrap();
        model.set_mixer(i, Box::new(edit(mixer))).unwrap();
    }
}

fn hedgehog() -> FeatureMapConfig {
    FeatureMapConfig::Hedgehog {
        feature_dim: 6,
        half_space: false,
        bias: true,
        init: FeatureMapInit::Kaiming,
    }
}

/// One config of each method, small windows and chunks so that 29 tokens cross their boundaries.
fn methods() -> Vec<AttentionConfig> {
    let base = |method| AttentionConfig {
        chunk_size: Some(8),
        ..AttentionConfig::new(method)
    };
    vec![
        AttentionConfig {
            feature_map: Some(hedgehog()),
            eps: Some(1e-6),
            ..base(Method::Linear)
        },
        AttentionConfig {
            feature_map: Some(hedgehog()),
            window_shape: Some(WindowShape::Tk),
            window_size: Some(4),
            sinks: Some(2),
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
        base(Method::GatedDeltanet),
        AttentionConfig {
            window_size: Some(5),
            sinks: Some(2),
            ..base(Method::GdnWindow)
        },
    ]
}

fn with_heads(cfg: &AttentionConfig, heads: &[usize]) -> AttentionConfig {
    AttentionConfig {
        softmax_heads: Some(heads.to_vec()),
        ..cfg.clone()
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Logits of `ids` through the cache: a prefill, one-token steps, a multi-token continuation
/// from a non-empty state, one-token steps to the end.
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
    Tensor::cat(&pieces, 1)
}

#[test]
fn hybrids_of_every_method_decode_like_their_full_pass() {
    let _rng = rng_lock();
    let ids = ids(2, LEN);
    for extra in [
        json!({}),
        json!({"model_type": "mistral", "sliding_window": 5}),
    ] {
        for cfg in methods() {
            // Head 1 reads key/value head 0, head 2 key/value head 1: both groups split.
            let cfg = with_heads(&cfg, &[1, 2]);
            let mut model = tiny_model(extra.clone());
            let student = nn::VarStore::new(Device::Cpu);
            convert_all(&mut model, &student, &cfg);
            assert_eq!(model.mixer(0).name(), cfg.name());
            assert!(cfg.name().ends_with("+softmax_heads2"), "{}", cfg.name());
            let full = tch::no_grad(|| model.forward(&ids, None).unwrap());
            let decoded = tch::no_grad(|| decoded_logits(&model, &ids));
            let diff = max_diff(&full, &decoded);
            assert!(diff <= 1e-4, "{}: full vs decoded {diff:e}", cfg.name());

            // A forked state continues as the original does, for each copy.
            let (prompt, rest) = (ids.narrow(1, 0, 13), ids.narrow(1, 13, 3));
            let mut cache = model.new_cache(2).unwrap();
            let _ = tch::no_grad(|| model.forward(&prompt, Some(&mut cache))).unwrap();
            let mut forked = model.fork_cache(&cache, 2, 8, Device::Cpu).unwrap();
            let want = tch::no_grad(|| model.forward(&rest, Some(&mut cache))).unwrap();
            let rest2 = rest.repeat_interleave_self_int(2, 0, None);
            let got = tch::no_grad(|| model.forward(&rest2, Some(&mut forked))).unwrap();
            let want2 = want.repeat_interleave_self_int(2, 0, None);
            assert!(max_diff(&got, &want2) <= 1e-5, "{}: fork", cfg.name());
        }
    }
}

#[test]
fn all_heads_softmax_is_the_teacher_and_none_is_the_plain_layer() {
    let _rng = rng_lock();
    let ids = ids(2, LEN);
    for extra in [
        json!({}),
        json!({"model_type": "mistral", "sliding_window": 5}),
    ] {
        let teacher = tiny_model(extra.clone());
        let want = teacher.forward(&ids, None).unwrap();
        let want_decoded = decoded_logits(&teacher, &ids);
        for cfg in methods() {
            let mut model = tiny_model(extra.clone());
            let student = nn::VarStore::new(Device::Cpu);
            convert_all(&mut model, &student, &with_heads(&cfg, &[0, 1, 2, 3]));
            let full = tch::no_grad(|| model.forward(&ids, None).unwrap());
            let decoded = tch::no_grad(|| decoded_logits(&model, &ids));
            assert!(max_diff(&full, &want) <= 1e-5, "{}: all heads", cfg.name());
            assert!(
                max_diff(&decoded, &want_decoded) <= 1e-5,
                "{}: all heads, decoded",
                cfg.name()
            );

            // No head: the plain layer over the same parameters (softmax heads add none, so
            // the same seed draws the same ones), exactly.
            let mut plain = tiny_model(extra.clone());
            convert_all(&mut plain, &nn::VarStore::new(Device::Cpu), &cfg);
            let want_plain = tch::no_grad(|| plain.forward(&ids, None).unwrap());
            let mut hybrid = tiny_model(extra.clone());
            let hybrid_store = nn::VarStore::new(Device::Cpu);
            let hybrid_cfg = with_heads(&cfg, &[0, 3]);
            convert_all_with(&mut hybrid, &hybrid_store, &hybrid_cfg, |m| m);
            let with = tch::no_grad(|| hybrid.forward(&ids, None).unwrap());
            if model.config().layer_window(0).is_none() {
                // (Under the teacher's window of 5, a sliding window of 5 is the teacher.)
                assert!(max_diff(&with, &want_plain) > 1e-4, "{}", cfg.name());
            }
            let mut none = tiny_model(extra.clone());
            convert_all_with(
                &mut none,
                &nn::VarStore::new(Device::Cpu),
                &hybrid_cfg,
                |m| {
                    let m = m.with_softmax_heads(None).unwrap();
                    assert_eq!(m.config(), &cfg.resolved());
                    m
                },
            );
            let got = tch::no_grad(|| none.forward(&ids, None).unwrap());
            assert!(got.equal(&want_plain), "{}: no head", cfg.name());
        }
    }
}

fn shape(window: Option<i64>) -> LayerShape {
    LayerShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        sliding_window: window,
    }
}

fn qkv(len: i64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(5);
    let opts = (Kind::Float, Device::Cpu);
    (
        Tensor::randn([2, 4, len, 8], opts),
        Tensor::randn([2, 2, len, 8], opts),
        Tensor::randn([2, 2, len, 8], opts),
    )
}

fn input<'a>(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> MixerInput<'a> {
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

#[test]
fn chosen_rows_are_the_teachers_and_the_others_the_plain_layers() {
    let _rng = rng_lock();
    let (q, k, v) = qkv(19);
    let x = input(&q, &k, &v);
    for window in [None, Some(4)] {
        let teacher = SoftmaxMixer::new(window).forward(&x, None).unwrap();
        for cfg in methods() {
            let store = nn::VarStore::new(Device::Cpu);
            let plain = LinearizedMixer::new(&store.root(), &shape(window), &cfg).unwrap();
            let plain_y = plain.forward(&x, None).unwrap();
            for heads in [vec![0], vec![1, 2], vec![0, 1, 3]] {
                let hybrid = plain.with_softmax_heads(Some(heads.clone())).unwrap();
                assert_eq!(hybrid.softmax_heads(), heads.as_slice());
                let y = hybrid.forward(&x, None).unwrap();
                for h in 0..4 {
                    let want = if heads.contains(&h) {
                        &teacher
                    } else {
                        &plain_y
                    };
                    let h = h as i64;
                    let diff = max_diff(&y.select(1, h), &want.select(1, h));
                    assert!(diff <= 1e-5, "{} {heads:?} head {h}: {diff:e}", cfg.name());
                }
                assert_eq!(
                    hybrid.linear_heads(),
                    (0..4).filter(|h| !heads.contains(h)).collect::<Vec<_>>()
                );
            }
        }
    }
}

#[test]
fn gradients_reach_only_the_linear_heads_parameters() {
    let _rng = rng_lock();
    let (q, k, v) = qkv(13);
    let x = input(&q, &k, &v);
    let cfg = &methods()[1]; // LoLCATs: per-head feature maps and window factors
    let store = nn::VarStore::new(Device::Cpu);
    let hybrid = LinearizedMixer::new(&store.root(), &shape(None), &with_heads(cfg, &[2])).unwrap();
    hybrid
        .forward(&x, None)
        .unwrap()
        .square()
        .sum(Kind::Float)
        .backward();
    let factors = store
        .variables()
        .into_iter()
        .find(|(n, _)| n.contains("window_factors"))
        .unwrap()
        .1
        .grad();
    let per_head = Vec::<f32>::try_from(&factors.abs()).unwrap();
    assert_eq!(per_head[2], 0.0, "the softmax head's factor has a gradient");
    assert!(per_head[0] > 0.0 && per_head[1] > 0.0 && per_head[3] > 0.0);
}

#[test]
fn the_cache_holds_only_the_key_value_heads_the_softmax_heads_read() {
    let _rng = rng_lock();
    let (q, k, v) = qkv(20);
    let x = input(&q, &k, &v);
    // 20 tokens x d 8 x (keys and values) x f32 x batch 2, per key/value head.
    let per_kv_head = 20 * 8 * 2 * 4 * 2;
    for cfg in methods() {
        let store = nn::VarStore::new(Device::Cpu);
        let plain = LinearizedMixer::new(&store.root(), &shape(None), &cfg).unwrap();
        let bytes = |mixer: &LinearizedMixer| {
            let mut state = mixer.new_state(2).unwrap();
            let _ = tch::no_grad(|| mixer.forward(&x, Some(&mut state))).unwrap();
            assert!(!mixer.step_capturable(&state) || mixer.softmax_heads().is_empty());
            mixer.state_bytes(&state).unwrap()
        };
        let base = bytes(&plain);
        for (heads, kv_heads) in [(vec![0], 1), (vec![0, 1], 1), (vec![1, 2], 2)] {
            let hybrid = plain.with_softmax_heads(Some(heads.clone())).unwrap();
            assert_eq!(
                bytes(&hybrid) - base,
                kv_heads * per_kv_head,
                "{} {heads:?}",
                cfg.name()
            );
            let state = hybrid.new_state(2).unwrap();
            let e = hybrid.state_tensors(&state).unwrap_err().to_string();
            assert!(e.contains("CUDA graph"), "{e}");
        }
    }
}

#[test]
fn bad_head_lists_are_refused_naming_the_key() {
    let _rng = rng_lock();
    let store = nn::VarStore::new(Device::Cpu);
    let cfg = AttentionConfig::new(Method::Lolcats);
    let e = |heads: Vec<usize>| {
        format!(
            "{:#}",
            LinearizedMixer::new(&store.root(), &shape(None), &with_heads(&cfg, &heads))
                .err()
                .unwrap()
        )
    };
    let msg = e(vec![4]);
    assert!(
        msg.contains("attention.softmax_heads") && msg.contains("head 4 does not exist"),
        "{msg}"
    );
    let msg = e(vec![2, 1]);
    assert!(msg.contains("ascending"), "{msg}");
    let msg = e(vec![1, 1]);
    assert!(msg.contains("distinct"), "{msg}");
    let msg = e(vec![]);
    assert!(msg.contains("is empty"), "{msg}");
    let msg = with_heads(&AttentionConfig::new(Method::Softmax), &[0])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("attention.softmax_heads is not used by method `softmax`"),
        "{msg}"
    );
    let cfg: AttentionConfig =
        serde_yaml_ng::from_str("method: lolcats\nsoftmax_heads: [0, 3]\n").unwrap();
    assert_eq!(cfg.resolved().softmax_heads, Some(vec![0, 3]));
    assert_eq!(
        AttentionConfig::new(Method::Lolcats)
            .resolved()
            .softmax_heads,
        None
    );
}
