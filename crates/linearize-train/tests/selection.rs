//! KL-guided selection on a tiny random model built so that the answer is known: layers 0 and 2
//! run a sliding window longer than the sequences (exactly the teacher), layer 1 runs untrained
//! linear attention (the whole error). Restoring layer 1, or its best head, must be what the
//! ranking picks, and it must lower KL(teacher || model); restoring the exact layers changes
//! nothing.
mod common;

use common::{rng_lock, sequences, tiny_model, SEQ_LEN};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_train::convert::{convert, ConversionConfig, ConvertedLayers};
use linearize_train::selection::{head_kl_drops, layer_kl_drops, top_heads, top_layers, KlProbe};
use std::collections::BTreeMap;
use tch::{nn, Device};

fn setup() -> (
    linearize_models::llama::Model,
    ConvertedLayers,
    nn::VarStore,
) {
    let mut model = tiny_model();
    let student = nn::VarStore::new(Device::Cpu);
    let exact = AttentionConfig {
        window_size: Some(2 * SEQ_LEN as i64),
        chunk_size: Some(8),
        ..AttentionConfig::new(Method::SlidingWindow)
    };
    let conversion = ConversionConfig {
        overrides: BTreeMap::from([(
            1,
            AttentionConfig {
                chunk_size: Some(8),
                ..AttentionConfig::new(Method::Linear)
            },
        )]),
        ..ConversionConfig::all(exact)
    };
    tch::manual_seed(5);
    let converted = convert(&mut model, &conversion, &student).unwrap();
    (model, converted, student)
}

#[test]
fn kl_ranks_first_the_layer_whose_restoration_removes_the_error() {
    let _rng = rng_lock();
    let (mut model, mut converted, _store) = setup();
    let val = sequences(6, 9);
    let before = common::probe_logits(&model);
    let probe = KlProbe::new(&mut model, &converted, &val, 2, 2).unwrap();
    // The teacher's pass put the converted mixers back.
    assert!(common::probe_logits(&model).equal(&before));

    let (base, scores) = layer_kl_drops(&mut model, &converted, &probe).unwrap();
    assert!(
        base > 1e-3,
        "the converted model is not the teacher: KL {base}"
    );
    assert_eq!(
        scores.iter().map(|s| s.layer).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    // Layer 1 carries the whole error: restored, the model is the teacher (KL 0).
    assert!((scores[1].score - base).abs() < 1e-5, "{scores:?}");
    for s in [scores[0], scores[2]] {
        assert!(s.score.abs() < 1e-5, "an exact layer changed KL: {s:?}");
    }
    assert_eq!(top_layers(&scores, 1).unwrap(), [1]);
    assert!(common::probe_logits(&model).equal(&before));

    converted.revert_to_softmax(&mut model, &[1]).unwrap();
    let after = probe.kl(&model).unwrap();
    assert!(after < 1e-5 && after < base, "KL {base} -> {after}");
}

#[test]
fn kl_ranks_heads_and_restoring_the_best_one_lowers_kl() {
    let _rng = rng_lock();
    let (mut model, mut converted, _store) = setup();
    let val = sequences(6, 9);
    let probe = KlProbe::new(&mut model, &converted, &val, 2, 2).unwrap();
    let (base, scores) = head_kl_drops(&mut model, &converted, &probe).unwrap();
    assert_eq!(
        scores.len(),
        3 * 4,
        "every head of the three converted layers"
    );
    for s in scores.iter().filter(|s| s.layer != 1) {
        assert!(
            s.score.abs() < 1e-5,
            "a head of an exact layer changed KL: {s:?}"
        );
    }
    let best = top_heads(&scores, 1).unwrap();
    let (&layer, heads) = best.iter().next().unwrap();
    assert_eq!(layer, 1);
    let drop = scores
        .iter()
        .find(|s| s.layer == 1 && s.head == heads[0])
        .unwrap()
        .score;
    assert!(drop > 0.0, "the best head's restoration does not lower KL");

    converted.set_softmax_heads(&mut model, &best).unwrap();
    let after = probe.kl(&model).unwrap();
    assert!(
        (base - after - drop).abs() < 1e-6 && after < base,
        "KL {base} -> {after}, measured drop {drop}"
    );
    assert!(converted.methods()[1].name.ends_with("+softmax_heads1"));
    // Its head is no longer a candidate; with every head of layer 1 softmax the model is the
    // teacher.
    assert_eq!(converted.head_candidates().len(), 3 * 4 - 1);
    converted
        .set_softmax_heads(&mut model, &BTreeMap::from([(1, vec![0, 1, 2, 3])]))
        .unwrap();
    assert!(probe.kl(&model).unwrap() < 1e-5);
    let e = converted
        .set_softmax_heads(&mut model, &BTreeMap::from([(1, vec![4])]))
        .unwrap_err();
    assert!(format!("{e:#}").contains("head 4 does not exist"), "{e:#}");
}
