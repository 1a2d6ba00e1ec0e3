//! Model source resolution: local directories, hub id syntax, the HF cache layout offline, a
//! download from a fake hub on localhost, and an unreachable hub.
use linearize_models::source::{
    cached_snapshot, resolve_config_with, resolve_with, HubId, HubSettings, ModelSource,
};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod fake_hub;

use fake_hub::{FakeHub, Tamper, COMMIT};

fn settings(cache_dir: &Path, endpoint: &str, offline: bool) -> HubSettings {
    HubSettings {
        cache_dir: cache_dir.to_path_buf(),
        endpoint: endpoint.to_string(),
        token: None,
        offline,
        timeout: Duration::from_secs(5),
    }
}

/// Lays out `models--org--name/{refs/main, snapshots/<commit>/...}` as hf-hub writes it
/// (files as symlinks into blobs/).
fn populate_cache(cache: &Path, repo: &str, files: &[(&str, &str)]) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    fs::create_dir_all(&snapshot).unwrap();
    fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    fs::create_dir_all(repo_dir.join("refs")).unwrap();
    fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    for (i, (name, content)) in files.iter().enumerate() {
        let blob = repo_dir.join("blobs").join(format!("blob{i}"));
        fs::write(&blob, content).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(name)).unwrap();
    }
    snapshot
}

#[test]
fn hub_ids_parse_and_bad_ones_are_rejected() {
    assert_eq!(
        HubId::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
        HubId {
            repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            revision: "main".into()
        }
    );
    assert_eq!(
        HubId::parse("meta-llama/Llama-3.2-1B@v1.0")
            .unwrap()
            .revision,
        "v1.0"
    );
    assert_eq!(
        HubId::parse("org/name@refs/pr/3").unwrap().revision,
        "refs/pr/3"
    );
    for bad in [
        "",
        "a/b/c",
        "name",
        "/name",
        "org/",
        "org/na me",
        "org/-x",
        "org/a--b",
        "org/x@",
        "org/x@a b",
        "org/x.",
        "org/ü",
    ] {
        assert!(HubId::parse(bad).is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn local_directories_and_missing_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    fs::create_dir(&dir).unwrap();
    let got = ModelSource::parse(dir.to_str().unwrap()).unwrap();
    assert_eq!(got, ModelSource::Local(dir.canonicalize().unwrap()));
    let offline = settings(tmp.path(), "http://127.0.0.1:9", true);
    assert_eq!(
        resolve_with(dir.to_str().unwrap(), &offline).unwrap(),
        dir.canonicalize().unwrap()
    );

    for missing in [
        "./no-such-model",
        "/no/such/model",
        "../x",
        "~/models/x",
        "models/x/",
    ] {
        let err = resolve_with(missing, &offline).unwrap_err().to_string();
        assert!(
            err.contains(missing) && err.contains("does not exist"),
            "{err}"
        );
    }
    let file = tmp.path().join("weights.bin");
    fs::write(&file, b"x").unwrap();
    let err = resolve_with(file.to_str().unwrap(), &offline)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a file"), "{err}");
    for bad in ["", "a/b/c"] {
        let err = format!("{:#}", resolve_with(bad, &offline).unwrap_err());
        assert!(err.contains("hub id"), "{bad:?}: {err}");
    }
}

#[test]
fn offline_unknown_model_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        resolve_with(
            "org/unknown-model",
            &settings(tmp.path(), "http://127.0.0.1:9", true)
        )
        .unwrap_err()
    );
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains("org/unknown-model") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    assert!(
        err.contains(tmp.path().to_str().unwrap()),
        "names the cache: {err}"
    );
}

#[test]
fn cached_snapshot_resolves_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let snapshot = populate_cache(
        tmp.path(),
        "org/tiny",
        &[("config.json", "{}"), ("model.safetensors", "w")],
    );
    let offline = settings(tmp.path(), "http://127.0.0.1:9", true);
    assert_eq!(resolve_with("org/tiny", &offline).unwrap(), snapshot);
    // A commit hash names the snapshot directly.
    assert_eq!(
        resolve_with(&format!("org/tiny@{COMMIT}"), &offline).unwrap(),
        snapshot
    );
    let err = format!("{:#}", resolve_with("org/tiny@v2", &offline).unwrap_err());
    assert!(
        err.contains("org/tiny@v2") && err.contains("not in the Hugging Face cache"),
        "{err}"
    );
}

