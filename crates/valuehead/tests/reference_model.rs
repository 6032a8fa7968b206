//! `create_reference_model` against TRL 0.26.2's: which parameters are shared (frozen in the
//! policy) for every call TRL's users make, the calls it refuses, TRL's own `TestReferenceModel`
//! ported, and the memory the sharing saves.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::Tensor;
use valuehead::{create_reference_model, create_seq2seq_reference_model, CausalLmWithValueHead, LoadOptions};
use vh_train::{AdamW, AdamWConfig};

fn reference() -> &'static (PathBuf, Vec<serde_json::Value>) {
    static DATA: OnceLock<(PathBuf, Vec<serde_json::Value>)> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = generate_reference("parity_reference.py", "reference-model");
        let cases: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
        (dir, cases)
    })
}

fn load(dir: &Path) -> CausalLmWithValueHead {
    CausalLmWithValueHead::from_folder(dir, &LoadOptions::default()).unwrap()
}

#[test]
fn shared_parameters_match_trl() {
    let (dir, cases) = reference();
    let mut rows = Vec::new();
    for case in cases {
        let model_name = case["model"].as_str().unwrap();
        let k = case["k"].as_u64().map(|k| k as usize);
        let pattern = case["pattern"].as_str();
        let model = load(&dir.join(model_name));
        let ours = create_reference_model(&model, k, pattern);
        let label = format!("{model_name} k={k:?} pattern={pattern:?}");
        let trl_frozen: Option<BTreeSet<String>> = case.get("frozen_in_policy").map(|f| {
            f.as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_string())
                .collect()
        });
        let all: usize = case.get("parameters").map_or(0, |p| p.as_array().unwrap().len());
        let outcome = match (&trl_frozen, ours) {
            // TRL refuses (no pattern matched for this depth): so do we.
            (None, Err(e)) => {
                assert!(e.to_string().contains("could not be matched"), "{label}: {e}");
                "both refuse".to_string()
            }
            // A given pattern that matches nothing: TRL freezes the whole policy, value head
            // included, with only a warning; we refuse (docs/parity.md).
            (Some(frozen), Err(e)) if frozen.len() == all && k.is_some() => {
                assert!(e.to_string().contains("could not be matched"), "{label}: {e}");
                "TRL freezes everything; we refuse".to_string()
            }
            (Some(frozen), Ok((reference, info))) => {
                let ours: BTreeSet<String> = info.shared.iter().map(|n| format!("pretrained_model.{n}")).collect();
                assert_eq!(&ours, frozen, "{label}: shared parameters");
                // Frozen exactly there in the policy; everything frozen in the reference.
                let policy_frozen: BTreeSet<String> = model
                    .var_store()
                    .variables()
                    .into_iter()
                    .filter(|(_, t)| !t.requires_grad())
                    .map(|(n, _)| format!("pretrained_model.{n}"))
                    .collect();
                assert_eq!(&policy_frozen, frozen, "{label}: frozen in the policy");
                assert!(
                    reference.var_store().variables().values().all(|t| !t.requires_grad()),
                    "{label}"
                );
                assert!(!reference.is_train(), "{label}: eval mode");
                format!("{} shared, same set", frozen.len())
            }
            (None, Ok(_)) => panic!("{label}: TRL refuses, we did not"),
            (Some(_), Err(e)) => panic!("{label}: TRL accepts, we refused: {e}"),
        };
        rows.push(vec![label, outcome]);
    }
    print_table(&["call", "outcome"], &rows);
}

