//! Mistral parity with Python TRL 0.26.2: seeded random Mistral models (sliding windows of 1 to 7
//! over 14-token rows, longer than the rows, and none; GQA, MQA and MHA; tied and untied; explicit
//! head_dim; rope scaling) saved with TRL's save_pretrained; logits, values and loss (full, and
//! incremental through the cache past the window) within 1e-4 on padded batches.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_mistral.py", "parity-mistral")));
    assert!(cases.len() >= 10, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn mistral_matches_trl_full_and_incremental() {
    check_causal_cases("Mistral parity against TRL 0.26.2", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_mistral() {
    check_cli("`vh forward` on Mistral against TRL 0.26.2", cases(), true);
}
