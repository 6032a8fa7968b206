//! Tiny models with random weights (GPT-2, Llama, Qwen2, T5), written once per run for the
//! `config` and `inputs` targets. They are built with the library's own model classes, so the
//! checkpoint holds exactly the tensors its config asks for, plus a value head.

use super::{write_file, FuzzError, Result};
use serde_json::{json, Value};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The architectures of the tiny models, as their folder names under the fixtures.
pub const ARCHITECTURES: [&str; 4] = ["gpt2", "llama", "qwen2", "t5"];

/// The vocabulary of the tiny decoder-only models (the T5 one has 40).
pub const VOCAB: i64 = 50;

/// The config.json of the tiny model of `arch` (one of [`ARCHITECTURES`]).
pub fn tiny_config(arch: &str) -> Value {
    match arch {
        "gpt2" => json!({
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": VOCAB,
            "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 4, "bos_token_id": 2, "eos_token_id": 2
        }),
        "llama" => json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "eos_token_id": 2, "pad_token_id": 0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        }),
        "qwen2" => json!({
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": VOCAB, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1,
            "max_position_embeddings": 64, "eos_token_id": [2, 3], "tie_word_embeddings": true
        }),
        _ => json!({
            "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 40, "d_model": 16,
            "d_kv": 4, "d_ff": 24, "num_layers": 2, "num_decoder_layers": 1, "num_heads": 4,
            "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
            "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1
        }),
    }
}

/// Deterministic values in [-scale, scale) for a parameter of shape `size` (the `seed` makes
/// parameters differ from each other).
fn pseudo_random(size: &[i64], seed: f64, scale: f64) -> Result<Tensor> {
    let n: i64 = size.iter().product();
    let x = Tensor::f_arange(n, (Kind::Double, Device::Cpu)).map_err(FuzzError::library)? * 12.9898 + seed * 78.233;
    let uniform = (x.sin() * 43758.5453).frac().abs();
    ((uniform * 2.0 - 1.0) * scale)
        .to_kind(Kind::Float)
        .f_reshape(size)
        .map_err(FuzzError::library)
}

/// Writes the tiny model of `arch` into `dir`: config.json and model.safetensors.
pub fn write_tiny_model(dir: &Path, arch: &str) -> Result<()> {
    let config = tiny_config(arch);
    let vs = VarStore::new(Device::Cpu);
    let hidden = match arch {
        "gpt2" => {
            let cfg = vh_models::gpt2::Gpt2Config::from_json(&config).map_err(FuzzError::library)?;
            vh_models::gpt2::Gpt2LmHeadModel::new(vs.root(), &cfg).map_err(FuzzError::library)?;
            cfg.n_embd
        }
        "llama" | "qwen2" => {
            let cfg = vh_models::llama::LlamaConfig::from_json(&config).map_err(FuzzError::library)?;
            vh_models::llama::LlamaForCausalLM::new(vs.root(), &cfg).map_err(FuzzError::library)?;
            cfg.hidden_size
        }
        _ => {
            let cfg = vh_models::t5::T5Config::from_json(&config).map_err(FuzzError::library)?;
            vh_models::t5::T5ForConditionalGeneration::new(vs.root(), &cfg).map_err(FuzzError::library)?;
            cfg.d_model
        }
    };
    let mut shapes: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
    shapes.sort();
    let mut tensors = Vec::new();
    for (i, (name, size)) in shapes.into_iter().enumerate() {
        tensors.push((name, pseudo_random(&size, i as f64, 0.35)?));
    }
    tensors.push((
        "v_head.summary.weight".into(),
        pseudo_random(&[1, hidden], 1000.0, 1.7)?,
    ));
    tensors.push((
        "v_head.summary.bias".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let text = serde_json::to_vec_pretty(&config).map_err(FuzzError::library)?;
    write_file(&dir.join("config.json"), &text)?;
    vh_hub::write_safetensors(&dir.join("model.safetensors"), &tensors).map_err(FuzzError::library)
}

/// Writes every tiny model, each into `fixtures/<arch>`.
pub fn write_tiny_models(fixtures: &Path) -> Result<()> {
    for arch in ARCHITECTURES {
        write_tiny_model(&fixtures.join(arch), arch)?;
    }
    Ok(())
}

/// Makes `dir` a folder whose `model.safetensors` is a link to the fixture model's, so that a
/// worker can write its own config.json beside shared weights.
pub fn link_weights(fixture_model: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| FuzzError::io(dir, e))?;
    let link = dir.join("model.safetensors");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(fixture_model.join("model.safetensors"), &link).map_err(|e| FuzzError::io(&link, e))
}
