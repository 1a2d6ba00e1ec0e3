mod data_common;

use data_common::{decode, ByteEncoder};
use linearize_models::prompt_format::TemplateChoice;
use linearize_train::data::{
    list_files, read_documents, tokenize_source, ModelEncoder, SourceConfig, SourceKind,
    TextEncoder,
};
use std::fs;
use std::path::Path;

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

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn error_of(source: &SourceConfig) -> String {
    format!("{:#}", documents(source).unwrap_err())
}

#[test]
fn text_directory_is_walked_recursively_in_path_order() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("b.txt"), "bee");
    write(&dir.path().join("a/z.txt"), "zed");
    write(&dir.path().join("a/notes.md"), "ignored");
    write(&dir.path().join("c.txt"), "  \n");
    let source = SourceConfig::new(SourceKind::Text, dir.path());
    assert_eq!(
        documents(&source).unwrap(),
        ["zed", "bee"],
        "blank file skipped"
    );
    let explicit = SourceConfig::new(SourceKind::Text, dir.path().join("a/notes.md"));
    assert_eq!(
        documents(&explicit).unwrap(),
        ["ignored"],
        "an explicit file is read whatever its name"
    );
}

#[test]
fn text_separator_splits_files_into_documents() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("book.txt"), "one\n\n\ntwo\n\n\n\n\nthree");
    let mut source = SourceConfig::new(SourceKind::Text, dir.path().join("book.txt"));
    source.separator = Some("\n\n\n".into());
    assert_eq!(documents(&source).unwrap(), ["one", "two", "\n\nthree"]);
}

#[test]
fn manifest_directory_reads_the_chosen_split() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("t1.txt"), "train one");
    write(&dir.path().join("sub/t2.txt"), "train two");
    write(&dir.path().join("v.txt"), "valid");
    write(
        &dir.path().join("manifest.json"),
        r#"{"source": "fetcher", "splits": {"train": ["sub/t2.txt", "t1.txt"], "validation": ["v.txt"]}}"#,
    );
    let mut source = SourceConfig::new(SourceKind::Text, dir.path());
    assert_eq!(documents(&source).unwrap(), ["train two", "train one"]);
    source.split = Some("validation".into());
    assert_eq!(documents(&source).unwrap(), ["valid"]);
    source.split = Some("test".into());
    let err = error_of(&source);
    assert!(
        err.contains("no files in split `test`") && err.contains("train, validation"),
        "{err}"
    );
}

#[test]
fn fetcher_manifest_gives_the_per_document_files_of_a_split() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("docs/sotu/a.txt"), "address a");
    write(&dir.path().join("docs/moby-dick.txt"), "whale");
    write(&dir.path().join("docs/sotu/b.txt"), "address b");
    write(&dir.path().join("train.txt"), "address a\n\nwhale\n");
    write(&dir.path().join("validation.txt"), "address b\n");
    write(
        &dir.path().join("manifest.json"),
        r#"{
  "format_version": 1,
  "splits": {"train": {"file": "train.txt", "documents": 2, "bytes": 17},
             "validation": {"file": "validation.txt", "documents": 1, "bytes": 10}},
  "documents": [
    {"name": "moby-dick", "file": "docs/moby-dick.txt", "split": "train", "bytes": 5},
    {"name": "sotu/a", "file": "docs/sotu/a.txt", "split": "train", "bytes": 9},
    {"name": "sotu/b", "file": "docs/sotu/b.txt", "split": "validation", "bytes": 9}
  ]
}"#,
    );
    let mut source = SourceConfig::new(SourceKind::Text, dir.path());
    assert_eq!(documents(&source).unwrap(), ["whale", "address a"]);
    source.split = Some("validation".into());
    assert_eq!(documents(&source).unwrap(), ["address b"]);

    let without_documents = r#"{"splits": {"train": {"file": "train.txt"}}}"#;
    write(&dir.path().join("manifest.json"), without_documents);
    source.split = None;
    assert_eq!(documents(&source).unwrap(), ["address a\n\nwhale\n"]);
}

