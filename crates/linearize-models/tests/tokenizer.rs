//! The tokenizer against transformers' AutoTokenizer on the fixture directories made by
//! scripts/make_tokenizer_fixtures.py (encodings, decodings, special ids, chat renderings).
use linearize_models::chat_template::ChatMessage;
use linearize_models::prompt_format::{PromptFormat, TemplateChoice};
use linearize_models::tokenizer::Tokenizer;
use serde::Deserialize;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Expected {
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    vocab_size: usize,
    cases: Vec<Case>,
    chats: Vec<Chat>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids_with_special: Vec<u32>,
    ids: Vec<u32>,
    decoded_with_special: String,
    decoded_skip_special: String,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
}

const VARIANTS: [&str; 3] = ["chatml", "llama3", "bosflag"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name)
}

fn load(name: &str) -> (Tokenizer, Expected) {
    let dir = fixture(name);
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let expected =
        serde_json::from_str(&fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (tokenizer, expected)
}

/// A copy of a fixture directory whose files a test may change.
fn scratch_copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    tmp
}

#[test]
fn special_ids_match_transformers() {
    for name in VARIANTS {
        let (tok, exp) = load(name);
        assert_eq!(tok.bos_id(), exp.bos_id, "{name}: bos");
        assert_eq!(tok.eos_ids(), exp.eos_ids.as_slice(), "{name}: eos ids");
        assert_eq!(tok.vocab_size(), exp.vocab_size, "{name}: vocab size");
    }
}

#[test]
fn encode_and_decode_match_transformers() {
    for name in VARIANTS {
        let (tok, exp) = load(name);
        for case in &exp.cases {
            let text = &case.text;
            assert_eq!(
                tok.encode(text, true).unwrap(),
                case.ids_with_special,
                "{name}: {text:?} with special"
            );
            assert_eq!(
                tok.encode(text, false).unwrap(),
                case.ids,
                "{name}: {text:?}"
            );
            assert_eq!(
                tok.decode(&case.ids_with_special, false).unwrap(),
                case.decoded_with_special,
                "{name}: decode {text:?}"
            );
            assert_eq!(
                tok.decode(&case.ids_with_special, true).unwrap(),
                case.decoded_skip_special,
                "{name}: decode {text:?} skipping special tokens"
            );
        }
    }
}

#[test]
fn bos_is_added_by_post_processor_or_add_bos_token() {
    // llama3 adds BOS through tokenizer.json, bosflag through add_bos_token, chatml not at all.
    for (name, adds) in [("llama3", true), ("bosflag", true), ("chatml", false)] {
        let (tok, _) = load(name);
        let ids = tok.encode("Hello", true).unwrap();
        assert_eq!(ids[0] == tok.bos_id().unwrap(), adds, "{name}: {ids:?}");
    }
}

#[test]
fn chat_rendering_and_ids_match_transformers() {
    for name in VARIANTS {
        let (tok, exp) = load(name);
        assert!(tok.has_chat_template(), "{name}");
        for chat in &exp.chats {
            let rendered = tok
                .apply_chat_template(&chat.messages, chat.add_generation_prompt)
                .unwrap();
            assert_eq!(rendered, chat.rendered, "{name}");
            let ids = tok
                .encode_chat(&chat.messages, chat.add_generation_prompt)
                .unwrap();
            assert_eq!(ids, chat.ids, "{name}: chat ids");
        }
    }
}

#[test]
fn rendered_chat_with_bos_in_template_has_one_bos() {
    let (tok, _) = load("llama3");
    let bos = tok.bos_id().unwrap();
    let ids = tok.encode_chat(&[ChatMessage::user("Hi")], true).unwrap();
    assert_eq!(ids[0], bos);
    assert_eq!(ids.iter().filter(|&&id| id == bos).count(), 1, "{ids:?}");
}

#[test]
fn streaming_decode_reassembles_multibyte_text() {
    for name in ["chatml", "bosflag"] {
        let (tok, exp) = load(name);
        let mut held_back = 0;
        for case in &exp.cases {
            let mut stream = tok.text_stream(false);
            let mut text = String::new();
            for &id in &case.ids_with_special {
                match stream.step(id).unwrap() {
                    Some(piece) => text.push_str(&piece),
                    None => held_back += 1,
                }
            }
            text.push_str(&stream.finish().unwrap());
            assert_eq!(text, case.decoded_with_special, "{name}: {:?}", case.text);
        }
        // The emoji and CJK cases split characters across tokens.
        assert!(held_back > 0, "{name}: no token ended inside a character");
    }
}

