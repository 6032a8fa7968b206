//! DBRX parity with Python TRL 0.26.2: seeded random DbrxForCausalLM models (2, 3, 4, 5 and 8
//! experts; top-1, top-2, top-4 and every expert; expert weights normalised by their 1-, 2- and
//! 0.5-norm or not at all; clip_qkv set and unset; GQA, MQA and MHA; silu and gelu experts; one to
//! three blocks; all untied, as DBRX must be) saved with TRL's save_pretrained. Logits, values and
//! loss within 1e-4 on left- and right-padded batches: the default call (with and without a mask),
//! explicit positions, our sdpa, incremental decoding through the cache, `vh forward`, HF's own
//! sdpa at attended positions, the seeded train-mode router jitter, and the bf16 backbone against
//! TRL's bf16.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::Kind;
use valuehead::{AttnImplementation, CausalLmWithValueHead, LoadOptions};

/// python/parity_dbrx.py's seed before its train-mode pass.
const TRAIN_SEED: i64 = 1234;

/// One test at a time: the jitter test seeds libtorch's global generator and then draws from it,
/// and a test loading a model beside it could draw in between.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn root() -> &'static PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    // One intra-op thread keeps CPU results reproducible (see common::vh_forward).
    tch::set_num_threads(1);
    DATA.get_or_init(|| generate_reference("parity_dbrx.py", "parity-dbrx"))
}

fn cases() -> Vec<Case> {
    let cases = read_cases(root());
    assert!(cases.len() >= 10, "the reference produced only {} cases", cases.len());
    cases
}

#[test]
fn dbrx_matches_trl_full_and_incremental() {
    let _serial = serial();
    check_causal_cases("DBRX parity against TRL 0.26.2 (eager)", cases());
}

#[test]
fn vh_forward_cli_matches_trl_on_dbrx() {
    let _serial = serial();
    check_cli("`vh forward` on DBRX against TRL 0.26.2 (eager)", cases(), true);
}

/// The default call with no attention mask at all (labels = the ids), every position.
#[test]
fn dbrx_default_call_without_a_mask_matches_trl() {
    let _serial = serial();
    let mut rows = Vec::new();
    let mut worst: f64 = 0.0;
    for case in cases() {
        let model = CausalLmWithValueHead::from_folder(&case.dir, &eager()).unwrap();
        let ids = &read_tensors(&case.dir.join("inputs.safetensors"))["input_ids"];
        let expected = read_tensors(&case.dir.join("extra.safetensors"));
        let out = tch::no_grad(|| model.forward(ids, None, None, Some(ids))).unwrap();
        let mut err = max_abs_diff(&out.logits, &expected["logits_nomask"])
            .max(max_abs_diff(out.loss.as_ref().unwrap(), &expected["loss_nomask"]));
        if !case.fresh_v_head {
            err = err.max(max_abs_diff(&out.values, &expected["values_nomask"]));
        }
        assert!(err <= TOLERANCE, "{}: {err:e}", case.name);
        worst = worst.max(err);
        rows.push(vec![case.name.clone(), fmt_err(err)]);
    }
    println!("\nDBRX, the default call without a mask, against TRL 0.26.2 (eager):");
    print_table(&["case", "max error (logits, values, loss)"], &rows);
    println!("worst {}", fmt_err(worst));
}

/// Our default load (sdpa) against HF's default attention (sdpa, unpatched: it also runs the
/// unclipped cases whose eager path crashes in transformers 4.57.6), at attended positions:
/// HF's sdpa unmasks fully padded query rows, which then attend to every key.
#[test]
fn dbrx_default_attention_matches_hf_sdpa_at_attended_positions() {
    let _serial = serial();
    let mut rows = Vec::new();
    for case in cases() {
        let model = CausalLmWithValueHead::from_folder(&case.dir, &LoadOptions::default()).unwrap();
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        let expected = read_tensors(&case.dir.join("extra.safetensors"));
        let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
        let out = tch::no_grad(|| model.forward(ids, Some(mask), None, None)).unwrap();
        let mut err = masked_max_abs_diff(&out.logits, &expected["logits_sdpa"], mask);
        if !case.fresh_v_head {
            err = err.max(masked_max_abs_diff(&out.values, &expected["values_sdpa"], mask));
        }
        assert!(err <= TOLERANCE, "{}: {err:e}", case.name);
        rows.push(vec![case.name.clone(), fmt_err(err)]);
    }
    println!("\nDBRX, our default attention against HF's sdpa (attended positions):");
    print_table(&["case", "max error (logits, values)"], &rows);
}

