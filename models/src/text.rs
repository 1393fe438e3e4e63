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
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::file(path, e))?;
        check_bpe_merges(&json["model"]).map_err(|e| ModelError::file(path, e))?;
        let inner = text
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| ModelError::file(path, e))?;
        Ok(Self {
            inner,
            path: path.display().to_string(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::File {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }
}

/// Every BPE merge `a b` must join two vocabulary tokens into a third, `b`
/// starting with the continuing-subword prefix: the tokenizers crate
/// assumes so while building the model and panics on a file that breaks it.
fn check_bpe_merges(model: &serde_json::Value) -> std::result::Result<(), String> {
    use serde_json::Value;
    let (Some(vocab), Some(merges)) = (
        model.get("vocab").and_then(Value::as_object),
        model.get("merges").and_then(Value::as_array),
    ) else {
        return Ok(()); // not BPE, or malformed: the parser says which
    };
    let prefix = match model.get("continuing_subword_prefix") {
        Some(Value::String(p)) => p.as_str(),
        _ => "",
    };
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = match m {
            // the merges file's version line, which the crate skips
            Value::String(s) if s.starts_with("#version") => continue,
            Value::String(s) => match s.split_once(' ') {
                Some(p) => p,
                None => continue,
            },
            Value::Array(p) => match (
                p.first().and_then(Value::as_str),
                p.get(1).and_then(Value::as_str),
            ) {
                (Some(a), Some(b)) => (a, b),
                _ => continue,
            },
            _ => continue,
        };
        let Some(rest) = b.strip_prefix(prefix) else {
            return Err(format!(
                "model.merges[{i}]: `{b}` does not start with the continuing_subword_prefix `{prefix}`"
            ));
        };
        for t in [a, b, &format!("{a}{rest}")] {
            if !vocab.contains_key(t) {
                return Err(format!("model.merges[{i}]: `{t}` is not in model.vocab"));
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::check_bpe_merges;
    use serde_json::json;

    #[test]
    fn merges_are_checked_as_the_tokenizers_crate_reads_them() {
        let model =
            |merges| json!({"vocab": {"a": 0, "b": 1, "ab": 2, "##b": 3}, "merges": merges});
        // the version line is skipped; pairs as strings or arrays
        assert!(check_bpe_merges(&model(json!(["#version: 0.2", "a b", ["a", "b"]]))).is_ok());
        let e = check_bpe_merges(&model(json!(["a ab"]))).unwrap_err();
        assert!(e.contains("merges[0]") && e.contains("`aab`"), "{e}");
        let mut m = model(json!(["a ##b"]));
        m["continuing_subword_prefix"] = json!("##");
        assert!(check_bpe_merges(&m).is_ok());
        m["merges"] = json!(["a b"]);
        let e = check_bpe_merges(&m).unwrap_err();
        assert!(e.contains("continuing_subword_prefix"), "{e}");
    }
}
