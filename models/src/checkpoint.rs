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
    /// The mappings handed to var builders, so their pages can be released.
    mapped: MappedPages,
}

/// The mappings of a checkpoint's var builders (a cheap handle).
#[derive(Clone, Default)]
pub struct MappedPages(std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<NamedBackend>>>>);

impl std::fmt::Debug for MappedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MappedPages")
    }
}

impl MappedPages {
    /// Drops this process's resident pages of every tensor whose name
    /// starts with `prefix` (e.g. a layer already loaded): the mappings are
    /// read only, so the pages stay in the page cache and a later read
    /// faults them back in. Keeps a load's peak RSS to what it holds plus
    /// the layer in flight.
    pub fn release(&self, prefix: &str) {
        if let Ok(m) = self.0.lock() {
            for b in m.iter() {
                b.release(prefix);
            }
        }
    }
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
            mapped: Default::default(),
        })
    }

    /// A VarBuilder over the mmapped files; weights are converted to `dtype`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let backend = std::sync::Arc::new(NamedBackend::new(&self.files)?);
        if let Ok(mut m) = self.mapped.0.lock() {
            m.push(backend.clone());
        }
        Ok(VarBuilder::from_backend(
            Box::new(Shared(backend)),
            dtype,
            device.clone(),
        ))
    }

    /// A handle to release the pages of what var builders have read.
    pub fn mapped_pages(&self) -> MappedPages {
        self.mapped.clone()
    }
}

/// Drops this process's resident pages under `data`, bytes of a read-only
/// file mapping (safetensors' mmapped tensor data).
pub(crate) fn release_mapped(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = data.as_ptr() as usize / page * page;
    let end = (data.as_ptr() as usize + data.len()).div_ceil(page) * page;
    // SAFETY: [start, end) lies within the read-only file mapping holding
    // `data` (widened to whole pages of the same mapping; safetensors maps
    // whole files). MADV_DONTNEED on such a mapping only drops page-table
    // entries: later reads fault the same file bytes back in, so no
    // reference into it can observe a change.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

/// A var-builder backend over a mapping the checkpoint keeps a handle to.
struct Shared(std::sync::Arc<NamedBackend>);

impl SimpleBackend for Shared {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
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

    fn release(&self, prefix: &str) {
        for name in self.file_of.keys().filter(|n| n.starts_with(prefix)) {
            if let Ok(view) = self.st.get(name) {
                release_mapped(view.data());
            }
        }
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
