//! save_pretrained: folders saved here load back here with the same outputs (one file and
//! sharded), and load in Python through TRL's from_pretrained with the same outputs (GPT-2,
//! Llama, Qwen2, Mistral, Qwen3, GPT-NeoX, OPT, Gemma, Gemma2, Phi3, Bloom, Cohere, DBRX, T5, Bart).

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use tch::Tensor;
use valuehead::{CausalLmWithValueHead, LoadOptions, Seq2SeqLmWithValueHead};

fn causal_outputs(dir: &Path, ids: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
    let model = CausalLmWithValueHead::from_folder(dir, &LoadOptions::default()).unwrap();
    let out = tch::no_grad(|| model.forward(ids, Some(mask), None, None)).unwrap();
    (out.logits, out.values)
}

/// Runs TRL's from_pretrained on `dir` and returns its (logits, values) on `inputs`.
fn python_outputs(kind: &str, dir: &Path, inputs: &[(String, Tensor)]) -> (Tensor, Tensor) {
    let scratch = tempfile::tempdir().unwrap();
    let (inputs_path, out_path) = (
        scratch.path().join("in.safetensors"),
        scratch.path().join("out.safetensors"),
    );
    vh_hub::write_safetensors(&inputs_path, inputs).unwrap();
    run_reference("load_saved.py", &[Path::new(kind), dir, &inputs_path, &out_path]);
    let out = read_tensors(&out_path);
    (out["logits"].shallow_clone(), out["values"].shallow_clone())
}

