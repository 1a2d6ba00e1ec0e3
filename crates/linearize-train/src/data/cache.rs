//! On-disk cache of tokenised sources, so a corpus is tokenised once per file version and
//! tokenizer.
//!
//! One file per source, `tokens-<key>.bin`: the magic `LZTOKID1`, the header length (u64 LE),
//! a JSON header (full key, counts, SHA-256 of the payload), then the payload: document
//! offsets (u64 LE, documents + 1) and token ids (u32 LE).
use super::config::{SourceConfig, SourceKind};
use super::sources::SourceFile;
use super::tokenized::TokenizedDocs;
use anyhow::{ensure, Context, Result};
use linearize_models::atomic;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"LZTOKID1";
/// Bump when tokenisation or the document split changes meaning, so old entries miss.
const KEY_VERSION: u32 = 1;

/// A directory of cached tokenised sources.
#[derive(Debug, Clone)]
pub struct TokenCache {
    dir: PathBuf,
}

/// Everything that determines a source's token ids.
#[derive(Serialize)]
struct KeyMaterial<'a> {
    version: u32,
    kind: SourceKind,
    field: &'a str,
    separator: Option<&'a str>,
    files: Vec<(PathBuf, u64, u64)>,
    encoder: &'a str,
}

#[derive(Serialize, Deserialize)]
struct Header {
    key: String,
    source: String,
    documents: u64,
    tokens: u64,
    sha256: String,
}

impl TokenCache {
    pub fn new(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating token cache directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The cache key of `source` read from `files` by the encoder named `encoder_identity`:
    /// it changes when a file is added, removed, resized or touched, or the tokenizer changes.
    pub fn key(source: &SourceConfig, files: &[SourceFile], encoder_identity: &str) -> String {
        let material = KeyMaterial {
            version: KEY_VERSION,
            kind: source.kind,
            field: source.field_name(),
            separator: source.separator.as_deref(),
            files: files
                .iter()
                .map(|f| {
                    let path = fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone());
                    (path, f.size, f.mtime_ns)
                })
                .collect(),
            encoder: encoder_identity,
        };
        let json = serde_json::to_vec(&material).expect("cache key material serialises");
        hex(&Sha256::digest(json))
    }

    /// Where the entry for `key` lives.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir
            .join(format!("tokens-{}.bin", &key[..32.min(key.len())]))
    }

    /// The cached documents for `key`; `None` on a miss. A damaged entry is a miss (logged).
    pub fn load(&self, key: &str) -> Option<TokenizedDocs> {
        let path = self.path(key);
        let bytes = fs::read(&path).ok()?;
        match decode(&bytes, key) {
            Ok(docs) => docs,
            Err(e) => {
                tracing::warn!("ignoring damaged token cache {}: {e:#}", path.display());
                None
            }
        }
    }

    /// Writes the entry for `key` atomically.
    pub fn store(&self, key: &str, source: &SourceConfig, docs: &TokenizedDocs) -> Result<()> {
        let mut payload = Vec::with_capacity(docs.offsets().len() * 8 + docs.num_tokens() * 4);
        for offset in docs.offsets() {
            payload.extend_from_slice(&offset.to_le_bytes());
        }
        for token in docs.tokens() {
            payload.extend_from_slice(&token.to_le_bytes());
        }
        let header = serde_json::to_vec(&Header {
            key: key.to_owned(),
            source: source.describe(),
            documents: docs.len() as u64,
            tokens: docs.num_tokens() as u64,
            sha256: hex(&Sha256::digest(&payload)),
        })?;
        let mut bytes = Vec::with_capacity(16 + header.len() + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&payload);
        let path = self.path(key);
        atomic::write_file(&path, &bytes)
            .with_context(|| format!("writing token cache {}", path.display()))
    }
}

/// Parses an entry: `Ok(None)` when it belongs to another key, `Err` when it is damaged.
fn decode(bytes: &[u8], key: &str) -> Result<Option<TokenizedDocs>> {
    ensure!(
        bytes.len() >= 16 && &bytes[..8] == MAGIC,
        "not a token cache file"
    );
    let header_len = u64::from_le_bytes(bytes[8..16].try_into()?) as usize;
    let header_bytes = bytes.get(16..16 + header_len).context("truncated header")?;
    let header: Header = serde_json::from_slice(header_bytes).context("bad header")?;
    if header.key != key {
        return Ok(None);
    }
    let payload = &bytes[16 + header_len..];
    let offsets_len = (header.documents as usize + 1) * 8;
    ensure!(
        payload.len() == offsets_len + header.tokens as usize * 4,
        "payload is {} bytes, header promises {} documents and {} tokens",
        payload.len(),
        header.documents,
        header.tokens
    );
    ensure!(
        hex(&Sha256::digest(payload)) == header.sha256,
        "checksum mismatch"
    );
    let offsets = payload[..offsets_len]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")))
        .collect();
    let tokens = payload[offsets_len..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4-byte chunk")))
        .collect();
    TokenizedDocs::from_parts(tokens, offsets).map(Some)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