/// Train mode with `moe_jitter_eps`: after the same seed, libtorch's generator gives our router
/// jitter HF's noise, so the logits match (the values pass the value head's dropout, which draws
/// after the backbone: not compared). Eager attention, as the reference.
#[test]
fn dbrx_train_mode_jitter_matches_seeded_hf() {
    let _serial = serial();
    let mut checked = 0;
    for case in cases() {
        let expected = read_tensors(&case.dir.join("extra.safetensors"));
        let Some(reference) = expected.get("logits_train") else {
            continue;
        };
        let mut model = CausalLmWithValueHead::from_folder(&case.dir, &eager()).unwrap();
        model.set_train(true);
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        tch::manual_seed(TRAIN_SEED);
        let out =
            tch::no_grad(|| model.forward(&inputs["input_ids"], Some(&inputs["attention_mask"]), None, None)).unwrap();
        let err = max_abs_diff(&out.logits, reference);
        let eval_gap = max_abs_diff(
            reference,
            &read_tensors(&case.dir.join("expected.safetensors"))["logits"],
        );
        println!(
            "{}: train-mode logits {} (train vs eval {})",
            case.name,
            fmt_err(err),
            fmt_err(eval_gap)
        );
        assert!(eval_gap > 1e-3, "{}: the jitter changes nothing", case.name);
        assert!(err <= TOLERANCE, "{}: {err:e}", case.name);
        checked += 1;
    }
    assert!(checked >= 1, "no case sets moe_jitter_eps");
}

/// The backbone in bf16 (TRL's value head and logits in f32) against TRL loaded with
/// `dtype=torch.bfloat16`, on the default call.
#[test]
fn dbrx_bf16_matches_trl_bf16() {
    let _serial = serial();
    let options = LoadOptions {
        dtype: Kind::BFloat16,
        ..eager()
    };
    let mut rows = Vec::new();
    for case in cases() {
        let model = CausalLmWithValueHead::from_folder(&case.dir, &options).unwrap();
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        let expected = read_tensors(&case.dir.join("extra.safetensors"));
        let (ids, mask, labels) = (&inputs["input_ids"], &inputs["attention_mask"], &inputs["labels"]);
        let out = tch::no_grad(|| model.forward(ids, Some(mask), None, Some(labels))).unwrap();
        assert_eq!(out.logits.kind(), Kind::Float);
        let scale = expected["logits_bf16"].abs().max().double_value(&[]);
        let logits_err = max_abs_diff(&out.logits, &expected["logits_bf16"]);
        let loss_err = max_abs_diff(out.loss.as_ref().unwrap(), &expected["loss_bf16"]);
        let values_err = if case.fresh_v_head {
            0.0
        } else {
            max_abs_diff(&out.values, &expected["values_bf16"])
        };
        // bf16 keeps 8 significant bits: 2^-8 of the logits' scale is one rounding there.
        let bound = 4.0 * scale / 256.0;
        assert!(
            logits_err <= bound && loss_err <= bound && values_err <= bound,
            "{}: bf16 logits {logits_err:e}, loss {loss_err:e}, values {values_err:e} (bound {bound:e})",
            case.name
        );
        rows.push(vec![
            case.name.clone(),
            fmt_err(logits_err),
            fmt_err(values_err),
            fmt_err(loss_err),
            format!("{scale:.2}"),
        ]);
    }
    println!("\nDBRX bf16 backbone against TRL's bf16 (default call, every position):");
    print_table(&["case", "logits", "values", "loss", "max |logit|"], &rows);
}

/// Configs transformers rejects or cannot run are typed errors here, not panics.
#[test]
fn dbrx_bad_configs_are_typed_errors() {
    let _serial = serial();
    let case = &cases()[0];
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.dir.join("config.json")).unwrap()).unwrap();
    for (what, patch) in [
        ("tied", serde_json::json!({"tie_word_embeddings": true})),
        ("heads not dividing d_model", serde_json::json!({"n_heads": 5})),
        (
            "top_k above the experts",
            serde_json::json!({"ffn_config": {"moe_num_experts": 2, "moe_top_k": 3}}),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(case.dir.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
        let mut cfg = config.clone();
        for (k, v) in patch.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let options = LoadOptions {
            attn_implementation: Some(AttnImplementation::Eager),
            ..Default::default()
        };
        let err = CausalLmWithValueHead::from_folder(dir.path(), &options).expect_err(what);
        assert!(
            matches!(err, valuehead::Error::Model(vh_core::Error::Config(_))),
            "{what}: {err}"
        );
    }
}
