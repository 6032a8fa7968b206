//! Target `safetensors`: bytes written to a file and read by `vh_hub::read_safetensors`, the
//! reader of every model.safetensors, shard and `vh` input file.

use super::st_format::{self, StTensor, DTYPES};
use super::{describe_tensors, hub_feature, kind_features, Target};
use crate::mutate::mutate_bytes;
use crate::rng::Rng;
use std::path::{Path, PathBuf};

/// Header keys and dtypes, for the mutator.
pub const DICT: &[&str] = &[
    "dtype",
    "shape",
    "data_offsets",
    "__metadata__",
    "format",
    "pt",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "U8",
    "BOOL",
    "F64",
    "F8_E4M3",
    "C64",
];

/// The `safetensors` target in a worker.
pub struct SafetensorsTarget {
    scratch: PathBuf,
    path: PathBuf,
}

impl SafetensorsTarget {
    /// The target writing its inputs to `scratch/in.safetensors`.
    pub fn open(scratch: &Path) -> Self {
        Self {
            scratch: scratch.to_path_buf(),
            path: scratch.join("in.safetensors"),
        }
    }
}

impl Target for SafetensorsTarget {
    fn execute(&mut self, input: &[u8]) -> Vec<String> {
        if let Err(e) = std::fs::write(&self.path, input) {
            return vec![format!("write:err:{e}")];
        }
        let read = vh_hub::read_safetensors(&self.path);
        let mut out = vec![hub_feature("read", &read, &[&self.scratch], |t| describe_tensors(t))];
        out.extend(kind_features("read", &read));
        out
    }
}

fn any_value(_name: &str, rng: &mut Rng, _i: usize) -> i64 {
    rng.below(7) as i64 - 3
}

/// A mutant file: tensor-level (names, dtypes, shapes, values), header-level (the JSON, the
/// length prefix) or byte-level.
pub fn mutate(input: &[u8], rng: &mut Rng, other: &[u8]) -> Vec<u8> {
    match rng.below(10) {
        0..=3 => {
            if let Some((mut tensors, mut metadata)) = st_format::parse(input) {
                for _ in 0..1 + rng.below(3) {
                    st_format::mutate_tensors(
                        &mut tensors,
                        &mut metadata,
                        rng,
                        &["a", "b", "", "__metadata__"],
                        any_value,
                    );
                }
                return st_format::write(&tensors, metadata.as_ref(), rng);
            }
        }
        4..=6 => {
            if let Some(out) = st_format::mutate_header(input, rng, DICT) {
                return out;
            }
        }
        _ => {}
    }
    mutate_bytes(input, rng, other, DICT)
}

/// Valid files of every dtype the reader accepts, an empty one, views sharing no data, and
/// metadata.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng::new(0);
    let mut seeds = Vec::new();
    let accepted = &DTYPES[..13];
    let all: Vec<StTensor> = accepted
        .iter()
        .filter(|d| !matches!(**d, "U16" | "U32" | "U64"))
        .map(|d| st_format::tensor(&format!("t_{d}"), d, &[2, 3], |i| i as i64 - 2))
        .collect();
    seeds.push((
        "all-dtypes.safetensors".to_string(),
        st_format::write(&all, Some(&serde_json::json!({"format": "pt"})), &mut rng),
    ));
    seeds.push(("empty.safetensors".to_string(), st_format::write(&[], None, &mut rng)));
    let shapes = vec![
        st_format::tensor("scalar", "F32", &[], |_| 3),
        st_format::tensor("zero", "F32", &[0, 4], |_| 0),
        st_format::tensor("deep", "I64", &[1, 2, 1, 2], |i| i as i64),
    ];
    seeds.push((
        "shapes.safetensors".to_string(),
        st_format::write(&shapes, None, &mut rng),
    ));
    seeds.push((
        "unsupported-dtype.safetensors".to_string(),
        st_format::write(&[st_format::tensor("u", "U16", &[2], |_| 1)], None, &mut rng),
    ));
    seeds
}
