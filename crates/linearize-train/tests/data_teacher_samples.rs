mod data_common;

use data_common::ByteEncoder;
use linearize_models::prompt_format::read_prompts_file;
use linearize_models::tokenizer::Tokenizer;
use linearize_train::data::{build_datasets, DataConfig, SampleSettings, TeacherSampleStore};
use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A directory with the ChatML test tokenizer (SmolLM2's template) of linearize-models, or with
/// `tokenizer_config` instead of its config.
fn tokenizer_dir(tokenizer_config: Option<&str>) -> tempfile::TempDir {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../linearize-models/tests/fixtures/tokenizer/chatml");
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        fs::copy(fixture.join(file), dir.path().join(file)).unwrap();
    }
    if let Some(config) = tokenizer_config {
        fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
    }
    dir
}

fn chatml() -> Tokenizer {
    Tokenizer::from_dir(tokenizer_dir(None).path()).unwrap()
}

fn config(yaml_samples: &str) -> DataConfig {
    let config: DataConfig = serde_yaml_ng::from_str(&format!(
        "seq_len: 3\nseed: 11\nteacher_samples: {yaml_samples}"
    ))
    .unwrap();
    config.validate().unwrap();
    config
}

fn settings() -> SampleSettings {
    let config = config("{num_sequences: 5, prompts: [a, b], temperature: 0.7}");
    SampleSettings::from_config(&config, "smollm2-135m@abc123", &chatml())
        .unwrap()
        .unwrap()
}

fn seq(first: u32) -> Vec<u32> {
    (first..first + 4).collect()
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

#[test]
fn settings_follow_the_config() {
    let s = settings();
    assert_eq!(
        (s.seq_len, s.window(), s.num_sequences, s.seed),
        (3, 4, 5, 11)
    );
    assert_eq!((s.temperature, s.top_p), (0.7, 1.0));
    assert_eq!(s.chat_template, None);
    // Sequences open with the prompts in turn; later conversations take hashed picks that are
    // the same every time and cover the prompts.
    assert_eq!(
        [0, 1, 2].map(|i| s.prompt_index(i, 0)),
        [Some(0), Some(1), Some(0)]
    );
    let later: Vec<usize> = (0..64)
        .map(|i| s.prompt_index(i, 1 + i % 3).unwrap())
        .collect();
    assert_eq!(
        later,
        (0..64)
            .map(|i| s.prompt_index(i, 1 + i % 3).unwrap())
            .collect::<Vec<_>>()
    );
    assert!(later.contains(&0) && later.contains(&1), "{later:?}");
    let from_bos = SampleSettings {
        prompts: vec![],
        ..s
    };
    assert_eq!(from_bos.prompt_index(3, 0), None);
    let no_samples: DataConfig = serde_yaml_ng::from_str("seq_len: 3").unwrap();
    assert!(SampleSettings::from_config(&no_samples, "t", &chatml())
        .unwrap()
        .is_none());
}

#[test]
fn chat_samples_record_the_template_and_need_one() {
    let chat = config("{num_sequences: 2, prompts: [Hi], chat: true}");
    let s = SampleSettings::from_config(&chat, "teacher-a", &chatml())
        .unwrap()
        .unwrap();
    let template = s.chat_template.as_deref().unwrap();
    assert!(template.contains("<|im_start|>"), "{template}");

    let base = tokenizer_dir(Some(
        r#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}"#,
    ));
    let base = Tokenizer::from_dir(base.path()).unwrap();
    let err = SampleSettings::from_config(&chat, "/models/base-lm (Float)", &base)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "data.teacher_samples.chat: the teacher /models/base-lm (Float) has no chat template"
        ),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");

    // A store of chat samples is not continued as plain samples, nor the other way round.
    let dir = tempfile::tempdir().unwrap();
    let mut store = TeacherSampleStore::open(dir.path(), s.clone()).unwrap();
    store.append(&seq(0)).unwrap();
    drop(store);
    let plain = SampleSettings {
        chat_template: None,
        ..s
    };
    let err = TeacherSampleStore::open(dir.path(), plain)
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat_template"), "{err}");
}

#[test]
fn plain_settings_read_stores_written_before_chat_existed() {
    // A header as the build before `chat` wrote it: no chat_template key.
    let dir = tempfile::tempdir().unwrap();
    let header = serde_json::json!({"format": 1, "settings": {
        "teacher": "smollm2-135m@abc123", "seq_len": 3, "next_token_targets": true,
        "num_sequences": 5, "prompts": ["a", "b"], "temperature": 0.7, "top_p": 1.0, "seed": 11}});
    fs::write(dir.path().join("samples.json"), header.to_string()).unwrap();
    fs::write(dir.path().join("samples.u32"), [0u8; 32]).unwrap();
    let store = TeacherSampleStore::open(dir.path(), settings()).unwrap();
    assert_eq!(store.len(), 2);
}

