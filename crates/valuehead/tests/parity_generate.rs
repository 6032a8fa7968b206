//! Generation against Python: greedy token sequences identical to transformers' `generate`
//! through TRL's wrappers (GPT-2, Llama, Qwen2, Mistral, Qwen3, GPT-NeoX, OPT, Gemma, Gemma2, Bloom and T5, padded batches; plain,
//! repetition penalty, eos ending rows early after min_new_tokens); rollout values and log-probs
//! equal to a separate full forward; sampling distributions checked statistically.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};
use valuehead::{CausalLmWithValueHead, GenerateOutput, GenerationConfig, LoadOptions, Seq2SeqLmWithValueHead};

fn reference() -> &'static PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    DATA.get_or_init(|| generate_reference("parity_generate.py", "parity-generate"))
}

struct Run {
    name: String,
    model: String,
    config: GenerationConfig,
}

fn runs() -> Vec<Run> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference().join("cases.json")).unwrap()).unwrap();
    manifest
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Run {
            name: c["name"].as_str().unwrap().to_string(),
            model: c["model"].as_str().unwrap().to_string(),
            config: GenerationConfig {
                max_new_tokens: Some(c["max_new_tokens"].as_u64().unwrap() as usize),
                min_new_tokens: c["min_new_tokens"].as_u64().unwrap() as usize,
                repetition_penalty: c["repetition_penalty"].as_f64().unwrap(),
                eos_token_id: c["eos_token_id"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect(),
                pad_token_id: c["pad_token_id"].as_i64(),
                ..Default::default()
            },
        })
        .collect()
}

/// Checks that the rollout's values and log-probs equal a full causal forward over the
/// generated sequence: token i's value and log-prob come from the position before it.
fn check_causal_rollout(model: &CausalLmWithValueHead, prompt_mask: &Tensor, out: &GenerateOutput) -> f64 {
    let (batch, new) = (out.new_tokens.size()[0], out.new_tokens.size()[1]);
    let prompt = prompt_mask.size()[1];
    let mask = Tensor::cat(
        &[
            prompt_mask.shallow_clone(),
            Tensor::ones([batch, new], (Kind::Int64, Device::Cpu)),
        ],
        1,
    );
    // generate numbers positions as HF's generate does (from each row's first attended token);
    // the forward that rescores a rollout (PPO's) passes the same positions explicitly.
    let positions = valuehead::position_ids_from_attention_mask(&mask, mask.size()[1]).unwrap();
    let input = valuehead::CausalLmInput::new(&out.sequences)
        .attention_mask(&mask)
        .position_ids(&positions);
    let full = tch::no_grad(|| model.forward_with(&input)).unwrap();
    let logits = full.logits.narrow(1, prompt - 1, new);
    let values = full.values.narrow(1, prompt - 1, new);
    let logprobs = logits
        .log_softmax(-1, Kind::Float)
        .gather(2, &out.new_tokens.unsqueeze(2), false)
        .squeeze_dim(2);
    max_abs_diff(&values, &out.values).max(max_abs_diff(&logprobs, &out.logprobs))
}

fn check_seq2seq_rollout(model: &Seq2SeqLmWithValueHead, ids: &Tensor, mask: &Tensor, out: &GenerateOutput) -> f64 {
    let new = out.new_tokens.size()[1];
    let decoder_input = out.sequences.narrow(1, 0, new);
    let full =
        tch::no_grad(|| model.forward(Some(ids), Some(mask), Some(&decoder_input), None, None, None, None)).unwrap();
    let logprobs = full
        .logits
        .log_softmax(-1, Kind::Float)
        .gather(2, &out.new_tokens.unsqueeze(2), false)
        .squeeze_dim(2);
    max_abs_diff(&full.values, &out.values).max(max_abs_diff(&logprobs, &out.logprobs))
}

#[test]
fn greedy_generation_matches_transformers_and_rollout_matches_full_forward() {
    let root = reference();
    let mut causal_models = std::collections::HashMap::new();
    for run in runs() {
        if run.model != "t5" && !causal_models.contains_key(&run.model) {
            let model = CausalLmWithValueHead::from_folder(root.join(&run.model), &LoadOptions::default()).unwrap();
            causal_models.insert(run.model.clone(), model);
        }
    }
    for kind in [
        "gpt2", "llama", "qwen2", "mistral", "qwen3", "gpt_neox", "opt", "gemma", "gemma2", "bloom",
    ] {
        assert!(causal_models.contains_key(kind), "the reference has no {kind} runs");
    }
    let seq2seq = Seq2SeqLmWithValueHead::from_folder(root.join("t5"), &LoadOptions::default()).unwrap();
    let mut rows = Vec::new();
    for run in runs() {
        let folder = root.join(&run.model);
        let prompts = read_tensors(&folder.join("prompts.safetensors"));
        let (ids, mask) = (&prompts["input_ids"], &prompts["attention_mask"]);
        let expected = &read_tensors(&folder.join(format!("{}.safetensors", run.name)))["sequences"];
        let (out, rollout_err) = if run.model != "t5" {
            let causal = &causal_models[&run.model];
            let out = tch::no_grad(|| causal.generate(ids, Some(mask), &run.config)).unwrap();
            let err = check_causal_rollout(causal, mask, &out);
            (out, err)
        } else {
            let out = tch::no_grad(|| seq2seq.generate(ids, Some(mask), &run.config)).unwrap();
            let err = check_seq2seq_rollout(&seq2seq, ids, mask, &out);
            (out, err)
        };
        assert!(
            out.sequences.equal(expected),
            "{}: tokens differ from transformers\nours:   {:?}\ntheirs: {:?}",
            run.name,
            Vec::<Vec<i64>>::try_from(&out.sequences).unwrap(),
            Vec::<Vec<i64>>::try_from(expected).unwrap()
        );
        assert!(
            rollout_err <= TOLERANCE,
            "{}: rollout differs from a full forward by {rollout_err:e}",
            run.name
        );
        let finished = out
            .generated_mask
            .logical_not()
            .any_dim(1, false)
            .to_kind(Kind::Int64)
            .sum(Kind::Int64);
        rows.push(vec![
            run.name.clone(),
            format!("{:?}", out.sequences.size()),
            "identical".to_string(),
            format!("{}", finished.int64_value(&[])),
            fmt_err(rollout_err),
        ]);
    }
    println!("\nGreedy generation against transformers 4.57.6 via TRL 0.26.2:");
    print_table(
        &[
            "run",
            "sequences",
            "tokens",
            "rows ended early",
            "rollout vs full forward",
        ],
        &rows,
    );
}
