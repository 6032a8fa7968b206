//! Bad input gives a typed error, never a panic or garbage: tensors of the wrong shape or range,
//! over-long sequences, broken config.json and model.safetensors, missing heads and tensors.

mod common;

use common::{write_tiny, write_tiny_gpt2, write_tiny_t5};
use serde_json::json;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use valuehead::{CausalLmWithValueHead, Error, LoadOptions, Seq2SeqLmWithValueHead};
use vh_hub::HubError;

fn load(dir: &Path) -> Result<CausalLmWithValueHead, Error> {
    CausalLmWithValueHead::from_folder(dir, &LoadOptions::default())
}

fn tiny() -> (tempfile::TempDir, CausalLmWithValueHead) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gpt2(dir.path(), json!({}));
    let model = load(dir.path()).unwrap();
    (dir, model)
}

fn is_invalid_input<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Model(vh_core::Error::InvalidInput(_))))
}

#[test]
fn bad_tensors_are_invalid_input() {
    let (_dir, model) = tiny();
    let ids = Tensor::from_slice2(&[[1i64, 2, 3], [4, 5, 6]]);
    assert!(model.forward(&ids, None, None, None).is_ok());
    assert!(
        is_invalid_input(model.forward(&Tensor::from_slice(&[1i64, 2, 3]), None, None, None)),
        "rank 1 ids"
    );
    assert!(
        is_invalid_input(model.forward(&ids.unsqueeze(0), None, None, None)),
        "rank 3 ids"
    );
    assert!(
        is_invalid_input(model.forward(&ids.to_kind(Kind::Float), None, None, None)),
        "float ids"
    );
    let mask = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    assert!(
        is_invalid_input(model.forward(&ids, Some(&mask), None, None)),
        "mask shape"
    );
    let labels = Tensor::ones([2, 2], (Kind::Int64, Device::Cpu));
    assert!(
        is_invalid_input(model.forward(&ids, None, None, Some(&labels))),
        "labels shape"
    );
    let labels = Tensor::from_slice2(&[[1i64, 2, 50], [1, 2, 3]]);
    assert!(
        is_invalid_input(model.forward(&ids, None, None, Some(&labels))),
        "label out of range"
    );
    let negative = Tensor::from_slice2(&[[1i64, -1, 3]]);
    assert!(
        is_invalid_input(model.forward(&negative, None, None, None)),
        "negative id"
    );
    let too_big = Tensor::from_slice2(&[[1i64, 50, 3]]);
    assert!(
        is_invalid_input(model.forward(&too_big, None, None, None)),
        "id >= vocab_size"
    );
    let empty = Tensor::zeros([1, 0], (Kind::Int64, Device::Cpu));
    assert!(
        is_invalid_input(model.forward(&empty, None, None, None)),
        "empty sequence"
    );
}

#[test]
fn sequences_longer_than_n_positions_are_refused_with_and_without_cache() {
    let (_dir, model) = tiny();
    let long = Tensor::ones([1, 17], (Kind::Int64, Device::Cpu));
    assert!(is_invalid_input(model.forward(&long, None, None, None)));
    let out = model
        .forward(&Tensor::ones([1, 16], (Kind::Int64, Device::Cpu)), None, None, None)
        .unwrap();
    let next = Tensor::ones([1, 1], (Kind::Int64, Device::Cpu));
    assert!(is_invalid_input(model.forward(&next, None, Some(&out.past), None)));
}

