//! Gemma2 parity with Python TRL 0.26.2 (eager attention): seeded random Gemma2 models (attention
//! and final-logit soft-capping, tight, HF's defaults and none; pre/post feed-forward norms;
//! alternating sliding-window layers with windows of 1 to 5 over 14-token rows and explicit
//! layer_types; query_pre_attn_scalar; GQA, MQA and MHA; tied and untied; attention biases; rope
//! scaling) saved with TRL's save_pretrained; logits, values and loss (full, and incremental
//! through the cache past the windows) within 1e-4 on padded batches.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_gemma2.py", "parity-gemma2")));
    assert!(cases.len() >= 10, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn gemma2_matches_trl_full_and_incremental() {
    check_causal_cases("Gemma2 parity against TRL 0.26.2 (eager)", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_gemma2() {
    check_cli("`vh forward` on Gemma2 against TRL 0.26.2 (eager)", cases(), true);
}
