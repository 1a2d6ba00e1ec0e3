//! GGUF parsing: every metadata value type, alignment, the tiny fixture's table, and clear
//! errors (naming the file) for damaged input.
mod gguf_writer;

use gguf_writer::Writer;
use linearize_models::gguf::{GgmlType, GgufFile, Value};
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tiny-llama.gguf")
}

fn open_err(path: &Path) -> String {
    match GgufFile::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn reads_every_value_type_and_array() {
    let dir = tempfile::tempdir().unwrap();
    let mut array = 5u32.to_le_bytes().to_vec(); // array of int32
    array.extend(3u64.to_le_bytes());
    for v in [-1i32, 0, 7] {
        array.extend(v.to_le_bytes());
    }
    let mut strings = 8u32.to_le_bytes().to_vec(); // array of string
    strings.extend(2u64.to_le_bytes());
    Writer::string(&mut strings, "a b");
    Writer::string(&mut strings, "ü");
    let path = Writer::new()
        .kv("u8", 0, &[200])
        .kv("i8", 1, &[0xFF])
        .kv("u16", 2, &60000u16.to_le_bytes())
        .kv("i16", 3, &(-300i16).to_le_bytes())
        .kv("u32", 4, &4_000_000_000u32.to_le_bytes())
        .kv("i32", 5, &(-5i32).to_le_bytes())
        .kv("f32", 6, &1.5f32.to_le_bytes())
        .kv("bool", 7, &[1])
        .kv_str("string", "héllo")
        .kv("array", 9, &array)
        .kv("strings", 9, &strings)
        .kv("u64", 10, &u64::MAX.to_le_bytes())
        .kv("i64", 11, &i64::MIN.to_le_bytes())
        .kv("f64", 12, &0.25f64.to_le_bytes())
        .write(dir.path(), "values.gguf");
    let g = GgufFile::open(&path).unwrap();
    let m = g.metadata();
    assert_eq!(m["u8"], Value::U8(200));
    assert_eq!(m["i8"], Value::I8(-1));
    assert_eq!(m["u16"], Value::U16(60000));
    assert_eq!(m["i16"], Value::I16(-300));
    assert_eq!(m["u32"], Value::U32(4_000_000_000));
    assert_eq!(m["i32"], Value::I32(-5));
    assert_eq!(m["f32"], Value::F32(1.5));
    assert_eq!(m["bool"], Value::Bool(true));
    assert_eq!(m["string"], Value::String("héllo".into()));
    assert_eq!(
        m["array"],
        Value::Array(vec![Value::I32(-1), Value::I32(0), Value::I32(7)])
    );
    assert_eq!(
        m["strings"],
        Value::Array(vec![Value::String("a b".into()), Value::String("ü".into())])
    );
    assert_eq!(m["u64"], Value::U64(u64::MAX));
    assert_eq!(m["i64"], Value::I64(i64::MIN));
    assert_eq!(m["f64"], Value::F64(0.25));
    assert_eq!(g.get_u64("u32").unwrap(), Some(4_000_000_000));
    let err = g.get_u64("string").unwrap_err().to_string();
    assert!(
        err.contains("values.gguf")
            && err.contains("string")
            && err.contains("non-negative integer"),
        "{err}"
    );
    assert!(g
        .require_str("missing")
        .unwrap_err()
        .to_string()
        .contains("missing metadata key missing"));
}

#[test]
fn honours_custom_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::new().kv("general.alignment", 4, &64u32.to_le_bytes());
    w.alignment = 64;
    let path = w
        .tensor("a", &[3], 0, f32_bytes(&[1.0, 2.0, 3.0]))
        .tensor("b", &[2, 2], 0, f32_bytes(&[4.0, 5.0, 6.0, 7.0]))
        .write(dir.path(), "aligned.gguf");
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.tensor("b").unwrap().offset, 64);
    assert_eq!(g.tensor("b").unwrap().shape(), [2, 2]);
    assert_eq!(
        g.dequantize(g.tensor("a").unwrap()).unwrap(),
        [1.0, 2.0, 3.0]
    );
    assert_eq!(
        g.dequantize(g.tensor("b").unwrap()).unwrap(),
        [4.0, 5.0, 6.0, 7.0]
    );
}

