//! What the data pipeline needs from a tokenizer: encoding, special ids and the prompt format.
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One message of a conversation, as found in chat JSONL (`{"role": ..., "content": ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

impl ChatTurn {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The tokenizer as seen by the data pipeline (implemented for the model's tokenizer by the caller).
pub trait TextEncoder {
    /// Token ids of `text`, without adding BOS/EOS (special tokens written in the text, such as
    /// those a chat template emits, still map to their ids).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// End-of-sequence id, written between packed documents.
    fn eos_id(&self) -> u32;
    /// Beginning-of-sequence id when the model expects one at the start of a document.
    fn bos_id(&self) -> Option<u32>;
    /// Renders chat messages in the model's prompt format (no generation prompt).
    fn render_chat(&self, messages: &[ChatTurn]) -> Result<String>;
    /// Renders an instruction record (`input` blank when it has none) with its `output`.
    fn render_instruction(&self, instruction: &str, input: &str, output: &str) -> Result<String>;
    /// A string that changes whenever `encode` or the renderings could give different output
    /// (e.g. a hash of the tokenizer files and the prompt format); it keys the token cache.
    fn identity(&self) -> String;
}