#[test]
fn broken_config_json_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gpt2(dir.path(), json!({}));
    let config = dir.path().join("config.json");

    std::fs::remove_file(&config).unwrap();
    assert!(matches!(load(dir.path()), Err(Error::Hub(HubError::NotFound { .. }))));

    std::fs::write(&config, "{ this is not json").unwrap();
    assert!(matches!(load(dir.path()), Err(Error::Hub(HubError::Json { .. }))));

    std::fs::write(&config, r#"{"n_embd": 16}"#).unwrap();
    assert!(
        matches!(load(dir.path()), Err(Error::Model(vh_core::Error::Config(_)))),
        "no model_type"
    );

    std::fs::write(&config, r#"{"model_type": "gpt2", "n_embd": "sixteen"}"#).unwrap();
    assert!(
        matches!(load(dir.path()), Err(Error::Model(vh_core::Error::Config(_)))),
        "wrong field type"
    );

    std::fs::write(&config, r#"{"model_type": "bert"}"#).unwrap();
    assert!(matches!(load(dir.path()), Err(Error::UnsupportedModel(_))));
}

#[test]
fn broken_weights_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gpt2(dir.path(), json!({}));
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();

    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert!(
        matches!(load(dir.path()), Err(Error::Hub(HubError::Safetensors { .. }))),
        "truncated"
    );

    std::fs::write(&weights, &bytes[..7]).unwrap();
    assert!(
        matches!(load(dir.path()), Err(Error::Hub(HubError::Safetensors { .. }))),
        "header cut"
    );

    std::fs::remove_file(&weights).unwrap();
    assert!(
        matches!(load(dir.path()), Err(Error::Hub(HubError::NotFound { .. }))),
        "missing"
    );

    // A tensor of the wrong shape, and a missing tensor.
    let mut tensors = vh_hub::read_safetensors(&{
        std::fs::write(&weights, &bytes).unwrap();
        weights.clone()
    })
    .unwrap();
    let pos = tensors.iter().position(|(n, _)| n == "transformer.wpe.weight").unwrap();
    tensors[pos].1 = Tensor::zeros([8, 16], (Kind::Float, Device::Cpu));
    vh_hub::write_safetensors(&weights, &tensors).unwrap();
    assert!(matches!(
        load(dir.path()),
        Err(Error::Model(vh_core::Error::TensorShape { .. }))
    ));
    let _removed = tensors.remove(pos);
    vh_hub::write_safetensors(&weights, &tensors).unwrap();
    match load(dir.path()) {
        Err(Error::Model(vh_core::Error::MissingTensor(name))) => {
            assert_eq!(name, "transformer.wpe.weight")
        }
        other => panic!("expected a missing tensor, got {other:?}"),
    }
}

#[test]
fn a_backbone_without_lm_head_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gpt2(dir.path(), json!({"architectures": ["GPT2Model"]}));
    assert!(matches!(load(dir.path()), Err(Error::NoLmHead(_))));

    // Untied embeddings but no lm_head.weight in the checkpoint.
    write_tiny_gpt2(dir.path(), json!({"tie_word_embeddings": false}));
    let weights = dir.path().join("model.safetensors");
    let tensors: Vec<_> = vh_hub::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != "lm_head.weight")
        .collect();
    vh_hub::write_safetensors(&weights, &tensors).unwrap();
    assert!(matches!(load(dir.path()), Err(Error::NoLmHead(_))));
}

#[test]
fn reduced_precision_backbones_keep_f32_head_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gpt2(dir.path(), json!({}));
    let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4], [5, 6, 7, 8]]);
    let reference = load(dir.path()).unwrap().forward(&ids, None, None, None).unwrap();
    for (dtype, tol) in [(Kind::BFloat16, 0.05), (Kind::Half, 0.005)] {
        let options = LoadOptions {
            dtype,
            ..Default::default()
        };
        let model = CausalLmWithValueHead::from_folder(dir.path(), &options).unwrap();
        let vars = model.var_store().variables();
        assert_eq!(vars["transformer.h.0.attn.c_attn.weight"].kind(), dtype);
        assert_eq!(vars["v_head.summary.weight"].kind(), Kind::Float);
        let out = model.forward(&ids, None, None, None).unwrap();
        assert_eq!(out.logits.kind(), Kind::Float);
        assert_eq!(out.values.kind(), Kind::Float);
        let err = (&out.logits - &reference.logits).abs().max().double_value(&[]);
        eprintln!("{dtype:?}: logits {err:.3e}");
        assert!(err < tol, "{dtype:?} logits differ from f32 by {err}");
        let verr = (&out.values - &reference.values).abs().max().double_value(&[]);
        eprintln!("{dtype:?}: values {verr:.3e}");
        assert!(verr < tol, "{dtype:?} values differ from f32 by {verr}");
    }
}

