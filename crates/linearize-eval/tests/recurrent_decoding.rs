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
