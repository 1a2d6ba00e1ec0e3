//! A byte-level test tokenizer with a minijinja chat template.
#![allow(dead_code)] // each test binary uses a different part

use anyhow::Result;
use linearize_train::data::{ChatTurn, TextEncoder};
use std::cell::Cell;

pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
const OFFSET: u32 = 3;

/// Llama-2-like: the rendered conversation starts with `<s>` and ends with `</s>`.
pub const CHAT_TEMPLATE: &str =
    "<s>{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}</s>";

/// Bytes map to `byte + 3`; the literal markers `<s>` and `</s>` map to BOS and EOS.
pub struct ByteEncoder {
    pub bos: Option<u32>,
    pub identity: String,
    pub encode_calls: Cell<usize>,
}

impl ByteEncoder {
    pub fn new() -> Self {
        Self {
            bos: Some(BOS),
            identity: "bytes-v1".into(),
            encode_calls: Cell::new(0),
        }
    }

    pub fn without_bos() -> Self {
        Self {
            bos: None,
            ..Self::new()
        }
    }
}

impl TextEncoder for ByteEncoder {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_calls.set(self.encode_calls.get() + 1);
        let mut ids = Vec::new();
        let mut rest = text.as_bytes();
        while let Some(&byte) = rest.first() {
            if let Some(after) = rest.strip_prefix(b"<s>") {
                ids.push(BOS);
                rest = after;
            } else if let Some(after) = rest.strip_prefix(b"</s>") {
                ids.push(EOS);
                rest = after;
            } else {
                ids.push(u32::from(byte) + OFFSET);
                rest = &rest[1..];
            }
        }
        Ok(ids)
    }

    fn eos_id(&self) -> u32 {
        EOS
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn render_chat(&self, messages: &[ChatTurn]) -> Result<String> {
        let env = minijinja::Environment::new();
        let rendered = env.render_str(CHAT_TEMPLATE, minijinja::context! { messages })?;
        Ok(rendered)
    }

    /// As the chat-template path of the real tokenizer: a user turn and an assistant turn.
    fn render_instruction(&self, instruction: &str, input: &str, output: &str) -> Result<String> {
        let user = if input.trim().is_empty() {
            instruction.to_owned()
        } else {
            format!("{instruction}\n\n{input}")
        };
        self.render_chat(&[
            ChatTurn::new("user", user),
            ChatTurn::new("assistant", output),
        ])
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}

/// Inverse of [`ByteEncoder::encode`] for ASCII text.
pub fn decode(ids: &[u32]) -> String {
    ids.iter()
        .map(|&id| match id {
            BOS => "<s>".to_string(),
            EOS => "</s>".to_string(),
            id => char::from((id - OFFSET) as u8).to_string(),
        })
        .collect()
}

/// Token ids of `text` under [`ByteEncoder`].
pub fn ids(text: &str) -> Vec<u32> {
    ByteEncoder::new().encode(text).unwrap()
}
