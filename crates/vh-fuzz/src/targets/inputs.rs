//! Target `inputs`: a `vh forward` input file (safetensors) run through
//! `valuehead::cli_io::forward_file`, the code `vh forward` runs, on a tiny GPT-2, a tiny Llama
//! and a tiny T5 model loaded once per worker. Mutations act on the tensors: their names,
//! dtypes, shapes and values (ids outside the vocabulary, masks that are not 0/1, labels, rows
//! without one attended token, sequences past the position limit).

use super::fixtures::{ARCHITECTURES, VOCAB};
use super::st_format::{self, StTensor};
use super::{feature, FuzzError, Result, Target};
use crate::mutate::mutate_bytes;
use crate::rng::Rng;
use std::path::{Path, PathBuf};
use valuehead::{LoadOptions, ValueHeadModel};

/// Tensor names the mutator uses: the accepted ones and a few that are not.
const NAMES: &[&str] = &[
    "input_ids",
    "input_ids",
    "attention_mask",
    "labels",
    "decoder_input_ids",
    "decoder_attention_mask",
    "position_ids",
    "",
];

/// The `inputs` target in a worker: the tiny models, loaded once.
pub struct InputsTarget {
    models: Vec<(&'static str, ValueHeadModel)>,
    scratch: PathBuf,
    fixtures: PathBuf,
}

impl InputsTarget {
    /// Loads the tiny GPT-2, Llama and T5 models of the fixtures.
    pub fn open(fixtures: &Path, scratch: &Path) -> Result<Self> {
        let mut models = Vec::new();
        for arch in ARCHITECTURES.into_iter().filter(|a| *a != "qwen2") {
            let model = ValueHeadModel::from_folder(fixtures.join(arch), &LoadOptions::default())
                .map_err(FuzzError::library)?;
            models.push((arch, model));
        }
        Ok(Self {
            models,
            scratch: scratch.to_path_buf(),
            fixtures: fixtures.to_path_buf(),
        })
    }
}

impl Target for InputsTarget {
    fn execute(&mut self, input: &[u8]) -> Vec<String> {
        let dirs = [self.scratch.as_path(), self.fixtures.as_path()];
        let (inputs, out) = (
            self.scratch.join("in.safetensors"),
            self.scratch.join("out.safetensors"),
        );
        if let Err(e) = std::fs::write(&inputs, input) {
            return vec![format!("write:err:{e}")];
        }
        let features: Vec<String> = self
            .models
            .iter()
            .map(|(arch, model)| {
                let result = valuehead::cli_io::forward_file(model, &inputs, &out);
                feature(arch, &result, &dirs, |_| String::new())
            })
            .collect();
        // A file that no model gets past (e.g. a broken header) is one feature, not three.
        let outcomes: Vec<&str> = features
            .iter()
            .filter_map(|f| f.split_once(':').map(|(_, o)| o))
            .collect();
        if outcomes.len() == features.len() && outcomes.windows(2).all(|w| w[0] == w[1]) {
            return vec![format!("all:{}", outcomes[0])];
        }
        features
    }
}

/// Values that fit each input: ids mostly inside every tiny vocabulary (T5's is 40), masks
/// mostly 1, labels sometimes -100.
fn value_for(name: &str, rng: &mut Rng, _i: usize) -> i64 {
    match name {
        "attention_mask" | "decoder_attention_mask" => i64::from(!rng.one_in(4)),
        "labels" if rng.one_in(4) => -100,
        _ if rng.one_in(50) => 40 + rng.below(VOCAB as usize - 38) as i64,
        _ => rng.below(40) as i64,
    }
}

/// A mutant input file: tensor-level mostly, header- or byte-level sometimes.
pub fn mutate(input: &[u8], rng: &mut Rng, other: &[u8]) -> Vec<u8> {
    match rng.below(10) {
        0..=6 => {
            if let Some((mut tensors, mut metadata)) = st_format::parse(input) {
                for _ in 0..1 + rng.below(3) {
                    st_format::mutate_tensors(&mut tensors, &mut metadata, rng, NAMES, value_for);
                }
                return st_format::write(&tensors, metadata.as_ref(), rng);
            }
        }
        7 => {
            if let Some(out) = st_format::mutate_header(input, rng, super::safetensors::DICT) {
                return out;
            }
        }
        _ => {}
    }
    mutate_bytes(input, rng, other, super::safetensors::DICT)
}

fn ids(name: &str, rows: &[&[i64]]) -> StTensor {
    let shape = [rows.len() as u64, rows.first().map_or(0, |r| r.len()) as u64];
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    st_format::tensor(name, "I64", &shape, |i| flat[i])
}

/// Valid input files for both kinds of model, and near-valid ones.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng::new(0);
    let metadata = serde_json::json!({"format": "pt"});
    let files: Vec<(&str, Vec<StTensor>)> = vec![
        (
            "causal-padded.safetensors",
            vec![
                ids("input_ids", &[&[0, 0, 5, 6, 7], &[1, 2, 3, 4, 5]]),
                ids("attention_mask", &[&[0, 0, 1, 1, 1], &[1, 1, 1, 1, 1]]),
                ids("labels", &[&[-100, -100, 5, 6, 7], &[1, 2, 3, 4, 5]]),
            ],
        ),
        ("ids-only.safetensors", vec![ids("input_ids", &[&[3, 1, 4, 1]])]),
        (
            "seq2seq.safetensors",
            vec![
                ids("input_ids", &[&[3, 4, 5, 1], &[6, 1, 0, 0]]),
                ids("attention_mask", &[&[1, 1, 1, 1], &[1, 1, 0, 0]]),
                ids("decoder_input_ids", &[&[0, 7, 8], &[0, 9, 0]]),
                ids("decoder_attention_mask", &[&[1, 1, 1], &[1, 1, 0]]),
                ids("labels", &[&[7, 8, 1], &[9, 1, -100]]),
            ],
        ),
        (
            "seq2seq-labels.safetensors",
            vec![ids("input_ids", &[&[3, 4, 5]]), ids("labels", &[&[7, 8, 9, 1]])],
        ),
        (
            "position-limit.safetensors",
            vec![ids("input_ids", &[&[1; 16]]), ids("attention_mask", &[&[1; 16]])],
        ),
        (
            "int32-ids.safetensors",
            vec![st_format::tensor("input_ids", "I32", &[1, 3], |i| i as i64 + 1)],
        ),
    ];
    files
        .into_iter()
        .map(|(name, tensors)| (name.to_string(), st_format::write(&tensors, Some(&metadata), &mut rng)))
        .collect()
}
