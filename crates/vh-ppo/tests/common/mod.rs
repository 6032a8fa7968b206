//! Tiny checkpoints for the PPO tests: the fixtures of crates/valuehead/tests/common (whose
//! module also drives the `vh` binary, which this package does not build), reduced to what these
//! tests use.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Deterministic noise, uniform in [-scale, scale), from a hash of the element index and `seed`
/// (the same checkpoint whatever the test threads do with the global generator).
pub fn pseudo_random(size: &[i64], seed: f64, scale: f64) -> Tensor {
    let n: i64 = size.iter().product();
    let x = Tensor::arange(n, (Kind::Double, tch::Device::Cpu)) * 12.9898 + seed * 78.233;
    let uniform = (x.sin() * 43758.5453).frac().abs();
    ((uniform * 2.0 - 1.0) * scale).to_kind(Kind::Float).reshape(size)
}

/// Writes a small random GPT-2 checkpoint with a value head into `dir`: the registry's tiny
/// config with `overrides` on top, every parameter filled with deterministic noise.
pub fn write_tiny_gpt2(dir: &Path, overrides: serde_json::Value) {
    let arch = vh_models::architecture("gpt2").expect("gpt2 is registered");
    let mut cfg = (arch.tiny_config)();
    for (k, v) in overrides.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let hidden = match arch.family {
        vh_models::Family::Causal(build) => build(vs.root(), &cfg, &vh_models::BuildOptions::default())
            .unwrap()
            .hidden_size(),
        vh_models::Family::Seq2Seq(_) => unreachable!("gpt2 is decoder-only"),
    };
    let mut names: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, v)| (n, v.size())).collect();
    names.sort();
    let mut tensors: Vec<(String, Tensor)> = names
        .into_iter()
        .enumerate()
        .map(|(i, (n, size))| (n, pseudo_random(&size, i as f64, 0.35)))
        .collect();
    tensors.push(("v_head.summary.weight".into(), pseudo_random(&[1, hidden], 1000.0, 1.7)));
    tensors.push((
        "v_head.summary.bias".into(),
        Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
    ));
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    vh_hub::write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
}

/// Writes a word-level tokenizer.json into `dir` whose vocabulary is `w0`, `w1`, ... (`size`
/// words, `w0` doubling as the unknown token).
pub fn write_word_tokenizer(dir: &Path, size: u32) {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab: HashMap<String, u32> = (0..size).map(|i| (format!("w{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("w0".into())
        .build()
        .unwrap();
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
}
