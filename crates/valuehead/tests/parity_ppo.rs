//! PPO's math against TRL 0.26.2 (python/parity_ppo.py): TRL's own utility functions and the
//! formulas inline in its `PPOTrainer.train`, on a synthetic padded rollout with full-length,
//! early-stopped, one-token and empty responses, for three configurations (k1 and k3, rewards
//! whitened or not, a missing-eos penalty, tight clip ranges).

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::{Kind, Tensor};
use vh_rl::*;

/// PPO's numbers are O(1); both sides run the same libtorch kernels in the same order, so they
/// agree to the bit except where a reduction's order differs (none expected): 1e-6 absolute.
const PPO_TOLERANCE: f64 = 1e-6;

fn reference() -> &'static (PathBuf, Vec<Value>) {
    static DATA: OnceLock<(PathBuf, Vec<Value>)> = OnceLock::new();
    tch::set_num_threads(1);
    DATA.get_or_init(|| {
        let dir = generate_reference("parity_ppo.py", "parity-ppo");
        let cases: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
        assert_eq!(cases.len(), 3);
        (dir, cases)
    })
}

fn config_of(c: &Value) -> PpoConfig {
    PpoConfig {
        kl_coef: c["kl_coef"].as_f64().unwrap(),
        kl_estimator: c["kl_estimator"].as_str().unwrap().parse().unwrap(),
        cliprange: c["cliprange"].as_f64().unwrap(),
        vf_coef: c["vf_coef"].as_f64().unwrap(),
        cliprange_value: c["cliprange_value"].as_f64().unwrap(),
        gamma: c["gamma"].as_f64().unwrap(),
        lam: c["lam"].as_f64().unwrap(),
        whiten_rewards: c["whiten_rewards"].as_bool().unwrap(),
        temperature: c["temperature"].as_f64().unwrap(),
        missing_eos_penalty: c["missing_eos_penalty"].as_f64(),
    }
}

/// Compares `ours` with the reference tensor `key` (same shape and kind class), records the error.
struct Checker<'a> {
    r: &'a HashMap<String, Tensor>,
    errors: Vec<(String, f64)>,
}

impl Checker<'_> {
    fn check(&mut self, key: &str, ours: &Tensor) {
        let expected = &self.r[key];
        assert_eq!(ours.size(), expected.size(), "{key}: shape");
        let err = if ours.kind() == Kind::Bool || vh_core::tensor::is_integer_kind(ours.kind()) {
            assert!(
                ours.to_kind(Kind::Int64).equal(&expected.to_kind(Kind::Int64)),
                "{key}: {ours} vs {expected}"
            );
            0.0
        } else {
            max_abs_diff(ours, expected)
        };
        self.errors.push((key.to_string(), err));
    }

    /// The largest error and where ("all bit-identical" when every error is 0).
    fn worst(&self) -> (String, f64) {
        let (key, err) = self
            .errors
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .cloned()
            .unwrap_or_default();
        if err == 0.0 {
            return ("all bit-identical".to_string(), 0.0);
        }
        (key, err)
    }
}

