//! A GGUF vocabulary as a Hugging Face fast tokenizer (tokenizer.json) plus its
//! tokenizer_config.json.
//!
//! transformers' GGUF converters (integrations/ggml.py, GGUFLlamaConverter) are the oracle for
//! what a vocabulary means: the same BPE model, merges, unknown token and special tokens, so
//! token ids agree with `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. Two deliberate
//! differences, both where transformers drops information the file carries:
//! - byte-level vocabularies get the pre-tokenizer `tokenizer.ggml.pre` names (llama.cpp's
//!   regexes, as in the model's original tokenizer.json); transformers always uses GPT-2's.
//!   They agree whenever the merges never join what the finer split keeps apart (SmolLM2's
//!   merges join no digits, so its digit-splitting pre-tokenizer changes nothing there).
//! - `tokenizer.ggml.add_bos_token` decides whether a BOS token is prepended; transformers
//!   ignores it and always prepends one for llama-architecture files.
//!
//! Gemma's SentencePiece vocabulary (architecture gemma3) is a Unigram model over the scores,
//! as transformers' GGUFGemmaConverter builds it, not BPE.
use super::reader::GgufFile;
use super::value::Value;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer,
};

/// llama.cpp's token types (llama_token_type).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's word-boundary marker.
const SPM_SPACE: &str = "\u{2581}";

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Byte-level pre-tokenizers, by the `tokenizer.ggml.pre` names llama.cpp writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreTokenizer {
    /// GPT-2's regex (ByteLevel with use_regex).
    Gpt2,
    /// Every digit alone, then GPT-2's regex (StarCoder, SmolLM).
    DigitsGpt2,
    /// A regex split, then byte-level mapping without GPT-2's regex.
    Regex {
        regex: &'static str,
        nfc: bool,
        ignore_merges: bool,
    },
}

const PRE_TOKENIZERS: &[(&str, PreTokenizer)] = &[
    ("default", PreTokenizer::Gpt2),
    ("gpt-2", PreTokenizer::Gpt2),
    ("smollm", PreTokenizer::DigitsGpt2),
    ("starcoder", PreTokenizer::DigitsGpt2),
    ("refact", PreTokenizer::DigitsGpt2),
    ("llama3", LLAMA3),
    ("llama-v3", LLAMA3),
    ("llama-bpe", LLAMA3),
    ("falcon3", LLAMA3),
    ("pixtral", LLAMA3),
    ("qwen2", QWEN2),
    ("deepseek-r1-qwen", QWEN2),
    (
        "tekken",
        PreTokenizer::Regex {
            regex: TEKKEN_REGEX,
            nfc: false,
            ignore_merges: false,
        },
    ),
];
const LLAMA3: PreTokenizer = PreTokenizer::Regex {
    regex: LLAMA3_REGEX,
    nfc: false,
    ignore_merges: true,
};
const QWEN2: PreTokenizer = PreTokenizer::Regex {
    regex: QWEN2_REGEX,
    nfc: true,
    ignore_merges: false,
};

/// A token with a role (BOS, EOS, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleToken {
    pub id: u32,
    pub content: String,
}

/// The converted vocabulary and what the tokenizer/generation configs need from it.
pub struct ConvertedTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: Option<RoleToken>,
    pub eos: Option<RoleToken>,
    /// End of turn (`tokenizer.ggml.eot_token_id`), a second stop token for chat models.
    pub eot: Option<RoleToken>,
    pub unk: Option<RoleToken>,
    pub pad: Option<RoleToken>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
    added: Vec<(u32, AddedToken)>,
}

