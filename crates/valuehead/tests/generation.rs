//! Generation behaviour that needs no Python: sampling follows softmax(logits / temperature)
//! restricted by top-k / top-p (checked statistically), seeds are reproducible, and bad settings
//! or inputs are clear errors.

mod common;

use common::{write_tiny_gpt2, write_tiny_t5};
use serde_json::json;
use tch::{Device, Kind, Tensor};
use valuehead::{CausalLmWithValueHead, Error, GenerationConfig, LoadOptions, Seq2SeqLmWithValueHead};

fn tiny_gpt2() -> (tempfile::TempDir, CausalLmWithValueHead) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gpt2(dir.path(), json!({}));
    let model = CausalLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    (dir, model)
}

/// The distribution HF samples from, computed independently of the library: softmax of
/// logits / temperature, keeping the k most likely tokens (ties kept) and then the smallest
/// most-likely set whose probability exceeds 1 - top_p removed from the tail.
fn target_distribution(logits: &[f64], temperature: f64, top_k: usize, top_p: f64) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|l| l / temperature).collect();
    let mut keep = vec![true; scaled.len()];
    if top_k > 0 {
        let mut sorted = scaled.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let kth = sorted[top_k.min(sorted.len()) - 1];
        for (i, s) in scaled.iter().enumerate() {
            keep[i] &= *s >= kth;
        }
    }
    let softmax = |keep: &[bool]| {
        let max = scaled
            .iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(s, _)| *s)
            .fold(f64::MIN, f64::max);
        let exp: Vec<f64> = scaled
            .iter()
            .zip(keep)
            .map(|(s, k)| if *k { (s - max).exp() } else { 0.0 })
            .collect();
        let total: f64 = exp.iter().sum();
        exp.into_iter().map(|e| e / total).collect::<Vec<f64>>()
    };
    if top_p < 1.0 {
        let probs = softmax(&keep);
        let mut order: Vec<usize> = (0..probs.len()).filter(|i| keep[*i]).collect();
        order.sort_by(|a, b| probs[*a].partial_cmp(&probs[*b]).unwrap());
        let mut cumulative = 0.0;
        for (n, i) in order.iter().enumerate() {
            cumulative += probs[*i];
            if cumulative <= 1.0 - top_p && n + 1 < order.len() {
                keep[*i] = false;
            }
        }
    }
    softmax(&keep)
}

#[test]
fn sampling_follows_the_warped_distribution() {
    let (_dir, model) = tiny_gpt2();
    let prompt = Tensor::from_slice2(&[[3i64, 17, 8]]);
    let logits = tch::no_grad(|| model.forward(&prompt, None, None, None))
        .unwrap()
        .logits
        .select(1, -1)
        .squeeze_dim(0);
    let logits: Vec<f64> = Vec::<f64>::try_from(logits.to_kind(Kind::Double)).unwrap();
    let samples = 20_000i64;
    let batch = prompt.repeat([samples, 1]);
    for (temperature, top_k, top_p) in [
        (1.0, 0, 1.0),
        (0.3, 0, 1.0),
        (1.0, 8, 1.0),
        (1.4, 0, 0.7),
        (0.8, 20, 0.9),
    ] {
        let config = GenerationConfig {
            do_sample: true,
            temperature,
            top_k,
            top_p,
            max_new_tokens: Some(1),
            seed: Some(1234),
            ..Default::default()
        };
        let out = tch::no_grad(|| model.generate(&batch, None, &config)).unwrap();
        let drawn: Vec<i64> = Vec::<i64>::try_from(out.new_tokens.reshape([-1])).unwrap();
        let mut counts = vec![0f64; logits.len()];
        for t in drawn {
            counts[t as usize] += 1.0;
        }
        let target = target_distribution(&logits, temperature, top_k, top_p);
        for (i, (c, p)) in counts.iter().zip(&target).enumerate() {
            assert!(
                *p > 0.0 || *c == 0.0,
                "token {i} is outside the kept set but was sampled {c} times"
            );
        }
        let tv: f64 = counts
            .iter()
            .zip(&target)
            .map(|(c, p)| (c / samples as f64 - p).abs())
            .sum::<f64>()
            / 2.0;
        // With 20k draws the sampling noise in total variation is about 0.02 for 50 tokens.
        assert!(
            tv < 0.04,
            "T={temperature} k={top_k} p={top_p}: total variation {tv:.4} from the target"
        );
        let plain = target_distribution(&logits, 1.0, 0, 1.0);
        let shift: f64 = target.iter().zip(&plain).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
        println!("T={temperature} k={top_k} p={top_p}: TV to target {tv:.4} (target differs from plain softmax by {shift:.3})");
    }
}

