//! Target `config`: JSON bytes as config.json. Parsed by serde_json, then by each
//! architecture's config parser, `ValueHeadConfig::resolve`, `GenerationConfig::from_model` and
//! `validate`; then written as the config.json of a folder beside a small valid checkpoint of
//! the architecture its `model_type` names and loaded with `ValueHeadModel::from_folder` (the
//! shape checks must refuse every config that does not fit the weights before anything of the
//! config's size is allocated). A config that loads runs one forward pass and a short
//! generation, so that values which pass the checks but break the math are found too.

use super::fixtures::{link_weights, tiny_config, ARCHITECTURES};
use super::{feature, Result, Target};
use crate::mutate::mutate_json_or_bytes;
use crate::rng::Rng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::Tensor;
use valuehead::{GenerationConfig, LoadOptions, ValueHeadConfig, ValueHeadModel, ValueHeadOptions};

/// Keys and values the config parsers know, for the mutator.
pub const DICT: &[&str] = &[
    "model_type",
    "architectures",
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "layer_norm_epsilon",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "tie_word_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "use_sliding_window",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "dropout_rate",
    "feed_forward_proj",
    "decoder_start_token_id",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "summary_dropout_prob",
    "word_embed_proj_dim",
    "is_encoder_decoder",
    "decoder",
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "gpt2",
    "llama",
    "qwen2",
    "t5",
    "linear",
    "dynamic",
    "llama3",
    "default",
    "gelu_new",
    "relu",
    "silu",
    "gated-gelu",
    "gated-silu",
    "GPT2LMHeadModel",
    "GPT2Model",
    "LlamaForCausalLM",
    "T5ForConditionalGeneration",
];

