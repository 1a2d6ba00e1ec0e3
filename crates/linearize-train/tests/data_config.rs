use linearize_train::data::{BosPolicy, DataConfig, SourceKind};
use std::path::{Path, PathBuf};

fn parse(yaml: &str) -> anyhow::Result<DataConfig> {
    let config: DataConfig = serde_yaml_ng::from_str(yaml)?;
    config.validate()?;
    Ok(config)
}

#[test]
fn full_section_parses_and_defaults_fill_the_rest() {
    let config = parse(
        r#"
sources:
  - {kind: text, path: data/sotu, separator: "\n\n\n"}
  - {kind: jsonl, path: data/web.jsonl, field: body}
  - {kind: alpaca, path: data/alpaca.jsonl}
  - {kind: chat, path: data/chats, split: train}
val_fraction: 0.05
seq_len: 512
batch_size: 4
max_tokens: 1000000
cache_dir: cache
teacher_samples: {num_sequences: 100, prompts: ["Once upon a time"], temperature: 0.8}
"#,
    )
    .unwrap();
    assert_eq!(config.sources.len(), 4);
    assert_eq!(config.sources[0].separator.as_deref(), Some("\n\n\n"));
    assert_eq!(config.sources[1].field_name(), "body");
    assert_eq!(config.sources[2].kind, SourceKind::Alpaca);
    assert_eq!(config.sources[3].field_name(), "messages");
    assert_eq!(config.sources[3].split.as_deref(), Some("train"));
    assert_eq!(
        (config.seq_len, config.batch_size, config.seed),
        (512, 4, 0)
    );
    assert!(config.shuffle && config.next_token_targets);
    assert_eq!(config.bos, BosPolicy::Auto);
    let samples = config.teacher_samples.as_ref().unwrap();
    assert_eq!((samples.temperature, samples.top_p), (0.8, 1.0));
    assert_eq!(
        (samples.chat, samples.weight, &samples.prompts_file),
        (false, None, &None)
    );
    // Left at their defaults, the chat keys stay out of the resolved recipe: recipes written
    // before them keep their hash (and their runs resume).
    let written = serde_yaml_ng::to_string(samples).unwrap();
    assert!(
        ["chat", "weight", "prompts_file"]
            .iter()
            .all(|key| !written.contains(key)),
        "{written}"
    );

    let defaults = parse("sources: [{kind: text, path: a.txt}]").unwrap();
    assert_eq!(
        (defaults.seq_len, defaults.batch_size, defaults.val_fraction),
        (1024, 1, 0.0)
    );
    assert_eq!(defaults.sources[0].field_name(), "text");

    let round_trip: DataConfig =
        serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&config).unwrap()).unwrap();
    assert_eq!(round_trip, config);
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    for (yaml, key) in [
        ("sources: []\nseqlen: 8", "seqlen"),
        ("sources: [{kind: text, path: a, feild: x}]", "feild"),
        (
            "sources: []\nteacher_samples: {num_sequences: 1, temp: 1}",
            "temp",
        ),
    ] {
        let err = parse(yaml).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
    let err = parse("sources: [{kind: parquet, path: a}]")
        .unwrap_err()
        .to_string();
    assert!(err.contains("parquet"), "{err}");
}

#[test]
fn invalid_values_and_combinations_name_the_key() {
    let cases = [
        ("sources: [{kind: text, path: a}]\nseq_len: 0", "data.seq_len"),
        ("sources: [{kind: text, path: a}]\nbatch_size: 0", "data.batch_size"),
        ("sources: [{kind: text, path: a}]\nval_fraction: 1.5", "data.val_fraction must be in [0, 1)"),
        (
            "sources: [{kind: text, path: a}]\nval_fraction: 0.1\nval_sources: [{kind: text, path: b}]",
            "either val_fraction or val_sources",
        ),
        ("sources: []", "no training data"),
        ("sources: [{kind: text, path: a, field: x}]", "data.sources[0].field"),
        ("sources: [{kind: text, path: a}]\nval_sources: [{kind: jsonl, path: b, separator: x}]", "data.val_sources[0].separator"),
        ("sources: []\nteacher_samples: {num_sequences: 0}", "num_sequences"),
        ("sources: []\nteacher_samples: {num_sequences: 5, top_p: 0}", "top_p"),
        ("sources: []\nteacher_samples: {num_sequences: 5, temperature: -1}", "temperature"),
        ("sources: []\nteacher_samples: {num_sequences: 5, prompts: [a], prompts_file: p.txt}", "either prompts or prompts_file, not both"),
        ("sources: []\nteacher_samples: {num_sequences: 5, chat: true}", "data.teacher_samples.chat needs prompts or prompts_file"),
        ("sources: []\nteacher_samples: {num_sequences: 5, weight: 0}", "data.teacher_samples.weight must be a positive number"),
        ("sources: []\nteacher_samples: {num_sequences: 5, weight: .inf}", "data.teacher_samples.weight"),
        ("sources: [{kind: text, path: a}]\nmax_tokens: 0", "data.max_tokens"),
        ("sources: [{kind: text, path: a, weight: 0}]", "data.sources[0].weight must be a positive number"),
        ("sources: [{kind: text, path: a}, {kind: text, path: b, weight: .nan}]", "data.sources[1].weight"),
        ("sources: [{kind: text, path: a}]\nval_sources: [{kind: text, path: b, weight: 2}]", "data.val_sources[0].weight"),
    ];
    for (yaml, expected) in cases {
        let err = parse(yaml).unwrap_err().to_string();
        assert!(err.contains(expected), "{yaml}: {err}");
    }
    parse("sources: []\nteacher_samples: {num_sequences: 5}").expect("data-free needs no sources");
}

#[test]
fn relative_paths_resolve_against_the_recipe_directory() {
    let mut config = parse(
        "sources: [{kind: text, path: data/a.txt}, {kind: text, path: /abs/b.txt}]\n\
         val_sources: [{kind: text, path: v.txt}]\ncache_dir: cache",
    )
    .unwrap();
    config.resolve_paths(Path::new("/recipes"));
    assert_eq!(config.sources[0].path, PathBuf::from("/recipes/data/a.txt"));
    let mut chat =
        parse("teacher_samples: {num_sequences: 1, chat: true, prompts_file: p/s.txt}").unwrap();
    chat.resolve_paths(Path::new("/recipes"));
    let samples = chat.teacher_samples.unwrap();
    assert_eq!(
        samples.prompts_file,
        Some(PathBuf::from("/recipes/p/s.txt"))
    );
    assert_eq!(config.sources[1].path, PathBuf::from("/abs/b.txt"));
    assert_eq!(config.val_sources[0].path, PathBuf::from("/recipes/v.txt"));
    assert_eq!(config.cache_dir, Some(PathBuf::from("/recipes/cache")));
}
