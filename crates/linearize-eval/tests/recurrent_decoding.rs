//! Issue #8: greedy tokens of a converted model decoded recurrently (token by token through its
//! cache) equal those of the full-sequence chunked forward (the argmax at the last position of
//! the whole prefix, re-run without a cache at every step), for every linear method, partial
//! conversions, and the softmax teacher.
mod common;

use common::{converted, lolcats, rng_lock, tiny_model, tokenizer};
use linearize_attention::feature_map::{FeatureMapConfig, FeatureMapInit};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_attention::ops::window::WindowShape;
use linearize_eval::generations::{encode_prompt, recurrent_vs_full};

const CONTEXT: i64 = 128;
/// Long enough to cross several 8-token chunks and 4-token windows while decoding.
const NEW_TOKENS: usize = 40;

fn prompt() -> Vec<u32> {
    // 13+ tokens: the prefill itself ends mid-chunk.
    let ids = encode_prompt(
        &tokenizer(),
        "The sea was calm and the ship sailed north",
        false,
    )
    .unwrap();
    assert!(ids.len() > 8 && ids.len() % 8 != 0, "{} tokens", ids.len());
    ids
}

fn methods() -> Vec<AttentionConfig> {
    let hedgehog = FeatureMapConfig::Hedgehog {
        feature_dim: 4,
        half_space: false,
        bias: false,
        init: FeatureMapInit::Kaiming,
    };
    vec![
        lolcats(),
        AttentionConfig {
            window_shape: Some(WindowShape::Tk),
            ..lolcats()
        },
        AttentionConfig {
            feature_map: Some(hedgehog),
            chunk_size: Some(8),
            ..AttentionConfig::new(Method::Linear)
        },
        AttentionConfig {
            window_size: Some(4),
            chunk_size: Some(8),
            ..AttentionConfig::new(Method::SlidingWindow)
        },
        AttentionConfig {
            chunk_size: Some(8),
            sub_chunk: Some(4),
            ..AttentionConfig::new(Method::LigerGla)
        },
        AttentionConfig {
            window_size: Some(4),
            chunk_size: Some(8),
            sub_chunk: Some(4),
            ..AttentionConfig::new(Method::Liger)
        },
    ]
}

#[test]
fn recurrent_greedy_decoding_equals_the_full_chunked_forward() {
    let _guard = rng_lock();
    let prompt = prompt();
    for attention in methods() {
        let (model, _store) = converted(CONTEXT, &attention, &[0, 1, 2], 11);
        let check = recurrent_vs_full(&model, &prompt, NEW_TOKENS).unwrap();
        assert_eq!(check.recurrent.len(), NEW_TOKENS, "{}", attention.name());
        assert_eq!(
            check.recurrent,
            check.full_forward,
            "{}: first mismatch at {:?}",
            attention.name(),
            check.first_mismatch
        );
        assert!(check.agree);
        // Where both choose the same token, the full forward's gap to the cache's choice is 0.
        assert_eq!(
            check.logit_gaps,
            vec![0.0; NEW_TOKENS],
            "{}",
            attention.name()
        );
        // A random model repeating one token would make the comparison vacuous.
        let distinct: std::collections::BTreeSet<_> = check.recurrent.iter().collect();
        assert!(
            distinct.len() > 3,
            "{}: {:?}",
            attention.name(),
            check.recurrent
        );
    }
}

#[test]
fn hybrid_and_teacher_decode_exactly_too() {
    let _guard = rng_lock();
    let prompt = prompt();
    let (hybrid, _store) = converted(CONTEXT, &lolcats(), &[1], 12);
    let check = recurrent_vs_full(&hybrid, &prompt, NEW_TOKENS).unwrap();
    assert!(check.agree, "hybrid: {check:?}");
    let teacher = tiny_model(CONTEXT);
    let check = recurrent_vs_full(&teacher, &prompt, NEW_TOKENS).unwrap();
    assert!(check.agree, "teacher: {check:?}");
    assert_eq!(check.prompt_tokens, prompt.len());
}

/// Forking a prefilled state into copies (as `bench decode` and parallel sampling do): every copy
/// continues exactly as the original, for every method, the hybrid and the teacher, and a fork
/// through the host continues exactly as one on the device.
#[test]
fn forked_states_continue_like_the_original() {
    use tch::{Device, Kind, Tensor};
    let _guard = rng_lock();
    let prompt: Vec<i64> = prompt().iter().map(|&t| i64::from(t)).collect();
    let ids = Tensor::from_slice(&prompt).unsqueeze(0); // (1, L)
    let next = Tensor::from_slice(&[5i64, 9, 2]).view([1, 3]);
    let mut models: Vec<_> = methods()
        .iter()
        .map(|a| (a.name(), converted(CONTEXT, a, &[0, 1, 2], 11)))
        .map(|(name, (model, store))| (name, model, Some(store)))
        .collect();
    let (hybrid, store) = converted(CONTEXT, &lolcats(), &[1], 12);
    models.push(("hybrid".into(), hybrid, Some(store)));
    models.push(("teacher".into(), tiny_model(CONTEXT), None));
    for (name, model, _store) in &models {
        tch::no_grad(|| {
            let mut cache = model.new_cache(1).unwrap();
            let _ = model.hidden_states(&ids, Some(&mut cache)).unwrap();
            let host = model.fork_cache(&cache, 1, 0, Device::Cpu).unwrap();
            let mut forked = model.fork_cache(&host, 3, 4, Device::Cpu).unwrap();
            assert_eq!(forked.seen(), cache.seen(), "{name}");
            let per_copy = model.cache_bytes(&forked).unwrap() as f64 / 3.0;
            let original = model.cache_bytes(&cache).unwrap() as f64;
            assert!(
                per_copy > 0.0 && per_copy <= original + 4.0 * 1024.0,
                "{name}: {per_copy} vs {original}"
            );
            // Three steps: the original one sequence at a time, the copies all at once.
            for step in 0..3 {
                let token = next.narrow(1, step, 1); // (1, 1)
                let want = model.forward(&token, Some(&mut cache)).unwrap(); // (1, 1, V)
                let got = model
                    .forward(&token.repeat([3, 1]), Some(&mut forked))
                    .unwrap(); // (3, 1, V)
                let diff = (got - want.expand([3, -1, -1], false))
                    .abs()
                    .max()
                    .to_kind(Kind::Double)
                    .double_value(&[]);
                assert!(diff < 1e-5, "{name} step {step}: max diff {diff}");
            }
        });
    }
}
