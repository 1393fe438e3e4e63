//! Text ↔ token ids. The engine and the evaluation take the [`TextCodec`]
//! trait; [`HfTokenizer`] implements it for a checkpoint's `tokenizer.json`.

use crate::error::{ModelError, Result};
use std::path::Path;

pub trait TextCodec: Send + Sync {
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Decodes `ids`, skipping special tokens.
    fn decode(&self, ids: &[u32]) -> Result<String>;
}

/// A Hugging Face `tokenizer.json`.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl HfTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::file(path, e))?;
        Ok(Self {
            inner,
            path: path.display().to_string(),
        })
    }

    /// The id of a token (special tokens included), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn err(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::File {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }
}

impl TextCodec for HfTokenizer {
    /// Encodes without adding special tokens (prompts carry their own).
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| self.err(e))?
            .get_ids()
            .to_vec())
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }
}