#[test]
fn state_dict_has_hf_names_and_the_value_head() {
    let (_dir, model) = tiny();
    let names: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
    for n in [
        "transformer.wte.weight",
        "lm_head.weight",
        "v_head.summary.weight",
        "v_head.summary.bias",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
}

#[test]
fn train_mode_uses_dropout_and_eval_mode_does_not() {
    let (_dir, mut model) = tiny();
    let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
    let a = model.forward(&ids, None, None, None).unwrap();
    let b = model.forward(&ids, None, None, None).unwrap();
    assert!(a.values.equal(&b.values));
    model.set_train(true);
    let c = model.forward(&ids, None, None, None).unwrap();
    assert!(!a.logits.equal(&c.logits));
    // Gradients reach the backbone and the head: forward never detaches.
    let labels = ids.shallow_clone();
    let out = model.forward(&ids, None, None, Some(&labels)).unwrap();
    (out.loss.unwrap() + out.values.sum(Kind::Float)).backward();
    for name in ["transformer.h.0.attn.c_attn.weight", "v_head.summary.weight"] {
        let grad = model.var_store().variables()[name].grad();
        assert!(
            grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name} has no gradient"
        );
    }
}

#[test]
fn cli_reports_errors_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gpt2(dir.path(), json!({}));
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vh"))
            .args(args)
            .output()
            .unwrap()
    };
    let model = dir.path().to_str().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let out_file = dir.path().join("out.safetensors");
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "forward",
            "--model",
            model,
            "--inputs",
            missing.to_str().unwrap(),
            "--out",
            out_file.to_str().unwrap(),
        ],
        vec!["score", "--model", model, "--input-ids", "1 2 99"],
        vec!["score", "--model", model, "--input-ids", "1 2", "--dtype", "f8"],
        vec!["score", "--model", "/nonexistent/model", "--input-ids", "1 2"],
        vec![
            "score",
            "--model",
            model,
            "--input-ids",
            "1 2",
            "--option",
            "summary_dropout=0.1",
        ],
    ];
    for args in cases {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("Error:"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert!(!out_file.exists());
    let ok = run(&["score", "--model", model, "--input-ids", "1, 2, 3"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let table = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        table
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count(),
        3,
        "{table}"
    );
}

fn tiny_t5() -> (tempfile::TempDir, Seq2SeqLmWithValueHead) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_t5(dir.path(), json!({}));
    let model = Seq2SeqLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    (dir, model)
}

#[test]
fn seq2seq_bad_encoder_and_decoder_inputs_are_invalid_input() {
    let (_dir, model) = tiny_t5();
    let src = Tensor::from_slice2(&[[3i64, 4, 5], [6, 7, 8]]);
    let tgt = Tensor::from_slice2(&[[0i64, 9], [0, 10]]);
    let f = |src: Option<&Tensor>,
             mask: Option<&Tensor>,
             tgt: Option<&Tensor>,
             dmask: Option<&Tensor>,
             labels: Option<&Tensor>| { model.forward(src, mask, tgt, dmask, None, None, labels) };
    assert!(f(Some(&src), None, Some(&tgt), None, None).is_ok());
    assert!(
        is_invalid_input(f(None, None, Some(&tgt), None, None)),
        "decoder input without encoder input"
    );
    assert!(
        is_invalid_input(f(Some(&src), None, None, None, None)),
        "no decoder input and no labels"
    );
    assert!(
        is_invalid_input(f(Some(&src.unsqueeze(0)), None, Some(&tgt), None, None)),
        "rank-3 encoder ids"
    );
    assert!(
        is_invalid_input(f(Some(&src), None, Some(&tgt.unsqueeze(0)), None, None)),
        "rank-3 decoder ids"
    );
    let bad_src = Tensor::from_slice2(&[[3i64, 40, 5], [6, 7, 8]]);
    assert!(
        is_invalid_input(f(Some(&bad_src), None, Some(&tgt), None, None)),
        "encoder id >= vocab"
    );
    let bad_tgt = Tensor::from_slice2(&[[0i64, -3], [0, 10]]);
    assert!(
        is_invalid_input(f(Some(&src), None, Some(&bad_tgt), None, None)),
        "negative decoder id"
    );
    let mask = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    assert!(
        is_invalid_input(f(Some(&src), Some(&mask), Some(&tgt), None, None)),
        "encoder mask shape"
    );
    let dmask = Tensor::ones([2, 3], (Kind::Int64, Device::Cpu));
    assert!(
        is_invalid_input(f(Some(&src), None, Some(&tgt), Some(&dmask), None)),
        "decoder mask shape"
    );
    let labels = Tensor::from_slice2(&[[1i64, 2, 3], [1, 2, 3]]);
    assert!(
        is_invalid_input(f(Some(&src), None, Some(&tgt), None, Some(&labels))),
        "labels shape"
    );
    let labels = Tensor::from_slice2(&[[1i64, 40], [1, 2]]);
    assert!(
        is_invalid_input(f(Some(&src), None, Some(&tgt), None, Some(&labels))),
        "label out of range"
    );
    let other_batch = Tensor::from_slice2(&[[0i64, 9]]);
    assert!(
        is_invalid_input(f(Some(&src), None, Some(&other_batch), None, None)),
        "batch sizes differ"
    );
    let out = f(Some(&src), None, Some(&tgt), None, None).unwrap();
    let step = Tensor::from_slice2(&[[11i64], [12], [13]]);
    let err = model.forward(
        None,
        None,
        Some(&step),
        None,
        Some(&out.encoder_outputs),
        Some(&out.past),
        None,
    );
    assert!(is_invalid_input(err), "cache batch differs");
}

#[test]
fn seq2seq_decoder_padding_mask_is_applied() {
    let (_dir, model) = tiny_t5();
    let src = Tensor::from_slice2(&[[3i64, 4, 5]]);
    let plain = model.forward(
        Some(&src),
        None,
        Some(&Tensor::from_slice2(&[[0i64, 9, 10]])),
        None,
        None,
        None,
        None,
    );
    let padded_ids = Tensor::from_slice2(&[[0i64, 9, 10, 0, 0]]);
    let dmask = Tensor::from_slice2(&[[1i64, 1, 1, 0, 0]]);
    let padded = model
        .forward(Some(&src), None, Some(&padded_ids), Some(&dmask), None, None, None)
        .unwrap();
    let plain = plain.unwrap();
    let diff = (padded.logits.narrow(1, 0, 3) - &plain.logits)
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff < 1e-5,
        "right-padded decoder rows must match unpadded ones: {diff}"
    );
    assert!(padded.logits.isfinite().all().int64_value(&[]) != 0);
}

