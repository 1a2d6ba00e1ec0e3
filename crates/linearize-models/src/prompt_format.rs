//! How an instruction or a conversation becomes model text: through a chat template (the
//! tokenizer's own, or a Jinja file a recipe names), or, for base models that ship no template,
//! through Alpaca's plain instruction prompt.
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// The text formats a prompt can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptFormat {
    /// The tokenizer's chat template (or the file that replaced it).
    ChatTemplate,
    /// Alpaca's plain instruction prompt.
    Alpaca,
}

impl PromptFormat {
    /// The name logs and errors use.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChatTemplate => "chat template",
            Self::Alpaca => "alpaca (plain instruction prompt)",
        }
    }
}

/// The template a recipe or a command asks for: `alpaca`, `chat` (the tokenizer's, which must
/// exist) or the path of a Jinja chat template file. Not given: the tokenizer's chat template
/// when it has one, else `alpaca`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TemplateChoice {
    Alpaca,
    Chat,
    File(PathBuf),
}

impl From<String> for TemplateChoice {
    fn from(value: String) -> Self {
        match value.as_str() {
            "alpaca" => Self::Alpaca,
            "chat" => Self::Chat,
            _ => Self::File(value.into()),
        }
    }
}

impl From<TemplateChoice> for String {
    fn from(choice: TemplateChoice) -> Self {
        choice.to_string()
    }
}

impl fmt::Display for TemplateChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Alpaca => f.write_str("alpaca"),
            Self::Chat => f.write_str("chat"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The preambles and headers of the Alpaca prompt, as in alpaca-lora's `templates/alpaca.json`
/// (Stanford Alpaca's prompt with a line break after `### Response:`).
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an \
input that provides further context. Write a response that appropriately completes the request.\
\n\n";
const ALPACA_WITHOUT_INPUT: &str = "Below is an instruction that describes a task. Write a \
response that appropriately completes the request.\n\n";

/// Alpaca's prompt for `instruction` (and `input` unless blank) followed by `response`; without
/// a response it ends at `### Response:\n`, where the model's answer starts.
pub fn alpaca(instruction: &str, input: &str, response: Option<&str>) -> String {
    let mut text = if input.trim().is_empty() {
        format!("{ALPACA_WITHOUT_INPUT}### Instruction:\n{instruction}\n\n")
    } else {
        format!("{ALPACA_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n")
    };
    text.push_str("### Response:\n");
    text.push_str(response.unwrap_or(""));
    text
}

/// The instruction and response of a conversation the Alpaca prompt can hold: one user turn,
/// then the assistant's reply or nothing (a generation prompt).
pub fn alpaca_exchange<'a>(
    roles_contents: &[(&'a str, &'a str)],
) -> Result<(&'a str, Option<&'a str>)> {
    match roles_contents {
        [("user", instruction)] => Ok((instruction, None)),
        [("user", instruction), ("assistant", response)] => Ok((instruction, Some(response))),
        other => {
            let roles: Vec<&str> = other.iter().map(|(role, _)| *role).collect();
            bail!(
                "the alpaca format holds one user instruction and the assistant's response, not \
                 a conversation of roles [{}]; give a chat template (data.template: FILE, or \
                 --template FILE)",
                roles.join(", ")
            )
        }
    }
}

/// The prompts of a prompts file: one a line, surrounding whitespace trimmed, blank lines and
/// lines starting with `#` skipped (eval's `generations.prompts_file`, the data's
/// `teacher_samples.prompts_file`). A file without any prompt is an error.
pub fn read_prompts_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the prompts file {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    ensure!(!prompts.is_empty(), "{}: no prompts", path.display());
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_read_and_write_as_strings() {
        for (text, choice) in [
            ("alpaca", TemplateChoice::Alpaca),
            ("chat", TemplateChoice::Chat),
            ("tpl/x.jinja", TemplateChoice::File("tpl/x.jinja".into())),
        ] {
            assert_eq!(TemplateChoice::from(text.to_string()), choice);
            assert_eq!(choice.to_string(), text);
        }
    }

    #[test]
    fn conversations_beyond_one_exchange_are_refused() {
        assert_eq!(alpaca_exchange(&[("user", "q")]).unwrap(), ("q", None));
        let err = alpaca_exchange(&[("system", "s"), ("user", "q")]).unwrap_err();
        assert!(err.to_string().contains("[system, user]"), "{err}");
    }
}
