//! A model directory's tokenizer as transformers' `AutoTokenizer` sees it: tokenizer.json plus
//! the special tokens, BOS/EOS policy, stop ids and chat template that tokenizer_config.json,
//! special_tokens_map.json, chat_template.jinja and generation_config.json declare.
use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::prompt_format::{self, PromptFormat, TemplateChoice};
use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The special-token names HF passes to chat templates, in tokenizer_config.json's spelling.
const SPECIAL_TOKEN_NAMES: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    stop_ids: Vec<u32>,
    /// `bos_token`, `eos_token`, ... as strings, for chat templates.
    special_tokens: BTreeMap<String, String>,
    chat_template: TemplateSource,
    /// Set for the tokenizer classes whose transformers implementation rebuilds the
    /// post-processor from `add_bos_token` / `add_eos_token` (Llama, Gemma, ...).
    bos_eos_policy: Option<BosEosPolicy>,
    clean_up_spaces: bool,
}

#[derive(Clone, Copy, Debug)]
struct BosEosPolicy {
    add_bos: bool,
    add_eos: bool,
}

enum TemplateSource {
    Missing,
    Found { text: String, origin: PathBuf },
    NoDefault { names: Vec<String>, origin: PathBuf },
}

/// A token given as a plain string or as a serialized `AddedToken` (`{"content": ...}`).
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Text(String),
    Added { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Text(s) => s,
            TokenSpec::Added { content } => content,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateSpec {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    #[serde(flatten)]
    tokens: HashMap<String, serde_json::Value>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    chat_template: Option<TemplateSpec>,
    clean_up_tokenization_spaces: Option<bool>,
    tokenizer_class: Option<String>,
}

#[derive(Deserialize, Default)]
struct GenerationConfig {
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl Tokenizer {
    /// Loads the tokenizer of a Hugging Face model directory. tokenizer.json is required; the
    /// other files are optional and read when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        if !json_path.is_file() {
            bail!(
                "{} not found: the model directory needs a Hugging Face tokenizer (tokenizer.json)",
                json_path.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&json_path)
            .map_err(|err| anyhow!("{}: not a valid tokenizer.json: {err}", json_path.display()))?;

        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = read_optional_json(&config_path)?.unwrap_or_default();
        let map_path = dir.join("special_tokens_map.json");
        let special_map: HashMap<String, serde_json::Value> =
            read_optional_json(&map_path)?.unwrap_or_default();
        let generation: GenerationConfig =
            read_optional_json(&dir.join("generation_config.json"))?.unwrap_or_default();

        let mut special_tokens = BTreeMap::new();
        for name in SPECIAL_TOKEN_NAMES {
            let declared = [(&config.tokens, &config_path), (&special_map, &map_path)]
                .into_iter()
                .find_map(|(map, path)| map.get(name).filter(|v| !v.is_null()).map(|v| (v, path)));
            if let Some((value, path)) = declared {
                let spec = TokenSpec::deserialize(value).map_err(|_| {
                    anyhow!(
                        "{}: {name} must be a string or an object with \"content\", got {value}",
                        path.display()
                    )
                })?;
                special_tokens.insert(name.to_string(), spec.content().to_string());
            }
        }
        let id_of = |name: &str| -> Option<u32> {
            let token = special_tokens.get(name)?;
            let id = inner.token_to_id(token);
            if id.is_none() {
                tracing::warn!(
                    "{name} {token:?} is not in the vocabulary of {}",
                    json_path.display()
                );
            }
            id
        };
        let bos = id_of("bos_token").or(generation.bos_token_id);
        let eos = id_of("eos_token");
        let mut stop_ids = match generation.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => Vec::new(),
        };
        if let Some(eos) = eos.filter(|id| !stop_ids.contains(id)) {
            stop_ids.push(eos);
        }

        let bos_eos_policy = bos_eos_policy(&config);
        if let Some(policy) = bos_eos_policy {
            if policy.add_bos && bos.is_none() || policy.add_eos && eos.is_none() {
                bail!(
                    "{}: add_bos_token/add_eos_token ask for a BOS/EOS token that is not defined",
                    config_path.display()
                );
            }
        }

        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.is_file() {
            let text = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("reading {}", jinja_path.display()))?;
            TemplateSource::Found {
                text,
                origin: jinja_path,
            }
        } else {
            match config.chat_template {
                None => TemplateSource::Missing,
                Some(TemplateSpec::One(text)) => TemplateSource::Found {
                    text,
                    origin: config_path,
                },
                Some(TemplateSpec::Named(list)) => {
                    match list.iter().position(|t| t.name == "default") {
                        Some(i) => TemplateSource::Found {
                            text: list
                                .into_iter()
                                .nth(i)
                                .map(|t| t.template)
                                .unwrap_or_default(),
                            origin: config_path,
                        },
                        None => TemplateSource::NoDefault {
                            names: list.into_iter().map(|t| t.name).collect(),
                            origin: config_path,
                        },
                    }
                }
            }
        };

        Ok(Self {
            inner,
            bos,
            eos,
            stop_ids,
            special_tokens,
            chat_template,
            bos_eos_policy,
            clean_up_spaces: config.clean_up_tokenization_spaces.unwrap_or(false),
        })
    }

    /// Token ids of `text`. With `add_special_tokens`, BOS/EOS are added as the model's tokenizer
    /// adds them (tokenizer.json's post-processor, or add_bos_token/add_eos_token for the
    /// tokenizer classes that honour those).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match self.bos_eos_policy.filter(|_| add_special_tokens) {
            Some(policy) => {
                let mut ids = Vec::new();
                ids.extend(self.bos.filter(|_| policy.add_bos));
                ids.extend(self.encode_raw(text, false)?);
                ids.extend(self.eos.filter(|_| policy.add_eos));
                Ok(ids)
            }
            None => self.encode_raw(text, add_special_tokens),
        }
    }

    fn encode_raw(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|err| anyhow!("tokenizing text: {err}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; with `skip_special_tokens`, special tokens (BOS, chat markers, ...) are
    /// left out. Applies clean_up_tokenization_spaces when the tokenizer config asks for it.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self.decode_raw(ids, skip_special_tokens)?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    fn decode_raw(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|err| anyhow!("decoding token ids: {err}"))
    }

    /// A decoder that turns generated ids into text as they arrive.
    pub fn text_stream(&self, skip_special_tokens: bool) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Every id that ends generation: generation_config.json's `eos_token_id` (an id or a list)
    /// and the tokenizer's `eos_token`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        matches!(self.chat_template, TemplateSource::Found { .. })
    }

    /// The conversation rendered by the model's chat template (chat_template.jinja, else the
    /// `chat_template` of tokenizer_config.json, the one named "default" if there are several).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let (text, origin) = match &self.chat_template {
            TemplateSource::Found { text, origin } => (text, origin),
            TemplateSource::Missing => {
                bail!("the tokenizer has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json)")
            }
            TemplateSource::NoDefault { names, origin } => bail!(
                "{}: several chat templates ({}) and none named \"default\"",
                origin.display(),
                names.join(", ")
            ),
        };
        let template = ChatTemplate::new(text).with_context(|| origin.display().to_string())?;
        template
            .render(messages, add_generation_prompt, &self.special_tokens)
            .with_context(|| origin.display().to_string())
    }

    /// The ids of a conversation rendered in the [`prompt_format`](Self::prompt_format). As in
    /// transformers, the rendered text is encoded without adding special tokens: the template
    /// writes BOS itself when the model wants one; the Alpaca prompt gets BOS as plain text does.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.render_conversation(messages, add_generation_prompt)?;
        self.encode(&text, self.prompt_format() == PromptFormat::Alpaca)
    }

    /// The tokenizer with the template `choice` asks for: `alpaca` drops the chat template,
    /// `chat` requires one, a file replaces it (checked to compile now).
    pub fn with_template(mut self, choice: &TemplateChoice) -> Result<Self> {
        match choice {
            TemplateChoice::Alpaca => self.chat_template = TemplateSource::Missing,
            TemplateChoice::Chat => {
                if matches!(self.chat_template, TemplateSource::Missing) {
                    bail!("template `chat`: the tokenizer has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json); use `alpaca` or a template file")
                }
            }
            TemplateChoice::File(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the chat template {}", path.display()))?;
                ChatTemplate::new(&text).with_context(|| path.display().to_string())?;
                self.chat_template = TemplateSource::Found {
                    text,
                    origin: path.clone(),
                };
            }
        }
        Ok(self)
    }

    /// How instructions and conversations are rendered: the chat template when there is one,
    /// else Alpaca's plain prompt (base models ship no template).
    pub fn prompt_format(&self) -> PromptFormat {
        match self.chat_template {
            TemplateSource::Missing => PromptFormat::Alpaca,
            _ => PromptFormat::ChatTemplate,
        }
    }

    /// The prompt format and where it comes from, for the log.
    pub fn describe_prompt_format(&self) -> String {
        match &self.chat_template {
            TemplateSource::Missing => {
                format!("{} (no chat template)", PromptFormat::Alpaca.name())
            }
            TemplateSource::Found { origin, .. } | TemplateSource::NoDefault { origin, .. } => {
                format!(
                    "{} of {}",
                    PromptFormat::ChatTemplate.name(),
                    origin.display()
                )
            }
        }
    }

    /// What decides rendered prompts (the template's text, or the Alpaca format), for cache keys.
    pub fn prompt_identity(&self) -> String {
        match &self.chat_template {
            TemplateSource::Missing => PromptFormat::Alpaca.name().to_string(),
            TemplateSource::Found { text, .. } => text.clone(),
            TemplateSource::NoDefault { names, .. } => names.join(","),
        }
    }

    /// An instruction (with an optional `input`, blank for none) and its `response`, or without
    /// a response the prompt that asks for it. Through a chat template they are a user turn
    /// (instruction, blank line, input) and an assistant turn.
    pub fn render_instruction(
        &self,
        instruction: &str,
        input: &str,
        response: Option<&str>,
    ) -> Result<String> {
        if self.prompt_format() == PromptFormat::Alpaca {
            return Ok(prompt_format::alpaca(instruction, input, response));
        }
        let user = if input.trim().is_empty() {
            instruction.to_owned()
        } else {
            format!("{instruction}\n\n{input}")
        };
        let mut messages = vec![ChatMessage::user(user)];
        messages.extend(response.map(ChatMessage::assistant));
        self.apply_chat_template(&messages, response.is_none())
    }

    /// A conversation in the [`prompt_format`](Self::prompt_format): the chat template, or in
    /// the Alpaca format one user instruction and its reply.
    pub fn render_conversation(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        if self.prompt_format() == PromptFormat::ChatTemplate {
            return self.apply_chat_template(messages, add_generation_prompt);
        }
        let turns: Vec<(&str, &str)> = messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        let (instruction, response) = prompt_format::alpaca_exchange(&turns)?;
        Ok(prompt_format::alpaca(instruction, "", response))
    }
}

