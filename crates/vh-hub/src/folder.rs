//! A local model folder in the HF layout: config.json plus weights.

use crate::error::{HubError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The weights file of a single-file safetensors checkpoint.
pub const SAFETENSORS_WEIGHTS: &str = "model.safetensors";
/// The weights file of a single-file PyTorch checkpoint.
pub const TORCH_WEIGHTS: &str = "pytorch_model.bin";
/// The index of a sharded PyTorch checkpoint.
pub const TORCH_INDEX: &str = "pytorch_model.bin.index.json";
/// The model configuration file.
pub const CONFIG: &str = "config.json";
/// The generation defaults file.
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// A reader of one weights file (safetensors or pytorch_model.bin), for the shards of an index.
type ReadTensors = fn(&Path) -> Result<Vec<(String, Tensor)>>;

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = crate::files::read_text_capped(path, crate::files::MAX_JSON_BYTES)?;
    serde_json::from_str(&text).map_err(|e| HubError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A local checkpoint folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    dir: PathBuf,
}

impl ModelFolder {
    /// Opens an existing folder. A folder missing because a save was killed between the two
    /// renames of its fallback path is first restored from its aside copy; the staging and
    /// trash folders of saves are refused, as they may be incomplete.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if crate::checkpoint::is_unfinished_save(dir) {
            return Err(HubError::NotAModelFolder {
                path: dir.to_path_buf(),
                reason: "it is the hidden staging or trash folder of a save, which may be incomplete".to_string(),
            });
        }
        if std::fs::symlink_metadata(dir).is_err() {
            crate::checkpoint::recover_missing_folder(dir);
        }
        if !dir.is_dir() {
            return Err(HubError::NotFound {
                what: "model folder".to_string(),
                path: dir.to_path_buf(),
            });
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The folder's path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// config.json as a JSON object.
    pub fn config(&self) -> Result<Value> {
        let path = self.dir.join(CONFIG);
        let value = read_json(&path)?;
        if !value.is_object() {
            return Err(HubError::Json {
                path,
                message: "expected a JSON object".to_string(),
            });
        }
        Ok(value)
    }

    /// generation_config.json, when the folder has one.
    pub fn generation_config(&self) -> Result<Option<Value>> {
        let path = self.dir.join(GENERATION_CONFIG);
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }

    /// Every tensor of the checkpoint's weights, on the CPU, from the first of
    /// `model.safetensors`, `model.safetensors.index.json` (its shards), `pytorch_model.bin` and
    /// `pytorch_model.bin.index.json` that the folder holds. Every shard an index names must
    /// exist and hold the tensors it assigns to it.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        type Reader = fn(&Path) -> Result<Vec<(String, Tensor)>>;
        let safetensors: Reader = crate::read_safetensors;
        let torch_bin: Reader = crate::torch_bin::read_torch_bin;
        let sources = [
            (SAFETENSORS_WEIGHTS, false, safetensors),
            (crate::checkpoint::SAFETENSORS_INDEX, true, safetensors),
            (TORCH_WEIGHTS, false, torch_bin),
            (TORCH_INDEX, true, torch_bin),
        ];
        for (file, is_index, read) in sources {
            let path = self.dir.join(file);
            if path.exists() {
                return if is_index {
                    self.read_sharded(&path, read)
                } else {
                    read(&path)
                };
            }
        }
        Err(HubError::NotFound {
            what: "model weights (model.safetensors, pytorch_model.bin or an index)".into(),
            path: self.dir.clone(),
        })
    }

    fn read_sharded(&self, index_path: &Path, read: ReadTensors) -> Result<Vec<(String, Tensor)>> {
        let index = read_json(index_path)?;
        let bad = |message: &str| HubError::Json {
            path: index_path.to_path_buf(),
            message: message.to_string(),
        };
        let weight_map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no `weight_map` object"))?;
        let mut shards: Vec<&str> = Vec::new();
        for file in weight_map.values() {
            let file = file
                .as_str()
                .ok_or_else(|| bad("`weight_map` values must be file names"))?;
            if file.contains('/') || file.contains('\\') {
                return Err(bad("shard names must be plain file names"));
            }
            if !shards.contains(&file) {
                shards.push(file);
            }
        }
        let mut tensors = Vec::with_capacity(weight_map.len());
        for file in shards {
            tensors.extend(read(&self.dir.join(file))?);
        }
        if let Some(missing) = weight_map.keys().find(|name| !tensors.iter().any(|(n, _)| n == *name)) {
            return Err(HubError::safetensors(
                index_path,
                format!("the index lists `{missing}` but its shard lacks it"),
            ));
        }
        Ok(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_malformed_configs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ModelFolder::open(dir.path().join("nope")),
            Err(HubError::NotFound { .. })
        ));
        let folder = ModelFolder::open(dir.path()).unwrap();
        assert!(matches!(folder.config(), Err(HubError::NotFound { .. })));
        std::fs::write(dir.path().join(CONFIG), "{not json").unwrap();
        assert!(matches!(folder.config(), Err(HubError::Json { .. })));
        std::fs::write(dir.path().join(CONFIG), "[1, 2]").unwrap();
        assert!(matches!(folder.config(), Err(HubError::Json { .. })));
        std::fs::write(dir.path().join(CONFIG), r#"{"model_type": "gpt2"}"#).unwrap();
        assert_eq!(folder.config().unwrap()["model_type"], "gpt2");
        assert!(matches!(folder.tensors(), Err(HubError::NotFound { .. })));
        std::fs::write(dir.path().join(TORCH_WEIGHTS), b"not a zip").unwrap();
        assert!(matches!(folder.tensors(), Err(HubError::Safetensors { .. })));
    }
}
