//! TRL's own value-head test suite (`tests/test_modeling_value_head.py` in TRL's repository),
//! ported: every behaviour it checks, for every architecture we implement (GPT-2, Llama, Qwen2,
//! Mistral, Qwen3, GPT-NeoX, OPT, Gemma, Gemma2, Phi3, Bloom, Cohere, DBRX, T5, Bart), against tiny seeded models the reference builds and saves as plain transformers
//! checkpoints (no value head, like TRL's tiny test models on the Hub). The table of TRL test ->
//! Rust test is in docs/parity.md. TRL's reference-model tests (`create_reference_model`) belong
//! to the training work.

mod common;

use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Kind, Tensor};
use valuehead::{CausalLmWithValueHead, GenerationConfig, LoadOptions, Seq2SeqLmWithValueHead, ValueHeadModel};

const ARCHS: [&str; 15] = [
    "gpt2", "llama", "qwen2", "mistral", "qwen3", "gpt_neox", "opt", "gemma", "gemma2", "phi3", "bloom", "cohere",
    "dbrx", "t5", "bart",
];

fn reference() -> &'static Path {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        tch::set_num_threads(1);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("trl-suite");
        let _ = std::fs::remove_dir_all(&dir);
        run_reference("trl_suite.py", &[Path::new("make"), &dir]);
        dir
    })
}

fn base(arch: &str) -> PathBuf {
    reference().join(arch).join("base")
}

fn load(arch: &str, options: &LoadOptions) -> ValueHeadModel {
    ValueHeadModel::from_folder(base(arch), options).unwrap_or_else(|e| panic!("{arch}: {e}"))
}

fn v_head(model: &ValueHeadModel) -> &valuehead::ValueHead {
    match model {
        ValueHeadModel::Causal(m) => m.v_head(),
        ValueHeadModel::Seq2Seq(m) => m.v_head(),
    }
}

fn state_dict(model: &ValueHeadModel) -> Vec<(String, Tensor)> {
    match model {
        ValueHeadModel::Causal(m) => m.state_dict(),
        ValueHeadModel::Seq2Seq(m) => m.state_dict(),
    }
}

fn save(model: &ValueHeadModel, dir: &Path, max_shard_size: Option<u64>) {
    match model {
        ValueHeadModel::Causal(m) => m.save_pretrained(dir, max_shard_size),
        ValueHeadModel::Seq2Seq(m) => m.save_pretrained(dir, max_shard_size),
    }
    .unwrap();
}

fn ids_1_to_10() -> Tensor {
    Tensor::arange_start(1, 11, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0)
}

/// test_value_head, test_value_head_shape, test_value_head_init_random: a checkpoint without a
/// value head gets one, `v_head.summary.weight` of shape [1, hidden], and a random bias (torch's
/// Linear init, so not all zeros).
#[test]
fn value_head_is_added_with_shape_1_by_hidden_and_a_random_bias() {
    for arch in ARCHS {
        let model = load(arch, &LoadOptions::default());
        let head = v_head(&model);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(base(arch).join("config.json")).unwrap()).unwrap();
        // TRL's ValueHead prefers `word_embed_proj_dim` (OPT) to `hidden_size`.
        let hidden = ["word_embed_proj_dim", "n_embd", "hidden_size", "d_model"]
            .iter()
            .find_map(|k| config.get(*k).and_then(serde_json::Value::as_i64))
            .unwrap();
        assert_eq!(head.weight.size(), vec![1, hidden], "{arch}");
        assert_eq!(head.bias.size(), vec![1], "{arch}");
        assert!(
            head.bias.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{arch}: bias all zeros"
        );
        let names: Vec<String> = state_dict(&model).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"v_head.summary.weight".to_string()), "{arch}");
    }
}

/// test_value_head_not_str: building from a model already in memory (transformers' model
/// object; here its config and tensors) adds the head the same way.
#[test]
fn value_head_is_added_to_a_model_given_as_tensors() {
    for arch in ARCHS {
        let folder = vh_hub::ModelFolder::open(base(arch)).unwrap();
        let (config, tensors) = (folder.config().unwrap(), folder.tensors().unwrap());
        let model = if valuehead::is_seq2seq_model_type(config["model_type"].as_str().unwrap()) {
            ValueHeadModel::Seq2Seq(
                Seq2SeqLmWithValueHead::from_parts(config, tensors, &LoadOptions::default()).unwrap(),
            )
        } else {
            ValueHeadModel::Causal(CausalLmWithValueHead::from_parts(config, tensors, &LoadOptions::default()).unwrap())
        };
        assert_eq!(v_head(&model).weight.size()[0], 1, "{arch}");
    }
}

