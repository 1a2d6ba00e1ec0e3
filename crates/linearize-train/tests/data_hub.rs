//! Data sources named by hub id: a dataset repository on a stand-in hub on localhost, its split
//! files listed without fetching (the dry run), fetched into the Hugging Face cache, read as
//! Parquet, JSONL and a JSON list, then read again offline; and the errors of bad selections and
//! records. One test: the hub settings come from the process environment.
mod data_common;
#[path = "../../linearize-models/tests/fake_hub/mod.rs"]
mod fake_hub;

use data_common::ByteEncoder;
use fake_hub::{FakeHub, COMMIT};
use linearize_train::data::{list_files, list_hub_files, read_documents, SourceConfig, SourceKind};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::sync::Arc;

/// A snappy-compressed Parquet file with the given UTF-8 columns; `None` values are nulls (the
/// column is then optional).
fn parquet(columns: &[(&str, Vec<Option<&str>>)]) -> Vec<u8> {
    let fields: Vec<String> = columns
        .iter()
        .map(|(name, values)| {
            let repetition = if values.iter().any(Option::is_none) {
                "OPTIONAL"
            } else {
                "REQUIRED"
            };
            format!("{repetition} BINARY {name} (UTF8);")
        })
        .collect();
    let schema = parse_message_type(&format!("message record {{ {} }}", fields.join(" "))).unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut bytes = Vec::new();
    let mut writer =
        SerializedFileWriter::new(&mut bytes, Arc::new(schema), Arc::new(props)).unwrap();
    let mut group = writer.next_row_group().unwrap();
    for (_, values) in columns {
        let mut column = group.next_column().unwrap().unwrap();
        let present: Vec<ByteArray> = values
            .iter()
            .flatten()
            .map(|v| ByteArray::from(*v))
            .collect();
        let levels: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
        let optional = values.iter().any(Option::is_none);
        column
            .typed::<ByteArrayType>()
            .write_batch(&present, optional.then_some(&levels[..]), None)
            .unwrap();
        column.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
    bytes
}

fn hub_source(hub: &str, split: Option<&str>, path: &str) -> SourceConfig {
    let mut source = SourceConfig::new(SourceKind::Alpaca, path);
    source.hub = Some(hub.to_string());
    source.split = split.map(str::to_string);
    source
}

/// The documents of a source, read through every file it lists.
fn documents(source: &SourceConfig) -> anyhow::Result<Vec<String>> {
    let encoder = ByteEncoder::new();
    let mut docs = Vec::new();
    for file in list_files(source)? {
        read_documents(&file.path, source, &encoder, |text| {
            docs.push(text.to_owned());
            Ok(())
        })?;
    }
    Ok(docs)
}

#[test]
fn hub_datasets_are_listed_fetched_cached_and_read() {
    let train = parquet(&[
        ("instruction", vec![Some("Add."), Some("Greet.")]),
        ("input", vec![Some("2 and 3"), None]),
        ("output", vec![Some("5"), Some("Hi")]),
    ]);
    let no_output = parquet(&[("instruction", vec![Some("Add.")])]);
    let hub = FakeHub::dataset(
        "org/alpaca-mini",
        vec![
            ("README.md", b"# mini".to_vec()),
            ("data/train-00000-of-00001.parquet", train),
            (
                "data/test-00000-of-00001.jsonl",
                b"{\"instruction\": \"Nap.\", \"output\": \"Zz\"}\n".to_vec(),
            ),
            (
                "extra/alpaca.json",
                b" [{\"instruction\": \"Sing.\", \"input\": \"\", \"output\": \"La\"}]".to_vec(),
            ),
            ("extra/no_output.parquet", no_output),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::set_var("HF_ENDPOINT", &hub.endpoint);
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_TOKEN");

    // The dry run's listing asks for the file list only, no data.
    let train_source = hub_source("org/alpaca-mini", None, "");
    assert_eq!(
        list_hub_files(&train_source).unwrap(),
        ["data/train-00000-of-00001.parquet"]
    );
    let requests = hub.requests.lock().unwrap().clone();
    assert!(
        requests.iter().all(|r| r.starts_with("/api/datasets/")),
        "{requests:?}"
    );

    let files = list_files(&train_source).unwrap();
    assert_eq!(files.len(), 1);
    assert!(files[0].path.starts_with(
        cache
            .path()
            .join("datasets--org--alpaca-mini/snapshots")
            .join(COMMIT)
    ));
    let expected_train = [
        "<s>[user] Add.\n\n2 and 3\n[assistant] 5\n</s>",
        "<s>[user] Greet.\n[assistant] Hi\n</s>",
    ];
    assert_eq!(documents(&train_source).unwrap(), expected_train);
    assert_eq!(
        documents(&hub_source("org/alpaca-mini", Some("test"), "")).unwrap(),
        ["<s>[user] Nap.\n[assistant] Zz\n</s>"]
    );
    assert_eq!(
        documents(&hub_source("org/alpaca-mini", None, "extra/alpaca.json")).unwrap(),
        ["<s>[user] Sing.\n[assistant] La\n</s>"]
    );

    // Bad selections and records: one line naming the repository, the file and the key.
    let err = format!(
        "{:#}",
        documents(&hub_source("org/alpaca-mini", Some("validation"), "")).unwrap_err()
    );
    assert!(
        err.contains("org/alpaca-mini") && err.contains("`validation`") && !err.contains('\n'),
        "{err}"
    );
    let err = format!(
        "{:#}",
        documents(&hub_source(
            "org/alpaca-mini",
            None,
            "extra/no_output.parquet"
        ))
        .unwrap_err()
    );
    assert!(
        err.contains("datasets--org--alpaca-mini")
            && err.contains("no_output.parquet: row 1")
            && err.contains("missing string field `output`")
            && !err.contains('\n'),
        "{err}"
    );
    let err = format!(
        "{:#}",
        list_hub_files(&hub_source("org/absent", None, "")).unwrap_err()
    );
    assert!(
        err.contains("org/absent") && err.contains("not found"),
        "{err}"
    );

    // Offline, the cached snapshot serves the same files.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    assert_eq!(documents(&train_source).unwrap(), expected_train);
    let err = format!(
        "{:#}",
        documents(&hub_source("org/never-fetched", None, "")).unwrap_err()
    );
    assert!(
        err.contains("org/never-fetched") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
