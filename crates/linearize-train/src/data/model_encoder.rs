//! [`TextEncoder`] over a model's own tokenizer and chat template.
use super::encoder::{ChatTurn, TextEncoder};
use anyhow::{Context, Result};
use linearize_models::chat_template::ChatMessage;
use linearize_models::tokenizer::Tokenizer;
use sha2::{Digest, Sha256};
use std::path::Path;

/// The tokenizer of a model directory, as the data pipeline sees it.
pub struct ModelEncoder {
    tokenizer: Tokenizer,
    eos: u32,
    bos: Option<u32>,
    identity: String,
}

/// Files whose contents decide how text and chats are encoded.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

impl ModelEncoder {
    /// The tokenizer of the model in `dir`. BOS starts documents only when the tokenizer itself
    /// adds it (as transformers' `encode(text)` would), so packed sequences look like what the
    /// model was trained on.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_dir(dir)?;
        let eos = *tokenizer.eos_ids().first().with_context(|| {
            format!(
                "{}: the tokenizer defines no EOS token, needed between packed documents",
                dir.display()
            )
        })?;
        let plain = tokenizer.encode("a", false)?;
        let special = tokenizer.encode("a", true)?;
        let bos = tokenizer
            .bos_id()
            .filter(|&bos| special.first() == Some(&bos) && plain.first() != Some(&bos));
        let mut hash = Sha256::new();
        for name in TOKENIZER_FILES {
            if let Ok(bytes) = std::fs::read(dir.join(name)) {
                hash.update(name.as_bytes());
                hash.update(&bytes);
            }
        }
        let identity = format!("{:x}", hash.finalize());
        Ok(Self {
            tokenizer,
            eos,
            bos,
            identity,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl TextEncoder for ModelEncoder {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, false)
    }

    fn eos_id(&self) -> u32 {
        self.eos
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn render_chat(&self, messages: &[ChatTurn]) -> Result<String> {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        self.tokenizer.apply_chat_template(&messages, false)
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}