#[test]
fn prompts_come_from_a_prompts_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seeds.txt");
    fs::write(
        &path,
        "# seeds\nName a color.\n\n  Why is the sky blue?  \n",
    )
    .unwrap();
    let yaml = format!(
        "{{num_sequences: 2, chat: true, prompts_file: {}}}",
        path.display()
    );
    let s = SampleSettings::from_config(&config(&yaml), "t", &chatml())
        .unwrap()
        .unwrap();
    assert_eq!(s.prompts, ["Name a color.", "Why is the sky blue?"]);

    fs::write(&path, "# nothing but comments\n\n").unwrap();
    let err = SampleSettings::from_config(&config(&yaml), "t", &chatml())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("data.teacher_samples.prompts_file:") && err.contains("no prompts"),
        "{err}"
    );
    fs::remove_file(&path).unwrap();
    let err = format!(
        "{:#}",
        SampleSettings::from_config(&config(&yaml), "t", &chatml()).unwrap_err()
    );
    assert!(
        err.starts_with("data.teacher_samples.prompts_file:") && err.contains("seeds.txt"),
        "{err}"
    );
}

#[test]
fn the_shipped_chat_seeds_are_many_distinct_and_none_is_an_evaluation_prompt() {
    let seeds = read_prompts_file(&repo_file("data/prompts/chat_seeds.txt")).unwrap();
    let evaluation = read_prompts_file(&repo_file("data/prompts/chat_facts.txt")).unwrap();
    // Compared without case, punctuation and spacing, and as substrings both ways, so that a
    // reworded copy ("What's the capital of France" in a longer instruction) is caught too.
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_alphanumeric() || c.is_whitespace())
            .collect::<String>()
            .to_lowercase()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(seeds.len() >= 200, "{} seeds", seeds.len());
    let distinct: HashSet<String> = seeds.iter().map(|s| norm(s)).collect();
    assert_eq!(distinct.len(), seeds.len(), "a seed is repeated");
    for question in &evaluation {
        let q = norm(question);
        // The evaluation question without its question word: "capital of france".
        let fact = q.split_once(" is ").map_or(q.as_str(), |(_, rest)| rest);
        for seed in &distinct {
            assert!(
                !seed.contains(&q) && !q.contains(seed.as_str()) && !seed.contains(fact),
                "seed {seed:?} overlaps the evaluation prompt {question:?}"
            );
        }
    }
}

#[test]
fn weight_repeats_or_thins_the_stored_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let ten = SampleSettings {
        num_sequences: 10,
        ..settings()
    };
    let mut store = TeacherSampleStore::open(dir.path(), ten).unwrap();
    let stored: Vec<Vec<u32>> = (0..10).map(|i| seq(10 * i)).collect();
    store.append(&stored.concat()).unwrap();
    let count = |weight: f64| -> Vec<usize> {
        let packed = store.read_weighted(weight).unwrap();
        stored
            .iter()
            .map(|s| {
                (0..packed.len())
                    .filter(|&i| packed.sequence(i) == s.as_slice())
                    .count()
            })
            .collect()
    };
    assert_eq!(store.read_weighted(1.0).unwrap(), store.read().unwrap());
    assert_eq!(count(2.0), [2; 10]);
    let half = count(0.5);
    assert_eq!(half.iter().sum::<usize>(), 5);
    assert!(half.iter().all(|&c| c <= 1));
    let more = count(1.5);
    assert_eq!(more.iter().sum::<usize>(), 15);
    assert!(more.iter().all(|&c| c == 1 || c == 2));
    // Which ones: fixed by the seed.
    assert_eq!(half, count(0.5));
    assert!(store.read_weighted(0.0).is_err());
}

#[test]
fn weighted_samples_take_their_share_of_the_mixed_training_data() {
    // 40 corpus sequences of 3 tokens (+1 target) and 10 stored samples at weight 4: 40 of the
    // 80 training sequences are samples, half the tokens.
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    fs::write(&text, "x".repeat(40 * 3)).unwrap();
    let data: DataConfig = serde_yaml_ng::from_str(&format!(
        "sources: [{{kind: text, path: {}}}]\nseq_len: 3\nbos: never\nseed: 11\n\
         teacher_samples: {{num_sequences: 10, prompts: [a, b], temperature: 0.7, weight: 4}}",
        text.display()
    ))
    .unwrap();
    let mut datasets = build_datasets(&data, &ByteEncoder::new()).unwrap();
    let corpus = datasets.train.len();
    assert_eq!(corpus, 40);
    let s = SampleSettings::from_config(&data, "smollm2-135m@abc123", &chatml())
        .unwrap()
        .unwrap();
    assert_eq!(
        s,
        SampleSettings {
            num_sequences: 10,
            ..settings()
        }
    );
    let mut store = TeacherSampleStore::open(&dir.path().join("samples"), s).unwrap();
    store
        .append(&(0..10).flat_map(|i| seq(1000 + 10 * i)).collect::<Vec<_>>())
        .unwrap();
    let weight = data.teacher_samples.as_ref().unwrap().weight.unwrap();
    datasets
        .train
        .append(&store.read_weighted(weight).unwrap())
        .unwrap();
    let from_samples = (0..datasets.train.len())
        .filter(|&i| datasets.train.sequence(i)[0] >= 1000)
        .count();
    assert_eq!((from_samples, datasets.train.len()), (40, 80));
    // A fractional weight rounds its share: 0.25 x 10 = 2.5 -> 3 of the ten.
    assert_eq!(store.read_weighted(0.25).unwrap().len(), 3);
}