/// The `config` target in a worker: one folder per architecture, each with the fixture's
/// weights linked in and the fuzzed config.json written beside them.
pub struct ConfigTarget {
    folders: Vec<(&'static str, PathBuf)>,
    scratch: PathBuf,
    fixtures: PathBuf,
}

impl ConfigTarget {
    /// Links the fixtures' weights into `scratch/<arch>/`.
    pub fn open(fixtures: &Path, scratch: &Path) -> Result<Self> {
        let mut folders = Vec::new();
        for arch in ARCHITECTURES {
            let dir = scratch.join(arch);
            link_weights(&fixtures.join(arch), &dir)?;
            folders.push((arch, dir));
        }
        Ok(Self {
            folders,
            scratch: scratch.to_path_buf(),
            fixtures: fixtures.to_path_buf(),
        })
    }
}

/// A forward pass and a short greedy generation on a loaded model, as features.
fn run_model(model: &ValueHeadModel, out: &mut Vec<String>, dirs: &[&Path]) {
    let ids = Tensor::from_slice2(&[[1i64, 2, 3], [4, 5, 6]]);
    let mask = Tensor::from_slice2(&[[0i64, 1, 1], [1, 1, 1]]);
    let forward = tch::no_grad(|| match model {
        ValueHeadModel::Causal(m) => m.forward(&ids, Some(&mask), None, Some(&ids)).map(|o| o.logits.size()),
        ValueHeadModel::Seq2Seq(m) => m
            .forward(Some(&ids), Some(&mask), None, None, None, None, Some(&ids))
            .map(|o| o.logits.size()),
    });
    out.push(feature("forward", &forward, dirs, |s| format!("{s:?}")));
    let config = model.default_generation_config();
    out.push(feature("generation_config", &config, dirs, |_| String::new()));
    if let Ok(mut config) = config {
        // A few tokens are enough to run every step of the loop; the config's own limit is
        // checked by `new_tokens` above and in `generate`, which is given a capped copy.
        let wanted = config.new_tokens(3).unwrap_or(1);
        config.max_new_tokens = Some(wanted.clamp(1, 3));
        config.seed = Some(0);
        let generated = tch::no_grad(|| model.generate(&ids, Some(&mask), &config)).map(|o| o.values.size());
        out.push(feature("generate", &generated, dirs, |s| format!("{s:?}")));
    }
}

impl Target for ConfigTarget {
    fn execute(&mut self, input: &[u8]) -> Vec<String> {
        let dirs = [self.scratch.as_path(), self.fixtures.as_path()];
        let dirs = &dirs[..];
        let value: std::result::Result<Value, _> = serde_json::from_slice(input);
        let mut out = vec![feature("json", &value, dirs, |v| {
            match v {
                Value::Object(_) => "object",
                _ => "other",
            }
            .to_string()
        })];
        let Ok(value) = value else { return out };
        out.push(feature(
            "gpt2",
            &vh_models::gpt2::Gpt2Config::from_json(&value),
            dirs,
            |_| String::new(),
        ));
        out.push(feature(
            "llama",
            &vh_models::llama::LlamaConfig::from_json(&value),
            dirs,
            |_| String::new(),
        ));
        out.push(feature("t5", &vh_models::t5::T5Config::from_json(&value), dirs, |_| {
            String::new()
        }));
        let head = ValueHeadConfig::resolve(&value, &ValueHeadOptions::default(), None);
        out.push(feature("value_head", &head, dirs, |_| String::new()));
        let generation = GenerationConfig::from_model(&value, Some(&value));
        out.push(feature("generation", &generation, dirs, |_| String::new()));
        if let Ok(generation) = &generation {
            let vocab = value.get("vocab_size").and_then(Value::as_i64).unwrap_or(50);
            out.push(feature(
                "generation_validate",
                &generation.validate(vocab),
                dirs,
                |_| String::new(),
            ));
            out.push(feature("new_tokens", &generation.new_tokens(1), dirs, |_| {
                String::new()
            }));
        }
        // The folder whose weights match the named architecture (GPT-2's for anything else).
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or("gpt2");
        let dir = self
            .folders
            .iter()
            .find(|(arch, _)| *arch == model_type)
            .unwrap_or(&self.folders[0])
            .1
            .clone();
        let config_path = dir.join("config.json");
        if let Err(e) = std::fs::write(&config_path, input) {
            out.push(format!("write:err:{e}"));
            return out;
        }
        let loaded = ValueHeadModel::from_folder(&dir, &LoadOptions::default());
        out.push(feature("load", &loaded, dirs, |m| {
            match m {
                ValueHeadModel::Causal(_) => "causal",
                ValueHeadModel::Seq2Seq(_) => "seq2seq",
            }
            .to_string()
        }));
        if let Ok(model) = &loaded {
            run_model(model, &mut out, dirs);
        }
        out
    }
}

/// A mutant config: JSON-aware mostly, byte-level sometimes.
pub fn mutate(input: &[u8], rng: &mut Rng, other: &[u8]) -> Vec<u8> {
    mutate_json_or_bytes(input, rng, other, DICT)
}

/// The tiny models' configs, plus variants that reach other branches of the parsers.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Value)> = ARCHITECTURES
        .iter()
        .map(|arch| (format!("{arch}.json"), tiny_config(arch)))
        .collect();
    let mut with = |name: &str, arch: &str, extra: Value| {
        let mut config = tiny_config(arch);
        for (k, v) in extra.as_object().into_iter().flatten() {
            config[k] = v.clone();
        }
        seeds.push((name.to_string(), config));
    };
    with(
        "gpt2-variants.json",
        "gpt2",
        json!({"activation_function": "relu", "n_inner": 64, "scale_attn_by_inverse_layer_idx": true,
               "reorder_and_upcast_attn": true, "summary_dropout_prob": null, "max_length": 8, "do_sample": true,
               "temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3, "min_new_tokens": 2}),
    );
    with(
        "llama-linear.json",
        "llama",
        json!({"rope_scaling": {"type": "linear", "factor": 2.0}, "head_dim": 8, "attention_bias": true,
               "rope_theta": 500000.0, "tie_word_embeddings": true}),
    );
    with(
        "llama-dynamic.json",
        "llama",
        json!({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}, "hidden_act": "gelu", "eos_token_id": [2, 3],
               "max_new_tokens": 4}),
    );
    with(
        "t5-v1.json",
        "t5",
        json!({"feed_forward_proj": "relu", "tie_word_embeddings": true, "relative_attention_num_buckets": 8,
               "relative_attention_max_distance": 16, "is_encoder_decoder": true}),
    );
    with(
        "word-embed-proj.json",
        "gpt2",
        json!({"word_embed_proj_dim": 16, "is_encoder_decoder": true, "decoder": {"hidden_size": 16}}),
    );
    seeds
        .into_iter()
        .map(|(name, v)| (name, serde_json::to_vec_pretty(&v).unwrap_or_default()))
        .collect()
}
