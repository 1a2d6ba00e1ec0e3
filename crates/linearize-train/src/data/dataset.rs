//! From a [`DataConfig`] to packed training and validation sequences.
use super::cache::TokenCache;
use super::config::{DataConfig, SourceConfig};
use super::encoder::TextEncoder;
use super::packing::{pack, PackOptions, PackedSequences};
use super::shuffle::{permutation, weighted_copies, Stream};
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
    let (train_docs, source_of) = load_sources(&config.sources, encoder, cache.as_ref())?;
    let (train_docs, source_of, val_docs) = if !config.val_sources.is_empty() {
        let (val, _) = load_sources(&config.val_sources, encoder, cache.as_ref())?;
        (train_docs, source_of, Some(val))
    } else if config.val_fraction > 0.0 {
        let (train, train_sources, val) =
            hold_out(&train_docs, &source_of, config.val_fraction, config.seed)?;
        (train, train_sources, Some(val))
    } else {
        (train_docs, source_of, None)
    };
    let weights: Vec<f64> = config
        .sources
        .iter()
        .map(|s| s.weight.unwrap_or(1.0))
        .collect();
    let train_docs = if weights.iter().all(|&w| w == 1.0) {
        train_docs
    } else {
        weighted(&train_docs, &source_of, &weights, config.seed)
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

/// The documents of every source in order, and the index of the source of each.
fn load_sources(
    sources: &[SourceConfig],
    encoder: &dyn TextEncoder,
    cache: Option<&TokenCache>,
) -> Result<(TokenizedDocs, Vec<usize>)> {
    let mut docs = TokenizedDocs::default();
    let mut source_of = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let tokenized = tokenize_source(source, encoder, cache)?;
        source_of.extend(std::iter::repeat_n(i, tokenized.len()));
        docs.extend(&tokenized);
    }
    Ok((docs, source_of))
}

/// Each source's documents `weights[source]` times on average, in their order: `floor(w)`
/// copies of every document, and one more of a `fract(w)` share of them chosen by `seed`
/// (per source, so that one source's weight does not change another's choice). Applied after
/// the validation hold-out: a held-out document is never repeated into training.
fn weighted(
    docs: &TokenizedDocs,
    source_of: &[usize],
    weights: &[f64],
    seed: u64,
) -> TokenizedDocs {
    let mut copies = vec![0usize; docs.len()];
    for (source, &weight) in weights.iter().enumerate() {
        let members: Vec<usize> = (0..docs.len())
            .filter(|&i| source_of[i] == source)
            .collect();
        let member_copies =
            weighted_copies(members.len(), weight, seed, Stream::Weights, source as u64);
        for (&i, &n) in members.iter().zip(&member_copies) {
            copies[i] = n;
        }
        tracing::info!(
            source,
            weight,
            documents = members.len(),
            used = member_copies.iter().sum::<usize>(),
            "weighted source"
        );
    }
    let mut out = TokenizedDocs::default();
    for (i, doc) in docs.iter().enumerate() {
        for _ in 0..copies[i] {
            out.push(doc);
        }
    }
    out
}

/// Splits off `round(fraction * n)` documents (at least one, leaving at least one), chosen by
/// `seed`; both parts keep the original document order. Also gives the training documents'
/// sources (`source_of` holds every document's).
fn hold_out(
    docs: &TokenizedDocs,
    source_of: &[usize],
    fraction: f64,
    seed: u64,
) -> Result<(TokenizedDocs, Vec<usize>, TokenizedDocs)> {
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
    let mut train_sources = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        if is_val[i] {
            val.push(doc)
        } else {
            train.push(doc);
            train_sources.push(source_of[i]);
        }
    }
    Ok((train, train_sources, val))
}
