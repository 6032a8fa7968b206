//! Qwen3 parity with Python TRL 0.26.2: seeded random Qwen3 models (per-head q/k norms, head_dim
//! apart from the hidden size, GQA, MQA and MHA, tied and untied, attention biases, rope scaling,
//! sliding-window layers from max_window_layers and from layer_types) saved with TRL's
//! save_pretrained; logits, values and loss (full and incremental) within 1e-4 on padded batches.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_qwen3.py", "parity-qwen3")));
    assert!(cases.len() >= 10, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn qwen3_matches_trl_full_and_incremental() {
    check_causal_cases("Qwen3 parity against TRL 0.26.2", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_qwen3() {
    check_cli("`vh forward` on Qwen3 against TRL 0.26.2", cases(), true);
}