#[test]
fn a_reopened_store_keeps_its_sequences_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = TeacherSampleStore::open(dir.path(), settings()).unwrap();
    assert_eq!((store.len(), store.remaining()), (0, 5));
    store.append(&[seq(0), seq(10)].concat()).unwrap();
    store.append(&seq(20)).unwrap();
    drop(store);

    let mut store = TeacherSampleStore::open(dir.path(), settings()).unwrap();
    assert_eq!((store.len(), store.remaining()), (3, 2));
    store.append(&[seq(30), seq(40)].concat()).unwrap();
    assert!(store.is_complete());
    let packed = store.read().unwrap();
    assert_eq!(packed.len(), 5);
    assert_eq!(packed.seq_len(), 3);
    assert_eq!(
        packed.tokens(),
        [seq(0), seq(10), seq(20), seq(30), seq(40)].concat()
    );

    let header: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.path().join("samples.json")).unwrap())
            .unwrap();
    assert_eq!(header["settings"]["teacher"], "smollm2-135m@abc123");
    assert_eq!(header["settings"]["temperature"], 0.7);
}

#[test]
fn a_partial_record_from_a_crash_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = TeacherSampleStore::open(dir.path(), settings()).unwrap();
    store.append(&seq(0)).unwrap();
    drop(store);
    let mut data = OpenOptions::new()
        .append(true)
        .open(dir.path().join("samples.u32"))
        .unwrap();
    data.write_all(&[1, 0, 0, 0, 2, 0]).unwrap();
    drop(data);

    let mut store = TeacherSampleStore::open(dir.path(), settings()).unwrap();
    assert_eq!(store.len(), 1);
    assert_eq!(
        fs::metadata(dir.path().join("samples.u32")).unwrap().len(),
        16
    );
    store.append(&seq(7)).unwrap();
    assert_eq!(store.read().unwrap().tokens(), [seq(0), seq(7)].concat());
}

#[test]
fn other_settings_are_refused_but_the_count_may_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = TeacherSampleStore::open(dir.path(), settings()).unwrap();
    store.append(&[seq(0), seq(1), seq(2)].concat()).unwrap();
    drop(store);

    let hotter = SampleSettings {
        temperature: 1.0,
        ..settings()
    };
    let err = TeacherSampleStore::open(dir.path(), hotter)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("samples.json") && err.contains("temperature: 0.7 stored vs 1.0 wanted"),
        "{err}"
    );
    let other_teacher = SampleSettings {
        teacher: "llama".into(),
        ..settings()
    };
    assert!(TeacherSampleStore::open(dir.path(), other_teacher)
        .unwrap_err()
        .to_string()
        .contains("teacher"));

    let fewer = SampleSettings {
        num_sequences: 2,
        ..settings()
    };
    let store = TeacherSampleStore::open(dir.path(), fewer).unwrap();
    assert_eq!((store.len(), store.remaining()), (3, 0));
    assert_eq!(
        store.read().unwrap().len(),
        2,
        "only the wanted count is served"
    );
    drop(store);
    let more = SampleSettings {
        num_sequences: 10,
        ..settings()
    };
    assert_eq!(
        TeacherSampleStore::open(dir.path(), more)
            .unwrap()
            .remaining(),
        7
    );
}

#[test]
fn appends_must_be_whole_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = TeacherSampleStore::open(dir.path(), settings()).unwrap();
    let err = store.append(&[1, 2, 3]).unwrap_err().to_string();
    assert!(err.contains("whole sequences of 4"), "{err}");
    assert!(store.append(&[]).is_err());
    assert!(store.is_empty());
}

#[test]
fn data_without_a_header_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("samples.u32"), [0u8; 32]).unwrap();
    let store = TeacherSampleStore::open(dir.path(), settings()).unwrap();
    assert_eq!(store.len(), 0);
    assert!(dir.path().join("samples.json").exists());
}