/// test_dropout_config and test_dropout_kwargs: `summary_dropout_prob` from config.json wins; the
/// load option applies when the config has none; TRL's default is 0.1.
#[test]
fn summary_dropout_prob_from_config_and_from_options() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        assert_eq!(
            v_head(&load(arch, &LoadOptions::default())).dropout_prob(),
            0.1,
            "{arch}"
        );
        let options = LoadOptions::from_pairs(["summary_dropout_prob=0.5"]).unwrap();
        assert_eq!(v_head(&load(arch, &options)).dropout_prob(), 0.5, "{arch}");
        let copy = dir.path().join(arch);
        std::fs::create_dir_all(&copy).unwrap();
        for file in ["model.safetensors", "generation_config.json"] {
            std::fs::copy(base(arch).join(file), copy.join(file)).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(base(arch).join("config.json")).unwrap()).unwrap();
        config["summary_dropout_prob"] = serde_json::json!(0.5);
        std::fs::write(copy.join("config.json"), config.to_string()).unwrap();
        let model = ValueHeadModel::from_folder(&copy, &LoadOptions::from_pairs(["summary_dropout_prob=0.2"]).unwrap())
            .unwrap();
        assert_eq!(
            v_head(&model).dropout_prob(),
            0.5,
            "{arch}: the config wins over the option"
        );
    }
}

fn read_all(dir: &Path) -> HashMap<String, Tensor> {
    let folder = vh_hub::ModelFolder::open(dir).unwrap();
    folder.tensors().unwrap().into_iter().collect()
}

/// test_from_save_trl, test_from_save_trl_sharded, test_from_save_transformers and
/// test_from_save_transformers_sharded: save, load back, every tensor identical (ours, and
/// TRL's loader on our folder); transformers' own loader gets the backbone identical to the
/// original model, with the same keys (the value head ignored). Sharded with shards small enough
/// for many files.
#[test]
fn save_then_load_keeps_every_tensor_in_trl_transformers_and_here() {
    let out = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for arch in ARCHS {
        let model = load(arch, &LoadOptions::default());
        let saved = out.path().join(format!("{arch}-single"));
        let sharded = out.path().join(format!("{arch}-sharded"));
        save(&model, &saved, None);
        save(&model, &sharded, Some(4096));
        let ours: HashMap<String, Tensor> = state_dict(&model).into_iter().collect();
        for dir in [&saved, &sharded] {
            let back = load_dir(dir);
            let back_state: HashMap<String, Tensor> = state_dict(&back).into_iter().collect();
            assert_eq!(
                {
                    let mut k: Vec<_> = back_state.keys().collect();
                    k.sort();
                    k
                },
                {
                    let mut k: Vec<_> = ours.keys().collect();
                    k.sort();
                    k
                },
                "{arch}"
            );
            for (name, t) in &ours {
                assert!(t.equal(&back_state[name]), "{arch} {}: {name} changed", dir.display());
            }
            // The files themselves hold our tensors, value head included.
            let files = read_all(dir);
            assert!(
                files["v_head.summary.weight"].equal(&ours["v_head.summary.weight"]),
                "{arch}"
            );
        }
        let shards = std::fs::read_dir(&sharded)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".safetensors")
            })
            .count();
        assert!(shards >= 5, "{arch}: only {shards} shards");
        let report = python_check(arch, &saved, &sharded);
        for key in [
            "single_transformers_same_keys",
            "single_transformers_equal",
            "sharded_transformers_same_keys",
            "sharded_transformers_equal",
            "single_trl_loads",
            "single_trl_v_head_equal",
        ] {
            assert_eq!(report[key], serde_json::json!(true), "{arch}: {key} in {report}");
        }
        assert_eq!(
            report["single_trl_mismatched"],
            serde_json::json!([]),
            "{arch}: {report}"
        );
        rows.push(vec![
            arch.to_string(),
            shards.to_string(),
            "identical".into(),
            if report["sharded_trl_loads"] == serde_json::json!(true) {
                "loads, identical".to_string()
            } else {
                format!(
                    "TRL fails: {}",
                    report["sharded_trl_error"]
                        .as_str()
                        .unwrap_or("?")
                        .chars()
                        .take(60)
                        .collect::<String>()
                )
            },
        ]);
    }
    println!(
        "\nsave_pretrained -> loaders (transformers on single and sharded, TRL on single: every tensor identical):"
    );
    print_table(
        &["arch", "shards", "transformers + TRL (single)", "TRL on sharded"],
        &rows,
    );
}

fn load_dir(dir: &Path) -> ValueHeadModel {
    ValueHeadModel::from_folder(dir, &LoadOptions::default()).unwrap()
}

