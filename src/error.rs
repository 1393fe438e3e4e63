//! Typed errors for everything a user or a file controls.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MoeError {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid MoE config: {0}")]
    InvalidConfig(String),

    /// Expert-parallel topology that cannot be realised.
    #[error("invalid expert-parallel setup: {0}")]
    ExpertParallel(String),

    /// A weight tensor is missing, has the wrong shape or the wrong dtype.
    #[error("weight `{name}`: {msg}")]
    Weight { name: String, msg: String },

    /// An input tensor given to `forward` does not fit the layer.
    #[error("bad input: {0}")]
    Input(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, MoeError>;

impl MoeError {
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Self::InvalidConfig(msg.into())
    }
    pub(crate) fn input(msg: impl Into<String>) -> Self {
        Self::Input(msg.into())
    }
    pub(crate) fn weight(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Weight {
            name: name.into(),
            msg: msg.into(),
        }
    }
}

/// `candle_nn::Module` returns candle errors: keep the typed error inside.
impl From<MoeError> for candle_core::Error {
    fn from(e: MoeError) -> Self {
        match e {
            MoeError::Candle(c) => c,
            other => candle_core::Error::wrap(other),
        }
    }
}
