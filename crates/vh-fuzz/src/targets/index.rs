//! Target `index`: a sharded checkpoint's index. The input is written as
//! `model.safetensors.index.json` into a folder of valid safetensors shards, and as
//! `pytorch_model.bin.index.json` into a folder of valid pytorch_model.bin shards, and both
//! folders are read with `vh_hub::ModelFolder::open(..).tensors()`. Beside the shards lie
//! things an index must not make the loader hang on or read: a FIFO, a link to /dev/zero, a
//! folder, a link loop, a file of the other format.

use super::{describe_tensors, hub_feature, write_file, FuzzError, Result, Target};
use crate::mutate::mutate_json_or_bytes;
use crate::rng::Rng;
use serde_json::json;
use std::path::{Path, PathBuf};

/// The safetensors shards of the fixture.
pub const ST_SHARDS: [&str; 2] = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
/// The pytorch_model.bin shards of the fixture.
pub const BIN_SHARDS: [&str; 2] = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"];

/// Keys, shard names, tensor names and hostile names, for the mutator.
pub const DICT: &[&str] = &[
    "weight_map",
    "metadata",
    "total_size",
    "a",
    "b",
    "c",
    "v_head.summary.weight",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "fifo.safetensors",
    "zero.safetensors",
    "loop.safetensors",
    "sub",
    "empty.safetensors",
    "config.json",
    "model.safetensors.index.json",
    "..",
    ".",
    "",
    "../fixtures/st/model-00001-of-00002.safetensors",
    "/etc/passwd",
    "a\\b",
];

/// Writes the shards both folders share: `a` [2] and `b` [3] in the first shard, `c` [1] in
/// the second, in each format.
pub fn prepare(fixtures: &Path) -> Result<()> {
    let mut rng = Rng::new(0);
    let first = vec![
        super::st_format::tensor("a", "F32", &[2], |i| i as i64),
        super::st_format::tensor("b", "F32", &[3], |i| i as i64),
    ];
    let second = vec![super::st_format::tensor("c", "F32", &[1], |_| 7)];
    write_file(
        &fixtures.join("st").join(ST_SHARDS[0]),
        &super::st_format::write(&first, None, &mut rng),
    )?;
    write_file(
        &fixtures.join("st").join(ST_SHARDS[1]),
        &super::st_format::write(&second, None, &mut rng),
    )?;
    let first = super::torch_bin::f32_archive(&[("a", vec![0.0, 1.0]), ("b", vec![0.0, 1.0, 2.0])]);
    let second = super::torch_bin::f32_archive(&[("c", vec![7.0])]);
    write_file(&fixtures.join("bin").join(BIN_SHARDS[0]), &first)?;
    write_file(&fixtures.join("bin").join(BIN_SHARDS[1]), &second)
}

/// The `index` target in a worker: two folders of linked shards and hostile neighbours.
pub struct IndexTarget {
    scratch: PathBuf,
    fixtures: PathBuf,
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).map_err(|e| FuzzError::io(link, e))
}

impl IndexTarget {
    /// Builds `scratch/st` and `scratch/bin`: every shard of both formats linked in, plus a
    /// FIFO, a link to /dev/zero, a folder, a link loop, an empty file and a config.json.
    pub fn open(fixtures: &Path, scratch: &Path) -> Result<Self> {
        for format in ["st", "bin"] {
            let dir = scratch.join(format);
            std::fs::create_dir_all(dir.join("sub")).map_err(|e| FuzzError::io(&dir, e))?;
            for (from, shards) in [("st", ST_SHARDS), ("bin", BIN_SHARDS)] {
                for shard in shards {
                    symlink(&fixtures.join(from).join(shard), &dir.join(shard))?;
                }
            }
            symlink(Path::new("/dev/zero"), &dir.join("zero.safetensors"))?;
            symlink(&dir.join("loop.safetensors"), &dir.join("loop.safetensors"))?;
            write_file(&dir.join("empty.safetensors"), b"")?;
            write_file(&dir.join("config.json"), b"{\"model_type\": \"gpt2\"}")?;
            let fifo = dir.join("fifo.safetensors");
            let _ = std::fs::remove_file(&fifo);
            let c_path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes())
                .map_err(|e| FuzzError::io(&fifo, std::io::Error::other(e)))?;
            // SAFETY: mkfifo with a valid NUL-terminated path.
            if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
                return Err(FuzzError::io(&fifo, std::io::Error::last_os_error()));
            }
        }
        Ok(Self {
            scratch: scratch.to_path_buf(),
            fixtures: fixtures.to_path_buf(),
        })
    }
}

impl Target for IndexTarget {
    fn execute(&mut self, input: &[u8]) -> Vec<String> {
        let dirs = [self.scratch.as_path(), self.fixtures.as_path()];
        let mut out = Vec::new();
        for (format, index) in [
            ("st", "model.safetensors.index.json"),
            ("bin", "pytorch_model.bin.index.json"),
        ] {
            let dir = self.scratch.join(format);
            if let Err(e) = std::fs::write(dir.join(index), input) {
                out.push(format!("write:err:{e}"));
                continue;
            }
            let read = vh_hub::ModelFolder::open(&dir).and_then(|f| f.tensors());
            out.push(hub_feature(format, &read, &dirs, |t| describe_tensors(t)));
        }
        out
    }
}

/// A mutant index: JSON-aware mostly, byte-level sometimes.
pub fn mutate(input: &[u8], rng: &mut Rng, other: &[u8]) -> Vec<u8> {
    mutate_json_or_bytes(input, rng, other, DICT)
}

/// Valid indexes of both formats, and indexes naming each hostile neighbour, a missing shard,
/// a tensor its shard lacks, a path outside the folder.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let index = |map: serde_json::Value| json!({"metadata": {"total_size": 24}, "weight_map": map});
    let mut seeds = vec![
        (
            "valid-safetensors.json".to_string(),
            index(json!({"a": ST_SHARDS[0], "b": ST_SHARDS[0], "c": ST_SHARDS[1]})),
        ),
        (
            "valid-bin.json".to_string(),
            index(json!({"a": BIN_SHARDS[0], "b": BIN_SHARDS[0], "c": BIN_SHARDS[1]})),
        ),
        (
            "missing-tensor.json".to_string(),
            index(json!({"a": ST_SHARDS[0], "z": ST_SHARDS[1]})),
        ),
        (
            "missing-shard.json".to_string(),
            index(json!({"a": "model-00009-of-00009.safetensors"})),
        ),
        (
            "outside.json".to_string(),
            index(json!({"a": "../st/model-00001-of-00002.safetensors"})),
        ),
        ("empty-map.json".to_string(), index(json!({}))),
    ];
    let hostile = [
        ("fifo", "fifo.safetensors"),
        ("dev-zero", "zero.safetensors"),
        ("folder", "sub"),
        ("link-loop", "loop.safetensors"),
        ("empty-file", "empty.safetensors"),
        ("json-shard", "config.json"),
        ("parent", ".."),
        ("self", "."),
    ];
    for (label, name) in hostile {
        seeds.push((format!("hostile-{label}.json"), index(json!({"a": name}))));
    }
    seeds
        .into_iter()
        .map(|(name, v)| (name, serde_json::to_vec_pretty(&v).unwrap_or_default()))
        .collect()
}
