//! The PPO trainer end to end on tiny models: it learns a programmatic reward, two runs under a
//! seed give identical statistics, a resumed run takes the same next step, and bad inputs are
//! refused before any work.

mod common;

use std::path::Path;
use valuehead::{CausalLmWithValueHead, LoadOptions};
use vh_ppo::{PpoConfig, PpoError, PpoStats, PpoTrainer, Reward};

/// The token the reward asks for.
const TARGET: i64 = 7;

/// A tiny GPT-2 (vocabulary 50) with room for prompts plus responses.
fn tiny_model(dir: &Path) -> CausalLmWithValueHead {
    common::write_tiny_gpt2(
        dir,
        serde_json::json!({"n_positions": 32, "n_embd": 32, "pad_token_id": 0}),
    );
    CausalLmWithValueHead::from_folder(dir, &LoadOptions::default()).unwrap()
}

/// 16 prompts of 2 to 5 tokens (ids 1..50, never the pad 0).
fn prompts() -> Vec<Vec<i64>> {
    (0..16)
        .map(|i: i64| (0..(2 + i % 4)).map(|j| 1 + (i * 7 + j * 13) % 49).collect())
        .collect()
}

/// The share of response tokens equal to [`TARGET`].
fn target_share() -> Reward {
    Reward::function(|_prompt, response| {
        response.iter().filter(|&&t| t == TARGET).count() as f32 / response.len().max(1) as f32
    })
}

fn config(steps: usize) -> PpoConfig {
    PpoConfig {
        learning_rate: 1e-2,
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2,
        num_mini_batches: 2,
        num_ppo_epochs: 4,
        total_episodes: Some(steps * 8),
        response_length: 8,
        temperature: 1.0,
        max_grad_norm: Some(1.0),
        kl_coef: 0.02,
        seed: 7,
        ..Default::default()
    }
}

/// Every statistic but `eps` (episodes per second, a clock reading), with NaN made comparable.
fn comparable(stats: &PpoStats) -> Vec<(&'static str, u64)> {
    stats
        .to_log()
        .into_iter()
        .filter(|(k, _)| *k != "eps")
        .map(|(k, v)| (k, v.to_bits()))
        .collect()
}

/// The learning tests' config: 16 rollouts per iteration (twice [`config`]'s). Over seeds 1 to
/// 20 the reward then rose by at least 0.53 for the full model and 0.38 for the LoRA one (with
/// oneDNN's products and without); with 8 rollouts some seeds rose by only 0.3 or collapsed onto
/// an unrewarded reply, and another CPU's rounding is as good as another seed (CI met one).
fn learning_config(steps: usize) -> PpoConfig {
    PpoConfig {
        per_device_train_batch_size: 8,
        total_episodes: Some(steps * 16),
        ..config(steps)
    }
}

fn run(dir: &Path, config: PpoConfig) -> Vec<PpoStats> {
    let mut trainer = PpoTrainer::new(tiny_model(dir), target_share(), prompts(), config).unwrap();
    assert!(trainer.last_timings().is_none(), "timings before any step");
    let mut all = Vec::new();
    while !trainer.is_done() {
        all.push(trainer.step().unwrap());
        // Every phase ran and took time; together they fit in the iteration.
        let t = trainer.last_timings().expect("timings after a step");
        let phases = [t.rollout, t.reference, t.reward, t.update];
        assert!(phases.iter().all(|&p| p > 0.0), "{t:?}");
        assert!(phases.iter().sum::<f64>() <= t.total, "{t:?}");
    }
    all
}

