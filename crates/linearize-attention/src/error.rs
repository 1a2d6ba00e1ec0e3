//! The crate's error type: every message names the tensor or setting and what was expected.
use tch::Kind;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tensor}: expected {expected}, got shape {got:?}")]
    Shape {
        tensor: &'static str,
        expected: String,
        got: Vec<i64>,
    },
    #[error("{tensor}: dtype {got:?} is not supported (expected f16, bf16, f32 or f64)")]
    Dtype { tensor: &'static str, got: Kind },
    #[error("{tensor}: {message}")]
    Value {
        tensor: &'static str,
        message: String,
    },
    #[error("{setting}: {message}")]
    Config {
        setting: &'static str,
        message: String,
    },
    /// A fused kernel failed to run (its message names the kernel).
    #[error("{0:#}")]
    Kernel(anyhow::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn config(setting: &'static str, message: impl Into<String>) -> Error {
    Error::Config {
        setting,
        message: message.into(),
    }
}

/// Checks a count setting that must be at least 1 (a chunk size, say).
pub(crate) fn at_least_one(setting: &'static str, value: i64) -> Result<()> {
    if value < 1 {
        return Err(config(setting, format!("must be >= 1, got {value}")));
    }
    Ok(())
}