#[test]
fn seq2seq_labels_build_decoder_inputs_and_loss() {
    let (_dir, model) = tiny_t5();
    let src = Tensor::from_slice2(&[[3i64, 4, 5]]);
    let labels = Tensor::from_slice2(&[[7i64, 8, -100]]);
    let from_labels = model
        .forward(Some(&src), None, None, None, None, None, Some(&labels))
        .unwrap();
    let shifted = Tensor::from_slice2(&[[0i64, 7, 8]]);
    let explicit = model
        .forward(Some(&src), None, Some(&shifted), None, None, None, Some(&labels))
        .unwrap();
    assert!(from_labels.logits.equal(&explicit.logits));
    let loss = from_labels.loss.unwrap().double_value(&[]);
    assert!(loss.is_finite() && loss > 0.0);
    let all_ignored = Tensor::from_slice2(&[[-100i64, -100, -100]]);
    assert!(is_invalid_input(model.forward(
        Some(&src),
        None,
        Some(&shifted),
        None,
        None,
        None,
        Some(&all_ignored)
    )));
}

/// Fuzzing regression (crates/vh-fuzz/regressions/inputs/t5-labels-2pow32-by-0.safetensors):
/// empty labels with a huge batch made the shift to decoder inputs allocate 32 GB, and the
/// failed allocation panicked inside tch instead of returning an error.
#[test]
fn seq2seq_labels_are_checked_before_they_are_shifted() {
    let (_dir, model) = tiny_t5();
    let src = Tensor::from_slice2(&[[3i64, 4, 5]]);
    let forward = |labels: &Tensor| model.forward(Some(&src), None, None, None, None, None, Some(labels));
    let huge_empty = Tensor::zeros([1i64 << 32, 0], (tch::Kind::Int64, tch::Device::Cpu));
    assert!(is_invalid_input(forward(&huge_empty)), "[2^32, 0] labels");
    let other_batch = Tensor::from_slice2(&[[7i64, 8], [9, 10]]);
    assert!(is_invalid_input(forward(&other_batch)), "labels of another batch");
    let empty = Tensor::zeros([1, 0], (tch::Kind::Int64, tch::Device::Cpu));
    assert!(is_invalid_input(forward(&empty)), "no label");
    assert!(forward(&Tensor::from_slice2(&[[7i64, 8]])).is_ok());
}

