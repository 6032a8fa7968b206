//! GPT-NeoX parity with Python TRL 0.26.2: seeded random GPTNeoXForCausalLM models (parallel and
//! sequential residuals, partial, odd, full and no rotary, rope scaling, tied and untied, with and
//! without attention biases, legacy keys) saved with TRL's save_pretrained; logits, values and
//! loss (full and incremental) within 1e-4, and `vh forward`.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;

fn cases() -> Vec<Case> {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    let cases = read_cases(DATA.get_or_init(|| generate_reference("parity_gpt_neox.py", "parity-gpt-neox")));
    assert!(cases.len() >= 12, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn gpt_neox_matches_trl_full_and_incremental() {
    check_causal_cases("GPT-NeoX parity against TRL 0.26.2", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_gpt_neox() {
    check_cli("`vh forward` on GPT-NeoX against TRL 0.26.2", cases(), true);
}