#[test]
fn trl_utilities_match() {
    let (dir, cases) = reference();
    let mut rows = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let r = read_tensors(&dir.join(format!("{name}.safetensors")));
        let (pad, eos, context) = (
            case["pad"].as_i64().unwrap(),
            case["eos"].as_i64().unwrap(),
            case["context_length"].as_i64().unwrap(),
        );
        let mut c = Checker { r: &r, errors: vec![] };
        let responses = &r["responses"];
        c.check(
            "selective_log_softmax_f32",
            &selective_log_softmax(&r["util_logits"], responses).unwrap(),
        );
        let bf16 = selective_log_softmax(&r["util_logits_bf16"], responses).unwrap();
        assert_eq!(bf16.kind(), Kind::BFloat16);
        c.check("selective_log_softmax_bf16", &bf16);
        c.check(
            "entropy_from_logits",
            &entropy_from_logits(&r["util_logits"], 128).unwrap(),
        );
        c.check(
            "entropy_from_logits_chunk_7",
            &entropy_from_logits(&r["util_logits"], 7).unwrap(),
        );
        c.check(
            "first_true_indices",
            &first_true_indices(&r["postprocessed"].eq(pad)).unwrap(),
        );
        c.check("truncate_response", &truncate_response(eos, pad, responses).unwrap());
        let qr = &r["query_responses"];
        let lens = reward_sequence_lengths(qr, pad, context).unwrap();
        c.check("get_reward_sequence_lengths", &lens);
        c.check(
            "get_reward_final",
            &gather_final_rewards(&r["reward_states"], &lens).unwrap(),
        );
        let inputs = padded_inputs(qr, pad).unwrap();
        for prefix in ["get_reward", "forward"] {
            c.check(&format!("{prefix}_input_ids"), &inputs.input_ids);
            c.check(&format!("{prefix}_attention_mask"), &inputs.attention_mask);
            c.check(&format!("{prefix}_position_ids"), &inputs.position_ids);
        }
        let (values, mask) = (&r["masked_values"], &r["masked_mask"]);
        c.check("masked_mean", &masked_mean(values, mask, None).unwrap());
        let rows_kept = &r["masked_rows"];
        c.check(
            "masked_mean_axis1",
            &masked_mean(
                &values.index_select(0, &rows_kept.nonzero().squeeze_dim(1)),
                &mask.index_select(0, &rows_kept.nonzero().squeeze_dim(1)),
                Some(1),
            )
            .unwrap(),
        );
        c.check(
            "masked_mean_float_mask",
            &masked_mean(values, &mask.to_kind(Kind::Float), None).unwrap(),
        );
        c.check("masked_var_unbiased", &masked_var(values, mask, true).unwrap());
        c.check("masked_var_biased", &masked_var(values, mask, false).unwrap());
        c.check("masked_whiten_shift", &masked_whiten(values, mask, true).unwrap());
        c.check("masked_whiten_noshift", &masked_whiten(values, mask, false).unwrap());
        // The reference's rows include an empty response: TRL's per-row mean is NaN there, ours
        // an error.
        assert!(masked_mean(values, mask, Some(1)).is_err());
        let (key, err) = c.worst();
        rows.push(vec![name.to_string(), c.errors.len().to_string(), fmt_err(err), key]);
        assert!(err <= PPO_TOLERANCE, "{name}: {:?}", c.errors);
    }
    println!("\nTRL's utility functions (max abs error; integer and bool outputs must be equal):");
    print_table(&["case", "outputs", "worst", "where"], &rows);
}