#[test]
fn seq2seq_checkpoint_without_lm_head_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_t5(dir.path(), json!({"architectures": ["T5EncoderModel"]}));
    assert!(matches!(
        Seq2SeqLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()),
        Err(Error::NoLmHead(_))
    ));
    write_tiny_t5(dir.path(), json!({"tie_word_embeddings": false}));
    let weights = dir.path().join("model.safetensors");
    let tensors: Vec<_> = vh_hub::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != "lm_head.weight")
        .collect();
    vh_hub::write_safetensors(&weights, &tensors).unwrap();
    assert!(matches!(
        Seq2SeqLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()),
        Err(Error::NoLmHead(_))
    ));
    write_tiny_t5(dir.path(), json!({}));
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"d_ff\"", "\"feed_forward_proj\": \"gated-fancy\", \"d_ff\"");
    std::fs::write(&config, text).unwrap();
    assert!(matches!(
        Seq2SeqLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()),
        Err(Error::Model(vh_core::Error::Config(_)))
    ));
}

#[test]
fn seq2seq_state_dict_and_dtypes() {
    let (dir, model) = tiny_t5();
    let names: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
    for n in [
        "shared.weight",
        "encoder.embed_tokens.weight",
        "lm_head.weight",
        "v_head.summary.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.1.layer.1.EncDecAttention.q.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing");
    }
    let src = Tensor::from_slice2(&[[3i64, 4, 5]]);
    let tgt = Tensor::from_slice2(&[[0i64, 9, 10]]);
    let reference = model
        .forward(Some(&src), None, Some(&tgt), None, None, None, None)
        .unwrap();
    let options = LoadOptions {
        dtype: Kind::BFloat16,
        ..Default::default()
    };
    let bf16 = Seq2SeqLmWithValueHead::from_folder(dir.path(), &options).unwrap();
    let out = bf16
        .forward(Some(&src), None, Some(&tgt), None, None, None, None)
        .unwrap();
    assert_eq!((out.logits.kind(), out.values.kind()), (Kind::Float, Kind::Float));
    let err = (&out.values - &reference.values).abs().max().double_value(&[]);
    assert!(err < 0.1, "bf16 values differ from f32 by {err}");
}