#[test]
fn seeds_are_reproducible_and_top_k_1_is_greedy() {
    let (_dir, model) = tiny_gpt2();
    let prompt = Tensor::from_slice2(&[[3i64, 17, 8], [0, 4, 9]]);
    let mask = Tensor::from_slice2(&[[1i64, 1, 1], [0, 1, 1]]);
    let sampling = GenerationConfig {
        do_sample: true,
        max_new_tokens: Some(8),
        seed: Some(7),
        ..Default::default()
    };
    let a = model.generate(&prompt, Some(&mask), &sampling).unwrap();
    let b = model.generate(&prompt, Some(&mask), &sampling).unwrap();
    assert!(a.sequences.equal(&b.sequences) && a.values.equal(&b.values));
    let c = model
        .generate(
            &prompt,
            Some(&mask),
            &GenerationConfig {
                seed: Some(8),
                ..sampling.clone()
            },
        )
        .unwrap();
    assert!(
        !a.sequences.equal(&c.sequences),
        "another seed should give another sample"
    );
    let greedy = model
        .generate(
            &prompt,
            Some(&mask),
            &GenerationConfig {
                max_new_tokens: Some(8),
                ..Default::default()
            },
        )
        .unwrap();
    let top1 = model
        .generate(&prompt, Some(&mask), &GenerationConfig { top_k: 1, ..sampling })
        .unwrap();
    assert!(greedy.sequences.equal(&top1.sequences));
}

#[test]
fn rows_that_hit_eos_are_padded_and_the_loop_stops_when_all_finish() {
    let (_dir, model) = tiny_gpt2();
    let prompt = Tensor::from_slice2(&[[3i64, 17, 8], [5, 4, 9]]);
    let every_token: Vec<i64> = (0..50).collect();
    let config = GenerationConfig {
        max_new_tokens: Some(6),
        eos_token_id: every_token,
        pad_token_id: Some(0),
        ..Default::default()
    };
    let out = model.generate(&prompt, None, &config).unwrap();
    assert_eq!(out.new_tokens.size(), vec![2, 1], "every row ends at its first token");
    // Every token but 7 ends a row, and eos is forbidden for the first 3 tokens: 7, 7, 7, then eos.
    let config = GenerationConfig {
        min_new_tokens: 3,
        eos_token_id: (0..50).filter(|t| *t != 7).collect(),
        ..config
    };
    let out = model.generate(&prompt, None, &config).unwrap();
    assert_eq!(
        Vec::<i64>::try_from(out.new_tokens.narrow(1, 0, 3).reshape([-1])).unwrap(),
        vec![7; 6]
    );
    assert_eq!(
        out.new_tokens.size(),
        vec![2, 4],
        "eos is forbidden for the first 3 tokens"
    );
    // A row that finished keeps getting pad_token_id, flagged in generated_mask.
    let greedy = model
        .generate(
            &prompt,
            None,
            &GenerationConfig {
                max_new_tokens: Some(6),
                ..Default::default()
            },
        )
        .unwrap();
    let first_row_token = greedy.new_tokens.int64_value(&[0, 0]);
    let second_row_token = greedy.new_tokens.int64_value(&[1, 0]);
    if first_row_token != second_row_token
        && !Vec::<i64>::try_from(greedy.new_tokens.get(1))
            .unwrap()
            .contains(&first_row_token)
    {
        let config = GenerationConfig {
            max_new_tokens: Some(6),
            eos_token_id: vec![first_row_token],
            pad_token_id: Some(2),
            ..Default::default()
        };
        let out = model.generate(&prompt, None, &config).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(out.new_tokens.get(0)).unwrap(),
            vec![first_row_token, 2, 2, 2, 2, 2]
        );
        assert_eq!(
            Vec::<bool>::try_from(out.generated_mask.get(0)).unwrap(),
            vec![true, false, false, false, false, false]
        );
    }
}

