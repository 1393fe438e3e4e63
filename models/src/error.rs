//! Errors that name the file, key or tensor at fault.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },

    #[error("config.json: {0}")]
    Config(String),

    #[error("tensor `{name}` in {file}: {msg}")]
    Tensor {
        name: String,
        file: String,
        msg: String,
    },

    #[error("kv cache full: {needed} more blocks needed, {free} free")]
    CacheFull { needed: usize, free: usize },

    #[error("{0}")]
    Input(String),

    #[error(transparent)]
    Moe(#[from] candle_moe::MoeError),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn file(path: &std::path::Path, msg: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.display().to_string(),
            msg: msg.to_string(),
        }
    }
}