#[test]
fn cli_scores_seq2seq_models_and_needs_decoder_ids() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_t5(dir.path(), json!({}));
    let model = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vh"))
            .args(args)
            .output()
            .unwrap()
    };
    let missing = run(&["score", "--model", model, "--input-ids", "3 4 5"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--decoder-input-ids"));
    let ok = run(&[
        "score",
        "--model",
        model,
        "--input-ids",
        "3 4 5",
        "--decoder-input-ids",
        "0 7 8 9",
    ]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let table = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        table
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count(),
        4,
        "{table}"
    );
}

#[test]
fn llama_family_trains_generates_and_rejects_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_llama(
        dir.path(),
        json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}),
    );
    let mut model = CausalLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    let ids = Tensor::from_slice2(&[[0i64, 3, 4, 5], [6, 7, 8, 9]]);
    let mask = Tensor::from_slice2(&[[0i64, 1, 1, 1], [1, 1, 1, 1]]);
    let config = valuehead::GenerationConfig {
        max_new_tokens: Some(4),
        ..model.default_generation_config().unwrap()
    };
    let out = model.generate(&ids, Some(&mask), &config).unwrap();
    assert_eq!(out.values.size()[0], 2);
    model.set_train(true);
    let out = model
        .forward(&ids, Some(&mask), None, Some(&ids.masked_fill(&mask.eq(0), -100)))
        .unwrap();
    (out.loss.unwrap() + out.values.sum(Kind::Float)).backward();
    for name in [
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.1.mlp.down_proj.weight",
        "v_head.summary.weight",
    ] {
        let grad = model.var_store().variables()[name].grad();
        assert!(
            grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name} has no gradient"
        );
    }
    let bf16 = CausalLmWithValueHead::from_folder(
        dir.path(),
        &LoadOptions {
            dtype: Kind::BFloat16,
            ..Default::default()
        },
    );
    assert_eq!(
        bf16.unwrap()
            .forward(&ids, Some(&mask), None, None)
            .unwrap()
            .values
            .kind(),
        Kind::Float
    );

    let config_path = dir.path().join("config.json");
    let good = std::fs::read_to_string(&config_path).unwrap();
    for (bad, why) in [
        (r#""num_key_value_heads": 3"#, "heads not a multiple of kv heads"),
        (
            r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
            "unknown rope scaling",
        ),
        (
            r#""rope_scaling": {"rope_type": "linear"}"#,
            "rope scaling without factor",
        ),
        (r#""hidden_act": "swiglu_fancy""#, "unknown activation"),
        (r#""use_sliding_window": true"#, "Qwen2 sliding windows"),
    ] {
        let key = bad.split(':').next().unwrap();
        let text = good.replacen(&"{\n".to_string(), &format!("{{\n  {bad},\n"), 1);
        let text = if good.contains(key) {
            // Replace the existing field rather than duplicating it.
            let start = good.find(key).unwrap();
            let end = start + good[start..].find('\n').unwrap();
            format!("{}{bad},{}", &good[..start], &good[end..])
        } else {
            text
        };
        std::fs::write(&config_path, &text).unwrap();
        let err = CausalLmWithValueHead::from_folder(dir.path(), &LoadOptions::default());
        assert!(
            matches!(err, Err(Error::Model(vh_core::Error::Config(_)))),
            "{why}: {err:?}"
        );
    }
}

#[test]
fn seq2seq_dropout_acts_only_in_train_mode() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_t5(dir.path(), json!({"dropout_rate": 0.3}));
    let mut model = Seq2SeqLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    let src = Tensor::from_slice2(&[[3i64, 4, 5]]);
    let tgt = Tensor::from_slice2(&[[0i64, 9, 10]]);
    let run = |m: &Seq2SeqLmWithValueHead| m.forward(Some(&src), None, Some(&tgt), None, None, None, None).unwrap();
    let (a, b) = (run(&model), run(&model));
    assert!(a.logits.equal(&b.logits) && a.values.equal(&b.values));
    model.set_train(true);
    assert!(!run(&model).logits.equal(&a.logits));
}

/// Bart: broken configs are config errors at load (heads not dividing d_model on either side,
/// sizes null or of the wrong type, an unknown activation, no model_type), a checkpoint short of
/// a parameter is `MissingTensor`, but one without `final_logits_bias` loads with zeros there (HF
/// ignores it when missing); shifting labels without `decoder_start_token_id` or `pad_token_id`
/// is a config error; encoder ids alone are a complete call (Bart derives the decoder inputs);
/// sequences past the position tables are invalid input.
#[test]
fn bart_bad_configs_checkpoints_and_inputs_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let load = || Seq2SeqLmWithValueHead::from_folder(dir.path(), &LoadOptions::default());
    let patch = |changes: serde_json::Value| {
        write_tiny("bart", dir.path(), json!({}));
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for (k, v) in changes.as_object().unwrap() {
            if v == &json!("<remove>") {
                config.as_object_mut().unwrap().remove(k);
            } else {
                config[k] = v.clone();
            }
        }
        std::fs::write(&path, config.to_string()).unwrap();
    };
    for changes in [
        json!({"encoder_attention_heads": 3}),
        json!({"decoder_attention_heads": 5}),
        json!({"d_model": null}),
        json!({"decoder_ffn_dim": "wide"}),
        json!({"activation_function": "fancy"}),
        json!({"model_type": "<remove>"}),
    ] {
        patch(changes.clone());
        assert!(
            matches!(load(), Err(Error::Model(vh_core::Error::Config(_)))),
            "{changes}: {:?}",
            load().err()
        );
    }

    // A missing parameter is an error; a missing final_logits_bias is zeros, as in HF.
    let src = Tensor::from_slice2(&[[3i64, 4, 5], [6, 7, 8]]);
    let tgt = Tensor::from_slice2(&[[2i64, 9], [2, 10]]);
    let weights = dir.path().join("model.safetensors");
    let without = |name: &str| {
        write_tiny("bart", dir.path(), json!({}));
        let tensors: Vec<_> = vh_hub::read_safetensors(&weights)
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n != name)
            .collect();
        vh_hub::write_safetensors(&weights, &tensors).unwrap();
    };
    without("model.encoder.layers.0.fc1.weight");
    assert!(matches!(load(), Err(Error::Model(vh_core::Error::MissingTensor(_)))));
    without("final_logits_bias");
    let defaulted = load().unwrap();
    let run = |m: &Seq2SeqLmWithValueHead| m.forward(Some(&src), None, Some(&tgt), None, None, None, None).unwrap();
    let vars = defaulted.var_store().variables();
    assert_eq!(vars["final_logits_bias"].abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert!(!vars["final_logits_bias"].requires_grad(), "a buffer, not trained");
    write_tiny("bart", dir.path(), json!({}));
    let tensors: Vec<_> = vh_hub::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            if n == "final_logits_bias" {
                (n, t.zeros_like())
            } else {
                (n, t)
            }
        })
        .collect();
    vh_hub::write_safetensors(&weights, &tensors).unwrap();
    assert!(run(&defaulted).logits.equal(&run(&load().unwrap()).logits));

    // Encoder ids alone: the decoder reads them shifted right behind the start token.
    let model = load().unwrap();
    let bare = model.forward(Some(&src), None, None, None, None, None, None).unwrap();
    let shifted = Tensor::from_slice2(&[[2i64, 3, 4], [2, 6, 7]]);
    let explicit = model
        .forward(Some(&src), None, Some(&shifted), None, None, None, None)
        .unwrap();
    assert!(bare.logits.equal(&explicit.logits));
    let long = Tensor::ones([1, 33], (Kind::Int64, Device::Cpu));
    assert!(is_invalid_input(model.forward(
        Some(&long),
        None,
        Some(&tgt.narrow(0, 0, 1)),
        None,
        None,
        None,
        None
    )));

    let labels = Tensor::from_slice2(&[[5i64, 6], [7, -100]]);
    for changes in [json!({"decoder_start_token_id": null}), json!({"pad_token_id": null})] {
        patch(changes.clone());
        let model = load().unwrap();
        assert!(
            matches!(
                model.forward(Some(&src), None, None, None, None, None, Some(&labels)),
                Err(Error::Model(vh_core::Error::Config(_)))
            ),
            "{changes}"
        );
    }
}