#[test]
fn causal_models_round_trip_and_load_in_trl() {
    tch::set_num_threads(1);
    let ids = Tensor::from_slice2(&[[0i64, 3, 4, 5, 6], [7, 8, 9, 10, 11]]);
    let mask = Tensor::from_slice2(&[[0i64, 1, 1, 1, 1], [1, 1, 1, 1, 1]]);
    // (label, model_type, config overrides, the LM head's name, whether the file stores it)
    for (kind, model_type, config, head, head_stored) in [
        ("gpt2 tied", "gpt2", json!({}), "lm_head.weight", false),
        (
            "gpt2 untied",
            "gpt2",
            json!({"tie_word_embeddings": false}),
            "lm_head.weight",
            true,
        ),
        ("llama", "llama", json!({}), "lm_head.weight", true),
        (
            "qwen2 tied",
            "qwen2",
            json!({"tie_word_embeddings": true}),
            "lm_head.weight",
            false,
        ),
        // A window of 3 over 5 tokens, and Qwen3 with a sliding second layer.
        (
            "mistral",
            "mistral",
            json!({"sliding_window": 3}),
            "lm_head.weight",
            true,
        ),
        (
            "qwen3 tied",
            "qwen3",
            json!({"use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1}),
            "lm_head.weight",
            false,
        ),
        ("gpt_neox", "gpt_neox", json!({}), "embed_out.weight", true),
        (
            "gpt_neox tied sequential",
            "gpt_neox",
            json!({"tie_word_embeddings": true, "use_parallel_residual": false}),
            "embed_out.weight",
            false,
        ),
        ("opt tied projected", "opt", json!({}), "lm_head.weight", false),
        (
            "opt untied post-norm",
            "opt",
            json!({"tie_word_embeddings": false, "do_layer_norm_before": false, "word_embed_proj_dim": 16}),
            "lm_head.weight",
            true,
        ),
        ("gemma tied", "gemma", json!({}), "lm_head.weight", false),
        // Soft caps, a sliding first layer (window 3 over 5 tokens).
        ("gemma2 tied", "gemma2", json!({}), "lm_head.weight", false),
        // ALiBi over six heads, residuals after the LayerNorms, untied.
        (
            "bloom untied six heads",
            "bloom",
            json!({"tie_word_embeddings": false, "n_head": 6, "hidden_size": 24,
                   "apply_residual_connection_post_layernorm": true}),
            "lm_head.weight",
            true,
        ),
        ("bloom tied", "bloom", json!({}), "lm_head.weight", false),
        // Mixture of experts (4 experts, top-2), GQA, clip_qkv; DBRX is never tied.
        ("dbrx untied top-2 clipped", "dbrx", json!({}), "lm_head.weight", true),
        (
            // python/load_saved.py runs eager, which transformers 4.57.6 cannot run without
            // clip_qkv (docs/parity.md): both cases clip.
            "dbrx untied top-1 mha unnormalised",
            "dbrx",
            json!({"attn_config": {"kv_n_heads": 4, "clip_qkv": 2.0},
                   "ffn_config": {"ffn_hidden_size": 24, "moe_num_experts": 3, "moe_top_k": 1,
                                  "moe_normalize_expert_weights": null}}),
            "lm_head.weight",
            true,
        ),
        // Tied (Cohere's default), q/k LayerNorms, logits scaled by 0.5.
        ("cohere tied qk norms", "cohere", json!({}), "lm_head.weight", false),
        (
            "cohere untied with biases, dynamic rope",
            "cohere",
            json!({"tie_word_embeddings": false, "use_qk_norm": false, "attention_bias": true, "logit_scale": 2.0,
                   "num_key_value_heads": 4, "max_position_embeddings": 4,
                   "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
            "lm_head.weight",
            true,
        ),
        (
            "gemma untied with attention biases",
            "gemma",
            json!({"tie_word_embeddings": false, "attention_bias": true}),
            "lm_head.weight",
            true,
        ),
        // LongRoPE on its long factors (original length 4 under 5 tokens), half of each head
        // rotating, fused qkv and gate_up projections.
        ("phi3 untied longrope", "phi3", json!({}), "lm_head.weight", true),
        (
            "phi3 tied with a window, no scaling",
            "phi3",
            json!({"tie_word_embeddings": true, "sliding_window": 3, "rope_scaling": null, "partial_rotary_factor": 1.0}),
            "lm_head.weight",
            false,
        ),
    ] {
        let source = tempfile::tempdir().unwrap();
        write_tiny(model_type, source.path(), config);
        let (logits, values) = causal_outputs(source.path(), &ids, &mask);
        let model = CausalLmWithValueHead::from_folder(source.path(), &LoadOptions::default()).unwrap();
        let saved = tempfile::tempdir().unwrap();
        let single = saved.path().join("single");
        model.save_pretrained(&single, None).unwrap();
        let sharded = saved.path().join("sharded");
        model.save_pretrained(&sharded, Some(4096)).unwrap();
        assert!(
            sharded.join("model.safetensors.index.json").exists(),
            "{kind}: expected shards"
        );
        for dir in [&single, &sharded] {
            let (l, v) = causal_outputs(dir, &ids, &mask);
            assert!(
                l.equal(&logits) && v.equal(&values),
                "{kind}: reloaded outputs differ ({})",
                dir.display()
            );
        }
        // Tied weights are stored once, as transformers stores them.
        let names: Vec<String> = vh_hub::read_safetensors(&single.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(names.iter().any(|n| n == "v_head.summary.weight"));
        assert_eq!(names.iter().any(|n| n == head), head_stored, "{kind}");

        // Both sides make the same default call (no position ids), compared at every position.
        let inputs = [
            ("input_ids".to_string(), ids.shallow_clone()),
            ("attention_mask".to_string(), mask.shallow_clone()),
        ];
        let (pl, pv) = python_outputs("causal", &single, &inputs);
        let (le, ve) = (max_abs_diff(&pl, &logits), max_abs_diff(&pv, &values));
        assert!(
            le <= TOLERANCE && ve <= TOLERANCE,
            "{kind}: TRL loads the saved folder with logits {le:e}, values {ve:e}"
        );
        println!("{kind}: saved (single and sharded) -> reloaded identically; TRL from_pretrained: logits {le:.1e}, values {ve:.1e}");
    }
}

#[test]
fn seq2seq_models_round_trip_and_load_in_trl() {
    tch::set_num_threads(1);
    let ids = Tensor::from_slice2(&[[3i64, 4, 5, 0], [6, 7, 8, 9]]);
    let mask = Tensor::from_slice2(&[[1i64, 1, 1, 0], [1, 1, 1, 1]]);
    // (label, model_type, config overrides, the decoder start, tensors the file must not store
    // (tied), tensors it must store)
    for (kind, model_type, config, start, absent, present) in [
        (
            "t5",
            "t5",
            json!({}),
            0i64,
            vec!["lm_head.weight"],
            vec!["shared.weight"],
        ),
        // A random final_logits_bias (write_tiny fills every variable): saved and read back by
        // both sides.
        (
            "bart tied",
            "bart",
            json!({}),
            2,
            vec!["lm_head.weight"],
            vec!["model.shared.weight", "final_logits_bias"],
        ),
        (
            "bart untied, scaled embeddings, relu, 3 decoder layers",
            "bart",
            json!({"tie_word_embeddings": false, "scale_embedding": true, "activation_function": "relu",
                   "decoder_layers": 3}),
            2,
            vec![],
            vec!["lm_head.weight", "model.shared.weight", "final_logits_bias"],
        ),
    ] {
        let source = tempfile::tempdir().unwrap();
        write_tiny(model_type, source.path(), config);
        let model = Seq2SeqLmWithValueHead::from_folder(source.path(), &LoadOptions::default()).unwrap();
        let decoder = Tensor::from_slice2(&[[start, 9, 10], [start, 11, 12]]);
        let run = |m: &Seq2SeqLmWithValueHead| {
            tch::no_grad(|| m.forward(Some(&ids), Some(&mask), Some(&decoder), None, None, None, None)).unwrap()
        };
        let reference = run(&model);
        let saved = tempfile::tempdir().unwrap();
        for shard in [None, Some(2048)] {
            let dir = saved.path().join(format!("{shard:?}"));
            model.save_pretrained(&dir, shard).unwrap();
            let back = run(&Seq2SeqLmWithValueHead::from_folder(&dir, &LoadOptions::default()).unwrap());
            assert!(
                back.logits.equal(&reference.logits) && back.values.equal(&reference.values),
                "{kind}: reloaded outputs differ"
            );
        }
        let names: Vec<String> = vh_hub::read_safetensors(&saved.path().join("None").join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for name in absent {
            assert!(!names.iter().any(|n| n == name), "{kind}: {name} stored");
        }
        for name in present {
            assert!(names.iter().any(|n| n == name), "{kind}: {name} missing from {names:?}");
        }
        let inputs = [
            ("input_ids".to_string(), ids.shallow_clone()),
            ("attention_mask".to_string(), mask.shallow_clone()),
            ("decoder_input_ids".to_string(), decoder.shallow_clone()),
        ];
        let (pl, pv) = python_outputs("seq2seq", &saved.path().join("None"), &inputs);
        let (le, ve) = (
            max_abs_diff(&pl, &reference.logits),
            max_abs_diff(&pv, &reference.values),
        );
        assert!(
            le <= TOLERANCE && ve <= TOLERANCE,
            "{kind}: TRL loads the saved folder with logits {le:e}, values {ve:e}"
        );
        println!(
            "{kind}: saved (single and sharded) -> reloaded identically; TRL from_pretrained: logits {le:.1e}, values {ve:.1e}"
        );
    }
}

#[test]
fn saving_over_a_folder_keeps_other_files_and_leaves_nothing_half_written() {
    let source = tempfile::tempdir().unwrap();
    write_tiny_gpt2(source.path(), json!({}));
    write_word_tokenizer(source.path(), 50);
    let model = CausalLmWithValueHead::from_folder(source.path(), &LoadOptions::default()).unwrap();
    // Save over the folder it was loaded from: the tokenizer stays, the weights are replaced.
    model.save_pretrained(source.path(), Some(4096)).unwrap();
    assert!(source.path().join("tokenizer.json").exists());
    assert!(!source.path().join("model.safetensors").exists());
    let parent = source.path().parent().unwrap();
    let stray = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".saving-"));
    assert!(!stray, "a staging folder was left behind");
    CausalLmWithValueHead::from_folder(source.path(), &LoadOptions::default()).unwrap();
}

#[test]
fn folders_saved_by_python_in_every_format_load_with_the_same_outputs() {
    tch::set_num_threads(1);
    let ids = Tensor::from_slice2(&[[0i64, 3, 4, 5, 6], [7, 8, 9, 10, 11]]);
    let mask = Tensor::from_slice2(&[[0i64, 1, 1, 1, 1], [1, 1, 1, 1, 1]]);
    for kind in [
        "gpt2", "llama", "mistral", "qwen3", "gpt_neox", "opt", "gemma", "gemma2", "phi3", "bloom", "cohere", "dbrx",
        "t5", "bart",
    ] {
        let source = tempfile::tempdir().unwrap();
        write_tiny(kind, source.path(), json!({}));
        let resaved = tempfile::tempdir().unwrap();
        let seq2seq = valuehead::is_seq2seq_model_type(kind);
        let role = if seq2seq { "seq2seq" } else { "causal" };
        run_reference("resave.py", &[Path::new(role), source.path(), resaved.path()]);
        let outputs = |dir: &Path| -> (Tensor, Tensor) {
            if seq2seq {
                let m = Seq2SeqLmWithValueHead::from_folder(dir, &LoadOptions::default()).unwrap();
                let dec = Tensor::from_slice2(&[[0i64, 9], [0, 10]]);
                let out =
                    tch::no_grad(|| m.forward(Some(&ids), Some(&mask), Some(&dec), None, None, None, None)).unwrap();
                (out.logits, out.values)
            } else {
                causal_outputs(dir, &ids, &mask)
            }
        };
        let (logits, values) = outputs(source.path());
        for format in ["bin", "bin_sharded", "safetensors_sharded"] {
            let dir = resaved.path().join(format);
            let files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            let expected_file = match format {
                "bin" => "pytorch_model.bin",
                "bin_sharded" => "pytorch_model.bin.index.json",
                _ => "model.safetensors.index.json",
            };
            assert!(files.iter().any(|f| f == expected_file), "{kind}/{format}: {files:?}");
            let (l, v) = outputs(&dir);
            assert!(l.equal(&logits) && v.equal(&values), "{kind}/{format}: outputs differ");
        }
        println!("{kind}: Python-saved pytorch_model.bin, sharded .bin and sharded safetensors load identically");
    }
}