#[test]
fn ppo_learns_a_token_reward_on_a_tiny_model() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let stats = run(tmp.path(), learning_config(30));
    assert_eq!(stats.len(), 30);
    let mean = |s: &[PpoStats]| s.iter().map(|s| s.objective_scores).sum::<f64>() / s.len() as f64;
    let (before, after) = (mean(&stats[..3]), mean(&stats[27..]));
    let max_kl = stats.iter().map(|s| s.objective_kl).fold(f64::MIN, f64::max);
    println!("mean target share: first 3 iterations {before:.3}, last 3 {after:.3}; max objective/kl {max_kl:.3}");
    for s in &stats {
        for (k, v) in s.to_log() {
            assert!(v.is_finite() || k == "val/ratio_var", "{k} = {v}");
        }
    }
    // A random tiny model says the target about 1 time in 50; the trained one most of the time.
    assert!(
        before < 0.15,
        "the untrained share {before} is already high: the test proves nothing"
    );
    assert!(
        after > before + 0.3,
        "the reward did not rise: {before:.3} -> {after:.3}"
    );
    // The KL penalty is what holds the policy near its reference. At kl_coef 0.02 the
    // KL-regularised optimum, pi_ref * exp(r / kl_coef) with r = 1/8 per target token, puts 0.91 on
    // the target and is itself 26 nats (8 tokens) from the reference: a bound near collapse
    // (8 ln 50 = 31) proves little. The same run with a strong coefficient (optimum: 0.03 on the
    // target) must stay far closer.
    let strong = run(
        &tmp.path().join("strong"),
        PpoConfig {
            kl_coef: 0.5,
            ..learning_config(30)
        },
    );
    let strong_kl = strong.iter().map(|s| s.objective_kl).fold(f64::MIN, f64::max);
    println!("max objective/kl with kl_coef 0.5: {strong_kl:.3}");
    assert!(
        strong_kl < 0.25 * max_kl,
        "kl_coef 0.5 let objective/kl reach {strong_kl}, 0.02 reached {max_kl}"
    );
    assert_eq!(stats[0].episode, 16.0);
    assert!(stats[0].lr > stats[29].lr, "the learning rate decays linearly");
}

#[test]
fn two_runs_under_a_seed_give_identical_stats() {
    tch::set_num_threads(1);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, second) = (run(a.path(), config(4)), run(b.path(), config(4)));
    let first: Vec<_> = first.iter().map(comparable).collect();
    let second: Vec<_> = second.iter().map(comparable).collect();
    assert_eq!(first, second);
    // And a different seed changes them (the comparison can fail).
    let mut other = PpoTrainer::new(
        tiny_model(&a.path().join("other")),
        target_share(),
        prompts(),
        PpoConfig { seed: 8, ..config(4) },
    )
    .unwrap();
    assert_ne!(comparable(&other.step().unwrap()), first[0]);
}

#[test]
fn a_resumed_run_takes_the_same_next_step() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let mut straight =
        PpoTrainer::new(tiny_model(&tmp.path().join("a")), target_share(), prompts(), config(6)).unwrap();
    let mut interrupted =
        PpoTrainer::new(tiny_model(&tmp.path().join("b")), target_share(), prompts(), config(6)).unwrap();
    for _ in 0..3 {
        straight.step().unwrap();
        interrupted.step().unwrap();
    }
    let ckpt = tmp.path().join("checkpoint");
    interrupted.save_checkpoint(&ckpt).unwrap();
    drop(interrupted);
    let mut resumed = PpoTrainer::resume(&ckpt, target_share(), &LoadOptions::default()).unwrap();
    assert_eq!(resumed.steps_done(), 3);
    for _ in 0..2 {
        let (a, b) = (straight.step().unwrap(), resumed.step().unwrap());
        assert_eq!(comparable(&a), comparable(&b));
    }
    let (a, b) = (straight.policy().state_dict(), resumed.policy().state_dict());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resuming");
    }
}

