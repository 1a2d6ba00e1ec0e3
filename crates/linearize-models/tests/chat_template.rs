//! Real-world chat templates rendered byte-exact as transformers renders them (fixtures made by
//! scripts/make_chat_fixtures.py).
use linearize_models::chat_template::{ChatMessage, ChatTemplate};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Deserialize)]
struct Fixture {
    name: String,
    template: String,
    special_tokens: BTreeMap<String, String>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    expected: Option<String>,
    error: Option<String>,
}

#[test]
fn templates_render_like_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let fixture: Fixture =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        let template = ChatTemplate::new(&fixture.template).unwrap();
        for (i, case) in fixture.cases.iter().enumerate() {
            let got = template.render(
                &case.messages,
                case.add_generation_prompt,
                &fixture.special_tokens,
            );
            match (&case.expected, &case.error) {
                (Some(expected), None) => {
                    assert_eq!(&got.unwrap(), expected, "{} case {i}", fixture.name)
                }
                (None, Some(error)) => {
                    let err = format!("{:#}", got.unwrap_err());
                    assert!(
                        err.contains(error.as_str()),
                        "{} case {i}: {err}",
                        fixture.name
                    );
                }
                _ => panic!(
                    "{} case {i}: a case has either expected or error",
                    fixture.name
                ),
            }
        }
        names.push(fixture.name);
    }
    names.sort();
    assert_eq!(
        names,
        ["features", "llama3", "mistral", "qwen25", "smollm2"]
    );
}
