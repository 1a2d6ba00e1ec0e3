//! Token ids of a set of documents, and tokenising a source into them (through the cache).
use super::cache::TokenCache;
use super::config::SourceConfig;
use super::documents::read_documents;
use super::encoder::TextEncoder;
use super::sources::list_files;
use anyhow::{ensure, Result};
use std::time::Instant;

/// Documents as token ids: document `i` is `tokens[offsets[i]..offsets[i + 1]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedDocs {
    tokens: Vec<u32>,
    offsets: Vec<u64>,
}

impl Default for TokenizedDocs {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            offsets: vec![0],
        }
    }
}

impl TokenizedDocs {
    /// Rebuilds documents from their raw parts; `offsets` must start at 0, never decrease
    /// and end at `tokens.len()`.
    pub fn from_parts(tokens: Vec<u32>, offsets: Vec<u64>) -> Result<Self> {
        ensure!(
            offsets.first() == Some(&0),
            "document offsets must start at 0"
        );
        ensure!(
            offsets.windows(2).all(|w| w[0] <= w[1]),
            "document offsets must not decrease"
        );
        ensure!(
            offsets.last() == Some(&(tokens.len() as u64)),
            "document offsets end at {:?}, but there are {} tokens",
            offsets.last(),
            tokens.len()
        );
        Ok(Self { tokens, offsets })
    }

    pub fn push(&mut self, doc: &[u32]) {
        self.tokens.extend_from_slice(doc);
        self.offsets.push(self.tokens.len() as u64);
    }

    pub fn extend(&mut self, other: &TokenizedDocs) {
        for doc in other.iter() {
            self.push(doc);
        }
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn doc(&self, index: usize) -> &[u32] {
        &self.tokens[self.offsets[index] as usize..self.offsets[index + 1] as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u32]> {
        (0..self.len()).map(|i| self.doc(i))
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }
}

/// Tokenises every document of `source` (empty documents skipped), reusing the cached ids
/// when `cache` holds them for the source's current files and this encoder.
pub fn tokenize_source(
    source: &SourceConfig,
    encoder: &dyn TextEncoder,
    cache: Option<&TokenCache>,
) -> Result<TokenizedDocs> {
    let files = list_files(source)?;
    let key = cache.map(|c| (c, TokenCache::key(source, &files, &encoder.identity())));
    if let Some((cache, key)) = &key {
        if let Some(docs) = cache.load(key) {
            tracing::info!(
                source = %source.describe(),
                documents = docs.len(),
                tokens = docs.num_tokens(),
                "token cache hit"
            );
            return Ok(docs);
        }
    }
    let started = Instant::now();
    tracing::info!(source = %source.path.display(), files = files.len(), "tokenising");
    let mut docs = TokenizedDocs::default();
    for file in &files {
        read_documents(&file.path, source, encoder, |text| {
            linearize_models::stop::check()?;
            let ids = encoder.encode(text)?;
            if !ids.is_empty() {
                docs.push(&ids);
            }
            Ok(())
        })?;
    }
    ensure!(
        !docs.is_empty(),
        "data source {}: no non-empty documents",
        source.describe()
    );
    tracing::info!(
        source = %source.describe(),
        files = files.len(),
        documents = docs.len(),
        tokens = docs.num_tokens(),
        seconds = started.elapsed().as_secs_f64(),
        "tokenised"
    );
    if let Some((cache, key)) = &key {
        cache.store(key, source, &docs)?;
    }
    Ok(docs)
}