#[test]
fn reads_the_tiny_fixture_table() {
    let g = GgufFile::open(&tiny()).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.tensors().len(), 20);
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (embd.ty, embd.dims.as_slice()),
        (GgmlType::Q4_0, &[64, 300][..])
    );
    assert_eq!(g.tensor("blk.0.ffn_up.weight").unwrap().ty, GgmlType::BF16);
    assert_eq!(g.tensor("blk.1.attn_q.weight").unwrap().ty, GgmlType::Q4_1);
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
    assert_eq!(
        g.get_array("tokenizer.ggml.tokens").unwrap().unwrap().len(),
        300
    );
}

#[test]
fn wrong_magic_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(tiny()).unwrap();
    bytes[..4].copy_from_slice(b"GGML");
    let path = dir.path().join("model.bin");
    std::fs::write(&path, bytes).unwrap();
    let err = open_err(&path);
    assert!(
        err.contains("model.bin") && err.contains("not a GGUF file") && err.contains("GGML"),
        "{err}"
    );
    std::fs::write(&path, b"").unwrap();
    assert!(open_err(&path).contains("empty file"));
}

#[test]
fn truncation_anywhere_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(tiny()).unwrap();
    for cut in [2, 10, 30, 1000, 5000, bytes.len() / 2, bytes.len() - 1] {
        let path = dir.path().join(format!("cut-{cut}.gguf"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = open_err(&path);
        assert!(
            err.contains(&format!("cut-{cut}.gguf")) && err.contains("truncated"),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn unknown_tensor_type_and_bad_versions_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = Writer::new()
        .tensor("w", &[32], 99, vec![0; 32])
        .write(dir.path(), "odd.gguf");
    let err = open_err(&path);
    assert!(
        err.contains("odd.gguf") && err.contains("tensor w has unknown ggml type id 99"),
        "{err}"
    );

    let mut bytes = Writer::new().bytes();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(open_err(&path).contains("version 1"));
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(open_err(&path).contains("big-endian"));
}

#[test]
fn damaged_tables_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // A Q4_0 row must hold whole 32-value blocks.
    let path = Writer::new()
        .tensor("w", &[16], 2, vec![0; 18])
        .write(dir.path(), "rows.gguf");
    assert!(open_err(&path).contains("not a multiple of the Q4_0 block size"));
    // An array claiming more items than the file has bytes.
    let mut huge = 4u32.to_le_bytes().to_vec();
    huge.extend(u64::MAX.to_le_bytes());
    let path = Writer::new()
        .kv("a", 9, &huge)
        .write(dir.path(), "huge.gguf");
    assert!(open_err(&path).contains("truncated"));
    let path = Writer::new()
        .kv("k", 7, &[2])
        .write(dir.path(), "bool.gguf");
    assert!(open_err(&path).contains("bool byte is 2"));
    let path = Writer::new()
        .kv("k", 13, &[0])
        .write(dir.path(), "type.gguf");
    assert!(open_err(&path).contains("unknown value type 13"));
}

#[test]
fn overflowing_offsets_and_duplicate_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // One f32 tensor "w" of 8 values: the header is 24 bytes, the tensor's entry 33 (name)
    // + 4 (rank) + 8 (dims) + 4 (type) = 49, so its offset field is bytes 49..57 and the data
    // starts at 64.
    let mut bytes = Writer::new()
        .tensor("w", &[8], 0, f32_bytes(&[1.0; 8]))
        .bytes();
    assert_eq!(&bytes[49..57], &0u64.to_le_bytes());
    // 2^64 - 64: data start + offset wraps to 0, where the header is.
    bytes[49..57].copy_from_slice(&(u64::MAX - 63).to_le_bytes());
    let path = dir.path().join("wrap.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let err = open_err(&path);
    assert!(
        err.contains("wrap.gguf") && err.contains("tensor w") && err.contains("overflows"),
        "{err}"
    );

    let path = Writer::new()
        .tensor("w", &[8], 0, f32_bytes(&[1.0; 8]))
        .tensor("w", &[8], 0, f32_bytes(&[2.0; 8]))
        .write(dir.path(), "dup.gguf");
    let err = open_err(&path);
    assert!(
        err.contains("dup.gguf") && err.contains("tensor w appears twice"),
        "{err}"
    );
}
