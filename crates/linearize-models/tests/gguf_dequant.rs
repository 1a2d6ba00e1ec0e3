//! Dequantisation is bit-exact with ggml's reference: fixtures from gguf-py's numpy port
//! (scripts/gguf_make_fixtures.py), 512 values per type, both reference-quantised data and
//! random block bytes.
use linearize_models::gguf::{dequantize, GgmlType, DEQUANTIZABLE};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf/dequant")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check(ty: GgmlType) {
    let blocks = fixture(&format!("{ty}.blocks"));
    let expected: Vec<f32> = fixture(&format!("{ty}.f32"))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let mut got = vec![f32::NAN; expected.len()];
    dequantize(ty, &blocks, &mut got).unwrap();
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            g.to_bits(),
            e.to_bits(),
            "{ty} value {i}: got {g}, reference {e}"
        );
    }
}

#[test]
fn f32() {
    check(GgmlType::F32);
}

#[test]
fn f16() {
    check(GgmlType::F16);
}

#[test]
fn bf16() {
    check(GgmlType::BF16);
}

#[test]
fn q8_0() {
    check(GgmlType::Q8_0);
}

#[test]
fn q4_0() {
    check(GgmlType::Q4_0);
}

#[test]
fn q4_1() {
    check(GgmlType::Q4_1);
}

#[test]
fn q5_0() {
    check(GgmlType::Q5_0);
}

#[test]
fn q5_1() {
    check(GgmlType::Q5_1);
}

#[test]
fn q4_k() {
    check(GgmlType::Q4_K);
}

#[test]
fn q5_k() {
    check(GgmlType::Q5_K);
}

#[test]
fn q6_k() {
    check(GgmlType::Q6_K);
}

#[test]
fn every_decodable_type_has_a_fixture() {
    for ty in DEQUANTIZABLE {
        assert!(!fixture(&format!("{ty}.blocks")).is_empty(), "{ty}");
    }
}
