//! GPT-2 parity with Python TRL 0.26.2: the reference builds seeded random models over a spread
//! of configs, saves them with TRL's save_pretrained and records its outputs; we load each
//! folder and compare logits, values and loss (full and incremental forward) within 1e-4.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use valuehead::{CausalLmWithValueHead, LoadOptions};

/// Tokens fed in the first pass of the incremental check; the rest go one at a time.
const PROMPT_LEN: i64 = 6;

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_gpt2.py", "parity-gpt2")));
    assert!(cases.len() >= 15, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn gpt2_matches_trl_full_and_incremental() {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for case in cases() {
        let model = CausalLmWithValueHead::from_folder(&case.dir, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        let expected = read_tensors(&case.dir.join("expected.safetensors"));
        let (ids, mask, labels) = (&inputs["input_ids"], &inputs["attention_mask"], &inputs["labels"]);
        let out = tch::no_grad(|| model.forward(ids, Some(mask), None, Some(labels))).unwrap();

        let logits_err = masked_max_abs_diff(&out.logits, &expected["logits"], mask);
        let loss_err = max_abs_diff(out.loss.as_ref().unwrap(), &expected["loss"]);
        let values_err = if case.fresh_v_head {
            assert_eq!(out.values.size(), mask.size());
            None
        } else {
            Some(masked_max_abs_diff(&out.values, &expected["values"], mask))
        };

        // Incremental decoding: the prompt, then one token at a time through the cache.
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
        let prompt_mask = mask.narrow(1, 0, PROMPT_LEN);
        let mut step_err = masked_max_abs_diff(
            &first.logits,
            &expected["logits"].narrow(1, 0, PROMPT_LEN),
            &prompt_mask,
        );
        let mut past = first.past;
        for t in PROMPT_LEN..seq {
            let step = tch::no_grad(|| {
                model.forward(&ids.narrow(1, t, 1), Some(&mask.narrow(1, 0, t + 1)), Some(&past), None)
            })
            .unwrap();
            step_err = step_err.max(max_abs_diff(&step.logits, &expected["logits"].narrow(1, t, 1)));
            if !case.fresh_v_head {
                step_err = step_err.max(max_abs_diff(&step.values, &expected["values"].narrow(1, t, 1)));
            }
            past = step.past;
        }
        assert_eq!(past.seq_len(), seq);

        let worst = [logits_err, loss_err, values_err.unwrap_or(0.0), step_err]
            .into_iter()
            .fold(0.0, f64::max);
        let ok = worst <= TOLERANCE;
        if !ok {
            failures.push(case.name.clone());
        }
        rows.push(vec![
            case.name.clone(),
            fmt_err(logits_err),
            values_err.map_or("n/a (fresh head)".to_string(), fmt_err),
            fmt_err(loss_err),
            fmt_err(step_err),
            if ok { "ok" } else { "FAIL" }.to_string(),
        ]);
    }
    println!("\nGPT-2 parity against TRL 0.26.2 (max abs error, tolerance {TOLERANCE:e}):");
    print_table(&["case", "logits", "values", "loss", "incremental", "result"], &rows);
    assert!(failures.is_empty(), "parity failed for {failures:?}");
}

#[test]
fn fresh_head_checkpoint_still_scores_with_trl_logits() {
    let case = cases()
        .into_iter()
        .find(|c| c.fresh_v_head)
        .expect("a case without v_head");
    let model = CausalLmWithValueHead::from_folder(&case.dir, &LoadOptions::default()).unwrap();
    let bound = 1.0 / (model.v_head().weight.size()[1] as f64).sqrt();
    assert!(model.v_head().weight.abs().max().double_value(&[]) <= bound);
    assert!(model.state_dict().iter().any(|(n, _)| n == "v_head.summary.bias"));
}

#[test]
fn vh_forward_cli_matches_trl() {
    let out_dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for case in cases() {
        let got = vh_forward(&case, out_dir.path());
        let expected = read_tensors(&case.dir.join("expected.safetensors"));
        let mask = &read_tensors(&case.dir.join("inputs.safetensors"))["attention_mask"];
        assert_eq!(got["logits"].kind(), tch::Kind::Float);
        let logits_err = masked_max_abs_diff(&got["logits"], &expected["logits"], mask);
        let loss_err = max_abs_diff(&got["loss"], &expected["loss"]);
        let values_err = if case.fresh_v_head {
            0.0
        } else {
            masked_max_abs_diff(&got["values"], &expected["values"], mask)
        };
        let worst = logits_err.max(loss_err).max(values_err);
        assert!(
            worst <= TOLERANCE,
            "{}: vh forward differs from TRL: logits {logits_err:e}, loss {loss_err:e}, values {values_err:e}",
            case.name
        );
        rows.push(vec![case.name, fmt_err(worst)]);
    }
    println!("\n`vh forward` against TRL 0.26.2 (max abs error over logits, values, loss):");
    print_table(&["case", "max error"], &rows);
}