/// TRL's `TestReferenceModel.test_independent_reference` and `test_shared_layers`, on its
/// layer format (`transformer.h.{layer}.attn.c_attn.weight`) with AdamW(lr=1) built before the
/// reference, as TRL's test builds it.
#[test]
fn trl_test_reference_model_ported() {
    let (dir, _) = reference();
    let layer = |i: usize| format!("transformer.h.{i}.attn.c_attn.weight");
    let ids = Tensor::from_slice(&[0i64, 1, 2, 3]).view([1, 4]);
    for shared in [None, Some(1)] {
        let model = load(&dir.join("gpt2"));
        let mut opt = AdamW::hf(
            model.var_store(),
            AdamWConfig {
                lr: 1.0,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        let (reference, _) = create_reference_model(&model, shared, None).unwrap();
        let get = |m: &CausalLmWithValueHead, name: &str| m.var_store().variables()[name].detach().copy();
        let (first, last) = (layer(0), layer(2));
        let before = [get(&model, &first), get(&model, &last)];
        let ref_before = [get(&reference, &first), get(&reference, &last)];
        let out = model.forward(&ids, None, None, Some(&ids)).unwrap();
        out.loss.unwrap().backward();
        opt.step().unwrap();
        let after = [get(&model, &first), get(&model, &last)];
        let ref_after = [get(&reference, &first), get(&reference, &last)];
        assert!(
            before[0].equal(&ref_before[0]) && before[1].equal(&ref_before[1]),
            "identical before"
        );
        assert!(
            ref_before[0].equal(&ref_after[0]) && ref_before[1].equal(&ref_after[1]),
            "the reference stays"
        );
        assert!(!before[1].equal(&after[1]), "{shared:?}: the unshared layer trains");
        if shared.is_none() {
            assert!(!before[0].equal(&after[0]), "independent: the first layer trains");
        } else {
            assert!(
                before[0].equal(&after[0]),
                "shared: the first layer is frozen in the policy"
            );
        }
    }
}

#[test]
fn sharing_holds_the_shared_bytes_once() {
    let (dir, _) = reference();
    let model = load(&dir.join("llama"));
    let (full, info_none) = create_reference_model(&model, None, None).unwrap();
    assert!(info_none.shared.is_empty() && info_none.shared_bytes == 0);
    let (shared, info) = create_reference_model(&model, Some(2), None).unwrap();
    // Same storage for every shared parameter, a separate one for the rest.
    let policy = model.var_store().variables();
    let mut counted = 0u64;
    for (name, t) in shared.var_store().variables() {
        let same = t.data_ptr() == policy[&name].data_ptr();
        assert_eq!(same, info.shared.contains(&name), "{name}");
        assert_ne!(
            full.var_store().variables()[&name].data_ptr(),
            policy[&name].data_ptr(),
            "{name}"
        );
        if same {
            counted += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        }
    }
    assert_eq!(counted, info.shared_bytes);
    let total: u64 = policy
        .values()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum();
    assert!(
        info.shared_bytes > total / 2,
        "embeddings and 2 of 3 layers are most of the model"
    );
    // Same outputs: the reference computes what the policy computed when it was made.
    let ids = Tensor::from_slice(&[5i64, 6, 7, 8, 9]).view([1, 5]);
    let a = tch::no_grad(|| model.forward(&ids, None, None, None)).unwrap();
    for r in [&full, &shared] {
        let b = tch::no_grad(|| r.forward(&ids, None, None, None)).unwrap();
        assert!(a.logits.equal(&b.logits) && a.values.equal(&b.values));
    }
    println!(
        "llama (3 layers), num_shared_layers=2: {} of {} parameter bytes shared ({} tensors); an independent reference holds all {}",
        info.shared_bytes,
        total,
        info.shared.len(),
        total
    );
}

#[test]
fn refused_calls_are_typed_errors() {
    let (dir, _) = reference();
    let model = load(&dir.join("gpt2"));
    for (k, pattern, needle) in [
        (3, None, "could not be matched"),
        (usize::MAX, None, "could not be matched"),
        (1, Some("no.such.{layer}"), "could not be matched"),
        (1, Some("transformer.h.{layer}.mlp"), "whole decoder layers"),
        (1, Some("transformer.h.{layers}"), "no other braces"),
        (1, Some(""), "must not be empty"),
    ] {
        let err = create_reference_model(&model, Some(k), pattern)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{k} {pattern:?}: {err}");
    }
    // Nothing was frozen by a refused call.
    assert!(model.var_store().variables().values().all(|t| t.requires_grad()));
}

#[test]
fn seq2seq_reference_is_an_independent_frozen_copy() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("reference-t5");
    let _ = std::fs::remove_dir_all(&dir);
    write_tiny("t5", &dir, serde_json::json!({}));
    let model = valuehead::Seq2SeqLmWithValueHead::from_folder(&dir, &LoadOptions::default()).unwrap();
    let reference = create_seq2seq_reference_model(&model).unwrap();
    let policy = model.var_store().variables();
    for (name, t) in reference.var_store().variables() {
        assert!(!t.requires_grad(), "{name}");
        assert_ne!(t.data_ptr(), policy[&name].data_ptr(), "{name}");
        assert!(t.equal(&policy[&name]), "{name}");
    }
    assert!(policy.values().all(|t| t.requires_grad()));
}
