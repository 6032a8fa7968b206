//! Llama-family parity with Python TRL 0.26.2: seeded random Llama and Qwen2 models (GQA and
//! not, tied and untied, each rope scaling, biases, explicit head_dim) saved with TRL's
//! save_pretrained; logits, values and loss (full and incremental) within 1e-4.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_llama.py", "parity-llama")));
    assert!(cases.len() >= 12, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn llama_family_matches_trl_full_and_incremental() {
    check_causal_cases("Llama / Qwen2 parity against TRL 0.26.2", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_llama() {
    check_cli("`vh forward` on Llama / Qwen2 against TRL 0.26.2", cases(), true);
}
