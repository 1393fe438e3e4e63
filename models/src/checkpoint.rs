//! A Hugging Face checkpoint directory: config.json, generation_config.json,
//! and one `model.safetensors` or shards listed by `model.safetensors.index.json`,
//! memory-mapped. Tensor errors name the tensor and the file holding it.

use crate::config::{token_ids, QwenMoeConfig};
use crate::error::{ModelError, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: QwenMoeConfig,
    /// The safetensors files, in index order.
    pub files: Vec<PathBuf>,
    /// EOS ids from generation_config.json, else config.json.
    pub eos_token_ids: Vec<u32>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))
}

impl Checkpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let cfg_path = dir.join("config.json");
        let mut config = QwenMoeConfig::from_json_str(&read(&cfg_path)?).map_err(|e| match e {
            ModelError::Config(m) => ModelError::file(&cfg_path, m),
            o => o,
        })?;
        let index = dir.join("model.safetensors.index.json");
        let files = if index.exists() {
            let v: serde_json::Value =
                serde_json::from_str(&read(&index)?).map_err(|e| ModelError::file(&index, e))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::file(&index, "no `weight_map` object"))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for f in map.values() {
                let f = f.as_str().ok_or_else(|| {
                    ModelError::file(&index, format!("weight_map value {f} is not a file name"))
                })?;
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            files
        } else {
            vec![dir.join("model.safetensors")]
        };
        for f in &files {
            if !f.is_file() {
                return Err(ModelError::file(f, "safetensors file not found"));
            }
        }
        let gen = dir.join("generation_config.json");
        let mut eos_token_ids = if gen.exists() {
            let v: serde_json::Value =
                serde_json::from_str(&read(&gen)?).map_err(|e| ModelError::file(&gen, e))?;
            token_ids(&v, "eos_token_id").map_err(|e| ModelError::file(&gen, e))?
        } else {
            vec![]
        };
        if eos_token_ids.is_empty() {
            eos_token_ids = config.eos_token_ids.clone();
        }
        // the model reports generation_config.json's EOS (as transformers stops on it)
        config.eos_token_ids = eos_token_ids.clone();
        Ok(Self {
            dir,
            config,
            files,
            eos_token_ids,
        })
    }

    /// A VarBuilder over the mmapped files; weights are converted to `dtype`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let backend = NamedBackend::new(&self.files)?;
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }
}

/// mmapped safetensors that know which file holds which tensor.
struct NamedBackend {
    st: MmapedSafetensors,
    file_of: HashMap<String, PathBuf>,
}

impl NamedBackend {
    fn new(files: &[PathBuf]) -> Result<Self> {
        let mut file_of = HashMap::new();
        for f in files {
            // SAFETY: the files are read-only inputs; candle's mmap loader has the same contract.
            let one = unsafe { MmapedSafetensors::new(f) }.map_err(|e| ModelError::file(f, e))?;
            for (name, _) in one.tensors() {
                file_of.insert(name, f.clone());
            }
        }
        let st = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| ModelError::file(&files[0], e))?;
        Ok(Self { st, file_of })
    }

    fn err(&self, name: &str, msg: impl std::fmt::Display) -> candle_core::Error {
        let file = self
            .file_of
            .get(name)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the checkpoint".into());
        candle_core::Error::wrap(ModelError::Tensor {
            name: name.to_string(),
            file,
            msg: msg.to_string(),
        })
    }
}

impl SimpleBackend for NamedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(self.err(
                name,
                format!("shape {:?}, expected {:?}", t.dims(), s.dims()),
            ));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if !self.file_of.contains_key(name) {
            return Err(self.err(name, "missing"));
        }
        self.st
            .load(name, dev)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| self.err(name, e))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file_of.contains_key(name)
    }
}
