//! Writing safetensors checkpoints tensor by tensor: the header is laid out
//! from names, dtypes and shapes first, then each tensor's bytes are made
//! and written in turn (never the whole model in memory). Shards of at most
//! `shard_bytes` with `model.safetensors.index.json`, or one
//! `model.safetensors` when everything fits one shard — as transformers'
//! `save_pretrained` lays them out.

use crate::error::{ModelError, Result};
use serde_json::json;
use std::io::{BufWriter, Write};
use std::path::Path;

/// One tensor to write.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    /// The safetensors dtype tag: `BF16`, `F16`, `F32`, `F8_E4M3`, `U8`.
    pub dtype: &'static str,
    pub shape: Vec<usize>,
}

impl OutTensor {
    pub fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n * match self.dtype {
            "F32" | "I32" | "U32" => 4,
            "BF16" | "F16" => 2,
            _ => 1,
        }
    }
}

/// Writes `tensors` into `dir`; `make(i)` returns tensor `i`'s bytes (called
/// once per tensor, in order); `done(i)` after each is written.
pub fn write_sharded(
    dir: &Path,
    tensors: &[OutTensor],
    shard_bytes: usize,
    make: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
    done: &mut dyn FnMut(usize),
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::file(dir, e))?;
    let mut shards: Vec<std::ops::Range<usize>> = vec![];
    let (mut start, mut size) = (0, 0);
    for (i, t) in tensors.iter().enumerate() {
        if size > 0 && size + t.bytes() > shard_bytes {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += t.bytes();
    }
    if start < tensors.len() || shards.is_empty() {
        shards.push(start..tensors.len());
    }
    let single = shards.len() == 1;
    let mut weight_map = serde_json::Map::new();
    for (s, r) in shards.iter().enumerate() {
        let file = if single {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards.len())
        };
        let path = dir.join(&file);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0;
        for t in &tensors[r.clone()] {
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.bytes()]}),
            );
            off += t.bytes();
            weight_map.insert(t.name.clone(), json!(file));
        }
        let mut h = serde_json::to_vec(&header).map_err(|e| ModelError::file(&path, e))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let tmp = path.with_extension("part");
        let io = |e: std::io::Error| ModelError::file(&tmp, e);
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::with_capacity(8 << 20, f);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&h).map_err(io)?;
        for i in r.clone() {
            let bytes = make(i)?;
            if bytes.len() != tensors[i].bytes() {
                return Err(ModelError::Tensor {
                    name: tensors[i].name.clone(),
                    file: file.clone(),
                    msg: format!(
                        "{} bytes made, {} laid out",
                        bytes.len(),
                        tensors[i].bytes()
                    ),
                });
            }
            w.write_all(&bytes).map_err(io)?;
            done(i);
        }
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(|e| ModelError::file(&path, e))?;
    }
    if !single {
        let total: usize = tensors.iter().map(OutTensor::bytes).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = dir.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap_or_default())
            .map_err(|e| ModelError::file(&p, e))?;
    }
    Ok(())
}
