//! What the PPO reference model costs in memory: a full policy with its frozen copy, against a
//! LoRA policy whose reference is its own base with the adapter switched off.
//!
//! ```sh
//! cargo run --release -p vh-ppo --example reference_memory -- full  [MODEL_DIR]
//! cargo run --release -p vh-ppo --example reference_memory -- lora  [MODEL_DIR]
//! ```
//!
//! Each run is one configuration in a fresh process (peak RSS is per process): it loads the model
//! (SmolLM2-135M-Instruct by default), builds a `PpoTrainer` and takes one PPO iteration (8
//! prompts, 16 new tokens), then prints the resident memory after loading, after building the
//! trainer and the peak, with the parameter bytes held by the policy and the reference.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use valuehead::{CausalLmWithValueHead, LoadOptions, LoraConfig};
use vh_ppo::{PpoConfig, PpoTrainer, Reward};

/// `VmRSS` or `VmHWM` of this process in MB.
fn status_mb(key: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in /proc/self/status"))?;
    let kb: f64 = line.split_whitespace().nth(1).context("value")?.parse()?;
    Ok(kb / 1024.0)
}

/// Bytes of the distinct storages behind `model`'s variables.
fn parameter_bytes(model: &CausalLmWithValueHead) -> usize {
    let mut seen = std::collections::HashSet::new();
    model
        .var_store()
        .variables()
        .values()
        .filter(|t| seen.insert(t.data_ptr() as usize))
        .map(|t| t.numel() * t.kind().elt_size_in_bytes())
        .sum()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".models/smollm2-135m-instruct"));
    tch::set_num_threads(2);
    let options = LoadOptions::default();
    let policy = match mode.as_str() {
        "full" => CausalLmWithValueHead::from_folder(&dir, &options)?,
        "lora" => {
            let config = LoraConfig::from_json(&serde_json::json!({
                "peft_type": "LORA", "task_type": "CAUSAL_LM",
                "r": 16, "lora_alpha": 32, "target_modules": "all-linear",
            }))?;
            CausalLmWithValueHead::with_new_adapter(&dir, &config, &options)?
        }
        other => bail!("mode {other:?}: use `full` or `lora`"),
    };
    let loaded = status_mb("VmRSS:")?;
    let policy_bytes = parameter_bytes(&policy);
    let prompts: Vec<Vec<i64>> = (0..8)
        .map(|i| (0..12).map(|j| 100 + i * 31 + j * 7).collect())
        .collect();
    let config = PpoConfig {
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2,
        num_mini_batches: 2,
        num_ppo_epochs: 1,
        total_episodes: Some(8),
        response_length: 16,
        ..Default::default()
    };
    let reward = Reward::function(|_prompt, response| response.len() as f32 * 0.01);
    let mut trainer = PpoTrainer::new(policy, reward, prompts, config)?;
    let built = status_mb("VmRSS:")?;
    let reference_bytes = trainer.reference().map_or(0, parameter_bytes);
    trainer.step()?;
    let peak = status_mb("VmHWM:")?;
    println!(
        "{mode}: policy parameters {:.0} MB, reference copy {:.0} MB; RSS after loading {loaded:.0} MB, with the trainer {built:.0} MB, peak over one iteration {peak:.0} MB",
        policy_bytes as f64 / 1e6,
        reference_bytes as f64 / 1e6
    );
    Ok(())
}
