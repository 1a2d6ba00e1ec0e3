mod data_common;

use data_common::{decode, ByteEncoder};
use linearize_train::data::{
    build_datasets, BosPolicy, DataConfig, PackedSequences, SourceConfig, SourceKind,
};
use std::fs;
use std::path::Path;

/// Writes `n` JSONL documents `doc-0`, `doc-1`, ... and returns a config packing one token per
/// sequence without BOS, so that the packed tokens read back as `doc-i</s>doc-j</s>...`.
fn config_for(dir: &Path, n: usize) -> DataConfig {
    let path = dir.join("docs.jsonl");
    let lines: String = (0..n)
        .map(|i| format!("{{\"text\": \"doc-{i}\"}}\n"))
        .collect();
    fs::write(&path, lines).unwrap();
    let mut config: DataConfig = serde_yaml_ng::from_str("sources: []").unwrap();
    config.sources = vec![SourceConfig::new(SourceKind::Jsonl, path)];
    config.seq_len = 1;
    config.next_token_targets = false;
    config.bos = BosPolicy::Never;
    config
}

fn doc_names(packed: &PackedSequences) -> Vec<String> {
    let text = decode(packed.tokens());
    text.split_terminator("</s>").map(str::to_owned).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn documents_are_shuffled_by_seed_before_packing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), 20);
    let all: Vec<String> = (0..20).map(|i| format!("doc-{i}")).collect();
    let order = |config: &DataConfig| {
        doc_names(&build_datasets(config, &ByteEncoder::new()).unwrap().train)
    };

    let seeded = order(&config);
    assert_eq!(sorted(seeded.clone()), sorted(all.clone()));
    assert_ne!(seeded, all);
    assert_eq!(order(&config), seeded, "same seed, same order");
    config.seed = 1;
    assert_ne!(order(&config), seeded, "another seed, another order");
    config.shuffle = false;
    assert_eq!(order(&config), all);
}

#[test]
fn validation_fraction_holds_out_documents_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), 20);
    config.val_fraction = 0.25;
    config.shuffle = false;
    let split = |config: &DataConfig| {
        let data = build_datasets(config, &ByteEncoder::new()).unwrap();
        (
            doc_names(&data.train),
            doc_names(data.val.as_ref().unwrap()),
        )
    };
    let (train, val) = split(&config);
    assert_eq!(val.len(), 5);
    assert_eq!(train.len(), 15);
    assert!(val.iter().all(|d| !train.contains(d)));
    let all: Vec<String> = (0..20).map(|i| format!("doc-{i}")).collect();
    assert_eq!(sorted([train.clone(), val.clone()].concat()), sorted(all));
    assert_eq!(split(&config).1, val, "same seed, same hold-out");
    config.seed = 3;
    assert_ne!(split(&config).1, val, "another seed, another hold-out");

    config.max_val_sequences = Some(4);
    assert_eq!(
        build_datasets(&config, &ByteEncoder::new())
            .unwrap()
            .val
            .unwrap()
            .len(),
        4
    );
}