#[test]
fn finish_flushes_an_incomplete_character() {
    let (tok, _) = load("chatml");
    let ids = tok.encode("🦀", false).unwrap();
    assert!(ids.len() > 1, "the crab must span several tokens: {ids:?}");
    let mut stream = tok.text_stream(false);
    for &id in &ids[..ids.len() - 1] {
        assert_eq!(stream.step(id).unwrap(), None);
    }
    let rest = stream.finish().unwrap();
    assert!(rest.ends_with(char::REPLACEMENT_CHARACTER), "{rest:?}");
}

#[test]
fn missing_or_invalid_tokenizer_json_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not found"),
        "{err}"
    );
    fs::write(tmp.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let err = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not a valid"),
        "{err}"
    );
}

#[test]
fn bad_tokenizer_config_is_named() {
    let tmp = scratch_copy("chatml");
    fs::write(
        tmp.path().join("tokenizer_config.json"),
        "{\"bos_token\": 5}",
    )
    .unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(tmp.path()).err().unwrap());
    assert!(
        err.contains("tokenizer_config.json") && err.contains("bos_token"),
        "{err}"
    );
    fs::write(tmp.path().join("tokenizer_config.json"), "{not json").unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(tmp.path()).err().unwrap());
    assert!(
        err.contains("parsing") && err.contains("tokenizer_config.json"),
        "{err}"
    );
}