fn is_error<T>(r: Result<T, Error>) -> bool {
    matches!(
        r,
        Err(Error::InvalidOption(_)) | Err(Error::Model(vh_core::Error::InvalidInput(_)))
    )
}

#[test]
fn bad_generation_settings_and_inputs_are_errors() {
    let (_dir, model) = tiny_gpt2();
    let prompt = Tensor::from_slice2(&[[3i64, 17, 8], [0, 0, 9]]);
    let ok = GenerationConfig {
        max_new_tokens: Some(4),
        ..Default::default()
    };
    assert!(model.generate(&prompt, None, &ok).is_ok());
    let all_padding = Tensor::from_slice2(&[[1i64, 1, 1], [0, 0, 0]]);
    assert!(
        is_error(model.generate(&prompt, Some(&all_padding), &ok)),
        "an all-padding row"
    );
    assert!(is_error(model.generate(
        &prompt,
        None,
        &GenerationConfig {
            max_new_tokens: Some(0),
            ..ok.clone()
        }
    )));
    let sampling = GenerationConfig {
        do_sample: true,
        ..ok.clone()
    };
    assert!(is_error(model.generate(
        &prompt,
        None,
        &GenerationConfig {
            temperature: 0.0,
            ..sampling.clone()
        }
    )));
    assert!(is_error(model.generate(
        &prompt,
        None,
        &GenerationConfig {
            temperature: -0.5,
            ..sampling.clone()
        }
    )));
    assert!(is_error(model.generate(
        &prompt,
        None,
        &GenerationConfig {
            top_p: 0.0,
            ..sampling.clone()
        }
    )));
    assert!(is_error(model.generate(
        &prompt,
        None,
        &GenerationConfig {
            top_p: 1.01,
            ..sampling.clone()
        }
    )));
    // An eos outside the vocabulary (50) never occurs and is accepted, as in HF; a pad token
    // that finished rows would be fed must be in the vocabulary.
    let out = model
        .generate(
            &prompt,
            None,
            &GenerationConfig {
                eos_token_id: vec![50],
                max_new_tokens: Some(4),
                ..ok.clone()
            },
        )
        .unwrap();
    assert_eq!(out.new_tokens.size()[1], 4);
    assert!(is_error(model.generate(
        &prompt,
        None,
        &GenerationConfig {
            eos_token_id: vec![3],
            pad_token_id: Some(50),
            ..ok.clone()
        }
    )));
    // n_positions is 16: a 16-token prompt has no room, a 12-token one has room for 4.
    let full = Tensor::ones([1, 16], (Kind::Int64, Device::Cpu));
    assert!(is_error(model.generate(
        &full,
        None,
        &GenerationConfig {
            max_new_tokens: Some(1),
            ..ok.clone()
        }
    )));
    let long = Tensor::ones([1, 12], (Kind::Int64, Device::Cpu));
    assert!(model
        .generate(
            &long,
            None,
            &GenerationConfig {
                max_new_tokens: Some(4),
                ..ok.clone()
            }
        )
        .is_ok());
    assert!(is_error(model.generate(
        &long,
        None,
        &GenerationConfig {
            max_new_tokens: Some(5),
            ..ok.clone()
        }
    )));
    assert!(
        is_error(model.generate(&Tensor::from_slice2(&[[3i64, 60]]), None, &ok)),
        "token id out of range"
    );
}

