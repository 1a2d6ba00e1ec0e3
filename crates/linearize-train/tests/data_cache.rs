mod data_common;

use data_common::ByteEncoder;
use linearize_train::data::{list_files, tokenize_source, SourceConfig, SourceKind, TokenCache};
use std::fs::{self, File};
use std::path::Path;
use std::time::{Duration, SystemTime};

struct Setup {
    _root: tempfile::TempDir,
    corpus: std::path::PathBuf,
    cache: TokenCache,
    cache_dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let corpus = root.path().join("corpus");
    fs::create_dir_all(&corpus).unwrap();
    fs::write(corpus.join("a.txt"), "first document").unwrap();
    fs::write(corpus.join("b.txt"), "second document").unwrap();
    let cache_dir = root.path().join("cache");
    let cache = TokenCache::new(&cache_dir).unwrap();
    Setup {
        corpus,
        cache,
        cache_dir,
        _root: root,
    }
}

/// Tokenises through the cache and says whether the encoder ran (a miss).
fn missed(source: &SourceConfig, encoder: &ByteEncoder, cache: &TokenCache) -> bool {
    let before = encoder.encode_calls.get();
    let cached = tokenize_source(source, encoder, Some(cache)).unwrap();
    let fresh = tokenize_source(source, &ByteEncoder::new(), None).unwrap();
    assert_eq!(cached, fresh, "cached ids equal freshly tokenised ones");
    encoder.encode_calls.get() > before
}

fn cache_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn second_run_hits_the_cache() {
    let s = setup();
    let source = SourceConfig::new(SourceKind::Text, &s.corpus);
    let encoder = ByteEncoder::new();
    assert!(missed(&source, &encoder, &s.cache));
    assert_eq!(encoder.encode_calls.get(), 2);
    assert!(!missed(&source, &encoder, &s.cache));
    let files = cache_files(&s.cache_dir);
    assert_eq!(files.len(), 1, "one entry and no temporary file: {files:?}");
    assert!(files[0].starts_with("tokens-") && files[0].ends_with(".bin"));
}

#[test]
fn changed_files_tokenizer_or_options_miss() {
    let s = setup();
    let mut source = SourceConfig::new(SourceKind::Text, &s.corpus);
    let encoder = ByteEncoder::new();
    assert!(missed(&source, &encoder, &s.cache));

    fs::write(s.corpus.join("a.txt"), "first document, edited").unwrap();
    assert!(missed(&source, &encoder, &s.cache), "size change");
    assert!(!missed(&source, &encoder, &s.cache));

    fs::write(s.corpus.join("a.txt"), "FIRST document, edited").unwrap();
    let later = SystemTime::now() + Duration::from_secs(5);
    File::options()
        .write(true)
        .open(s.corpus.join("a.txt"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert!(missed(&source, &encoder, &s.cache), "same size, new mtime");

    fs::write(s.corpus.join("c.txt"), "third").unwrap();
    assert!(missed(&source, &encoder, &s.cache), "file added");

    let other_tokenizer = ByteEncoder {
        identity: "bytes-v2".into(),
        ..ByteEncoder::new()
    };
    assert!(
        missed(&source, &other_tokenizer, &s.cache),
        "tokenizer changed"
    );

    source.separator = Some("\n".into());
    assert!(
        missed(&source, &encoder, &s.cache),
        "document split changed"
    );
    assert!(!missed(&source, &encoder, &s.cache));
}

#[test]
fn keys_depend_on_what_the_ids_depend_on() {
    let s = setup();
    let source = SourceConfig::new(SourceKind::Text, &s.corpus);
    let files = list_files(&source).unwrap();
    let key = TokenCache::key(&source, &files, "tok");
    assert_eq!(key, TokenCache::key(&source, &files, "tok"));
    assert_ne!(key, TokenCache::key(&source, &files, "tok2"));
    assert_ne!(key, TokenCache::key(&source, &files[..1], "tok"));
    let as_jsonl = SourceConfig::new(SourceKind::Jsonl, &s.corpus);
    assert_ne!(key, TokenCache::key(&as_jsonl, &files, "tok"));
}

#[test]
fn a_damaged_entry_is_rebuilt() {
    let s = setup();
    let source = SourceConfig::new(SourceKind::Text, &s.corpus);
    let encoder = ByteEncoder::new();
    assert!(missed(&source, &encoder, &s.cache));
    let key = TokenCache::key(&source, &list_files(&source).unwrap(), &encoder.identity);
    let entry = s.cache.path(&key);

    let mut bytes = fs::read(&entry).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&entry, &bytes).unwrap();
    assert!(
        s.cache.load(&key).is_none(),
        "checksum catches a flipped bit"
    );
    assert!(missed(&source, &encoder, &s.cache));
    assert!(s.cache.load(&key).is_some(), "rewritten");

    let bytes = fs::read(&entry).unwrap();
    fs::write(&entry, &bytes[..bytes.len() - 3]).unwrap();
    assert!(s.cache.load(&key).is_none(), "truncation caught");
    fs::write(&entry, b"garbage").unwrap();
    assert!(s.cache.load(&key).is_none());
    assert!(missed(&source, &encoder, &s.cache));
}
