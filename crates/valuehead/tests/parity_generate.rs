//! Generation against Python: greedy token sequences identical to transformers' `generate`
//! through TRL's wrappers (GPT-2, Llama, Qwen2, Mistral, Qwen3, GPT-NeoX, OPT, Gemma, Gemma2, Phi3, Bloom, Cohere, DBRX, T5 and Bart, padded
//! batches; plain, repetition penalty, eos ending rows early after min_new_tokens; Bart with its forced first and
//! last tokens; a Phi3 whose LongRoPE switches factors during decoding, where HF reruns the whole sequence); rollout
//! values and log-probs
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
    /// The first generated column whose pass saw the whole sequence with the factors a full
    /// forward uses (0; for a Phi3 whose LongRoPE switches mid-way, the column after the rerun).
    rollout_from: i64,
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
                // What the model's generation config forces (Bart's forced_bos/eos_token_id).
                forced_bos_token_id: c["forced_bos_token_id"].as_i64(),
                forced_eos_token_id: match &c["forced_eos_token_id"] {
                    serde_json::Value::Array(ids) => ids.iter().map(|v| v.as_i64().unwrap()).collect(),
                    v => v.as_i64().into_iter().collect(),
                },
                ..Default::default()
            },
            rollout_from: c.get("rollout_from").and_then(serde_json::Value::as_i64).unwrap_or(0),
        })
        .collect()
}

/// How far the rollout's values and log-probs are from a full causal forward over the generated
/// sequence (token i's value and log-prob come from the position before it), over the generated
/// columns `from..` and, separately, `..from`.
fn check_causal_rollout(
    model: &CausalLmWithValueHead,
    prompt_mask: &Tensor,
    out: &GenerateOutput,
    from: i64,
) -> (f64, Option<f64>) {
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
    let gap = |start: i64, len: i64| {
        max_abs_diff(&values.narrow(1, start, len), &out.values.narrow(1, start, len)).max(max_abs_diff(
            &logprobs.narrow(1, start, len),
            &out.logprobs.narrow(1, start, len),
        ))
    };
    // Rows may all have ended before the switch: then every column is from before it.
    let from = from.min(new);
    let after = if from < new { gap(from, new - from) } else { 0.0 };
    (after, (from > 0).then(|| gap(0, from)))
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
    let mut seq2seq_models = std::collections::HashMap::new();
    for run in runs() {
        let folder = root.join(&run.model);
        if valuehead::is_seq2seq_model_type(&run.model) {
            if !seq2seq_models.contains_key(&run.model) {
                let model = Seq2SeqLmWithValueHead::from_folder(folder, &LoadOptions::default()).unwrap();
                seq2seq_models.insert(run.model.clone(), model);
            }
        } else if !causal_models.contains_key(&run.model) {
            let model = CausalLmWithValueHead::from_folder(folder, &LoadOptions::default()).unwrap();
            causal_models.insert(run.model.clone(), model);
        }
    }
    for kind in [
        "gpt2",
        "llama",
        "qwen2",
        "mistral",
        "qwen3",
        "gpt_neox",
        "opt",
        "gemma",
        "gemma2",
        "phi3",
        "phi3_switch",
        "bloom",
        "cohere",
        "dbrx",
    ] {
        assert!(causal_models.contains_key(kind), "the reference has no {kind} runs");
    }
    for kind in ["t5", "bart"] {
        assert!(seq2seq_models.contains_key(kind), "the reference has no {kind} runs");
    }
    let mut rows = Vec::new();
    for run in runs() {
        let folder = root.join(&run.model);
        let prompts = read_tensors(&folder.join("prompts.safetensors"));
        let (ids, mask) = (&prompts["input_ids"], &prompts["attention_mask"]);
        let expected = &read_tensors(&folder.join(format!("{}.safetensors", run.name)))["sequences"];
        let (out, rollout_err) = if let Some(causal) = causal_models.get(&run.model) {
            let out = tch::no_grad(|| causal.generate(ids, Some(mask), &run.config)).unwrap();
            let (err, before) = check_causal_rollout(causal, mask, &out, run.rollout_from);
            // Before LongRoPE's switch the steps ran on the short factors, the full forward runs
            // on the long ones: that part must differ, or the run tests no switch.
            if let Some(before) = before {
                assert!(
                    before > 1e-3,
                    "{}: the columns before the switch match the full forward ({before:e})",
                    run.name
                );
            }
            (out, err)
        } else {
            let seq2seq = &seq2seq_models[&run.model];
            let out = tch::no_grad(|| seq2seq.generate(ids, Some(mask), &run.config)).unwrap();
            let err = check_seq2seq_rollout(seq2seq, ids, mask, &out);
            (out, err)
        };
        assert!(
            out.sequences.equal(expected),
            "{}: tokens differ from transformers\nours:   {:?}\ntheirs: {:?}",
            run.name,
            Vec::<Vec<i64>>::try_from(&out.sequences).unwrap(),
            Vec::<Vec<i64>>::try_from(expected).unwrap()
        );
        // Forced tokens (Bart): the first new token is the forced BOS, and every row still
        // running at max_new_tokens ends with the forced eos (checked on transformers' own output, so
        // the runs do exercise the forcing).
        if let Some(bos) = run.config.forced_bos_token_id {
            assert!(
                out.new_tokens.select(1, 0).eq(bos).all().int64_value(&[]) != 0,
                "{}",
                run.name
            );
        }
        let full_length = out.new_tokens.size()[1] as usize == run.config.max_new_tokens.unwrap();
        if let (Some(&eos), true) = (run.config.forced_eos_token_id.first(), full_length) {
            let last = out.new_tokens.size()[1] - 1;
            let running = out.generated_mask.select(1, last);
            let ends = out
                .new_tokens
                .select(1, last)
                .eq(eos)
                .logical_or(&running.logical_not());
            assert!(ends.all().int64_value(&[]) != 0, "{}", run.name);
        }
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
