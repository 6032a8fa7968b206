//! T5 parity with Python TRL 0.26.2 (`AutoModelForSeq2SeqLMWithValueHead`): the reference builds
//! seeded random T5 models over a spread of configs, saves them with TRL's save_pretrained and
//! records its outputs on right-padded encoder batches with labels; we load each folder and
//! compare logits, values and loss, for the full decoder pass and step by step through the
//! caches, within 1e-4.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use valuehead::{LoadOptions, Seq2SeqLmWithValueHead};

/// Decoder tokens fed in the first pass of the incremental check; the rest go one at a time.
const DECODER_PROMPT_LEN: i64 = 5;

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_t5.py", "parity-t5")));
    assert!(cases.len() >= 7, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn t5_matches_trl_full_and_incremental() {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for case in cases() {
        let model = Seq2SeqLmWithValueHead::from_folder(&case.dir, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        let expected = read_tensors(&case.dir.join("expected.safetensors"));
        let (ids, mask, labels) = (&inputs["input_ids"], &inputs["attention_mask"], &inputs["labels"]);
        let decoder_ids = &inputs["decoder_input_ids"];

        // Labels only: decoder inputs are the labels shifted right, as in HF.
        let out = tch::no_grad(|| model.forward(Some(ids), Some(mask), None, None, None, None, Some(labels))).unwrap();
        let logits_err = max_abs_diff(&out.logits, &expected["logits"]);
        let loss_err = max_abs_diff(out.loss.as_ref().unwrap(), &expected["loss"]);
        let values_err = (!case.fresh_v_head).then(|| max_abs_diff(&out.values, &expected["values"]));

        // Incremental: encode once, the first decoder tokens, then one at a time through the caches.
        let encoder = tch::no_grad(|| model.encode(ids, Some(mask))).unwrap();
        let first = tch::no_grad(|| {
            model.forward(
                None,
                None,
                Some(&decoder_ids.narrow(1, 0, DECODER_PROMPT_LEN)),
                None,
                Some(&encoder),
                None,
                None,
            )
        })
        .unwrap();
        let mut step_err = max_abs_diff(&first.logits, &expected["logits"].narrow(1, 0, DECODER_PROMPT_LEN));
        let mut past = first.past;
        let tgt = decoder_ids.size()[1];
        for t in DECODER_PROMPT_LEN..tgt {
            let step = tch::no_grad(|| {
                model.forward(
                    None,
                    None,
                    Some(&decoder_ids.narrow(1, t, 1)),
                    None,
                    Some(&encoder),
                    Some(&past),
                    None,
                )
            })
            .unwrap();
            step_err = step_err.max(max_abs_diff(&step.logits, &expected["logits"].narrow(1, t, 1)));
            if !case.fresh_v_head {
                step_err = step_err.max(max_abs_diff(&step.values, &expected["values"].narrow(1, t, 1)));
            }
            past = step.past;
        }
        assert_eq!(past.seq_len(), tgt);

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
    println!("\nT5 parity against TRL 0.26.2 (max abs error, tolerance {TOLERANCE:e}):");
    print_table(&["case", "logits", "values", "loss", "incremental", "result"], &rows);
    assert!(failures.is_empty(), "parity failed for {failures:?}");
}

#[test]
fn vh_forward_cli_matches_trl_on_t5() {
    check_cli("`vh forward` on T5 against TRL 0.26.2", cases(), false);
}