/// `weight` mixes sources: 2 uses every document of its source twice, 0.5 half of them (the
/// same half for the same seed), 1.5 every one once and half of them twice; held-out documents
/// are never weighted into training.
#[test]
fn source_weights_repeat_or_subsample_each_sources_documents() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), 8);
    let other = dir.path().join("other.jsonl");
    let lines: String = (0..4)
        .map(|i| format!("{{\"text\": \"x-{i}\"}}\n"))
        .collect();
    fs::write(&other, lines).unwrap();
    config
        .sources
        .push(SourceConfig::new(SourceKind::Jsonl, &other));
    let names = |config: &DataConfig| {
        sorted(doc_names(
            &build_datasets(config, &ByteEncoder::new()).unwrap().train,
        ))
    };
    let count =
        |names: &[String], prefix: &str| names.iter().filter(|n| n.starts_with(prefix)).count();
    let plain = names(&config);
    assert_eq!((count(&plain, "doc-"), count(&plain, "x-")), (8, 4));

    config.sources[1].weight = Some(2.0);
    let twice = names(&config);
    assert_eq!((count(&twice, "doc-"), count(&twice, "x-")), (8, 8));
    for i in 0..4 {
        assert_eq!(twice.iter().filter(|n| **n == format!("x-{i}")).count(), 2);
    }

    config.sources[1].weight = None;
    config.sources[0].weight = Some(0.5);
    let half = names(&config);
    assert_eq!((count(&half, "doc-"), count(&half, "x-")), (4, 4));
    assert_eq!(names(&config), half, "same seed, same half");
    let mut distinct = half.clone();
    distinct.dedup();
    assert_eq!(distinct, half, "a weight below 1 repeats nothing");

    config.sources[0].weight = Some(1.5);
    let more = names(&config);
    assert_eq!(count(&more, "doc-"), 12);
    for i in 0..8 {
        let n = more.iter().filter(|n| **n == format!("doc-{i}")).count();
        assert!(n == 1 || n == 2, "doc-{i} used {n} times");
    }

    config.val_fraction = 0.25;
    config.sources[0].weight = Some(2.0);
    let data = build_datasets(&config, &ByteEncoder::new()).unwrap();
    let (train, val) = (
        doc_names(&data.train),
        doc_names(data.val.as_ref().unwrap()),
    );
    assert_eq!(val.len(), 3);
    assert!(
        val.iter().all(|d| !train.contains(d)),
        "{val:?} in {train:?}"
    );
    let held_docs = val.iter().filter(|n| n.starts_with("doc-")).count();
    assert_eq!(count(&train, "doc-"), 2 * (8 - held_docs));
}

#[test]
fn separate_validation_sources_and_no_validation() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), 4);
    let val_path = dir.path().join("val.txt");
    fs::write(&val_path, "held").unwrap();
    config.val_sources = vec![SourceConfig::new(SourceKind::Text, &val_path)];
    let data = build_datasets(&config, &ByteEncoder::new()).unwrap();
    assert_eq!(doc_names(data.val.as_ref().unwrap()), ["held"]);
    assert_eq!(doc_names(&data.train).len(), 4);

    config.val_sources.clear();
    assert!(build_datasets(&config, &ByteEncoder::new())
        .unwrap()
        .val
        .is_none());
}

#[test]
fn bos_policy_and_targets_shape_the_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), 3);
    config.shuffle = false;
    config.bos = BosPolicy::Auto;
    config.seq_len = 6;
    config.next_token_targets = true;
    let data = build_datasets(&config, &ByteEncoder::new()).unwrap();
    // <s>doc-0</s><s>doc-1</s><s>doc-2</s>: 21 tokens -> (21 - 7) / 6 + 1 = 3 windows of 7.
    assert_eq!(data.train.len(), 3);
    assert_eq!(data.train.window(), 7);
    assert_eq!(decode(data.train.sequence(0)), "<s>doc-0</s>");
    assert_eq!(decode(data.train.sequence(1)), "</s><s>doc-1");

    let without = build_datasets(&config, &ByteEncoder::without_bos()).unwrap();
    assert_eq!(decode(without.train.sequence(0)), "doc-0</s>d");
    config.bos = BosPolicy::Always;
    let err = build_datasets(&config, &ByteEncoder::without_bos()).unwrap_err();
    assert!(err.to_string().contains("no BOS token"), "{err}");
}

#[test]
fn too_little_text_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), 2);
    config.seq_len = 100;
    let err = build_datasets(&config, &ByteEncoder::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains("do not fill one sequence of 100 tokens"),
        "{err}"
    );

    let mut config = config_for(dir.path(), 1);
    config.val_fraction = 0.1;
    let err = build_datasets(&config, &ByteEncoder::new()).unwrap_err();
    assert!(err.to_string().contains("1 document(s), too few"), "{err}");
}

#[test]
fn configured_cache_dir_skips_tokenisation_on_the_second_build() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), 5);
    config.cache_dir = Some(dir.path().join("cache"));
    let encoder = ByteEncoder::new();
    let first = build_datasets(&config, &encoder).unwrap();
    let calls = encoder.encode_calls.get();
    assert_eq!(calls, 5);
    let second = build_datasets(&config, &encoder).unwrap();
    assert_eq!(encoder.encode_calls.get(), calls);
    assert_eq!(first.train, second.train);
}
