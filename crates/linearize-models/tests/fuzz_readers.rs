//! Damaged and random inputs for the readers of files we do not control: safetensors headers
//! (and their data), safetensors indexes and GGUF files. Each case must end in `Ok` or `Err`,
//! never a panic, an abort or an allocation over 1 GiB (linearize_models::mutation). CI runs a
//! bounded number of cases; docs/SECURITY.md records longer runs.
use linearize_models::gguf::GgufFile;
use linearize_models::mutation::{run, seeds, CappedAlloc};
use linearize_models::weights::Checkpoint;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

const CASES: u64 = 1500;

fn corpus(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(name)
}

/// Opens the checkpoint and reads every tensor it lists.
fn read_all(dir: &Path) -> bool {
    let Ok(ckpt) = Checkpoint::open(dir) else {
        return false;
    };
    let names: Vec<String> = ckpt.names().map(str::to_owned).collect();
    names
        .iter()
        .all(|name| ckpt.tensor(name, Kind::Float, Device::Cpu).is_ok())
}

#[test]
fn safetensors_headers_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    run(
        "safetensors",
        &seeds(&corpus("safetensors")),
        CASES,
        |input| {
            std::fs::write(&file, input).unwrap();
            read_all(dir.path())
        },
    );
}

#[test]
fn safetensors_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let shards = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama3_tied_sharded");
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        std::fs::copy(shards.join(shard), dir.path().join(shard)).unwrap();
    }
    let index = dir.path().join("model.safetensors.index.json");
    run(
        "safetensors-index",
        &seeds(&corpus("index")),
        CASES,
        |input| {
            std::fs::write(&index, input).unwrap();
            read_all(dir.path())
        },
    );
}

#[test]
fn gguf_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    run("gguf", &seeds(&corpus("gguf")), CASES, |input| {
        std::fs::write(&file, input).unwrap();
        let Ok(gguf) = GgufFile::open(&file) else {
            return false;
        };
        // Every tensor's bytes are inside the file (checked at open): reading them must not
        // go past it.
        let bytes: usize = gguf
            .tensors()
            .iter()
            .map(|t| gguf.tensor_data(t).len())
            .sum();
        bytes <= input.len()
    });
}
