//! Hugging Face chat templates rendered with minijinja, in the environment transformers renders
//! them in: trim_blocks and lstrip_blocks on, loop controls, Python string/dict methods,
//! `raise_exception`, `strftime_now`, a `json.dumps`-compatible `tojson`, and `{% generation %}`
//! blocks (which only mark assistant text for training masks, so they render their body).
mod pyjson;

use anyhow::{anyhow, Result};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const TEMPLATE_NAME: &str = "chat_template";
/// Instructions one render may execute. Real templates take a few hundred per message; a
/// template from a model directory that loops (nested `range`s) stops here, within a second,
/// instead of running forever.
const FUEL: u64 = 20_000_000;
/// The rendered text may hold this many bytes plus [`OUTPUT_PER_CONTENT_BYTE`] per byte of the
/// messages' content: a conversation is its content plus markup, never megabytes more.
const OUTPUT_BASE: usize = 1 << 20;
const OUTPUT_PER_CONTENT_BYTE: usize = 4;

/// One turn of a conversation, as HF templates expect it (`message['role']`, `message.content`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names the line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_blocks(source))
            .map_err(|err| anyhow!("invalid chat template: {err}"))?;
        Ok(Self { env })
    }

    /// Renders `messages` with the variables HF passes: the tokenizer's special tokens
    /// (`bos_token`, `eos_token`, ...), `add_generation_prompt`, and `tools`/`documents` as none.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special_tokens: &BTreeMap<String, String>,
    ) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = special_tokens
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        let template = self.env.get_template(TEMPLATE_NAME)?;
        let content: usize = messages.iter().map(|m| m.content.len()).sum();
        let mut out = CappedOutput {
            text: Vec::new(),
            cap: OUTPUT_BASE.saturating_add(content.saturating_mul(OUTPUT_PER_CONTENT_BYTE)),
            exceeded: false,
        };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.text)
                .map_err(|_| anyhow!("the chat template rendered invalid UTF-8")),
            Err(err) if err.kind() == ErrorKind::OutOfFuel => Err(anyhow!(
                "rendering the chat template: stopped after {FUEL} instructions (a loop that does \
                 not end?)"
            )),
            Err(_) if out.exceeded => Err(anyhow!(
                "rendering the chat template: the output passed {} bytes for {content} bytes of \
                 messages",
                out.cap
            )),
            Err(err) => Err(anyhow!("rendering the chat template: {err}")),
        }
    }
}

/// The rendered text, refusing to grow past `cap` bytes.
struct CappedOutput {
    text: Vec<u8>,
    cap: usize,
    exceeded: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.cap {
            self.exceeded = true;
            return Err(std::io::Error::other("output cap reached"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `datetime.now().strftime(format)` (templates use it to date the system prompt).
fn strftime_now(format: String) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    })?;
    Ok(out)
}

fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(v.as_usize().ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                )
            })?),
        }),
    };
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")? {
        None => None,
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => Some((item, key)),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair (item_separator, key_separator)",
                ))
            }
        },
    };
    let options = pyjson::DumpOptions {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        indent,
        separators,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    pyjson::dumps(&value, &options).map(Value::from)
}

/// Turns `{% generation %}` / `{% endgeneration %}` (a transformers-only tag) into an always-true
/// `if`, keeping the tag's whitespace-control markers so the output is unchanged.
fn rewrite_generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let end = start + len + 2;
        out.push_str(&rest[..start]);
        out.push_str(&rewrite_tag(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn rewrite_tag(tag: &str) -> String {
    let inner = &tag[2..tag.len() - 2];
    let open = if inner.starts_with(['-', '+']) {
        &inner[..1]
    } else {
        ""
    };
    let close = if inner.len() > open.len() && inner.ends_with(['-', '+']) {
        &inner[inner.len() - 1..]
    } else {
        ""
    };
    match inner[open.len()..inner.len() - close.len()].trim() {
        "generation" => format!("{{%{open} if true {close}%}}"),
        "endgeneration" => format!("{{%{open} endif {close}%}}"),
        _ => tag.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new(source)?.render(messages, false, &BTreeMap::new())
    }

    #[test]
    fn generation_tags_keep_whitespace_control() {
        assert_eq!(
            rewrite_generation_blocks("a{%- generation +%}b{% endgeneration -%}c{% if x %}"),
            "a{%- if true +%}b{% endif -%}c{% if x %}"
        );
        let out = render(
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
            &[ChatMessage::assistant("hi")],
        )
        .unwrap();
        assert_eq!(out, "hi");
    }

    #[test]
    fn strftime_now_formats_the_current_date() {
        let before = chrono::Local::now().format("%Y").to_string();
        let out = render("{{ strftime_now('%Y') }}", &[]).unwrap();
        let after = chrono::Local::now().format("%Y").to_string();
        assert!(out == before || out == after, "{out}");
        let err = render("{{ strftime_now('%Q') }}", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("invalid format"), "{err:#}");
    }

    #[test]
    fn syntax_errors_and_raised_exceptions_are_reported() {
        let err = ChatTemplate::new("{% for m in messages %}").err().unwrap();
        assert!(
            format!("{err:#}").starts_with("invalid chat template"),
            "{err:#}"
        );
        let err = render("{{ raise_exception('roles must alternate') }}", &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("roles must alternate"),
            "{err:#}"
        );
    }

    #[test]
    fn tojson_rejects_bad_options() {
        let err = render("{{ 1 | tojson(indent=[1]) }}", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("indent"), "{err:#}");
        let err = render("{{ 1 | tojson(colour=1) }}", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("colour"), "{err:#}");
    }
}
