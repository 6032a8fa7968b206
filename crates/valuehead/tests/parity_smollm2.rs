//! The real model, SmolLM2-135M-Instruct (converted from its GGUF file by `cargo xtask setup`):
//! chat formatting, logits and values over a chat prompt, and 32 greedy tokens on three prompts,
//! against TRL / transformers; and the bf16 backbone against f32.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::{Kind, Tensor};
use valuehead::{apply_chat_template, load_tokenizer, CausalLmWithValueHead, GenerationConfig, LoadOptions, Message};

const NEW_TOKENS: usize = 32;

/// The converted model folder `cargo xtask setup` links into the checkout.
fn model_dir() -> PathBuf {
    let dir = workspace_root().join(".models/smollm2-135m-instruct");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run `cargo xtask setup` (or `cargo xtask test`)",
        dir.display()
    );
    dir
}

fn reference() -> &'static PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    DATA.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("parity-smollm2");
        let _ = std::fs::remove_dir_all(&out);
        run_reference("parity_smollm2.py", &[&model_dir(), &out]);
        out
    })
}

fn prompts() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(reference().join("cases.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn greedy() -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: Some(NEW_TOKENS),
        eos_token_id: vec![],
        pad_token_id: Some(2),
        ..Default::default()
    }
}

#[test]
fn smollm2_matches_transformers_on_chat_prompts() {
    let root = reference();
    let folder = root.join("model");
    // The reference runs HF's eager attention; so does this side, to compare to the bit.
    let model = CausalLmWithValueHead::from_folder(&folder, &common::eager()).unwrap();
    let tokenizer = load_tokenizer(&folder).unwrap().expect("tokenizer.json");
    let expected = read_tensors(&root.join("expected.safetensors"));
    let mut rows = Vec::new();
    for (i, case) in prompts().iter().enumerate() {
        let rendered = apply_chat_template(&folder, &[Message::user(case["prompt"].as_str().unwrap())], true).unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "chat template rendering differs from HF's"
        );
        let ids: Vec<i64> = tokenizer
            .encode(rendered.as_str(), false)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&x| x as i64)
            .collect();
        let prompt = Tensor::from_slice(&ids).unsqueeze(0);
        assert!(
            prompt.equal(&expected[&format!("prompt_{i}")]),
            "token ids differ from HF's tokenizer"
        );
        // The reference passes an all-ones mask; without one, HF (and we) would infer padding
        // from the pad token <|im_end|>, which the chat template puts inside the prompt.
        let ones = prompt.ones_like();
        let out = tch::no_grad(|| model.generate(&prompt, Some(&ones), &greedy())).unwrap();
        let theirs = &expected[&format!("sequences_{i}")];
        assert!(
            out.sequences.equal(theirs),
            "prompt {i}: greedy tokens differ\nours:   {:?}\ntheirs: {:?}",
            Vec::<i64>::try_from(out.new_tokens.reshape([-1])).unwrap(),
            Vec::<i64>::try_from(theirs.narrow(1, prompt.size()[1], NEW_TOKENS as i64).reshape([-1])).unwrap()
        );
        let mut logits_err = String::from("-");
        let mut values_err = String::from("-");
        if i == 0 {
            let full = tch::no_grad(|| model.forward(&prompt, None, None, None)).unwrap();
            let (l, v) = (
                max_abs_diff(&full.logits, &expected["logits"]),
                max_abs_diff(&full.values, &expected["values"]),
            );
            // Both sides run the same libtorch kernels in the same order on f32 weights, so
            // anything above float rounding (logits here are up to ~30) would be a real difference.
            assert!(l <= TOLERANCE && v <= TOLERANCE, "logits {l:e}, values {v:e}");
            logits_err = fmt_err(l);
            values_err = fmt_err(v);
        }
        let reply = tokenizer
            .decode(
                &out.new_tokens
                    .reshape([-1])
                    .iter::<i64>()
                    .unwrap()
                    .map(|t| t as u32)
                    .collect::<Vec<_>>(),
                false,
            )
            .unwrap();
        rows.push(vec![
            format!("{i}"),
            format!("{} + {NEW_TOKENS}", ids.len()),
            "identical".into(),
            logits_err,
            values_err,
            format!("{:?}", reply.chars().take(40).collect::<String>()),
        ]);
    }
    println!("\nSmolLM2-135M-Instruct against transformers 4.57.6 / TRL 0.26.2:");
    print_table(
        &[
            "prompt",
            "tokens",
            "32 greedy tokens",
            "logits err",
            "values err",
            "reply",
        ],
        &rows,
    );
}

