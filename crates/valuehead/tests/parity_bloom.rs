//! Bloom parity with Python TRL 0.26.2 (eager, Bloom's only attention in transformers 4.57.6):
//! seeded random BloomForCausalLM models (ALiBi over 1, 2, 3, 4, 5, 6, 8 and 12 heads, power-of-2
//! and not; residuals after the LayerNorms; tied and untied; pretraining_tp with and without
//! slow_but_exact; legacy keys without `transformer.`) saved with TRL's save_pretrained; logits,
//! values and loss (full, incremental through the cache, and without an attention mask) within
//! 1e-4 on left- and right-padded batches, and `vh forward`.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use valuehead::CausalLmWithValueHead;

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_bloom.py", "parity-bloom")));
    assert!(cases.len() >= 10, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn bloom_matches_trl_full_and_incremental() {
    check_causal_cases("Bloom parity against TRL 0.26.2 (eager)", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_bloom() {
    check_cli("`vh forward` on Bloom against TRL 0.26.2 (eager)", cases(), true);
}

/// The call without an attention mask (every token attended, ALiBi numbering keys 0..S), as
/// TRL's default call with input ids only.
#[test]
fn default_call_without_a_mask_matches_trl() {
    let mut rows = Vec::new();
    let mut worst = 0.0f64;
    for case in cases() {
        let model = CausalLmWithValueHead::from_folder(&case.dir, &eager()).unwrap();
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        let expected = read_tensors(&case.dir.join("expected.safetensors"));
        let out = tch::no_grad(|| model.forward(&inputs["input_ids"], None, None, Some(&inputs["labels"]))).unwrap();
        let mut err = max_abs_diff(&out.logits, &expected["logits_nomask"])
            .max(max_abs_diff(out.loss.as_ref().unwrap(), &expected["loss_nomask"]));
        if !case.fresh_v_head {
            err = err.max(max_abs_diff(&out.values, &expected["values_nomask"]));
        }
        // The pads count as tokens here: the outputs must differ from the masked call's, or the
        // mask would not be reaching ALiBi.
        let masked = max_abs_diff(&out.logits, &expected["logits"]);
        assert!(masked > 1e-3, "{}: the mask changes nothing ({masked:e})", case.name);
        worst = worst.max(err);
        rows.push(vec![case.name.clone(), fmt_err(err)]);
    }
    println!("\nBloom without an attention mask against TRL 0.26.2:");
    print_table(&["case", "max error (logits, values, loss)"], &rows);
    assert!(worst <= TOLERANCE, "worst {worst:e}");
}