/// Reads the vocabulary of `gguf` (`tokenizer.ggml.model` "gpt2" or "llama").
pub fn convert(gguf: &GgufFile) -> Result<ConvertedTokenizer> {
    let file = gguf.path().display().to_string();
    let model = gguf.require_str("tokenizer.ggml.model")?;
    let tokens = gguf
        .get_array_of("tokenizer.ggml.tokens", "a string", |v| {
            v.as_str().map(str::to_owned)
        })?
        .ok_or_else(|| anyhow!("{file}: missing metadata key tokenizer.ggml.tokens"))?;
    let types = match gguf.get_array_of("tokenizer.ggml.token_type", "an integer", Value::as_i64)? {
        Some(types) if types.len() != tokens.len() => bail!(
            "{file}: tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ),
        Some(types) => types,
        None => vec![1; tokens.len()],
    };
    let role = |key: &str| -> Result<Option<RoleToken>> {
        let Some(id) = gguf.get_u64(key)? else {
            return Ok(None);
        };
        let content = tokens.get(id as usize).ok_or_else(|| {
            anyhow!(
                "{file}: {key} = {id} but the vocabulary has {} tokens",
                tokens.len()
            )
        })?;
        Ok(Some(RoleToken {
            id: id as u32,
            content: content.clone(),
        }))
    };
    let (bos, eos, eot) = (
        role("tokenizer.ggml.bos_token_id")?,
        role("tokenizer.ggml.eos_token_id")?,
        role("tokenizer.ggml.eot_token_id")?,
    );
    let (unk, pad) = (
        role("tokenizer.ggml.unknown_token_id")?,
        role("tokenizer.ggml.padding_token_id")?,
    );
    let is_spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => bail!(
            "{file}: tokenizer.ggml.model {other:?} is not supported (supported: gpt2 = byte-level BPE, llama = SentencePiece BPE)"
        ),
    };
    let add_bos = gguf
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(is_spm);
    let add_eos = gguf
        .get_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);

    let gemma = gguf.architecture()? == "gemma3";
    let mut tokenizer = if is_spm {
        let scores = gguf
            .get_array_of("tokenizer.ggml.scores", "a float", Value::as_f64)?
            .ok_or_else(|| {
                anyhow!("{file}: SentencePiece vocabulary without tokenizer.ggml.scores")
            })?;
        if scores.len() != tokens.len() {
            bail!(
                "{file}: {} scores for {} tokens",
                scores.len(),
                tokens.len()
            );
        }
        let add_space_prefix = gguf
            .get_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);
        if gemma {
            gemma_tokenizer(&tokens, &scores, unk.as_ref(), add_space_prefix)
        } else {
            spm_tokenizer(&tokens, &scores, unk.as_ref(), add_space_prefix)
        }
    } else {
        let merges = gguf
            .get_array_of("tokenizer.ggml.merges", "a string", |v| {
                v.as_str().map(str::to_owned)
            })?
            .ok_or_else(|| {
                anyhow!("{file}: byte-level BPE vocabulary without tokenizer.ggml.merges")
            })?;
        let pre = gguf.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let pre = PRE_TOKENIZERS
            .iter()
            .find(|(name, _)| *name == pre)
            .map(|p| p.1)
            .ok_or_else(|| {
                let names: Vec<_> = PRE_TOKENIZERS.iter().map(|p| p.0).collect();
                anyhow!(
                    "{file}: tokenizer.ggml.pre {pre:?} is not supported (supported: {})",
                    names.join(", ")
                )
            })?;
        byte_level_tokenizer(&tokens, &merges, unk.as_ref(), pre)
    }
    .with_context(|| format!("{file}: building the tokenizer"))?;

    // Control tokens are special (matched in raw text, skipped when decoding); user-defined
    // ones are matched in raw text but decoded as text, as llama.cpp does. Gemma's tokenizer in
    // transformers has only its pad, eos, bos and unk tokens as special tokens: the other control
    // tokens (<start_of_turn>, ...) are pieces of the Unigram model.
    let added: Vec<(u32, AddedToken)> = if gemma {
        let mut roles: Vec<&RoleToken> = [&pad, &eos, &bos, &unk].into_iter().flatten().collect();
        roles.sort_by_key(|t| t.id);
        roles.dedup_by_key(|t| t.id);
        roles
            .into_iter()
            .map(|t| (t.id, AddedToken::from(t.content.clone(), true)))
            .collect()
    } else {
        tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter_map(|(id, (content, &ty))| match ty {
                TOKEN_TYPE_CONTROL => Some((id as u32, AddedToken::from(content.clone(), true))),
                TOKEN_TYPE_USER_DEFINED => Some((
                    id as u32,
                    AddedToken::from(content.clone(), false).normalized(false),
                )),
                _ => None,
            })
            .collect()
    };
    let (special, user): (Vec<_>, Vec<_>) =
        added.iter().map(|a| a.1.clone()).partition(|t| t.special);
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user);

    let template = template_processor(add_bos, add_eos, bos.as_ref(), eos.as_ref())
        .with_context(|| format!("{file}: building the BOS/EOS template"))?;
    let post: Option<PostProcessorWrapper> = match (is_spm, template) {
        (true, template) => template.map(Into::into),
        (false, None) => Some(ByteLevel::default().trim_offsets(false).into()),
        (false, Some(t)) => Some(
            ProcessorSequence::new(vec![
                ByteLevel::default().trim_offsets(false).into(),
                t.into(),
            ])
            .into(),
        ),
    };
    tokenizer.with_post_processor(post);

    Ok(ConvertedTokenizer {
        tokenizer,
        bos,
        eos,
        eot,
        unk,
        pad,
        add_bos,
        add_eos,
        chat_template: gguf.get_str("tokenizer.chat_template")?.map(str::to_owned),
        added,
    })
}