/// The tokenizer classes whose transformers implementation replaces tokenizer.json's
/// post-processor with one built from add_bos_token/add_eos_token, and their defaults.
fn bos_eos_policy(config: &TokenizerConfig) -> Option<BosEosPolicy> {
    let class = config.tokenizer_class.as_deref()?;
    let default_bos = match class.strip_suffix("Fast").unwrap_or(class) {
        "LlamaTokenizer" | "CodeLlamaTokenizer" | "GemmaTokenizer" | "CohereTokenizer" => true,
        "GPTNeoXTokenizer" => false,
        _ => return None,
    };
    Some(BosEosPolicy {
        add_bos: config.add_bos_token.unwrap_or(default_bos),
        add_eos: config.add_eos_token.unwrap_or(false),
    })
}

/// transformers' `clean_up_tokenization`: drops the spaces that word-level tokenizers put
/// before punctuation and English contractions.
fn clean_up_tokenization(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |acc, (from, to)| acc.replace(from, to))
}

fn read_optional_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(value))
}

/// Incremental detokenization for streaming: each step returns the text that the new id
/// completes. A token that ends inside a multi-byte character yields nothing until the
/// character is complete, and the decoder's context-dependent spacing (e.g. SentencePiece's
/// leading space) is resolved by decoding a few previous ids along with the new one.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// Ids decoded together: those behind `prefix`, then those not yet emitted.
    ids: Vec<u32>,
    /// The text of `ids[..prefix_index]`, already emitted.
    prefix: String,
    prefix_index: usize,
}

impl TextStream<'_> {
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let prefix = self.decode(&self.ids)?;
            if !prefix.ends_with(char::REPLACEMENT_CHARACTER) {
                self.prefix = prefix;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = self.decode(&self.ids)?;
        if text.len() <= self.prefix.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let Some(new_text) = text.strip_prefix(self.prefix.as_str()) else {
            bail!("streaming decode: the text of earlier tokens changed after token {id}");
        };
        let new_text = new_text.to_string();
        let unread = self.ids.len() - self.prefix_index;
        self.ids.drain(..self.prefix_index);
        self.prefix = self.decode(&self.ids)?;
        self.prefix_index = unread;
        Ok(Some(new_text))
    }

    /// The text still held back (an incomplete character at the end of generation, written
    /// lossily).
    pub fn finish(self) -> Result<String> {
        let text = self.decode(&self.ids)?;
        Ok(text
            .strip_prefix(self.prefix.as_str())
            .unwrap_or(&text)
            .to_string())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode_raw(ids, self.skip_special_tokens)
    }
}