#[test]
fn bad_inputs_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = || tiny_model(tmp.path());
    let err = |r: Result<PpoTrainer, PpoError>| r.map(|_| ()).unwrap_err().to_string();
    let e = err(PpoTrainer::new(model(), target_share(), vec![], config(2)));
    assert!(e.contains("no prompts"), "{e}");
    let e = err(PpoTrainer::new(model(), target_share(), vec![vec![]; 8], config(2)));
    assert!(e.contains("prompt 0 is empty"), "{e}");
    let e = err(PpoTrainer::new(
        model(),
        target_share(),
        vec![vec![3; 30]; 8],
        config(2),
    ));
    assert!(e.contains("exceeds the model's 32 positions"), "{e}");
    let e = err(PpoTrainer::new(
        model(),
        target_share(),
        vec![vec![3, 99]; 8],
        config(2),
    ));
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = err(PpoTrainer::new(
        model(),
        target_share(),
        prompts()[..3].to_vec(),
        config(2),
    ));
    assert!(e.contains("cannot fill one rollout batch"), "{e}");
    let e = err(PpoTrainer::new(
        model(),
        target_share(),
        prompts(),
        PpoConfig {
            num_mini_batches: 3,
            ..config(2)
        },
    ));
    assert!(e.contains("multiple of `num_mini_batches`"), "{e}");

    // A reward model that reads another vocabulary.
    let rm_dir = tmp.path().join("rm");
    common::write_tiny_gpt2(
        &rm_dir,
        serde_json::json!({"vocab_size": 60, "n_embd": 32, "pad_token_id": 0, "num_labels": 1, "architectures": ["GPT2ForSequenceClassification"]}),
    );
    let mut tensors = vh_hub::read_safetensors(&rm_dir.join("model.safetensors")).unwrap();
    tensors.retain(|(n, _)| !n.starts_with("v_head."));
    tensors.push((
        "score.weight".into(),
        tch::Tensor::zeros([1, 32], (tch::Kind::Float, tch::Device::Cpu)),
    ));
    vh_hub::write_safetensors(&rm_dir.join("model.safetensors"), &tensors).unwrap();
    let rm = valuehead::SequenceClassifier::from_folder(&rm_dir, &LoadOptions::default()).unwrap();
    let e = err(PpoTrainer::new(
        model(),
        Reward::Model(Box::new(rm)),
        prompts(),
        config(2),
    ));
    assert!(e.contains("60 tokens") && e.contains("50"), "{e}");

    // A NaN reward stops the step before any update.
    let mut trainer = PpoTrainer::new(model(), Reward::function(|_, _| f32::NAN), prompts(), config(2)).unwrap();
    let before = trainer.policy().state_dict();
    let e = trainer.step().unwrap_err();
    assert!(matches!(e, PpoError::NonFiniteReward { row: 0, .. }), "{e}");
    for ((n, a), (_, b)) in before.iter().zip(trainer.policy().state_dict().iter()) {
        assert!(a.equal(b), "{n} changed");
    }
}

/// The rollout's log-probabilities (read from the sampling passes) and values (from the
/// generation passes) are those the update's forward computes: with a learning rate of 0 every
/// ratio is 1, nothing is clipped, and the value loss is that of the rollout's own values.
#[test]
fn rollout_logprobs_and_values_agree_with_the_update_forward() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let config = PpoConfig {
        learning_rate: 0.0,
        stop_token_id: Some(TARGET),
        pad_token_id: Some(0),
        ..config(2)
    };
    let mut trainer = PpoTrainer::new(tiny_model(tmp.path()), target_share(), prompts(), config).unwrap();
    for _ in 0..2 {
        let s = trainer.step().unwrap();
        assert!(s.policy_approxkl_avg < 1e-10, "approxkl {}", s.policy_approxkl_avg);
        assert!((s.val_ratio - 1.0).abs() < 1e-5, "ratio {}", s.val_ratio);
        assert_eq!(s.policy_clipfrac_avg, 0.0);
        assert_eq!(s.val_clipfrac_avg, 0.0, "vpred moved away from the rollout's values");
    }
}

