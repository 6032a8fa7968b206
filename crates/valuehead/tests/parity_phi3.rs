//! Phi3 parity with Python TRL 0.26.2 (eager attention): seeded random Phi3 models (fused qkv and
//! gate_up projections; no rope scaling, LongRoPE on its long factors throughout, on its short
//! factors throughout and switching inside the rows, with an attention factor of 1; full, half,
//! three-quarter and odd partial rotary widths; sliding windows of 1, 3 and 4 and none; GQA, MQA and
//! MHA; an explicit head_dim; tied and untied) saved with TRL's save_pretrained. Logits, values
//! and loss within 1e-4 on padded batches: the default call (with and without a mask), explicit
//! positions, our sdpa, incremental decoding through the cache against the full pass (where
//! LongRoPE does not switch mid-way) and against HF's own incremental decoding (everywhere,
//! across the switch included), `vh forward`, and the bf16 backbone against TRL's bf16.

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
    DATA.get_or_init(|| generate_reference("parity_phi3.py", "parity-phi3"))
}

fn cases() -> Vec<Case> {
    let cases = read_cases(root());
    assert!(cases.len() >= 10, "the reference produced only {} cases", cases.len());
    cases
}

/// What the reference measured about HF itself on a case (python/parity_phi3.py's phi3_extras.json).
fn hf_facts(case: &Case) -> serde_json::Value {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("phi3_extras.json")).unwrap()).unwrap();
    report[&case.name].clone()
}

#[test]
fn phi3_matches_trl_full_and_incremental() {
    check_causal_cases("Phi3 parity against TRL 0.26.2 (eager)", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_phi3() {
    check_cli("`vh forward` on Phi3 against TRL 0.26.2 (eager)", cases(), true);
}

/// The default call with no attention mask at all (HF builds the causal mask alone; LongRoPE
/// reads the largest default position), logits, values and loss at every position.
#[test]
fn phi3_default_call_without_a_mask_matches_trl() {
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
    println!("\nPhi3, the default call without a mask, against TRL 0.26.2 (eager):");
    print_table(&["case", "max error (logits, values, loss)"], &rows);
    println!("worst {}", fmt_err(worst));
}

/// Incremental decoding (the first 6 tokens, then one at a time with the growing mask and default
/// positions) against HF's own incremental decoding, at attended positions: equal
/// where LongRoPE switches inside the rows too (keys cached before the switch keep the short
/// factors on both sides), where the full pass differs from both.
#[test]
fn phi3_incremental_decoding_matches_hf_incremental_across_the_longrope_switch() {
    let mut rows = Vec::new();
    let mut switched = 0;
    for case in cases() {
        let model = CausalLmWithValueHead::from_folder(&case.dir, &eager()).unwrap();
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        let expected = read_tensors(&case.dir.join("extra.safetensors"));
        let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
        let seq = ids.size()[1];
        let first = tch::no_grad(|| {
            model.forward(
                &ids.narrow(1, 0, PROMPT_LEN),
                Some(&mask.narrow(1, 0, PROMPT_LEN)),
                None,
                None,
            )
        })
        .unwrap();
        let (mut logits, mut values) = (vec![first.logits], vec![first.values]);
        let mut past = first.past;
        for t in PROMPT_LEN..seq {
            let step = tch::no_grad(|| {
                model.forward(&ids.narrow(1, t, 1), Some(&mask.narrow(1, 0, t + 1)), Some(&past), None)
            })
            .unwrap();
            logits.push(step.logits);
            values.push(step.values);
            past = step.past;
        }
        let logits = tch::Tensor::cat(&logits, 1);
        let values = tch::Tensor::cat(&values, 1);
        // At attended positions: a padded query attends uniformly to the keys it can see, and
        // HF's sliding-window cache holds fewer of them than ours (which masks the older ones).
        let mut err = masked_max_abs_diff(&logits, &expected["logits_hf_incremental"], mask);
        if !case.fresh_v_head {
            err = err.max(masked_max_abs_diff(&values, &expected["values_hf_incremental"], mask));
        }
        let facts = hf_facts(&case);
        let hf_gap = facts["hf_incremental_vs_full"].as_f64().unwrap();
        // Where the case expects the switch, HF's own passes disagree, or the case tests nothing.
        if !case.incremental {
            assert!(
                hf_gap > 1e-3,
                "{}: LongRoPE's switch changes nothing ({hf_gap:e})",
                case.name
            );
            switched += 1;
        }
        // HF's sliding-window cache keeps every key for a window of 1 and broadcasts a one-key
        // mask over them (docs/parity.md): its incremental pass is not its full pass, which ours
        // follows (checked by phi3_matches_trl_full_and_incremental).
        if facts["hf_window_1_cache"].as_bool().unwrap() {
            assert!(
                hf_gap > 1e-3,
                "{}: HF's window-1 cache now matches its full pass",
                case.name
            );
            rows.push(vec![
                case.name.clone(),
                format!("n/a (HF's window-1 cache; ours {} from it)", fmt_err(err)),
                fmt_err(hf_gap),
            ]);
            continue;
        }
        assert!(err <= TOLERANCE, "{}: {err:e}", case.name);
        rows.push(vec![case.name.clone(), fmt_err(err), fmt_err(hf_gap)]);
    }
    assert!(switched >= 1, "no case switches LongRoPE's factors inside the rows");
    println!("\nPhi3 incremental decoding against HF's incremental decoding (attended positions):");
    print_table(
        &["case", "ours vs HF incremental", "HF incremental vs HF full (attended)"],
        &rows,
    );
}

/// The backbone in bf16 (TRL's value head and logits in f32) against TRL loaded with
/// `dtype=torch.bfloat16`, on the default call: the same operations in the same order, so the
/// gap stays at a few bf16 roundings of the logits' scale.
#[test]
fn phi3_bf16_matches_trl_bf16() {
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
    println!("\nPhi3 bf16 backbone against TRL's bf16 (default call, every position):");
    print_table(&["case", "logits", "values", "loss", "max |logit|"], &rows);
}