#[test]
fn seq2seq_generation_errors_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_t5(dir.path(), json!({}));
    let model = Seq2SeqLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    let src = Tensor::from_slice2(&[[3i64, 4, 5], [6, 7, 0]]);
    let mask = Tensor::from_slice2(&[[1i64, 1, 1], [1, 1, 0]]);
    let config = GenerationConfig {
        max_new_tokens: Some(5),
        ..model.default_generation_config().unwrap()
    };
    let out = model.generate(&src, Some(&mask), &config).unwrap();
    assert_eq!(out.sequences.size(), vec![2, 6], "decoder start + 5 new tokens");
    assert_eq!(
        out.sequences.int64_value(&[0, 0]),
        0,
        "starts with decoder_start_token_id"
    );
    let all_padding = Tensor::from_slice2(&[[1i64, 1, 1], [0, 0, 0]]);
    assert!(is_error(model.generate(&src, Some(&all_padding), &config)));
    assert!(is_error(model.generate(
        &src,
        Some(&mask),
        &GenerationConfig {
            max_new_tokens: Some(0),
            ..config.clone()
        }
    )));

    write_tiny_t5(dir.path(), json!({"decoder_start_token_id": null}));
    let model = Seq2SeqLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    assert!(is_error(model.generate(
        &src,
        Some(&mask),
        &GenerationConfig {
            max_new_tokens: Some(3),
            ..Default::default()
        }
    )));
}

#[test]
fn vh_generate_prints_text_and_writes_sequences_values_logprobs() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gpt2(dir.path(), json!({}));
    let model = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vh"))
            .args(args)
            .output()
            .unwrap()
    };

    let no_tokenizer = run(&["generate", "--model", model, "--prompt", "w1 w2"]);
    assert_eq!(no_tokenizer.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_tokenizer.stderr).contains("tokenizer.json"));

    common::write_word_tokenizer(dir.path(), 50);
    let out_file = dir.path().join("out.safetensors");
    let ok = run(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "w3 w17 w8",
        "--max-new-tokens",
        "5",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.lines().next().unwrap().starts_with("[0] w"), "{stdout}");
    let out = common::read_tensors(&out_file);
    assert_eq!(out["sequences"].size(), vec![1, 8]);
    assert_eq!(out["sequences"].kind(), Kind::Int64);
    assert_eq!(
        (out["values"].size(), out["logprobs"].kind()),
        (vec![1, 5], Kind::Float)
    );

    // The same prompt as ids through the library gives the same tokens and values.
    let library = CausalLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    let config = GenerationConfig {
        max_new_tokens: Some(5),
        ..library.default_generation_config().unwrap()
    };
    let direct = library
        .generate(&Tensor::from_slice2(&[[3i64, 17, 8]]), None, &config)
        .unwrap();
    assert!(direct.sequences.equal(&out["sequences"]));
    assert!(direct.values.allclose(&out["values"], 1e-6, 1e-6, false));

    let inputs = dir.path().join("in.safetensors");
    vh_hub::write_safetensors(
        &inputs,
        &[
            (
                "input_ids".to_string(),
                Tensor::from_slice2(&[[0i64, 3, 17], [4, 5, 6]]),
            ),
            (
                "attention_mask".to_string(),
                Tensor::from_slice2(&[[0i64, 1, 1], [1, 1, 1]]),
            ),
        ],
    )
    .unwrap();
    let batch = run(&[
        "generate",
        "--model",
        model,
        "--inputs",
        inputs.to_str().unwrap(),
        "--max-new-tokens",
        "3",
        "--do-sample",
        "--seed",
        "3",
    ]);
    assert!(batch.status.success(), "{}", String::from_utf8_lossy(&batch.stderr));
    assert!(String::from_utf8_lossy(&batch.stdout).contains("[1] "));

    let bad = run(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "w1",
        "--do-sample",
        "--temperature",
        "0",
    ]);
    assert_eq!(bad.status.code(), Some(1), "{}", String::from_utf8_lossy(&bad.stderr));
    let bad = run(&["generate", "--model", model, "--prompt", "w1", "--max-new-tokens", "0"]);
    assert_eq!(bad.status.code(), Some(1));
}
