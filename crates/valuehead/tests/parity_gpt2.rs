//! GPT-2 parity with Python TRL 0.26.2: the reference builds seeded random models over a spread
//! of configs, saves them with TRL's save_pretrained and records its outputs; we load each
//! folder and compare logits, values and loss (full and incremental forward) within 1e-4.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use valuehead::{CausalLmWithValueHead, LoadOptions};

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
    check_causal_cases("GPT-2 parity against TRL 0.26.2", cases());
}

#[test]
fn fresh_head_checkpoint_gets_a_default_initialised_head() {
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
    check_cli("`vh forward` on GPT-2 against TRL 0.26.2", cases(), true);
}