#[test]
fn incomplete_cached_snapshots_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
    populate_cache(
        tmp.path(),
        "org/sharded",
        &[
            ("config.json", "{}"),
            ("model.safetensors.index.json", index),
            ("model-00001-of-00002.safetensors", "1"),
        ],
    );
    let id = HubId::parse("org/sharded").unwrap();
    let err = cached_snapshot(&id, &settings(tmp.path(), "", true))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("incomplete") && err.contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn unreachable_hub_fails_fast_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = format!(
        "{:#}",
        resolve_with(
            "org/tiny",
            &settings(tmp.path(), "http://127.0.0.1:9", false)
        )
        .unwrap_err()
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains("could not reach the Hugging Face hub")
            && err.contains("local model directory"),
        "{err}"
    );
}

#[test]
fn unreachable_hub_falls_back_to_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let snapshot = populate_cache(
        tmp.path(),
        "org/tiny",
        &[("config.json", "{}"), ("model.safetensors", "w")],
    );
    assert_eq!(
        resolve_with(
            "org/tiny",
            &settings(tmp.path(), "http://127.0.0.1:9", false)
        )
        .unwrap(),
        snapshot
    );
}

#[test]
fn settings_follow_the_huggingface_hub_variables() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("token"), "hf_from_file\n").unwrap();
    let home = tmp.path().to_str().unwrap().to_string();
    let vars = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubSettings::from_vars(move |k| map.get(k).cloned())
    };
    let s = vars(&[("HF_HOME", &home)]);
    assert_eq!(s.cache_dir, tmp.path().join("hub"));
    assert_eq!(s.token.as_deref(), Some("hf_from_file"));
    assert_eq!(s.endpoint, "https://huggingface.co");
    assert!(!s.offline);
    assert_eq!(s.timeout, Duration::from_secs(10));

    let s = vars(&[
        ("HF_HOME", &home),
        ("HF_HUB_CACHE", "/elsewhere"),
        ("HF_TOKEN", "hf_env"),
        ("HF_HUB_OFFLINE", "true"),
        ("HF_ENDPOINT", "http://mirror.local/"),
        ("HF_HUB_ETAG_TIMEOUT", "2.5"),
    ]);
    assert_eq!(s.cache_dir, PathBuf::from("/elsewhere"));
    assert_eq!(s.token.as_deref(), Some("hf_env"));
    assert!(s.offline);
    assert_eq!(s.endpoint, "http://mirror.local");
    assert_eq!(s.timeout, Duration::from_millis(2500));

    assert!(!vars(&[("HF_HUB_OFFLINE", "0")]).offline);
    assert_eq!(
        vars(&[("HOME", "/home/u")]).cache_dir,
        PathBuf::from("/home/u/.cache/huggingface/hub")
    );
}

/// Every path under `root`, links not followed.
fn all_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                todo.push(entry.path());
            }
            out.push(entry.path());
        }
    }
    out
}

fn tiny_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("config.json", br#"{"model_type": "llama"}"#.to_vec()),
        ("model.safetensors", vec![7u8; 100]),
    ]
}

