use linearize_train::data::{DataConfig, SampleSettings, TeacherSampleStore};
use std::fs::{self, OpenOptions};
use std::io::Write;

fn settings() -> SampleSettings {
    let config: DataConfig = serde_yaml_ng::from_str(
        "seq_len: 3\nseed: 11\nteacher_samples: {num_sequences: 5, prompts: [a, b], temperature: 0.7}",
    )
    .unwrap();
    SampleSettings::from_config(&config, "smollm2-135m@abc123").unwrap()
}

fn seq(first: u32) -> Vec<u32> {
    (first..first + 4).collect()
}

#[test]
fn settings_follow_the_config() {
    let s = settings();
    assert_eq!(
        (s.seq_len, s.window(), s.num_sequences, s.seed),
        (3, 4, 5, 11)
    );
    assert_eq!((s.temperature, s.top_p), (0.7, 1.0));
    assert_eq!(
        [s.prompt_for(0), s.prompt_for(1), s.prompt_for(2)],
        [Some("a"), Some("b"), Some("a")]
    );
    let from_bos = SampleSettings {
        prompts: vec![],
        ..s
    };
    assert_eq!(from_bos.prompt_for(3), None);
    let no_samples: DataConfig = serde_yaml_ng::from_str("seq_len: 3").unwrap();
    assert!(SampleSettings::from_config(&no_samples, "t").is_none());
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
