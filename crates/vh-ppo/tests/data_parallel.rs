//! Training under data parallelism (two ranks, c10d Gloo on CPU): a plain LM + value loop gives
//! the parameters of one process on the global batch, and the PPO trainer keeps its ranks in
//! lockstep with shared statistics and rank-0 checkpoints.

mod common;
#[path = "../../vh-dist/tests/common/mod.rs"]
mod dist;

use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};
use valuehead::{CausalLmWithValueHead, LoadOptions};
use vh_dist::ProcessGroup;
use vh_ppo::{PpoConfig, PpoTrainer, Reward};

/// A tiny GPT-2 (vocabulary 50) with room for prompts plus responses, dropout off.
fn tiny_model(dir: &Path) -> CausalLmWithValueHead {
    common::write_tiny_gpt2(
        dir,
        serde_json::json!({"n_positions": 32, "n_embd": 32, "pad_token_id": 0,
                           "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    );
    CausalLmWithValueHead::from_folder(dir, &LoadOptions::default()).unwrap()
}

/// A folder both ranks of one run can reach (named after the run's port).
fn shared_dir(name: &str) -> PathBuf {
    let port = std::env::var("MASTER_PORT").unwrap();
    std::env::temp_dir().join(format!("vh-ppo-dp-{name}-{port}"))
}

/// Every parameter, in name order.
fn sorted_parameters(model: &CausalLmWithValueHead) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// One number per parameter that any change of it changes (a weighted sum in f64).
fn fingerprint(model: &CausalLmWithValueHead) -> Tensor {
    let sums: Vec<f64> = sorted_parameters(model)
        .iter()
        .map(|(_, t)| {
            let w = Tensor::arange(t.numel() as i64, (Kind::Double, tch::Device::Cpu)).sin();
            (t.to_kind(Kind::Double).reshape([-1]) * w)
                .sum(Kind::Double)
                .double_value(&[])
        })
        .collect();
    Tensor::from_slice(&sums)
}

/// The trainer's group.
fn group(trainer: &PpoTrainer) -> &ProcessGroup {
    trainer.process_group().unwrap()
}

/// Whether every rank holds the same `t`.
fn same_on_all_ranks(pg: &ProcessGroup, t: &Tensor) -> bool {
    let all = pg.all_gather(t).unwrap();
    all.iter().all(|x| x.equal(&all[0]))
}

const B: i64 = 2;
const SEQ: i64 = 6;
const STEPS: usize = 3;

/// Step `s`'s global batch (the same on every rank): ids in 1..50, value targets.
fn global_batch(s: usize, world: i64) -> (Tensor, Tensor) {
    let n = world * B * SEQ;
    let ids: Vec<i64> = (0..n).map(|i| 1 + (i * 7 + s as i64 * 13 + i * i) % 49).collect();
    let ids = Tensor::from_slice(&ids).view([world * B, SEQ]);
    let targets = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.37 + s as f64)
        .sin()
        .view([world * B, SEQ]);
    (ids, targets)
}

fn train_step(model: &CausalLmWithValueHead, ids: &Tensor, targets: &Tensor) -> Tensor {
    let mask = ids.ones_like();
    let out = model.forward(ids, Some(&mask), None, Some(ids)).unwrap();
    let terms = vh_train::lm_value_loss(&out.loss.unwrap(), &out.values, targets, &mask, 0.5).unwrap();
    vh_train::backward(&terms.total).unwrap();
    terms.total
}

#[test]
fn lm_value_training_under_data_parallelism_equals_one_process_on_the_global_batch() {
    const NAME: &str = "lm_value_training_under_data_parallelism_equals_one_process_on_the_global_batch";
    if !dist::is_child() {
        for out in dist::spawn_ranks(NAME, 2) {
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().find(|l| l.contains("worst relative difference"));
            println!("{}", line.expect("each rank reports its worst difference"));
        }
        return;
    }
    tch::set_num_threads(1);
    let pg = ProcessGroup::from_env().unwrap();
    let (rank, world) = (pg.rank() as i64, pg.world_size() as i64);
    let tmp = tempfile::tempdir().unwrap();
    let single = tiny_model(&tmp.path().join("single"));
    let ranked = tiny_model(&tmp.path().join("ranked"));
    if rank == 1 {
        // A rank that starts elsewhere is brought to rank 0's weights.
        tch::no_grad(|| {
            for (_, mut t) in ranked.var_store().variables() {
                let _ = t.f_add_scalar_(0.25).unwrap();
            }
        });
    }
    vh_dist::broadcast_parameters(&pg, ranked.var_store(), 0).unwrap();
    // eps 1e-4 rather than 1e-8: the key half of GPT-2's c_attn.bias has an exactly zero
    // gradient (softmax ignores a shift shared by all keys), so what is computed for it is
    // rounding noise (~1e-9), which Adam with eps 1e-8 turns into steps of ~0.1 lr with a random
    // sign on each side (measured: 4e-4 apart after one step). The larger eps keeps the
    // comparison about the data-parallel arithmetic; both sides use the same optimiser.
    let config = vh_train::AdamWConfig {
        lr: 1e-2,
        eps: 1e-4,
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut single_opt = vh_train::AdamW::hf(single.var_store(), config).unwrap();
    let mut ranked_opt = vh_train::AdamW::hf(ranked.var_store(), config).unwrap();
    for s in 0..STEPS {
        let (ids, targets) = global_batch(s, world);
        let _ = train_step(&single, &ids, &targets);
        let mine = |t: &Tensor| t.narrow(0, rank * B, B);
        let _ = train_step(&ranked, &mine(&ids), &mine(&targets));
        vh_dist::all_reduce_gradients(&pg, ranked.var_store(), vh_dist::DEFAULT_BUCKET_BYTES).unwrap();
        ranked_opt.step().unwrap();
        ranked_opt.zero_grad().unwrap();
        single_opt.step().unwrap();
        single_opt.zero_grad().unwrap();
    }
    let mut worst = 0f64;
    for ((name, a), (_, b)) in sorted_parameters(&single).iter().zip(sorted_parameters(&ranked)) {
        let rel = (a - &b).abs().max().double_value(&[]) / a.abs().max().double_value(&[]).max(1e-12);
        assert!(rel <= 1e-6, "{name}: relative difference {rel:e}");
        worst = worst.max(rel);
    }
    assert!(same_on_all_ranks(&pg, &fingerprint(&ranked)));
    println!("rank {rank}: LM + value loss, {STEPS} AdamW steps, worst relative difference to one process {worst:.2e}");
}

/// The share of response tokens equal to 7.
fn target_share() -> Reward {
    Reward::function(|_prompt, response| {
        response.iter().filter(|&&t| t == 7).count() as f32 / response.len().max(1) as f32
    })
}

/// 16 prompts of 2 to 5 tokens (ids 1..50).
fn prompts() -> Vec<Vec<i64>> {
    (0..16)
        .map(|i: i64| (0..(2 + i % 4)).map(|j| 1 + (i * 7 + j * 13) % 49).collect())
        .collect()
}

#[test]
fn ppo_ranks_stay_in_lockstep_with_their_own_prompts_and_shared_statistics() {
    const NAME: &str = "ppo_ranks_stay_in_lockstep_with_their_own_prompts_and_shared_statistics";
    if !dist::is_child() {
        let outs = dist::spawn_ranks(NAME, 2);
        let text = String::from_utf8_lossy(&outs[0].stdout);
        assert!(text.contains("rank 0: 3 iterations in lockstep"), "{text}");
        return;
    }
    tch::set_num_threads(1);
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_model(tmp.path());
    if rank == 1 {
        tch::no_grad(|| {
            for (_, mut t) in policy.var_store().variables() {
                let _ = t.f_mul_scalar_(0.5).unwrap();
            }
        });
    }
    let config = PpoConfig {
        learning_rate: 1e-2,
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        num_mini_batches: 2,
        num_ppo_epochs: 2,
        total_episodes: Some(3 * 4 * 2),
        response_length: 6,
        temperature: 1.0,
        max_grad_norm: Some(1.0),
        seed: 3,
        ..Default::default()
    };
    let mut trainer = PpoTrainer::new(policy, target_share(), prompts(), config)
        .unwrap()
        .with_data_parallel(ProcessGroup::from_env().unwrap())
        .unwrap();
    assert_eq!(trainer.is_main_process(), rank == 0);
    assert!(
        same_on_all_ranks(group(&trainer), &fingerprint(trainer.policy())),
        "not broadcast"
    );
    let mut seen = Vec::new();
    while !trainer.is_done() {
        let stats = trainer.step().unwrap();
        let pg = group(&trainer);
        // The episode counts the global batch (2 ranks x 4 rollouts).
        assert_eq!(stats.episode, 8.0 * trainer.steps_done() as f64);
        assert!(
            same_on_all_ranks(pg, &fingerprint(trainer.policy())),
            "parameters diverged"
        );
        let shared = Tensor::from_slice(&[
            stats.objective_kl,
            stats.objective_scores,
            stats.policy_approxkl_avg,
            stats.loss_policy_avg,
            stats.loss_value_avg,
            stats.lr,
        ]);
        assert!(same_on_all_ranks(pg, &shared), "statistics not reduced");
        let mine: Vec<i64> = trainer
            .last_rollout()
            .unwrap()
            .prompt_indices
            .iter()
            .map(|&i| i as i64)
            .collect();
        seen.push(pg.all_gather(&Tensor::from_slice(&mine)).unwrap());
    }
    assert_eq!(trainer.steps_done(), 3);
    for batches in &seen {
        let (a, b) = (
            Vec::<i64>::try_from(&batches[0]).unwrap(),
            Vec::<i64>::try_from(&batches[1]).unwrap(),
        );
        assert!(
            a.iter().all(|i| !b.contains(i)),
            "ranks rolled out the same prompts: {a:?} {b:?}"
        );
    }
    // Rank 0 writes the checkpoint; on return it is complete on every rank.
    let ckpt = shared_dir("ckpt");
    trainer.save_checkpoint(&ckpt).unwrap();
    assert!(ckpt.join("trainer_state.json").exists());
    group(&trainer).barrier().unwrap();
    if rank == 0 {
        std::fs::remove_dir_all(&ckpt).unwrap();
    }
    println!("rank {rank}: 3 iterations in lockstep");
}
