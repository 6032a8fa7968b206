//! OPT parity with Python TRL 0.26.2: seeded random OPTForCausalLM models (pre- and post-norm,
//! word_embed_proj_dim != hidden_size, final LayerNorm removed, no biases, LayerNorms without
//! parameters, tied and untied, legacy `decoder.*` keys) saved with TRL's save_pretrained; logits,
//! values (read after project_out, as TRL) and loss, full and incremental, within 1e-4, and
//! `vh forward`. OPT's default call numbers positions from the mask, as HF's OPT forward does.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::Tensor;
use valuehead::{CausalLmWithValueHead, LoadOptions};

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_opt.py", "parity-opt")));
    assert!(cases.len() >= 9, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn opt_matches_trl_full_and_incremental() {
    check_causal_cases("OPT parity against TRL 0.26.2", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_opt() {
    check_cli("`vh forward` on OPT against TRL 0.26.2", cases(), true);
}

/// The value head's width is `word_embed_proj_dim` (TRL's ValueHead reads it) and the values come
/// from the hidden state after `project_out`: on the projected cases the head is narrower than the
/// layers, and the values still match TRL's.
#[test]
fn value_head_reads_the_projected_hidden_state() {
    let mut checked = 0;
    for case in cases() {
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(case.dir.join("config.json")).unwrap()).unwrap();
        let (hidden, proj) = (
            config["hidden_size"].as_i64().unwrap(),
            config["word_embed_proj_dim"].as_i64().unwrap(),
        );
        if hidden == proj || case.fresh_v_head {
            continue;
        }
        let model = CausalLmWithValueHead::from_folder(&case.dir, &eager()).unwrap();
        assert_eq!(model.v_head().weight.size(), vec![1, proj], "{}", case.name);
        assert_eq!(model.backbone().hidden_size(), proj, "{}", case.name);
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        let expected = read_tensors(&case.dir.join("expected.safetensors"));
        let out =
            tch::no_grad(|| model.forward(&inputs["input_ids"], Some(&inputs["attention_mask"]), None, None)).unwrap();
        let err = max_abs_diff(&out.values, &expected["values"]);
        assert!(err <= TOLERANCE, "{}: values differ by {err:e}", case.name);
        checked += 1;
    }
    assert!(
        checked >= 3,
        "only {checked} cases with word_embed_proj_dim != hidden_size"
    );
}

/// Learned positions bound the sequence (cache included): a typed error, never a panic, at
/// `max_position_embeddings + 1` tokens, while `max_position_embeddings` tokens run.
#[test]
fn sequences_longer_than_the_position_table_are_errors() {
    let case = cases().into_iter().next().unwrap();
    let model = CausalLmWithValueHead::from_folder(&case.dir, &LoadOptions::default()).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(case.dir.join("config.json")).unwrap()).unwrap();
    let limit = config["max_position_embeddings"].as_i64().unwrap();
    let ids = |n: i64| Tensor::ones([1, n], (tch::Kind::Int64, tch::Device::Cpu));
    assert!(tch::no_grad(|| model.forward(&ids(limit), None, None, None)).is_ok());
    let err = tch::no_grad(|| model.forward(&ids(limit + 1), None, None, None)).unwrap_err();
    assert!(err.to_string().contains("positions"), "{err}");
    let past = tch::no_grad(|| model.forward(&ids(limit - 1), None, None, None))
        .unwrap()
        .past;
    assert!(tch::no_grad(|| model.forward(&ids(2), None, Some(&past), None)).is_err());
}
