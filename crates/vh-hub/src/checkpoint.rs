//! Writing checkpoint folders as transformers does (config.json, generation_config.json,
//! model.safetensors or shards with model.safetensors.index.json), atomically.

use crate::error::{HubError, Result};
use crate::folder::{CONFIG, GENERATION_CONFIG, SAFETENSORS_WEIGHTS};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The index file of a sharded safetensors checkpoint.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// Whether a file name is one of the weight files this writer replaces.
fn is_weight_file(name: &str) -> bool {
    name == SAFETENSORS_WEIGHTS
        || name == SAFETENSORS_INDEX
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// Splits tensors into shards of at most `max_shard_size` bytes (a tensor larger than that gets
/// a shard of its own), keeping their order, as transformers' `split_torch_state_dict_into_shards`.
fn shard(tensors: &[(String, Tensor)], max_shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current = 0u64;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if shards.is_empty() || current + bytes > max_shard_size {
            shards.push(Vec::new());
            current = 0;
        }
        shards.last_mut().expect("pushed above").push(i);
        current += bytes;
    }
    shards
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| HubError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    crate::atomic_write(path, format!("{text}\n").as_bytes())
}

/// Writes a checkpoint folder: `config.json`, `generation_config.json` (when given) and the
/// tensors, in one `model.safetensors` or, when `max_shard_size` (bytes) is exceeded, in
/// `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`.
///
/// The folder is written aside and swapped into place, so an interrupted save never leaves a
/// folder that loads as a valid checkpoint. Other files already in `dir` (tokenizer, README)
/// are kept; its previous weight files are replaced.
pub fn write_checkpoint(
    dir: &Path,
    config: &Value,
    generation_config: Option<&Value>,
    tensors: &[(String, Tensor)],
    max_shard_size: Option<u64>,
) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .ok_or_else(|| HubError::io(dir, std::io::Error::other("not a folder path")))?;
    std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, e))?;
    let staging = parent.join(format!(".{}.saving-{}", name.to_string_lossy(), std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| HubError::io(&staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| HubError::io(&staging, e))?;
    let result = fill_staging(&staging, dir, config, generation_config, tensors, max_shard_size)
        .and_then(|()| swap_into_place(&staging, dir));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn fill_staging(
    staging: &Path,
    dir: &Path,
    config: &Value,
    generation_config: Option<&Value>,
    tensors: &[(String, Tensor)],
    max_shard_size: Option<u64>,
) -> Result<()> {
    // Keep what the folder already holds besides the files written here.
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(|e| HubError::io(dir, e))? {
            let entry = entry.map_err(|e| HubError::io(dir, e))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let written = file_name == CONFIG || file_name == GENERATION_CONFIG || is_weight_file(&file_name);
            if entry.path().is_file() && !written {
                std::fs::copy(entry.path(), staging.join(&file_name)).map_err(|e| HubError::io(&entry.path(), e))?;
            }
        }
    }
    write_json(&staging.join(CONFIG), config)?;
    if let Some(generation_config) = generation_config {
        write_json(&staging.join(GENERATION_CONFIG), generation_config)?;
    }
    let shards = match max_shard_size {
        Some(max) => shard(tensors, max),
        None => vec![(0..tensors.len()).collect()],
    };
    if shards.len() <= 1 {
        return crate::write_safetensors(&staging.join(SAFETENSORS_WEIGHTS), tensors);
    }
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    for (n, indices) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", n + 1, shards.len());
        let part: Vec<(String, Tensor)> = indices
            .iter()
            .map(|&i| (tensors[i].0.clone(), tensors[i].1.shallow_clone()))
            .collect();
        for (name, t) in &part {
            weight_map.insert(name.clone(), file.clone());
            total_size += t.numel() * t.kind().elt_size_in_bytes();
        }
        crate::write_safetensors(&staging.join(&file), &part)?;
    }
    write_json(
        &staging.join(SAFETENSORS_INDEX),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    )
}

/// Replaces `dir` by `staging`: the old folder is moved aside, the new one renamed in, then the
/// old one removed.
fn swap_into_place(staging: &Path, dir: &Path) -> Result<()> {
    let old: Option<PathBuf> = if dir.exists() {
        let aside = staging.with_extension("old");
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(|e| HubError::io(&aside, e))?;
        }
        std::fs::rename(dir, &aside).map_err(|e| HubError::io(dir, e))?;
        Some(aside)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(staging, dir) {
        if let Some(aside) = &old {
            let _ = std::fs::rename(aside, dir);
        }
        return Err(HubError::io(dir, e));
    }
    if let Some(aside) = old {
        std::fs::remove_dir_all(&aside).map_err(|e| HubError::io(&aside, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelFolder;
    use tch::{Device, Kind};

    fn tensors() -> Vec<(String, Tensor)> {
        (0..5)
            .map(|i| {
                (
                    format!("t{i}"),
                    Tensor::full([16], i as f64, (Kind::Float, Device::Cpu)),
                )
            })
            .collect()
    }

    #[test]
    fn writes_one_file_or_shards_and_reads_them_back() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let config = json!({"model_type": "gpt2"});
        write_checkpoint(&dir, &config, Some(&json!({"eos_token_id": 1})), &tensors(), None).unwrap();
        assert!(dir.join(SAFETENSORS_WEIGHTS).exists() && dir.join(GENERATION_CONFIG).exists());
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();

        // 64 bytes per tensor, shards of at most 130 bytes: 2 + 2 + 1 tensors.
        write_checkpoint(&dir, &config, None, &tensors(), Some(130)).unwrap();
        let files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            files.contains(&"model-00003-of-00003.safetensors".to_string()),
            "{files:?}"
        );
        assert!(
            !files.contains(&SAFETENSORS_WEIGHTS.to_string()),
            "the old single file is replaced"
        );
        assert!(files.contains(&"tokenizer.json".to_string()), "other files are kept");
        assert!(!files.contains(&GENERATION_CONFIG.to_string()));
        let back = ModelFolder::open(&dir).unwrap().tensors().unwrap();
        assert_eq!(back.len(), 5);
        for (name, t) in back {
            let i: f64 = name[1..].parse().unwrap();
            assert_eq!(t.double_value(&[3]), i);
        }
        let leftovers: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no staging folders left: {leftovers:?}");
    }

    #[test]
    fn an_index_naming_a_missing_shard_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        write_checkpoint(&dir, &json!({}), None, &tensors(), Some(130)).unwrap();
        std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
        assert!(matches!(
            ModelFolder::open(&dir).unwrap().tensors(),
            Err(HubError::NotFound { .. })
        ));
    }
}