#[test]
fn chat_template_sources_and_their_errors() {
    let tmp = scratch_copy("chatml");
    fs::write(
        tmp.path().join("tokenizer_config.json"),
        "{\"eos_token\": \"<|im_end|>\"}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(tmp.path()).unwrap();
    assert!(!tok.has_chat_template());
    let err = tok
        .apply_chat_template(&[ChatMessage::user("x")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");

    let named = r#"{"chat_template": [{"name": "tool_use", "template": "a"}, {"name": "rag", "template": "b"}]}"#;
    fs::write(tmp.path().join("tokenizer_config.json"), named).unwrap();
    let tok = Tokenizer::from_dir(tmp.path()).unwrap();
    let err = tok
        .apply_chat_template(&[ChatMessage::user("x")], true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tool_use, rag") && err.contains("default"),
        "{err}"
    );

    // chat_template.jinja wins over the config's template.
    fs::write(
        tmp.path().join("chat_template.jinja"),
        "{{ messages[0].content | upper }}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::user("x")], true)
            .unwrap(),
        "X"
    );

    fs::write(tmp.path().join("chat_template.jinja"), "{% if %}").unwrap();
    let tok = Tokenizer::from_dir(tmp.path()).unwrap();
    let err = format!(
        "{:#}",
        tok.apply_chat_template(&[ChatMessage::user("x")], true)
            .unwrap_err()
    );
    assert!(
        err.contains("chat_template.jinja") && err.contains("invalid chat template"),
        "{err}"
    );
}

#[test]
fn generation_config_eos_list_and_single_id() {
    let tmp = scratch_copy("chatml");
    fs::write(
        tmp.path().join("generation_config.json"),
        "{\"eos_token_id\": [0, 2]}",
    )
    .unwrap();
    assert_eq!(Tokenizer::from_dir(tmp.path()).unwrap().eos_ids(), &[0, 2]);
    fs::write(
        tmp.path().join("generation_config.json"),
        "{\"eos_token_id\": 0}",
    )
    .unwrap();
    // The tokenizer's own eos (<|im_end|> = 2) is a stop id too.
    assert_eq!(Tokenizer::from_dir(tmp.path()).unwrap().eos_ids(), &[0, 2]);
    fs::write(
        tmp.path().join("generation_config.json"),
        "{\"eos_token_id\": \"x\"}",
    )
    .unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(tmp.path()).err().unwrap());
    assert!(err.contains("generation_config.json"), "{err}");
}

#[test]
fn looping_and_exploding_chat_templates_stop_within_seconds_naming_the_file() {
    let tmp = scratch_copy("chatml");
    let render = |template: &str| {
        fs::write(tmp.path().join("chat_template.jinja"), template).unwrap();
        let tok = Tokenizer::from_dir(tmp.path()).unwrap();
        let started = std::time::Instant::now();
        let err = format!(
            "{:#}",
            tok.apply_chat_template(&[ChatMessage::user("x")], true)
                .unwrap_err()
        );
        let took = started.elapsed();
        assert!(
            took.as_secs() < 10,
            "{template}: an error only after {took:?}"
        );
        assert!(err.contains("chat_template.jinja"), "{err}");
        err
    };
    // Few instructions, each writing 100 kB: 10 MB of output for a 1-byte message.
    let err = render("{% for a in range(100) %}{{ 'x' * 100000 }}{% endfor %}");
    assert!(err.contains("output passed"), "{err}");
    // 10^15 iterations: without a limit this runs for days.
    let err = render(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}\
         {% endfor %}{% endfor %}{% endfor %}",
    );
    assert!(err.contains("instructions"), "{err}");
}

/// The Alpaca prompt as alpaca-lora's `templates/alpaca.json` writes it.
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5";
const ALPACA_WITHOUT_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n";

#[test]
fn without_a_chat_template_prompts_take_the_alpaca_format() {
    let tmp = scratch_copy("chatml");
    fs::write(
        tmp.path().join("tokenizer_config.json"),
        "{\"bos_token\": \"<|im_start|>\", \"eos_token\": \"<|im_end|>\"}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(tok.prompt_format(), PromptFormat::Alpaca);
    assert!(
        tok.describe_prompt_format().starts_with("alpaca"),
        "{}",
        tok.describe_prompt_format()
    );
    assert_eq!(
        tok.render_instruction("Add the numbers.", "2 and 3", Some("5"))
            .unwrap(),
        ALPACA_WITH_INPUT
    );
    assert_eq!(
        tok.render_instruction("Say hi.", " ", None).unwrap(),
        ALPACA_WITHOUT_INPUT
    );
    // A chat turn (generate --chat, eval generations) takes the same prompt, and is encoded as
    // plain text: with the BOS the tokenizer adds.
    let user = [ChatMessage::user("Say hi.")];
    assert_eq!(
        tok.render_conversation(&user, true).unwrap(),
        ALPACA_WITHOUT_INPUT
    );
    assert_eq!(
        tok.encode_chat(&user, true).unwrap(),
        tok.encode(ALPACA_WITHOUT_INPUT, true).unwrap()
    );
    let err = tok
        .render_conversation(&[ChatMessage::system("s"), ChatMessage::user("q")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[system, user]"), "{err}");
    let err = format!(
        "{:#}",
        tok.with_template(&TemplateChoice::Chat).err().unwrap()
    );
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn an_explicit_template_overrides_the_tokenizers() {
    let (tok, _) = load("chatml");
    assert_eq!(tok.prompt_format(), PromptFormat::ChatTemplate);
    let chat = tok
        .render_instruction("Add the numbers.", "2 and 3", Some("5"))
        .unwrap();
    assert!(
        chat.contains("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>"),
        "{chat}"
    );
    let tok = tok.with_template(&TemplateChoice::Alpaca).unwrap();
    assert_eq!(
        tok.render_instruction("Add the numbers.", "2 and 3", Some("5"))
            .unwrap(),
        ALPACA_WITH_INPUT
    );

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain.jinja");
    fs::write(
        &file,
        "{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}",
    )
    .unwrap();
    let (tok, _) = load("chatml");
    let tok = tok
        .with_template(&TemplateChoice::File(file.clone()))
        .unwrap();
    assert_eq!(
        tok.render_instruction("Say hi.", "", Some("hi")).unwrap(),
        "USER: Say hi.\nASSISTANT: hi\n"
    );
    assert!(tok
        .describe_prompt_format()
        .contains(&file.display().to_string()));
    fs::write(&file, "{% for m in messages %}").unwrap();
    let (tok, _) = load("chatml");
    let err = format!(
        "{:#}",
        tok.with_template(&TemplateChoice::File(file.clone()))
            .err()
            .unwrap()
    );
    assert!(
        err.contains("plain.jinja") && err.contains("invalid chat template"),
        "{err}"
    );
}