/// Links back to an ancestor (twice per level: 2^depth paths without loop detection) and a
/// second link to one directory: every file is listed once, at once.
#[test]
fn symlink_loops_in_a_data_directory_are_walked_once() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.txt"), "one");
    write(&dir.path().join("sub/b.txt"), "two");
    std::os::unix::fs::symlink(dir.path(), dir.path().join("sub/up")).unwrap();
    std::os::unix::fs::symlink("..", dir.path().join("sub/up2")).unwrap();
    std::os::unix::fs::symlink("sub", dir.path().join("again")).unwrap();
    let source = SourceConfig::new(SourceKind::Text, dir.path());
    let started = std::time::Instant::now();
    let files: Vec<_> = list_files(&source)
        .unwrap()
        .into_iter()
        .map(|f| f.path.strip_prefix(dir.path()).unwrap().to_path_buf())
        .collect();
    assert!(
        started.elapsed().as_secs() < 5,
        "took {:?}",
        started.elapsed()
    );
    // `again` sorts before `sub`, so the directory is listed under its first name.
    assert_eq!(files, [Path::new("a.txt"), Path::new("again/b.txt")]);
}

#[test]
fn manifest_paths_outside_the_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("data/t.txt"), "inside");
    write(&dir.path().join("secret.txt"), "outside");
    let source = SourceConfig::new(SourceKind::Text, dir.path().join("data"));
    for entry in [
        "../secret.txt",
        dir.path().join("secret.txt").to_str().unwrap(),
    ] {
        write(
            &dir.path().join("data/manifest.json"),
            &format!(r#"{{"splits": {{"train": ["t.txt", "{entry}"]}}}}"#),
        );
        let err = error_of(&source);
        assert!(
            err.contains("manifest.json") && err.contains(entry) && err.contains("train"),
            "{err}"
        );
    }
}

#[test]
fn missing_paths_and_empty_directories_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = SourceConfig::new(SourceKind::Text, dir.path().join("nope.txt"));
    assert!(error_of(&missing).contains("nope.txt"));
    let empty = SourceConfig::new(SourceKind::Jsonl, dir.path());
    let err = error_of(&empty);
    assert!(err.contains("no *.jsonl files"), "{err}");
    let mut split_without_manifest = SourceConfig::new(SourceKind::Text, dir.path());
    split_without_manifest.split = Some("train".into());
    assert!(error_of(&split_without_manifest).contains("no manifest.json"));
}

#[test]
fn jsonl_reads_the_configured_field_and_skips_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    write(
        &path,
        "{\"text\": \"first\", \"body\": \"b1\"}\n\n{\"text\": \"second\", \"body\": \"b2\"}\n",
    );
    let mut source = SourceConfig::new(SourceKind::Jsonl, &path);
    assert_eq!(documents(&source).unwrap(), ["first", "second"]);
    source.field = Some("body".into());
    assert_eq!(documents(&source).unwrap(), ["b1", "b2"]);
}

#[test]
fn jsonl_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let cases = [
        (
            "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{not json}\n",
            ":3: not valid JSON",
        ),
        (
            "{\"text\": \"ok\"}\n{\"content\": \"x\"}\n",
            ":2: missing string field `text`",
        ),
        (
            "{\"text\": 5}\n",
            ":1: field `text` must be a string, found a number",
        ),
        ("\n[1, 2]\n", ":2: expected a JSON object, found a list"),
    ];
    for (content, expected) in cases {
        write(&path, content);
        let err = error_of(&SourceConfig::new(SourceKind::Jsonl, &path));
        assert!(
            err.contains(&format!("{}{expected}", path.display())),
            "{err}"
        );
    }
}

#[test]
fn alpaca_records_render_as_user_and_assistant_turns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alpaca.jsonl");
    write(
        &path,
        concat!(
            r#"{"instruction": "Add.", "input": "2 and 3", "output": "5"}"#,
            "\n",
            r#"{"instruction": "Greet.", "input": "", "output": "Hi"}"#,
            "\n",
            r#"{"instruction": "Nap.", "output": "Zz"}"#,
            "\n",
        ),
    );
    let docs = documents(&SourceConfig::new(SourceKind::Alpaca, &path)).unwrap();
    assert_eq!(
        docs,
        [
            "<s>[user] Add.\n\n2 and 3\n[assistant] 5\n</s>",
            "<s>[user] Greet.\n[assistant] Hi\n</s>",
            "<s>[user] Nap.\n[assistant] Zz\n</s>",
        ]
    );
    write(&path, "{\"instruction\": \"x\", \"input\": \"y\"}\n");
    let err = error_of(&SourceConfig::new(SourceKind::Alpaca, &path));
    assert!(err.contains(":1: missing string field `output`"), "{err}");
}