/// A tiny GPT-2 (as [`tiny_model`]) with a fresh LoRA adapter: r 8 on every linear layer,
/// `lora_B` zero and `lora_A` deterministic noise in kaiming's +-1/sqrt(in) range. Not the
/// global generator: every model load draws from it (a value head is built before its weights
/// are read), and the tests of this binary load models in parallel, so a seeded draw here came
/// out differently about one run in ten.
///
/// The final LayerNorm's weight is [`LN_F`] (the random tiny model's is uniform in +-0.35): the
/// adapter cannot train it nor the tied embeddings, and with the random one every logit stays
/// within about +-1 whatever the hidden state, so no adapter could raise a token's probability
/// much (measured: a supervised LoRA run plateaued at 0.27 where full training reached 0.99).
fn tiny_lora_model(dir: &Path) -> CausalLmWithValueHead {
    drop(tiny_model(dir));
    let file = dir.join("model.safetensors");
    let tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            if n == "transformer.ln_f.weight" {
                (n, t.ones_like() * LN_F)
            } else {
                (n, t)
            }
        })
        .collect();
    vh_hub::write_safetensors(&file, &tensors).unwrap();
    let lora = valuehead::LoraConfig::from_json(&serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": 8, "lora_alpha": 16, "target_modules": "all-linear",
    }))
    .unwrap();
    let model = CausalLmWithValueHead::with_new_adapter(dir, &lora, &LoadOptions::default()).unwrap();
    let mut variables: Vec<(String, tch::Tensor)> = model.var_store().variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (i, (name, t)) in variables.iter_mut().enumerate() {
            if name.contains("lora_A") {
                let size = t.size();
                let bound = 1.0 / (size[1] as f64).sqrt();
                t.copy_(&common::pseudo_random(&size, 500.0 + i as f64, bound));
            }
        }
    });
    model
}

/// The base model's tensors (neither adapter nor value head), copied.
fn base_tensors(model: &CausalLmWithValueHead) -> Vec<(String, tch::Tensor)> {
    model
        .state_dict()
        .into_iter()
        .filter(|(n, _)| !n.contains("lora_") && !n.starts_with("v_head."))
        .map(|(n, t)| (n, t.copy()))
        .collect()
}

/// The LoRA test model's final LayerNorm weight: HF's initial value. The pseudo-random one of the
/// other tests (about 0.35) leaves an adapter too little reach into the logits; 2.0 made the model
/// so peaked that half the seeds collapsed onto an unrewarded reply.
const LN_F: f64 = 1.0;

/// The share of response tokens with ids below 10 (a fifth of the vocabulary): a dense reward
/// the base model earns 0.08 to 0.22 of (seeds 1 to 20).
fn low_id_share() -> Reward {
    Reward::function(|_prompt, response| {
        response.iter().filter(|&&t| t < 10).count() as f32 / response.len().max(1) as f32
    })
}

/// The LoRA test's learning rate (3e-3 learned too slowly for a robust margin in 30 iterations).
const LORA_LR: f64 = 1e-2;

