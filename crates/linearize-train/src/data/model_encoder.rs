//! [`TextEncoder`] over a model's own tokenizer and prompt format.
use super::encoder::{ChatTurn, TextEncoder};
use anyhow::{ensure, Context, Result};
use linearize_models::chat_template::ChatMessage;
use linearize_models::prompt_format::TemplateChoice;
use linearize_models::tokenizer::Tokenizer;
use sha2::{Digest, Sha256};
use std::path::Path;

/// The tokenizer of a model directory, as the data pipeline sees it.
pub struct ModelEncoder {
    tokenizer: Tokenizer,
    eos: u32,
    bos: Option<u32>,
    identity: String,
    /// Whether a text cut before a line break encodes to the ids of its pieces (see
    /// [`pieces`]): true of byte-level BPE tokenizers, false of those that prefix every input.
    splits_exactly: bool,
}

/// A document longer than this is tokenised piece by piece: the tokenizer holds about 100 bytes
/// per token while it works (offsets, token strings), so one 300 MB line took over 20 GB.
const PIECE_BYTES: usize = 1 << 20;
/// The longest piece tokenised at once: a longer run without a line break is refused.
const MAX_PIECE_BYTES: usize = 64 << 20;
/// Texts whose ids must be the same cut in pieces as whole, for splitting to be used.
const SPLIT_PROBES: [&str; 3] = [
    "The end.\nNext line",
    "one two\n\n  indented paragraph\n",
    "x = 1;\r\n\tdone()",
];

/// Files whose contents decide how text and chats are encoded.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

impl ModelEncoder {
    /// The tokenizer of the model in `dir`, with the prompt format `template` asks for (none:
    /// the chat template, or Alpaca's prompt when the tokenizer has none). BOS starts documents
    /// only when the tokenizer itself adds it (as transformers' `encode(text)` would), so packed
    /// sequences look like what the model was trained on.
    pub fn new(dir: &Path, template: Option<&TemplateChoice>) -> Result<Self> {
        let mut tokenizer = Tokenizer::from_dir(dir)?;
        if let Some(choice) = template {
            tokenizer = tokenizer
                .with_template(choice)
                .with_context(|| format!("data.template: {choice}"))?;
        }
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
        hash.update(tokenizer.prompt_identity().as_bytes());
        let identity = format!("{:x}", hash.finalize());
        let mut splits_exactly = true;
        for probe in SPLIT_PROBES {
            let mut pieced = Vec::new();
            for piece in pieces(probe, 1) {
                pieced.extend(tokenizer.encode(piece, false)?);
            }
            splits_exactly &= pieced == tokenizer.encode(probe, false)?;
        }
        Ok(Self {
            tokenizer,
            eos,
            bos,
            identity,
            splits_exactly,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl TextEncoder for ModelEncoder {
    /// The ids of `text`; a long one is encoded in pieces of about [`PIECE_BYTES`] cut before
    /// line breaks, which gives the same ids (checked on probes when the tokenizer is loaded;
    /// a tokenizer where it does not hold encodes whole) with memory bounded by the piece.
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.len() <= PIECE_BYTES || !self.splits_exactly {
            return self.tokenizer.encode(text, false);
        }
        let mut ids = Vec::new();
        for piece in pieces(text, PIECE_BYTES) {
            // A long document is minutes of work: a stop request is honoured between pieces.
            linearize_models::stop::check()?;
            ensure!(
                piece.len() <= MAX_PIECE_BYTES,
                "a document holds {} bytes without a line break that can be cut at; at most \
                 {MAX_PIECE_BYTES} are tokenised at once",
                piece.len()
            );
            ids.extend(self.tokenizer.encode(piece, false)?);
        }
        Ok(ids)
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
        self.tokenizer.render_conversation(&messages, false)
    }

    fn render_instruction(&self, instruction: &str, input: &str, output: &str) -> Result<String> {
        self.tokenizer
            .render_instruction(instruction, input, Some(output))
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}

/// `text` cut into consecutive pieces of about `target` bytes (at least one line each), each cut
/// just before a line break that follows a non-space character. Pre-tokenizers split there
/// anyway (a word or punctuation never runs into a line break), so the pieces' ids concatenate
/// to the text's. A piece is longer than `target` only where no such break comes sooner.
fn pieces(text: &str, target: usize) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let is_cut = move |i: usize| {
        matches!(bytes[i], b'\n' | b'\r') && i > 0 && !bytes[i - 1].is_ascii_whitespace()
    };
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        let from = start;
        let mut end = bytes.len();
        if bytes.len() - from > target {
            // The last cut within the target, else the first one after it.
            let limit = from + target;
            end = (from + 1..=limit)
                .rev()
                .find(|&i| is_cut(i))
                .or_else(|| (limit + 1..bytes.len()).find(|&i| is_cut(i)))
                .unwrap_or(bytes.len());
        }
        start = end;
        Some(&text[from..end])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_before_line_breaks_and_cover_the_text() {
        let text = "ab cd.\nef\n\n  gh\r\nij";
        let cut: Vec<&str> = pieces(text, 3).collect();
        assert_eq!(cut.concat(), text);
        assert_eq!(cut, ["ab cd.", "\nef", "\n\n  gh", "\r\nij"]);
        assert_eq!(
            pieces("no break at all", 4).collect::<Vec<_>>(),
            ["no break at all"]
        );
        assert_eq!(pieces("", 4).count(), 0);
    }

    #[test]
    fn a_long_document_encodes_in_pieces_to_the_same_ids() {
        let dir = linearize_models::offline::ensure_smollm2(None).unwrap();
        let encoder = ModelEncoder::new(&dir, None).unwrap();
        assert!(encoder.splits_exactly);
        let corpus = linearize_models::offline::ensure_text().unwrap();
        let val = std::fs::read_to_string(
            corpus.split_path(linearize_models::offline::Split::Validation),
        )
        .unwrap();
        // One document of over 3 pieces.
        let text = &val.repeat(3 * PIECE_BYTES / val.len() + 1);
        let whole = encoder.tokenizer.encode(text, false).unwrap();
        let pieced = encoder.encode(text).unwrap();
        assert!(pieces(text, PIECE_BYTES).count() > 3);
        assert!(
            whole == pieced,
            "{} ids whole, {} in pieces",
            whole.len(),
            pieced.len()
        );
        // A run without line breaks longer than the cap is refused, not tokenised at once.
        let run = "word ".repeat(MAX_PIECE_BYTES / 5 + 1);
        let err = encoder.encode(&run).unwrap_err().to_string();
        assert!(err.contains("without a line break"), "{err}");
    }
}
