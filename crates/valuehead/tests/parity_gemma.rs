//! Gemma parity with Python TRL 0.26.2: seeded random Gemma models (embeddings scaled by
//! sqrt(hidden) in the model's dtype, (1 + w) RMS norms, GeGLU, head_dim from the config; GQA, MQA
//! and MHA; tied and untied; attention biases; rope scaling) saved with TRL's save_pretrained;
//! logits, values and loss (full, and incremental through the cache) within 1e-4 on padded batches.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_gemma.py", "parity-gemma")));
    assert!(cases.len() >= 10, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn gemma_matches_trl_full_and_incremental() {
    check_causal_cases("Gemma parity against TRL 0.26.2", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_gemma() {
    check_cli("`vh forward` on Gemma against TRL 0.26.2", cases(), true);
}