#[test]
fn trainer_math_matches_trl() {
    let (dir, cases) = reference();
    let mut rows = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = config_of(&case["config"]);
        let r = read_tensors(&dir.join(format!("{name}.safetensors")));
        let (pad, eos) = (case["pad"].as_i64().unwrap(), case["eos"].as_i64().unwrap());
        let mut c = Checker { r: &r, errors: vec![] };
        let responses = &r["responses"];

        // The rollout's scoring.
        let (_, logprob) = tempered_logprobs(&r["policy_logits"], responses, cfg.temperature).unwrap();
        let (_, ref_logprob) = tempered_logprobs(&r["ref_logits"], responses, cfg.temperature).unwrap();
        c.check("rollout_logprobs_raw", &logprob);
        c.check("rollout_ref_logprobs_raw", &ref_logprob);
        let postprocessed = &r["postprocessed"];
        let sequence_lengths = first_true_indices(&postprocessed.eq(pad)).unwrap() - 1;
        c.check("sequence_lengths", &sequence_lengths);
        let (scores, contain_eos) =
            apply_missing_eos_penalty(&r["scores_raw"], postprocessed, eos, cfg.missing_eos_penalty).unwrap();
        c.check("scores", &scores);
        c.check("contain_eos_token", &contain_eos);

        let targets = compute_rollout_targets(
            &Rollout {
                logprobs: &logprob,
                ref_logprobs: &ref_logprob,
                values: &r["values_raw"],
                scores: &scores,
                sequence_lengths: &sequence_lengths,
            },
            &cfg,
        )
        .unwrap();
        for (key, t) in [
            ("padding_mask", &targets.padding_mask),
            ("padding_mask_p1", &targets.padding_mask_p1),
            ("logprobs", &targets.logprobs),
            ("ref_logprobs", &targets.ref_logprobs),
            ("values", &targets.values),
            ("kl", &targets.kl),
            ("non_score_reward", &targets.non_score_reward),
            ("rewards", &targets.rewards),
            ("returns", &targets.returns),
            ("advantages", &targets.advantages),
        ] {
            c.check(key, t);
        }

        // One update micro-batch, with gradients.
        let inds = &r["update_indices"];
        let rows_of = |t: &Tensor| t.index_select(0, inds);
        let logits = r["update_logits_raw"].copy().set_requires_grad(true);
        let vpred = r["update_vpred_raw"].copy().set_requires_grad(true);
        let (tempered, new_logprobs) = tempered_logprobs(&logits, &rows_of(responses), cfg.temperature).unwrap();
        c.check("update_new_logprobs_raw", &new_logprobs);
        let batch = PpoBatch {
            new_logprobs: &new_logprobs,
            vpred: &vpred,
            old_logprobs: &rows_of(&targets.logprobs),
            old_values: &rows_of(&targets.values),
            returns: &rows_of(&targets.returns),
            advantages: &rows_of(&targets.advantages),
            padding_mask: &rows_of(&targets.padding_mask),
            padding_mask_p1: &rows_of(&targets.padding_mask_p1),
        };
        let loss = ppo_loss(&batch, &cfg).unwrap();
        vh_train::backward(&loss.loss).unwrap();
        for (key, t) in [
            ("loss", &loss.loss),
            ("pg_loss", &loss.pg_loss),
            ("vf_loss", &loss.vf_loss),
            ("vf_clipfrac", &loss.vf_clipfrac),
            (
                "pg_clipfrac",
                loss.pg_clipfrac
                    .as_ref()
                    .expect("the reference batch has response tokens"),
            ),
            ("approxkl", &loss.approxkl),
            ("ratio_mean", &loss.ratio_mean),
        ] {
            c.check(key, &t.detach());
        }
        let entropy = tch::no_grad(|| ppo_entropy(&tempered)).unwrap();
        c.check("entropy", &entropy);
        c.check("grad_logits", &logits.grad());
        c.check("grad_vpred", &vpred.grad());

        // The rollout statistics under TRL's names.
        let mut stats = PpoStats::default();
        stats.set_rollout(&targets, &scores).unwrap();
        for (key, v) in [
            ("objective_kl", stats.objective_kl),
            ("objective_entropy", stats.objective_entropy),
            ("objective_non_score_reward", stats.objective_non_score_reward),
            ("objective_rlhf_reward", stats.objective_rlhf_reward),
            ("objective_scores", stats.objective_scores),
        ] {
            c.check(key, &Tensor::from(v as f32));
        }
        assert_eq!(
            num_eos_tokens(responses, eos).unwrap(),
            r["num_eos_tokens"].int64_value(&[])
        );
        let mut updates = UpdateStats::default();
        updates.record(&loss, &entropy).unwrap();
        stats.set_updates(&updates).unwrap();
        assert_eq!(stats.loss_policy_avg, loss.pg_loss.double_value(&[]));

        let (key, err) = c.worst();
        let clipped = (
            r["vf_clipped_count"].int64_value(&[]),
            r["pg_clipped_count"].int64_value(&[]),
        );
        rows.push(vec![
            name.to_string(),
            c.errors.len().to_string(),
            fmt_err(err),
            key,
            format!("{} / {}", clipped.0, clipped.1),
        ]);
        assert!(clipped.0 > 0 && clipped.1 > 0, "{name}: both clips must act somewhere");
        assert!(err <= PPO_TOLERANCE, "{name}: {:?}", c.errors);
    }
    println!("\nPPOTrainer.train's math (max abs error over masks, rewards, GAE, losses, gradients, statistics):");
    print_table(
        &["case", "outputs", "worst", "where", "value / policy clips acting"],
        &rows,
    );
}
