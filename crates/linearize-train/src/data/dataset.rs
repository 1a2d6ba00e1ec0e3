//! From a [`DataConfig`] to packed training and validation sequences.
use super::cache::TokenCache;
use super::config::{DataConfig, SourceConfig};
use super::encoder::TextEncoder;
use super::packing::{pack, PackOptions, PackedSequences};
use super::shuffle::{permutation, Stream};
use super::tokenized::{tokenize_source, TokenizedDocs};
use anyhow::{ensure, Result};

/// The packed training sequences and, when the config asks for it, validation sequences.
#[derive(Debug)]
pub struct Datasets {
    /// Empty when the config has no text sources (teacher samples only).
    pub train: PackedSequences,
    pub val: Option<PackedSequences>,
    pub options: PackOptions,
}

/// Reads, tokenises (through the cache), splits, shuffles and packs the configured sources.
pub fn build_datasets(config: &DataConfig, encoder: &dyn TextEncoder) -> Result<Datasets> {
    config.validate()?;
    let options = PackOptions {
        seq_len: config.seq_len,
        next_token_targets: config.next_token_targets,
        bos: config.bos.resolve(encoder)?,
        eos: encoder.eos_id(),
    };
    let cache = config
        .cache_dir
        .as_deref()
        .map(TokenCache::new)
        .transpose()?;
    let train_docs = load_sources(&config.sources, encoder, cache.as_ref())?;
    let (train_docs, val_docs) = if !config.val_sources.is_empty() {
        (
            train_docs,
            Some(load_sources(&config.val_sources, encoder, cache.as_ref())?),
        )
    } else if config.val_fraction > 0.0 {
        let (train, val) = hold_out(&train_docs, config.val_fraction, config.seed)?;
        (train, Some(val))
    } else {
        (train_docs, None)
    };

    let order = if config.shuffle {
        permutation(train_docs.len(), config.seed, Stream::Documents, 0)
    } else {
        (0..train_docs.len()).collect()
    };
    let (train, stats) = pack(order.iter().map(|&i| train_docs.doc(i)), &options);
    tracing::info!(
        documents = stats.documents,
        tokens = stats.stream_tokens,
        sequences = train.len(),
        dropped_tokens = stats.dropped_tokens,
        "packed training data"
    );
    ensure!(
        config.sources.is_empty() || !train.is_empty(),
        "data.sources: {} tokens do not fill one sequence of {} tokens",
        stats.stream_tokens,
        options.window()
    );

    let val = match val_docs {
        Some(docs) => {
            let (mut val, stats) = pack(docs.iter(), &options);
            ensure!(
                !val.is_empty(),
                "validation data: {} tokens do not fill one sequence of {} tokens",
                stats.stream_tokens,
                options.window()
            );
            if let Some(max) = config.max_val_sequences {
                val.truncate(max);
            }
            tracing::info!(
                documents = stats.documents,
                sequences = val.len(),
                "packed validation data"
            );
            Some(val)
        }
        None => None,
    };
    Ok(Datasets {
        train,
        val,
        options,
    })
}

fn load_sources(
    sources: &[SourceConfig],
    encoder: &dyn TextEncoder,
    cache: Option<&TokenCache>,
) -> Result<TokenizedDocs> {
    let mut docs = TokenizedDocs::default();
    for source in sources {
        docs.extend(&tokenize_source(source, encoder, cache)?);
    }
    Ok(docs)
}

/// Splits off `round(fraction * n)` documents (at least one, leaving at least one), chosen by
/// `seed`; both parts keep the original document order.
fn hold_out(
    docs: &TokenizedDocs,
    fraction: f64,
    seed: u64,
) -> Result<(TokenizedDocs, TokenizedDocs)> {
    let n = docs.len();
    ensure!(
        n >= 2,
        "data.val_fraction: the sources hold {n} document(s), too few to hold any out; give \
         data.val_sources, or split text files into documents with `separator`"
    );
    let held = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut is_val = vec![false; n];
    for &i in &permutation(n, seed, Stream::Validation, 0)[..held] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (TokenizedDocs::default(), TokenizedDocs::default());
    for (i, doc) in docs.iter().enumerate() {
        if is_val[i] {
            val.push(doc)
        } else {
            train.push(doc)
        }
    }
    Ok((train, val))
}
