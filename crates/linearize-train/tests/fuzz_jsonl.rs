//! Damaged and random JSONL for the data reader, read as `jsonl`, `alpaca` and `chat` sources:
//! every case must end in `Ok` or `Err`, never a panic, an abort or an allocation over 1 GiB
//! (linearize_models::mutation). CI runs a bounded number of cases; docs/SECURITY.md records
//! longer runs.
mod data_common;

use data_common::ByteEncoder;
use linearize_models::mutation::{run, seeds, CappedAlloc};
use linearize_train::data::{read_documents, SourceConfig, SourceKind};
use std::path::Path;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

#[test]
fn jsonl_alpaca_and_chat_records() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/jsonl");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.jsonl");
    let encoder = ByteEncoder::new();
    let kinds = [SourceKind::Jsonl, SourceKind::Alpaca, SourceKind::Chat];
    run("jsonl", &seeds(&corpus), 1000, |input| {
        std::fs::write(&file, input).unwrap();
        let mut accepted = false;
        for kind in kinds {
            let source = SourceConfig::new(kind, &file);
            let read = read_documents(&file, &source, &encoder, |text| {
                encoder_check(&encoder, text)
            });
            accepted |= read.is_ok();
        }
        accepted
    });
}

/// Tokenises a document as a job would.
fn encoder_check(encoder: &ByteEncoder, text: &str) -> anyhow::Result<()> {
    use linearize_train::data::TextEncoder;
    encoder.encode(text).map(drop)
}
