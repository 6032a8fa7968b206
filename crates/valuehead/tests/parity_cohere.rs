//! Cohere parity with Python TRL 0.26.2 (eager attention): seeded random Cohere models (parallel
//! blocks, bias-free mean-centred LayerNorms, interleaved rotary pairs; q/k LayerNorms on and off;
//! MHA, GQA and MQA; tied and untied heads; logit_scale 0.0625, 0.5, 1, 2.5 and -0.75; q/k/v/o
//! biases on and off; linear, dynamic-NTK and llama3 rope scaling; an explicit head_dim) saved with
//! TRL's save_pretrained. Logits, values and loss within 1e-4 on left- and right-padded batches:
//! the default call (with and without a mask), explicit positions, our sdpa, incremental decoding
//! through the cache against the full pass, `vh forward`, and the bf16 backbone against TRL's bf16.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::Kind;
use valuehead::{CausalLmWithValueHead, LoadOptions};

fn root() -> &'static PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    DATA.get_or_init(|| generate_reference("parity_cohere.py", "parity-cohere"))
}

fn cases() -> Vec<Case> {
    let cases = read_cases(root());
    assert!(cases.len() >= 10, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn cohere_matches_trl_full_and_incremental() {
    check_causal_cases("Cohere parity against TRL 0.26.2 (eager)", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_cohere() {
    check_cli("`vh forward` on Cohere against TRL 0.26.2 (eager)", cases(), true);
}

/// The default call with no attention mask at all (HF builds the causal mask alone)), logits, values and loss at every position.
#[test]
fn cohere_default_call_without_a_mask_matches_trl() {
    let mut rows = Vec::new();
    let mut worst: f64 = 0.0;
    for case in cases() {
        let model = CausalLmWithValueHead::from_folder(&case.dir, &eager()).unwrap();
        let ids = &read_tensors(&case.dir.join("inputs.safetensors"))["input_ids"];
        let expected = read_tensors(&case.dir.join("extra.safetensors"));
        let out = tch::no_grad(|| model.forward(ids, None, None, Some(ids))).unwrap();
        let mut err = max_abs_diff(&out.logits, &expected["logits_nomask"])
            .max(max_abs_diff(out.loss.as_ref().unwrap(), &expected["loss_nomask"]));
        if !case.fresh_v_head {
            err = err.max(max_abs_diff(&out.values, &expected["values_nomask"]));
        }
        assert!(err <= TOLERANCE, "{}: {err:e}", case.name);
        worst = worst.max(err);
        rows.push(vec![case.name.clone(), fmt_err(err)]);
    }
    println!("\nCohere, the default call without a mask, against TRL 0.26.2 (eager):");
    print_table(&["case", "max error (logits, values, loss)"], &rows);
    println!("worst {}", fmt_err(worst));
}

/// The backbone in bf16 (TRL's value head and logits in f32) against TRL loaded with
/// `dtype=torch.bfloat16`, on the default call: the same operations in the same order, so the
/// gap stays at a few bf16 roundings of the logits' scale.
#[test]
fn cohere_bf16_matches_trl_bf16() {
    let options = LoadOptions {
        dtype: Kind::BFloat16,
        ..eager()
    };
    let mut rows = Vec::new();
    for case in cases() {
        let model = CausalLmWithValueHead::from_folder(&case.dir, &options).unwrap();
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        let expected = read_tensors(&case.dir.join("extra.safetensors"));
        let (ids, mask, labels) = (&inputs["input_ids"], &inputs["attention_mask"], &inputs["labels"]);
        let out = tch::no_grad(|| model.forward(ids, Some(mask), None, Some(labels))).unwrap();
        assert_eq!(out.logits.kind(), Kind::Float);
        let scale = expected["logits_bf16"].abs().max().double_value(&[]);
        let logits_err = max_abs_diff(&out.logits, &expected["logits_bf16"]);
        let loss_err = max_abs_diff(out.loss.as_ref().unwrap(), &expected["loss_bf16"]);
        let values_err = if case.fresh_v_head {
            0.0
        } else {
            max_abs_diff(&out.values, &expected["values_bf16"])
        };
        // bf16 keeps 8 significant bits: 2^-8 of the logits' scale is one rounding there.
        let bound = 4.0 * scale / 256.0;
        assert!(
            logits_err <= bound && loss_err <= bound && values_err <= bound,
            "{}: bf16 logits {logits_err:e}, loss {loss_err:e}, values {values_err:e} (bound {bound:e})",
            case.name
        );
        rows.push(vec![
            case.name.clone(),
            fmt_err(logits_err),
            fmt_err(values_err),
            fmt_err(loss_err),
            format!("{scale:.2}"),
        ]);
    }
    println!("\nCohere bf16 backbone against TRL's bf16 (default call, every position):");
    print_table(&["case", "logits", "values", "loss", "max |logit|"], &rows);
}
