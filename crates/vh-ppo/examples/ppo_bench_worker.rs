//! The Rust side of `cargo xtask bench`'s `ppo` workload: one PPO iteration of [`PpoTrainer`],
//! speaking the line protocol of the valuehead crate's `bench_worker` (`init`, `load`, `prepare`,
//! `run`, `rss`; one JSON object per line each way).
//!
//! The task gives the prompts (`input_ids`, 8 rows), `max_new_tokens` (the response length) and
//! `reward_dir` (a `*ForSequenceClassification` folder the Python side wrote). An iteration is
//! [`PpoTrainer::step`]: sampled rollout (values and log-probs from the generation passes), the
//! reference's forward, the reward model's forward, the targets, and one PPO epoch of two
//! mini-batches of 4 (two AdamW steps), as the Python side runs with TRL's functions.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::time::Instant;
use valuehead::{CausalLmWithValueHead, LoadOptions, SequenceClassifier};
use vh_ppo::{PpoConfig, PpoTrainer, Reward};

#[derive(Default)]
struct Worker {
    dir: Option<String>,
    trainer: Option<PpoTrainer>,
}

fn peak_rss_mb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| anyhow!("no VmHWM in /proc/self/status"))?;
    let kb: f64 = line.split_whitespace().nth(1).context("VmHWM value")?.parse()?;
    Ok(kb / 1024.0)
}

impl Worker {
    fn prepare(&mut self, task: &Value) -> Result<()> {
        self.trainer = None;
        if task["type"] != "ppo" {
            bail!("this worker runs the ppo task only, not {}", task["type"]);
        }
        let dir = self.dir.as_ref().context("no model loaded")?;
        let prompts: Vec<Vec<i64>> = serde_json::from_value(task["input_ids"].clone())?;
        let response_length = task["max_new_tokens"].as_u64().context("max_new_tokens")? as usize;
        let reward_dir = task["reward_dir"].as_str().context("reward_dir")?;
        let options = LoadOptions::default();
        tch::manual_seed(0);
        let policy = CausalLmWithValueHead::from_folder(dir, &options)?;
        let reward = SequenceClassifier::from_folder(reward_dir, &options)?;
        let config = PpoConfig {
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 2,
            num_mini_batches: 2,
            num_ppo_epochs: 1,
            response_length,
            total_episodes: Some(usize::MAX / 2),
            seed: 0,
            ..Default::default()
        };
        let mut trainer = PpoTrainer::new(policy, Reward::Model(Box::new(reward)), prompts, config)?;
        std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")?;
        trainer.step()?;
        self.trainer = Some(trainer);
        Ok(())
    }

    fn run(&mut self, iters: u64) -> Result<Value> {
        let trainer = self.trainer.as_mut().context("no task prepared")?;
        let start = Instant::now();
        let mut check = Value::Null;
        for _ in 0..iters.max(1) {
            let stats = trainer.step()?;
            let t = trainer.last_timings().context("no timings after a step")?;
            check = json!({"objective/scores": stats.objective_scores, "objective/kl": stats.objective_kl,
                           "loss/policy_avg": stats.loss_policy_avg, "loss/value_avg": stats.loss_value_avg,
                           "phases_ms": {"rollout": t.rollout * 1e3, "reference": t.reference * 1e3,
                                         "reward": t.reward * 1e3, "update": t.update * 1e3}});
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
        Ok(json!({"ms": ms, "check": check}))
    }
}

fn handle(worker: &mut Worker, request: &Value) -> Result<Value> {
    match request["cmd"].as_str().unwrap_or_default() {
        "init" => {
            let threads = request["threads"].as_i64().context("threads")?;
            tch::set_num_threads(threads as i32);
            tch::set_num_interop_threads(1);
            Ok(json!({"versions": {"valuehead": env!("CARGO_PKG_VERSION")}}))
        }
        "load" => {
            if request["dtype"] != "f32" {
                bail!("the ppo task runs in f32 only");
            }
            worker.trainer = None;
            worker.dir = Some(request["dir"].as_str().context("dir")?.to_string());
            Ok(json!({}))
        }
        "prepare" => worker.prepare(&request["task"]).map(|_| json!({})),
        "run" => worker.run(request["iters"].as_u64().unwrap_or(1)),
        "rss" => Ok(json!({"peak_rss_mb": peak_rss_mb()?})),
        other => bail!("unknown command {other}"),
    }
}

fn main() -> Result<()> {
    // As every binary of ours: freed tensor memory stays for reuse (see the function's doc).
    valuehead::keep_freed_tensor_memory();
    let mut worker = Worker::default();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let request: Value = serde_json::from_str(&line?)?;
        if request["cmd"] == "quit" {
            writeln!(stdout, "{}", json!({"ok": true}))?;
            break;
        }
        let reply = match handle(&mut worker, &request) {
            Ok(mut out) => {
                out["ok"] = json!(true);
                out
            }
            Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
        };
        writeln!(stdout, "{reply}")?;
        stdout.flush()?;
    }
    Ok(())
}