/// Headers are never used for paths: a crafted ETag and commit header change nothing, and every
/// file lands inside the cache.
#[test]
fn crafted_etag_and_commit_headers_write_nothing_outside_the_cache() {
    let hub = FakeHub::start_tampered(
        "org/tiny",
        tiny_files(),
        Tamper {
            headers: "etag: \"../../../outside\"\r\nx-linked-etag: \"../../../outside\"\r\nx-repo-commit: ../../../outside\r\n",
            ..Tamper::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let dir = resolve_with("org/tiny", &settings(&cache, &hub.endpoint, false)).unwrap();
    assert_eq!(dir, cache.join("models--org--tiny/snapshots").join(COMMIT));
    assert_eq!(
        fs::read(dir.join("model.safetensors")).unwrap(),
        vec![7u8; 100]
    );
    let top: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(top, vec![cache.clone()], "written beside the cache");
    for path in all_paths(&cache) {
        let real = path.canonicalize().unwrap();
        assert!(
            real.starts_with(cache.canonicalize().unwrap()),
            "{path:?} -> {real:?}"
        );
    }
}

/// A commit that is not a hash, and shard names that leave the snapshot, are refused before
/// anything is written for them.
#[test]
fn crafted_commit_and_shard_names_are_refused() {
    let hub = FakeHub::start_tampered(
        "org/tiny",
        tiny_files(),
        Tamper {
            commit: Some("../../../outside"),
            ..Tamper::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let err = format!(
        "{:#}",
        resolve_with("org/tiny", &settings(&cache, &hub.endpoint, false)).unwrap_err()
    );
    assert!(
        err.contains("40 hex digits") && !err.contains('\n'),
        "{err}"
    );
    assert!(!cache.exists(), "nothing is written for a refused commit");

    let shard = "../../../../outside.safetensors";
    let index = format!(r#"{{"metadata": {{}}, "weight_map": {{"a": "{shard}"}}}}"#);
    let hub = FakeHub::start(
        "org/tiny",
        vec![
            ("config.json", b"{}".to_vec()),
            ("model.safetensors.index.json", index.into_bytes()),
            (shard, vec![1u8; 10]),
        ],
    );
    let err = format!(
        "{:#}",
        resolve_with("org/tiny", &settings(&cache, &hub.endpoint, false)).unwrap_err()
    );
    assert!(
        err.contains("model.safetensors.index.json")
            && err.contains("weight_map")
            && err.contains("leaves its directory"),
        "{err}"
    );
    let top: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(top, vec![cache.clone()], "written beside the cache");
    let requested = hub.requests.lock().unwrap().clone();
    assert!(
        requested.iter().all(|p| !p.contains("outside")),
        "{requested:?}"
    );
}

/// A file whose bytes do not match the hub's listed SHA-256 or size is refused with a one-line
/// error naming it, and neither kept nor linked.
#[test]
fn size_and_checksum_mismatches_are_refused_naming_the_file() {
    for (name, served, why) in [
        ("model.safetensors", vec![8u8; 100], "SHA-256"),
        ("model.safetensors", vec![7u8; 101], "bytes"),
        (
            "config.json",
            b"{\"model_type\": \"llama\"} ".to_vec(),
            "bytes",
        ),
    ] {
        let hub = FakeHub::start_tampered(
            "org/tiny",
            tiny_files(),
            Tamper {
                bodies: vec![(name, served)],
                ..Tamper::default()
            },
        );
        let tmp = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            resolve_with("org/tiny", &settings(tmp.path(), &hub.endpoint, false)).unwrap_err()
        );
        assert!(
            err.contains(name) && err.contains(why) && err.contains("refused"),
            "{name}: {err}"
        );
        assert!(!err.contains('\n'), "{err}");
        let snapshot = tmp.path().join("models--org--tiny/snapshots").join(COMMIT);
        assert!(!snapshot.join(name).exists(), "{name} was linked");
        let blobs = tmp.path().join("models--org--tiny/blobs");
        for blob in all_paths(&blobs) {
            let content = fs::read(&blob).unwrap();
            assert!(
                tiny_files().iter().any(|(_, c)| *c == content),
                "a refused download was kept: {blob:?}"
            );
        }
    }
}

#[test]
fn downloads_a_sharded_model_into_the_cache_and_then_works_offline() {
    let index = br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;
    let hub = FakeHub::start(
        "org/tiny",
        vec![
            ("config.json", br#"{"model_type": "llama"}"#.to_vec()),
            ("tokenizer.json", b"{}".to_vec()),
            ("model.safetensors.index.json", index.to_vec()),
            ("model-00001-of-00002.safetensors", vec![1u8; 300]),
            ("model-00002-of-00002.safetensors", vec![2u8; 200]),
            ("pytorch_model.bin", vec![9u8; 10]),
            ("README.md", b"# tiny".to_vec()),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let online = settings(tmp.path(), &hub.endpoint, false);
    let dir = resolve_with("org/tiny", &online).unwrap();
    assert_eq!(
        dir,
        tmp.path().join("models--org--tiny/snapshots").join(COMMIT)
    );
    assert_eq!(
        fs::read(dir.join("config.json")).unwrap(),
        br#"{"model_type": "llama"}"#
    );
    assert_eq!(
        fs::read(dir.join("model-00001-of-00002.safetensors")).unwrap(),
        vec![1u8; 300]
    );
    assert_eq!(
        fs::read(dir.join("model-00002-of-00002.safetensors")).unwrap(),
        vec![2u8; 200]
    );
    assert!(dir.join("tokenizer.json").is_file());
    // Only what a model needs is fetched.
    assert!(!dir.join("pytorch_model.bin").exists() && !dir.join("README.md").exists());
    let fetched: Vec<String> = hub.requests.lock().unwrap().clone();
    assert!(
        fetched.iter().all(|p| !p.ends_with("pytorch_model.bin")),
        "{fetched:?}"
    );

    let offline = settings(tmp.path(), "http://127.0.0.1:9", true);
    assert_eq!(resolve_with("org/tiny", &offline).unwrap(), dir);
}

#[test]
fn hub_without_safetensors_or_with_unknown_repo_is_an_error() {
    let hub = FakeHub::start(
        "org/binonly",
        vec![
            ("config.json", b"{}".to_vec()),
            ("pytorch_model.bin", vec![0; 4]),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let online = settings(tmp.path(), &hub.endpoint, false);
    let err = format!("{:#}", resolve_with("org/binonly", &online).unwrap_err());
    assert!(err.contains("no safetensors weights"), "{err}");
    let err = format!("{:#}", resolve_with("org/missing", &online).unwrap_err());
    assert!(
        err.contains("org/missing") && err.contains("not found"),
        "{err}"
    );
}

/// `--dry-run`'s resolution: config.json and the tokenizer come down, no weights; offline the
/// config is found again, while a full resolution sees the snapshot as incomplete.
#[test]
fn config_only_resolution_fetches_no_weights() {
    let index = br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
    let hub = FakeHub::start(
        "org/big",
        vec![
            ("config.json", br#"{"model_type": "llama"}"#.to_vec()),
            ("tokenizer.json", b"{}".to_vec()),
            ("tokenizer_config.json", b"{}".to_vec()),
            ("model.safetensors.index.json", index.to_vec()),
            ("model-00001-of-00002.safetensors", vec![1u8; 300]),
            ("model-00002-of-00002.safetensors", vec![2u8; 200]),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let online = settings(tmp.path(), &hub.endpoint, false);
    let dir = resolve_config_with("org/big", &online).unwrap();
    assert!(dir.join("config.json").is_file() && dir.join("tokenizer.json").is_file());
    let fetched: Vec<String> = hub.requests.lock().unwrap().clone();
    assert!(
        fetched.iter().all(|p| !p.contains("safetensors")),
        "weights requested: {fetched:?}"
    );
    assert!(
        fetched.iter().any(|p| p.ends_with("/config.json")),
        "{fetched:?}"
    );

    let offline = settings(tmp.path(), "http://127.0.0.1:9", true);
    assert_eq!(resolve_config_with("org/big", &offline).unwrap(), dir);
    let e = format!("{:#}", resolve_with("org/big", &offline).unwrap_err());
    assert!(e.contains("incomplete") && e.contains("safetensors"), "{e}");
    // The full resolution then fetches the weights.
    let full = resolve_with("org/big", &online).unwrap();
    assert_eq!(full, dir);
    assert!(full.join("model-00002-of-00002.safetensors").is_file());

    let e = format!(
        "{:#}",
        resolve_config_with("org/other", &offline).unwrap_err()
    );
    assert!(
        e.contains("org/other") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}