#[test]
fn chat_records_render_through_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    write(
        &path,
        concat!(
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#,
            "\n",
        ),
    );
    let docs = documents(&SourceConfig::new(SourceKind::Chat, &path)).unwrap();
    assert_eq!(
        docs,
        ["<s>[system] Be brief.\n[user] Hi\n[assistant] Hello\n</s>"]
    );

    let bad = [
        (
            r#"{"messages": [{"role": "user"}]}"#,
            "missing string field `content`",
        ),
        (r#"{"messages": []}"#, "field `messages` is an empty list"),
        (r#"{"messages": ["hi"]}"#, "`messages[0]` must be an object"),
        (r#"{"conversation": []}"#, "missing field `messages`"),
    ];
    for (line, expected) in bad {
        write(
            &path,
            &format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"ok\"}}]}}\n{line}\n"),
        );
        let err = error_of(&SourceConfig::new(SourceKind::Chat, &path));
        assert!(err.contains(&format!("chat.jsonl:2: {expected}")), "{err}");
    }
}

#[test]
fn tokenised_chat_keeps_template_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    write(
        &path,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n",
    );
    let docs = tokenize_source(
        &SourceConfig::new(SourceKind::Chat, &path),
        &ByteEncoder::new(),
        None,
    )
    .unwrap();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs.doc(0)[0], data_common::BOS);
    assert_eq!(decode(docs.doc(0)), "<s>[user] Hi\n</s>");
}

#[test]
fn a_source_without_documents_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.jsonl");
    write(&path, "\n\n");
    let err = tokenize_source(
        &SourceConfig::new(SourceKind::Jsonl, &path),
        &ByteEncoder::new(),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no non-empty documents"), "{err}");
}

/// A copy of the models crate's ChatML tokenizer fixture, with `tokenizer_config` as its config.
fn tokenizer_dir(tokenizer_config: &str) -> tempfile::TempDir {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../linearize-models/tests/fixtures/tokenizer/chatml/tokenizer.json");
    let dir = tempfile::tempdir().unwrap();
    fs::copy(fixture, dir.path().join("tokenizer.json")).unwrap();
    write(&dir.path().join("tokenizer_config.json"), tokenizer_config);
    dir
}

#[test]
fn alpaca_records_of_a_base_model_take_alpacas_prompt() {
    let base = tokenizer_dir(r#"{"eos_token": "<|im_end|>"}"#);
    let data = tempfile::tempdir().unwrap();
    let path = data.path().join("alpaca.jsonl");
    write(
        &path,
        "{\"instruction\": \"Add.\", \"input\": \"2 and 3\", \"output\": \"5\"}\n",
    );
    let source = SourceConfig::new(SourceKind::Alpaca, &path);
    let render = |encoder: &ModelEncoder| {
        let mut docs = Vec::new();
        read_documents(&path, &source, encoder, |text| {
            docs.push(text.to_owned());
            Ok(())
        })
        .unwrap();
        docs
    };
    let encoder = ModelEncoder::new(base.path(), None).unwrap();
    assert_eq!(
        render(&encoder),
        [
            "Below is an instruction that describes a task, paired with an input that provides \
          further context. Write a response that appropriately completes the request.\n\n\
          ### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5"
        ]
    );
    let err = format!(
        "{:#}",
        ModelEncoder::new(base.path(), Some(&TemplateChoice::Chat))
            .err()
            .unwrap()
    );
    assert!(
        err.contains("data.template: chat") && err.contains("no chat template"),
        "{err}"
    );

    // An instruct tokenizer renders through its chat template unless `alpaca` is asked for; the
    // token cache tells the two apart.
    let instruct = tokenizer_dir(
        r#"{"eos_token": "<|im_end|>", "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"}"#,
    );
    let chat = ModelEncoder::new(instruct.path(), None).unwrap();
    assert_eq!(render(&chat), ["<user>Add.\n\n2 and 3<assistant>5"]);
    let alpaca = ModelEncoder::new(instruct.path(), Some(&TemplateChoice::Alpaca)).unwrap();
    assert_eq!(render(&alpaca), render(&encoder));
    assert_ne!(chat.identity(), alpaca.identity());
}