fn byte_level_tokenizer(
    tokens: &[String],
    merges: &[String],
    unk: Option<&RoleToken>,
    pre: PreTokenizer,
) -> Result<Tokenizer> {
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| {
                    anyhow!(
                        "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let ignore_merges = matches!(
        pre,
        PreTokenizer::Regex {
            ignore_merges: true,
            ..
        }
    );
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab(tokens), merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .ignore_merges(ignore_merges);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk.content.clone());
    }
    let mut tokenizer = Tokenizer::new(bpe.build().map_err(|e| anyhow!("BPE model: {e}"))?);
    let byte_level = ByteLevel::new(false, true, true);
    let (normalizer, pre_tokenizer): (Option<NormalizerWrapper>, PreTokenizerWrapper) = match pre {
        PreTokenizer::Gpt2 => (None, byte_level.into()),
        PreTokenizer::DigitsGpt2 => (
            None,
            PreSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        ),
        PreTokenizer::Regex { regex, nfc, .. } => {
            let split = Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?;
            let pre = PreSequence::new(vec![split.into(), byte_level.use_regex(false).into()]);
            (nfc.then(|| NFC.into()), pre.into())
        }
    };
    tokenizer.with_normalizer(normalizer);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

fn spm_tokenizer(
    tokens: &[String],
    scores: &[f64],
    unk: Option<&RoleToken>,
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab(tokens), spm_merges(tokens, scores))
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk.content.clone());
    }
    let mut tokenizer = Tokenizer::new(bpe.build().map_err(|e| anyhow!("BPE model: {e}"))?);
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| anyhow!("{e}"));
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new(SPM_SPACE.into()).into());
    }
    normalizers.push(replace(" ", SPM_SPACE)?.into());
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(SPM_SPACE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Gemma's vocabulary as transformers' GGUFGemmaConverter builds it: a Unigram model over the
/// scores with byte fallback, spaces turned into the word-boundary marker (tab and whitespace-only
/// pieces renamed as the converter does), and no space prepended unless the file asks for it.
fn gemma_tokenizer(
    tokens: &[String],
    scores: &[f64],
    unk: Option<&RoleToken>,
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    let pieces: Vec<(String, f64)> = tokens
        .iter()
        .zip(scores)
        .map(|(t, &s)| {
            let piece = if t == "<0x09>" {
                "\t".to_owned()
            } else if t.contains(' ') && t.trim().is_empty() {
                SPM_SPACE.repeat(t.chars().count())
            } else {
                t.clone()
            };
            (piece, s)
        })
        .collect();
    let unigram = Unigram::from(pieces, unk.map(|u| u.id as usize), true)
        .map_err(|e| anyhow!("Unigram model: {e}"))?;
    let mut tokenizer = Tokenizer::new(unigram);
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| anyhow!("{e}"));
    tokenizer.with_normalizer(Some(replace(" ", SPM_SPACE)?));
    let split = Split::new(
        SplitPattern::String(" ".into()),
        SplitDelimiterBehavior::MergedWithPrevious,
        false,
    )
    .map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_pre_tokenizer(Some(split));
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(SPM_SPACE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Token -> id; a token listed twice keeps its last id, as in transformers' dict comprehension.
fn vocab(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// BPE merges for a SentencePiece vocabulary that ships only scores, built exactly as
/// transformers' GGUFTokenizerSkeleton does: every split of every token into two tokens, ranked
/// by the merged token's score (ties: the parts' scores, then vocabulary order).
fn spm_merges(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let mut score: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (t, &s) in tokens.iter().zip(scores) {
        if score.insert(t, s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for piece in order {
        let mut local: Vec<(&str, &str, f64)> = piece
            .char_indices()
            .skip(1)
            .map(|(i, _)| piece.split_at(i))
            .filter(|(l, r)| score.contains_key(l) && score.contains_key(r))
            .map(|(l, r)| (l, r, score[piece]))
            .collect();
        local.sort_by(|a, b| {
            (score[b.0], score[b.1])
                .partial_cmp(&(score[a.0], score[a.1]))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_owned(), r.to_owned()))
        .collect()
}

/// BOS/EOS insertion the way transformers' LlamaTokenizerFast.update_post_processor writes it.
fn template_processor(
    add_bos: bool,
    add_eos: bool,
    bos: Option<&RoleToken>,
    eos: Option<&RoleToken>,
) -> Result<Option<TemplateProcessing>> {
    if !add_bos && !add_eos {
        return Ok(None);
    }
    let mut specials = Vec::new();
    let mut ends = |on: bool, token: Option<&RoleToken>, what: &str| -> Result<Option<String>> {
        if !on {
            return Ok(None);
        }
        let t = token
            .ok_or_else(|| anyhow!("add_{what}_token is set but there is no {what} token id"))?;
        specials.push((t.content.clone(), t.id));
        Ok(Some(t.content.clone()))
    };
    let (bos, eos) = (ends(add_bos, bos, "bos")?, ends(add_eos, eos, "eos")?);
    let seq = |name: &str, type_id: u32| {
        let mut parts = Vec::new();
        parts.extend(bos.iter().map(|b| format!("{b}:{type_id}")));
        parts.push(format!("${name}:{type_id}"));
        parts.extend(eos.iter().map(|e| format!("{e}:{type_id}")));
        parts.join(" ")
    };
    let template = TemplateProcessing::builder()
        .try_single(seq("A", 0))
        .and_then(|b| b.try_pair(format!("{} {}", seq("A", 0), seq("B", 1))))
        .map_err(|e| anyhow!("{e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(Some(template))
}

impl ConvertedTokenizer {
    /// tokenizer.json.
    pub fn tokenizer_json(&self) -> Result<String> {
        self.tokenizer
            .to_string(true)
            .map_err(|e| anyhow!("serialising tokenizer.json: {e}"))
    }

    /// tokenizer_config.json, for transformers' PreTrainedTokenizerFast and our loader.
    pub fn tokenizer_config(&self, model_max_length: u64) -> serde_json::Value {
        let added_tokens_decoder: Map<String, serde_json::Value> = self
            .added
            .iter()
            .map(|(id, t)| {
                let entry = json!({
                    "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                    "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
                });
                (id.to_string(), entry)
            })
            .collect();
        let name = |t: &Option<RoleToken>| t.as_ref().map(|t| t.content.clone());
        json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "bos_token": name(&self.bos),
            "eos_token": name(&self.eos),
            "unk_token": name(&self.unk),
            "pad_token": name(&self.pad),
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": false,
            "model_max_length": model_max_length,
            "added_tokens_decoder": added_tokens_decoder,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre_tokens(pre: PreTokenizer, text: &str) -> Vec<String> {
        let tokens: Vec<String> = ["a"].iter().map(|s| s.to_string()).collect();
        let tok = byte_level_tokenizer(&tokens, &[], None, pre).unwrap();
        let pre = tok.get_pre_tokenizer().unwrap();
        let mut s = tokenizers::PreTokenizedString::from(text);
        tokenizers::PreTokenizer::pre_tokenize(pre, &mut s).unwrap();
        s.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(piece, _, _)| piece.to_owned())
        .collect()
    }

    #[test]
    fn pre_tokenizers_split_digits_as_their_models_do() {
        // GPT-2 keeps a run of digits together, SmolLM splits every digit, Llama 3 groups 3.
        assert_eq!(pre_tokens(PreTokenizer::Gpt2, "ab 12345"), ["ab", "Ġ12345"]);
        assert_eq!(
            pre_tokens(PreTokenizer::DigitsGpt2, "ab 12345"),
            ["ab", "Ġ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(pre_tokens(LLAMA3, "ab 12345"), ["ab", "Ġ", "123", "45"]);
        assert_eq!(pre_tokens(QWEN2, "ab 123"), ["ab", "Ġ", "1", "2", "3"]);
        // Llama 3 keeps a newline run apart from the following word and lowercases nothing.
        assert_eq!(pre_tokens(LLAMA3, "Hi\n\n there"), ["Hi", "ĊĊ", "Ġthere"]);
        assert_eq!(pre_tokens(LLAMA3, "I'LL go"), ["I", "'LL", "Ġgo"]);
    }

    #[test]
    fn spm_merges_rank_by_merged_score_then_parts() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, -1.0, -2.0, -3.0, -1.5];
        let merges = spm_merges(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        // abc (-1.5) before ab (-2) before bc (-3); within abc, "ab"+"c" (-2, -1) ranks
        // below "a"+"bc" (0, -3) because the left part's score decides first.
        assert_eq!(pairs, [("a", "bc"), ("ab", "c"), ("a", "b"), ("b", "c")]);
    }

    #[test]
    fn template_adds_bos_for_single_and_pair() {
        let bos = RoleToken {
            id: 1,
            content: "<s>".into(),
        };
        let t = template_processor(true, false, Some(&bos), None)
            .unwrap()
            .unwrap();
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["single"][0]["SpecialToken"]["id"], "<s>");
        assert_eq!(v["pair"].as_array().unwrap().len(), 4);
        assert!(template_processor(true, false, None, None).is_err());
        assert!(template_processor(false, false, None, None)
            .unwrap()
            .is_none());
    }
}