#[test]
fn smollm2_bf16_backbone_mostly_agrees_with_f32() {
    let folder = reference().join("model");
    let f32_model = CausalLmWithValueHead::from_folder(&folder, &common::eager()).unwrap();
    let options = LoadOptions {
        dtype: Kind::BFloat16,
        ..common::eager()
    };
    let bf16_model = CausalLmWithValueHead::from_folder(&folder, &options).unwrap();
    assert_eq!(bf16_model.v_head().kind(), Kind::Float);
    let tokenizer = load_tokenizer(&folder).unwrap().expect("tokenizer.json");
    let expected = read_tensors(&reference().join("expected.safetensors"));
    let mut rows = Vec::new();
    let (mut agree_total, mut values_worst) = (0usize, 0f64);
    for i in 0..prompts().len() {
        let prompt = &expected[&format!("prompt_{i}")];
        let ours32 = tch::no_grad(|| f32_model.generate(prompt, None, &greedy())).unwrap();
        let ours16 = tch::no_grad(|| bf16_model.generate(prompt, None, &greedy())).unwrap();
        assert_eq!(
            (ours16.logprobs.kind(), ours16.values.kind()),
            (Kind::Float, Kind::Float)
        );
        let a: Vec<i64> = Vec::<i64>::try_from(ours32.new_tokens.reshape([-1])).unwrap();
        let b: Vec<i64> = Vec::<i64>::try_from(ours16.new_tokens.reshape([-1])).unwrap();
        let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        // Values of the same (f32-generated) sequence under both precisions.
        let v32 = tch::no_grad(|| f32_model.forward(&ours32.sequences, None, None, None))
            .unwrap()
            .values;
        let v16 = tch::no_grad(|| bf16_model.forward(&ours32.sequences, None, None, None))
            .unwrap()
            .values;
        let verr = max_abs_diff(&v32, &v16);
        let vscale = v32.abs().max().double_value(&[]);
        agree_total += agree;
        values_worst = values_worst.max(verr);
        let reply: Vec<u32> = b.iter().map(|&t| t as u32).collect();
        let reply: String = tokenizer.decode(&reply, false).unwrap().chars().take(36).collect();
        rows.push(vec![
            format!("{i}"),
            format!("{agree}/{NEW_TOKENS}"),
            format!("{prefix}"),
            format!("{verr:.3} (|values| up to {vscale:.2})"),
            format!("{reply:?}"),
        ]);
    }
    println!("\nSmolLM2 bf16 backbone (f32 head and logits) against f32:");
    print_table(
        &[
            "prompt",
            "same tokens",
            "identical prefix",
            "max value difference",
            "bf16 reply",
        ],
        &rows,
    );
    // bf16 keeps ~3 significant digits, so a near-tie between candidate tokens can flip, and that
    // continuation then diverges (observed: on prompt 0, where f32's first token has only 15%
    // probability, bf16 opens differently and the reply goes astray); most tokens must still
    // agree, and values stay close on the same sequence.
    assert!(
        agree_total * 2 >= NEW_TOKENS * prompts().len(),
        "bf16 agrees on only {agree_total} tokens"
    );
    assert!(values_worst < 0.25, "bf16 values differ from f32 by {values_worst}");
}
