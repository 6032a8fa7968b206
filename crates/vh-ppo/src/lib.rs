//! PPO for value-head language models, in the image of TRL 0.26.2's
//! `trl.experimental.ppo.PPOTrainer`: [`PpoConfig`] has its names and defaults, [`PpoTrainer`]
//! runs its loop (rollout by sampling, reference log-probabilities, rewards with a KL penalty,
//! GAE, clipped policy and value updates with AdamW) and reports its statistics under its names
//! ([`vh_rl::PpoStats`]).
//!
//! ```no_run
//! use valuehead::{CausalLmWithValueHead, LoadOptions};
//! use vh_ppo::{PpoConfig, PpoTrainer, Reward};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = CausalLmWithValueHead::from_folder("model", &LoadOptions::default())?;
//! // Reward: the share of response tokens equal to 42.
//! let reward = Reward::function(|_prompt, response| {
//!     response.iter().filter(|&&t| t == 42).count() as f32 / response.len().max(1) as f32
//! });
//! let prompts = vec![vec![1i64, 2, 3]; 8];
//! let mut trainer = PpoTrainer::new(policy, reward, prompts, PpoConfig::default())?;
//! while !trainer.is_done() {
//!     let stats = trainer.step()?;
//!     println!("{:?}", stats.to_log());
//! }
//! trainer.policy().save_pretrained("trained", None)?;
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod error;
pub mod optim;
pub mod reward;
pub mod trainer;

pub use config::{BatchSizes, Optim, PpoConfig};
pub use error::{PpoError, Result};
pub use optim::{AdamWSettings, StatefulAdamW};
pub use reward::{Reward, RewardFn};
pub use trainer::{PpoTrainer, RolloutSample, StepTimings, TrainerState};
pub use vh_rl::PpoStats;

/// The statistics as one JSON object (TRL's keys, plus `step`), for JSON-lines logs.
pub fn stats_json(step: u64, stats: &PpoStats) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert("step".into(), step.into());
    for (k, v) in stats.to_log() {
        // NaN (val/ratio_var over one micro-batch) is not JSON: written as null.
        map.insert(
            k.into(),
            serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into),
        );
    }
    serde_json::Value::Object(map)
}