#[test]
fn a_lora_policy_learns_with_its_base_as_the_reference() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_lora_model(tmp.path());
    let base_before = base_tensors(&policy);
    let lora_b_before: Vec<(String, tch::Tensor)> = policy
        .state_dict()
        .into_iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .map(|(n, t)| (n, t.copy()))
        .collect();
    assert!(!lora_b_before.is_empty());
    let config = PpoConfig {
        learning_rate: LORA_LR,
        ..learning_config(30)
    };
    let mut trainer = PpoTrainer::new(policy, low_id_share(), prompts(), config).unwrap();
    assert!(
        trainer.reference().is_none(),
        "a LoRA policy's reference is its own base with the adapter off, not a copy"
    );
    let mut stats = Vec::new();
    while !trainer.is_done() {
        stats.push(trainer.step().unwrap());
    }
    // lora_B starts at zero: the first rollout's policy is the reference exactly.
    assert!(
        stats[0].objective_kl.abs() < 1e-4,
        "first objective/kl {}",
        stats[0].objective_kl
    );
    let mean = |s: &[PpoStats]| s.iter().map(|s| s.objective_scores).sum::<f64>() / s.len() as f64;
    let (before, after) = (mean(&stats[..3]), mean(&stats[27..]));
    println!(
        "LoRA policy: mean share of ids < 10, first 3 iterations {before:.3}, last 3 {after:.3}; last objective/kl {:.3}",
        stats[29].objective_kl
    );
    assert!(before < 0.4, "the untrained share {before} is already high");
    assert!(
        after > before + 0.3,
        "the reward did not rise: {before:.3} -> {after:.3}"
    );
    assert!(stats[29].objective_kl > 0.01, "the policy never left its reference");

    // Only the adapter and the value head trained: the base (the reference) is bit-identical.
    let policy = trainer.policy();
    for ((name, before), (_, after)) in base_before.iter().zip(base_tensors(policy)) {
        assert!(before.equal(&after), "{name} of the frozen base changed");
    }
    let after: std::collections::BTreeMap<String, tch::Tensor> = policy.state_dict().into_iter().collect();
    assert!(
        lora_b_before.iter().any(|(n, t)| !t.equal(&after[n])),
        "no lora_B moved"
    );
    // The adapter is back on after every reference forward: the policy differs from its base.
    let ids = tch::Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
    // Outside autograd on both sides, so both take the same products (a frozen base with a graph
    // elsewhere and a trainable one would meet different kernels and differ by rounding).
    let on = tch::no_grad(|| policy.forward(&ids, None, None, None)).unwrap().logits;
    policy.set_adapter_enabled(false).unwrap();
    let off = tch::no_grad(|| policy.forward(&ids, None, None, None)).unwrap().logits;
    policy.set_adapter_enabled(true).unwrap();
    let base = CausalLmWithValueHead::from_folder(tmp.path(), &LoadOptions::default()).unwrap();
    let plain = tch::no_grad(|| base.forward(&ids, None, None, None)).unwrap().logits;
    assert!(off.equal(&plain), "adapter off is not the base model");
    assert!(!on.equal(&off), "the adapter was left switched off");
}

#[test]
fn a_resumed_lora_run_takes_the_same_next_step() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let mut straight = PpoTrainer::new(
        tiny_lora_model(&tmp.path().join("a")),
        target_share(),
        prompts(),
        config(5),
    )
    .unwrap();
    let mut interrupted = PpoTrainer::new(
        tiny_lora_model(&tmp.path().join("b")),
        target_share(),
        prompts(),
        config(5),
    )
    .unwrap();
    let same = |x: &PpoTrainer, y: &PpoTrainer, when: &str| {
        for ((na, ta), (_, tb)) in x.policy().state_dict().iter().zip(&y.policy().state_dict()) {
            assert!(ta.equal(tb), "{na} differs {when}");
        }
    };
    same(&straight, &interrupted, "at the start");
    for i in 0..2 {
        let (a, b) = (straight.step().unwrap(), interrupted.step().unwrap());
        assert_eq!(comparable(&a), comparable(&b), "step {i}");
        same(&straight, &interrupted, "after a step");
    }
    let ckpt = tmp.path().join("checkpoint");
    // An earlier full-model checkpoint in the same folder must not leave its reference behind.
    std::fs::create_dir_all(ckpt.join("reference")).unwrap();
    interrupted.save_checkpoint(&ckpt).unwrap();
    assert!(
        ckpt.join("policy/adapter_config.json").exists(),
        "the policy is saved as a peft adapter"
    );
    assert!(
        !ckpt.join("reference").exists(),
        "no reference copy is written for a LoRA policy"
    );
    let mut resumed = PpoTrainer::resume(&ckpt, target_share(), &LoadOptions::default()).unwrap();
    assert!(resumed.reference().is_none());
    let (a, b) = (interrupted.policy().state_dict(), resumed.policy().state_dict());
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs in the checkpoint");
    }
    drop(interrupted);
    for _ in 0..2 {
        let (a, b) = (straight.step().unwrap(), resumed.step().unwrap());
        assert_eq!(comparable(&a), comparable(&b));
    }
    let (a, b) = (straight.policy().state_dict(), resumed.policy().state_dict());
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resuming");
    }
}