fn python_check(arch: &str, saved: &Path, sharded: &Path) -> serde_json::Value {
    let out = std::process::Command::new(python())
        .arg(workspace_root().join("python/trl_suite.py"))
        .arg("check")
        .arg(reference().join(arch))
        .arg(saved)
        .arg(sharded)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// test_inference: `model(input_ids)` for ids 1..10 (seq2seq: decoder ids 1..10 too) gives
/// logits, no loss without labels, and values; the logits equal TRL's.
#[test]
fn inference_returns_logits_loss_and_values() {
    let ids = ids_1_to_10();
    for arch in ARCHS {
        let model = load(arch, &eager());
        let expected = read_tensors(&reference().join(arch).join("expected.safetensors"));
        let (logits, loss, values) = match &model {
            ValueHeadModel::Causal(m) => {
                let out = tch::no_grad(|| m.forward(&ids, None, None, None)).unwrap();
                (out.logits, out.loss, out.values)
            }
            ValueHeadModel::Seq2Seq(m) => {
                let out = tch::no_grad(|| m.forward(Some(&ids), None, Some(&ids), None, None, None, None)).unwrap();
                (out.logits, out.loss, out.values)
            }
        };
        assert!(loss.is_none(), "{arch}");
        assert_eq!(values.size(), vec![1, 10], "{arch}");
        let err = max_abs_diff(&logits, &expected["logits"]);
        assert!(err <= TOLERANCE, "{arch}: logits differ from TRL by {err:e}");
    }
}

/// test_generate: `generate` with max_new_tokens=9 from ids 1..10 (seq2seq: continuing decoder
/// ids 1..10, behind the decoder start as HF puts it) works, and gives transformers' tokens. The
/// GPT-2 config is `GPT2Config(vocab_size=1000)`, whose eos 50256 lies outside the vocabulary:
/// HF generates with it (it never occurs), and so do we.
#[test]
fn generate_nine_tokens_from_ids_1_to_10() {
    let ids = ids_1_to_10();
    for arch in ARCHS {
        let model = load(arch, &eager());
        let expected = read_tensors(&reference().join(arch).join("expected.safetensors"));
        let config = GenerationConfig {
            max_new_tokens: Some(9),
            ..model.default_generation_config().unwrap()
        };
        let decoder = matches!(model, ValueHeadModel::Seq2Seq(_)).then(|| ids.shallow_clone());
        let out = tch::no_grad(|| model.generate_from(&ids, None, decoder.as_ref(), &config))
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(
            out.sequences.equal(&expected["generated"]),
            "{arch}: {:?} vs transformers {:?}",
            Vec::<i64>::try_from(out.sequences.reshape([-1])).unwrap(),
            Vec::<i64>::try_from(expected["generated"].reshape([-1])).unwrap()
        );
    }
    // The out-of-vocabulary eos is kept in the config, and a saved model keeps it too.
    let gpt2 = load("gpt2", &LoadOptions::default());
    assert_eq!(gpt2.default_generation_config().unwrap().eos_token_id, vec![50256]);
    let dir = tempfile::tempdir().unwrap();
    save(&gpt2, dir.path(), None);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["eos_token_id"], serde_json::json!(50256));
}

/// test_transformers_bf16_kwargs: loading with dtype bf16 keeps the LM head in bf16 and a
/// forward on [[0, 1, 0, 1]] runs.
#[test]
fn bf16_loading_keeps_the_lm_head_bf16_and_runs() {
    let ids = Tensor::from_slice2(&[[0i64, 1, 0, 1]]);
    for arch in ARCHS {
        let model = load(arch, &LoadOptions::from_pairs(["dtype=bf16"]).unwrap());
        let vars = match &model {
            ValueHeadModel::Causal(m) => m.var_store().variables(),
            ValueHeadModel::Seq2Seq(m) => m.var_store().variables(),
        };
        // TRL checks each of its `lm_head_namings` the model has (`lm_head`, `embed_out`); a
        // tied head is the input embedding.
        let head = [
            "lm_head.weight",
            "embed_out.weight",
            "transformer.wte.weight",
            "model.embed_tokens.weight",
            "gpt_neox.embed_in.weight",
            "model.decoder.embed_tokens.weight",
            "transformer.word_embeddings.weight",
            "shared.weight",
            "model.shared.weight",
        ]
        .iter()
        .find_map(|n| vars.get(*n))
        .unwrap_or_else(|| panic!("{arch}: no LM head"));
        assert_eq!(head.kind(), Kind::BFloat16, "{arch}");
        for naming in ["lm_head.weight", "embed_out.weight"] {
            if let Some(lm_head) = vars.get(naming) {
                assert_eq!(lm_head.kind(), Kind::BFloat16, "{arch}: {naming}");
            }
        }
        let logits = match &model {
            ValueHeadModel::Causal(m) => tch::no_grad(|| m.forward(&ids, None, None, None)).unwrap().logits,
            ValueHeadModel::Seq2Seq(m) => {
                tch::no_grad(|| m.forward(Some(&ids), None, Some(&ids), None, None, None, None))
                    .unwrap()
                    .logits
            }
        };
        assert!(logits.isfinite().all().int64_value(&[]) != 0, "{arch}");
    }
}
