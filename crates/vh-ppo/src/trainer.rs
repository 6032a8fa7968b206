//! The PPO loop of TRL 0.26.2's `PPOTrainer.train`, one iteration per [`PpoTrainer::step`]:
//! rollout by sampling, reference log-probabilities, scores, KL rewards, GAE, then
//! `num_ppo_epochs` passes of clipped policy and value updates over shuffled mini-batches.
//!
//! Unlike TRL's trainer, which keeps a separate value model, the policy and the critic are one
//! [`CausalLmWithValueHead`] (shared backbone), as TRL's PPO was when it used these wrappers. The
//! rollout reads each token's value and sampling log-probability from the generation passes
//! themselves, so no second forward of the policy is needed before the updates.

use crate::config::{BatchSizes, PpoConfig};
use crate::error::{PpoError, Result};
use crate::optim::{AdamWSettings, StatefulAdamW};
use crate::reward::Reward;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};
use valuehead::{CausalLmInput, CausalLmWithValueHead, GenerationConfig, LoadOptions};
use vh_core::ops::ScalarOps;
use vh_rl::{PpoBatch, PpoStats, Rollout, UpdateStats};
use vh_train::LrLambda;

/// Where the prompt order, the sampling and the shuffles stand: what a checkpoint must restore
/// for a resumed run to take the same next step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Iterations done.
    pub step: u64,
    /// Episodes (rollouts) seen.
    pub episode: u64,
    /// The generator's seed.
    pub rng_seed: [u8; 32],
    /// The generator's stream.
    pub rng_stream: u64,
    /// The generator's position (a 68-bit number, as a decimal string for JSON).
    pub rng_word_pos: String,
    /// The current pass's prompt order.
    pub order: Vec<usize>,
    /// The next position in `order`.
    pub cursor: usize,
    /// Optimiser steps taken.
    pub optimizer_steps: u64,
}

/// What one rollout produced, for inspection (samples, tests).
#[derive(Debug)]
pub struct RolloutSample {
    /// The prompts' indices in the prompt set.
    pub prompt_indices: Vec<usize>,
    /// The responses, truncated after the stop token, without padding.
    pub responses: Vec<Vec<i64>>,
    /// Their scores.
    pub scores: Vec<f32>,
}

/// Where the reference log-probabilities come from.
enum ReferenceModel {
    /// A frozen model of its own (TRL's `create_reference_model` copy).
    Model(Box<CausalLmWithValueHead>),
    /// The policy with its LoRA adapter switched off, as TRL does for a peft policy
    /// (`disable_adapter()`): the frozen base is the reference, with no second copy in memory.
    AdapterDisabled,
}

/// Switches a policy's adapter back on when dropped, so an error inside a reference forward
/// cannot leave the policy without its adapter.
struct AdapterOff<'a>(&'a CausalLmWithValueHead);

impl<'a> AdapterOff<'a> {
    fn new(model: &'a CausalLmWithValueHead) -> Result<Self> {
        model.set_adapter_enabled(false)?;
        Ok(Self(model))
    }
}

impl Drop for AdapterOff<'_> {
    fn drop(&mut self) {
        // The model has an adapter (checked when switching it off), so this cannot fail.
        let _ = self.0.set_adapter_enabled(true);
    }
}

/// A PPO trainer over a value-head policy, a frozen reference (a copy, or the policy's base with
/// its LoRA adapter off) and a reward.
pub struct PpoTrainer {
    config: PpoConfig,
    sizes: BatchSizes,
    policy: CausalLmWithValueHead,
    reference: ReferenceModel,
    reward: Reward,
    optimizer: StatefulAdamW,
    prompts: Vec<Vec<i64>>,
    pad: i64,
    eos: Option<i64>,
    rng: ChaCha8Rng,
    order: Vec<usize>,
    cursor: usize,
    step: u64,
    episode: u64,
    started: std::time::Instant,
    last_rollout: Option<RolloutSample>,
    last_timings: Option<StepTimings>,
    /// The data-parallel group, when this process is one rank of several.
    group: Option<vh_dist::ProcessGroup>,
}

impl std::fmt::Debug for PpoTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PpoTrainer")
            .field("config", &self.config)
            .field("sizes", &self.sizes)
            .field("step", &self.step)
            .finish()
    }
}

/// Where one PPO iteration spent its wall-clock time, in seconds (see
/// [`PpoTrainer::last_timings`]). On CUDA each phase ends with a device synchronisation, so the
/// work a phase queued is counted in that phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimings {
    /// Sampling the responses (the policy's log-probs and values come with it).
    pub rollout: f64,
    /// The reference model's forward and log-probs.
    pub reference: f64,
    /// Scoring the responses, and the rewards, advantages and returns from the scores.
    pub reward: f64,
    /// The PPO epochs: forwards, backwards, gradient all-reduce and clipping, optimiser steps.
    pub update: f64,
    /// The whole iteration, statistics included.
    pub total: f64,
}

/// A stopwatch for [`StepTimings`]: each lap waits for the device's queued work first.
struct Laps {
    device: tch::Device,
    started: std::time::Instant,
    last: std::time::Instant,
}

impl Laps {
    fn new(device: tch::Device) -> Self {
        let now = std::time::Instant::now();
        Self {
            device,
            started: now,
            last: now,
        }
    }

    /// Seconds since the previous lap.
    fn lap(&mut self) -> f64 {
        if let tch::Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
        let now = std::time::Instant::now();
        let seconds = (now - self.last).as_secs_f64();
        self.last = now;
        seconds
    }

    /// Seconds since the start.
    fn total(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// Reads config.json's integer `key` (an id may also be a list, whose first entry is taken).
fn config_id(config: &serde_json::Value, key: &str) -> Option<i64> {
    match config.get(key)? {
        serde_json::Value::Array(a) => a.first()?.as_i64(),
        v => v.as_i64(),
    }
}

/// A permutation of `0..n` from `rng` (Fisher-Yates).
fn permutation(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        v.swap(i, j);
    }
    v
}

impl PpoTrainer {
    /// A trainer for `policy` on `prompts` (token ids, one prompt each) scored by `reward`. The
    /// reference is the policy's frozen copy, or, for a policy with a LoRA adapter, the policy
    /// itself with the adapter switched off (TRL's peft path: only the adapter and value head
    /// train, and no second model is held). Everything is checked here, before any work: the
    /// configuration and batch sizes, empty prompts, ids outside the vocabulary, prompts too long
    /// for the model's positions with `response_length` new tokens, a reward model with another
    /// vocabulary, fewer prompts than one rollout batch.
    pub fn new(
        policy: CausalLmWithValueHead,
        reward: Reward,
        prompts: Vec<Vec<i64>>,
        config: PpoConfig,
    ) -> Result<Self> {
        let reference = if policy.adapter_config().is_some() {
            ReferenceModel::AdapterDisabled
        } else {
            ReferenceModel::Model(Box::new(valuehead::create_reference_model(&policy, None, None)?.0))
        };
        Self::build(policy, reference, reward, prompts, config)
    }

    /// [`PpoTrainer::new`] with a given reference model (a resumed run brings the original one).
    pub fn with_reference(
        policy: CausalLmWithValueHead,
        reference: CausalLmWithValueHead,
        reward: Reward,
        prompts: Vec<Vec<i64>>,
        config: PpoConfig,
    ) -> Result<Self> {
        if reference.vocab_size() != policy.vocab_size() {
            return Err(PpoError::Input(format!(
                "the reference model's vocabulary has {} tokens, the policy's {}",
                reference.vocab_size(),
                policy.vocab_size()
            )));
        }
        Self::build(
            policy,
            ReferenceModel::Model(Box::new(reference)),
            reward,
            prompts,
            config,
        )
    }

    /// The checks and set-up shared by the constructors.
    fn build(
        mut policy: CausalLmWithValueHead,
        reference: ReferenceModel,
        reward: Reward,
        prompts: Vec<Vec<i64>>,
        config: PpoConfig,
    ) -> Result<Self> {
        let sizes = config.batch_sizes(prompts.len())?;
        let vocab = policy.vocab_size();
        reward.check_vocab(vocab)?;
        if prompts.len() < sizes.batch_size {
            return Err(PpoError::Input(format!(
                "{} prompt(s) cannot fill one rollout batch of {} (per_device_train_batch_size * gradient_accumulation_steps)",
                prompts.len(),
                sizes.batch_size
            )));
        }
        let max_positions = policy.backbone().max_positions();
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(PpoError::Input(format!("prompt {i} is empty")));
            }
            if let Some(bad) = p.iter().find(|&&t| !(0..vocab).contains(&t)) {
                return Err(PpoError::Input(format!(
                    "prompt {i} has token id {bad}, outside the vocabulary 0..{vocab}"
                )));
            }
            if let Some(limit) = max_positions {
                if p.len() as i64 + config.response_length as i64 > limit {
                    return Err(PpoError::Input(format!(
                        "prompt {i} has {} tokens: with response_length {} that exceeds the model's {limit} positions",
                        p.len(),
                        config.response_length
                    )));
                }
            }
        }
        let model_config = policy.config().clone();
        let pad = config
            .pad_token_id
            .or_else(|| config_id(&model_config, "pad_token_id"))
            .or_else(|| config_id(&model_config, "eos_token_id"))
            .ok_or_else(|| {
                PpoError::Config(
                    "no pad_token_id: set it (config.json has neither pad_token_id nor eos_token_id)".into(),
                )
            })?;
        // config.json's eos may lie outside a resized vocabulary (GPT-2's 50256 on a toy model);
        // it can then never be generated, so it counts nothing.
        let eos = config
            .eos_token_id
            .or(config.stop_token_id)
            .or_else(|| config_id(&model_config, "eos_token_id").filter(|id| (0..vocab).contains(id)));
        for (name, id) in [
            ("pad_token_id", Some(pad)),
            ("eos_token_id", eos),
            ("stop_token_id", config.stop_token_id),
        ] {
            if let Some(id) = id.filter(|id| !(0..vocab).contains(id)) {
                return Err(PpoError::Config(format!(
                    "{name} {id} is outside the vocabulary 0..{vocab}"
                )));
            }
        }
        // TRL disables dropout in every model; eval mode is exactly that here.
        policy.set_train(false);
        let optimizer = StatefulAdamW::hf(
            policy.var_store(),
            AdamWSettings {
                betas: (config.adam_beta1, config.adam_beta2),
                eps: config.adam_epsilon,
                weight_decay: config.weight_decay,
                fused: config.optim == crate::config::Optim::AdamwTorchFused,
            },
        )?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let order = permutation(&mut rng, prompts.len());
        Ok(Self {
            config,
            sizes,
            policy,
            reference,
            reward,
            optimizer,
            prompts,
            pad,
            eos,
            rng,
            order,
            cursor: 0,
            step: 0,
            episode: 0,
            started: std::time::Instant::now(),
            last_rollout: None,
            last_timings: None,
            group: None,
        })
    }

    /// Makes this trainer one rank of a data-parallel run over `group`, as TRL under accelerate
    /// (DDP): the policy (and a reference copy) start from rank 0's weights; each iteration every
    /// rank takes its own `batch_size` prompts of one shared shuffle (rank r the r-th slice of a
    /// global batch of `world_size * batch_size`) and samples with its own seed; gradients are
    /// averaged over the ranks before clipping and each optimiser step, so the parameters stay
    /// identical everywhere; statistics are averaged over the ranks (`val/num_eos_tokens` and
    /// `eps` stay local, as in TRL); `episode` and the run's length (`total_episodes` /
    /// `num_total_batches`) count the global batch, as TRL's `batch_size` does. Every rank must build
    /// its trainer with the same prompts and configuration; a prompt set smaller than the global
    /// batch is refused.
    pub fn with_data_parallel(mut self, group: vh_dist::ProcessGroup) -> Result<Self> {
        let global = self.sizes.batch_size * group.world_size();
        if self.prompts.len() < global {
            return Err(PpoError::Input(format!(
                "{} prompt(s) cannot fill one global rollout batch of {global} ({} ranks x {})",
                self.prompts.len(),
                group.world_size(),
                self.sizes.batch_size
            )));
        }
        // TRL's `batch_size` is the global one: the run's iterations are counted in it.
        let total = self.config.total_episodes_for(self.prompts.len());
        self.sizes.num_total_batches = total.div_ceil(global);
        vh_dist::broadcast_parameters(&group, self.policy.var_store(), 0)?;
        if let ReferenceModel::Model(reference) = &self.reference {
            vh_dist::broadcast_parameters(&group, reference.var_store(), 0)?;
        }
        self.group = Some(group);
        Ok(self)
    }

    /// The data-parallel group, when there is one.
    pub fn process_group(&self) -> Option<&vh_dist::ProcessGroup> {
        self.group.as_ref()
    }

    /// Whether this process saves and reports: rank 0, or the only process.
    pub fn is_main_process(&self) -> bool {
        self.group.as_ref().is_none_or(vh_dist::ProcessGroup::is_main)
    }

    /// The configuration.
    pub fn config(&self) -> &PpoConfig {
        &self.config
    }

    /// The derived batch sizes (and `num_total_batches`, the iterations of a full run).
    pub fn sizes(&self) -> BatchSizes {
        self.sizes
    }

    /// The policy (with its value head) being trained.
    pub fn policy(&self) -> &CausalLmWithValueHead {
        &self.policy
    }

    /// The frozen reference model; `None` when the reference is the policy with its LoRA
    /// adapter switched off.
    pub fn reference(&self) -> Option<&CausalLmWithValueHead> {
        match &self.reference {
            ReferenceModel::Model(m) => Some(m),
            ReferenceModel::AdapterDisabled => None,
        }
    }

    /// The padding token in use.
    pub fn pad_token_id(&self) -> i64 {
        self.pad
    }

    /// Iterations done.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Whether `num_total_batches` iterations are done.
    pub fn is_done(&self) -> bool {
        self.step as usize >= self.sizes.num_total_batches
    }

    /// The last iteration's prompts, responses and scores.
    pub fn last_rollout(&self) -> Option<&RolloutSample> {
        self.last_rollout.as_ref()
    }

    /// The learning rate of iteration `step` (TRL's linear schedule over `num_total_batches`).
    fn lr_at(&self, step: u64) -> f64 {
        let schedule = vh_train::LinearWarmup {
            num_warmup_steps: self.config.warmup_steps as u64,
            num_training_steps: self.sizes.num_total_batches as u64,
        };
        self.config.learning_rate * schedule.factor(step)
    }

    /// The next rollout batch's prompt indices (a fresh shuffle when the pass runs out; an
    /// incomplete last batch is dropped, as TRL's `drop_last` dataloader).
    fn next_batch(&mut self) -> Vec<usize> {
        let b = self.sizes.batch_size;
        // Under data parallelism the shuffle is shared and each rank takes its slice of the
        // global batch (accelerate's sharded dataloader).
        let (rank, world) = self.group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()));
        let global = b * world;
        if self.cursor + global > self.order.len() {
            self.order = permutation(&mut self.rng, self.prompts.len());
            self.cursor = 0;
        }
        let start = self.cursor + rank * b;
        let batch = self.order[start..start + b].to_vec();
        self.cursor += global;
        batch
    }

    /// The prompts `indices`, left-padded with the pad token into `[B, ctx]`.
    fn queries(&self, indices: &[usize]) -> Result<Tensor> {
        let ctx = indices.iter().map(|&i| self.prompts[i].len()).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(indices.len() * ctx);
        for &i in indices {
            let p = &self.prompts[i];
            flat.extend(std::iter::repeat_n(self.pad, ctx - p.len()));
            flat.extend_from_slice(p);
        }
        Ok(Tensor::f_from_slice(&flat)?.f_view([indices.len() as i64, ctx as i64])?)
    }

    /// `model`'s logits for the response tokens `[B, R, V]` and values `[B, R]` over
    /// `query_responses` (TRL's `forward`: padding masked and renumbered), computing logits for
    /// the last `R + 1` positions only.
    fn response_forward(
        model: &CausalLmWithValueHead,
        query_responses: &Tensor,
        context_length: i64,
        pad: i64,
    ) -> Result<(Tensor, Tensor)> {
        let device = model.var_store().device();
        let inputs = vh_rl::padded_inputs(&query_responses.f_to_device(device)?, pad)?;
        let total = query_responses.size()[1];
        let r = total - context_length;
        let out = model.forward_with(
            &CausalLmInput::new(&inputs.input_ids)
                .attention_mask(&inputs.attention_mask)
                .position_ids(&inputs.position_ids)
                .logits_to_keep(r + 1),
        )?;
        let logits = out.logits.f_narrow(1, 0, r)?;
        let values = out.values.f_narrow(1, context_length - 1, r)?;
        Ok((logits, values))
    }

    /// One PPO iteration: rollout, targets, `num_ppo_epochs` of updates. Returns TRL's metrics
    /// for it. A non-finite reward or loss stops the iteration before any parameter changes
    /// with it (the reward) or is refused by the optimiser (the loss).
    pub fn step(&mut self) -> Result<PpoStats> {
        let cfg = self.config.clone();
        let rl = cfg.rl_config();
        let device = self.policy.var_store().device();
        let mut laps = Laps::new(device);
        let mut timings = StepTimings::default();
        let (rank, world) = self.group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()));
        self.episode += (self.sizes.batch_size * world) as u64;
        let indices = self.next_batch();
        let queries = self.queries(&indices)?.f_to_device(device)?;
        let context_length = queries.size()[1];
        // Each rank samples with its own seed (TRL's local seed: seed + rank * 100003); the
        // shared generator keeps the shuffles the same on every rank.
        let sample_seed = self.rng.gen::<u64>().wrapping_add(rank as u64 * 100_003);

        // Rollout, reference log-probabilities, scores: no gradients.
        let (query_responses, responses, postprocessed, targets, scores) = tch::no_grad(|| -> Result<_> {
            let mask = queries.s_ne(self.pad)?;
            let generation = GenerationConfig {
                max_new_tokens: Some(cfg.response_length),
                max_length: None,
                min_new_tokens: 0,
                do_sample: true,
                temperature: cfg.temperature + 1e-7,
                top_k: 0,
                top_p: 1.0,
                repetition_penalty: 1.0,
                eos_token_id: cfg.stop_token_id.into_iter().collect(),
                pad_token_id: Some(self.pad),
                decoder_start_token_id: None,
                seed: Some(sample_seed),
                ..GenerationConfig::default()
            };
            let ids = queries.s_masked_fill(&mask.f_logical_not()?, 0)?;
            let out = self.policy.generate(&ids, Some(&mask), &generation)?;
            // Rows that finished are continued with padding; TRL's responses hold the same.
            let responses = out.new_tokens.shallow_clone();
            let query_responses = Tensor::f_cat(&[&queries, &responses], 1)?;
            timings.rollout = laps.lap();
            let (ref_logits, _) = match &self.reference {
                ReferenceModel::Model(m) => Self::response_forward(m, &query_responses, context_length, self.pad)?,
                ReferenceModel::AdapterDisabled => {
                    let _off = AdapterOff::new(&self.policy)?;
                    Self::response_forward(&self.policy, &query_responses, context_length, self.pad)?
                }
            };
            let (_, ref_logprobs) = vh_rl::tempered_logprobs(&ref_logits, &responses, cfg.temperature)?;
            drop(ref_logits);
            timings.reference = laps.lap();
            let postprocessed = match cfg.stop_token_id {
                Some(stop) => vh_rl::truncate_response(stop, self.pad, &responses)?,
                None => responses.shallow_clone(),
            };
            let sequence_lengths = vh_rl::first_true_indices(&postprocessed.s_eq(self.pad)?)?.s_sub(1)?;
            let prompts: Vec<&[i64]> = indices.iter().map(|&i| self.prompts[i].as_slice()).collect();
            let scores = self
                .reward
                .score(&prompts, &queries, &postprocessed, &sequence_lengths, self.pad)?
                .f_to_device(device)?;
            let scores = match self.eos {
                Some(eos) => vh_rl::apply_missing_eos_penalty(&scores, &postprocessed, eos, cfg.missing_eos_penalty)?.0,
                None => scores,
            };
            let targets = vh_rl::compute_rollout_targets(
                &Rollout {
                    logprobs: &out.sample_logprobs,
                    ref_logprobs: &ref_logprobs,
                    values: &out.values,
                    scores: &scores,
                    sequence_lengths: &sequence_lengths,
                },
                &rl,
            )?;
            timings.reward = laps.lap();
            Ok((query_responses, responses, postprocessed, targets, scores))
        })?;

        // PPO epochs over shuffled mini-batches of micro-batches.
        let lr = self.lr_at(self.step);
        let mut updates = UpdateStats::default();
        let b = self.sizes.batch_size;
        for _ in 0..cfg.num_ppo_epochs {
            let perm = permutation(&mut self.rng, b);
            for mini in perm.chunks(self.sizes.mini_batch_size) {
                for micro in mini.chunks(self.sizes.micro_batch_size) {
                    let idx = Tensor::f_from_slice(&micro.iter().map(|&i| i as i64).collect::<Vec<_>>())?
                        .f_to_device(device)?;
                    let pick = |t: &Tensor| t.f_index_select(0, &idx);
                    let (logits, vpred) =
                        Self::response_forward(&self.policy, &pick(&query_responses)?, context_length, self.pad)?;
                    let mb_responses = pick(&responses)?;
                    let (tempered, new_logprobs) = vh_rl::tempered_logprobs(&logits, &mb_responses, cfg.temperature)?;
                    let loss = vh_rl::ppo_loss(
                        &PpoBatch {
                            new_logprobs: &new_logprobs,
                            vpred: &vpred,
                            old_logprobs: &pick(&targets.logprobs)?,
                            old_values: &pick(&targets.values)?,
                            returns: &pick(&targets.returns)?,
                            advantages: &pick(&targets.advantages)?,
                            padding_mask: &pick(&targets.padding_mask)?,
                            padding_mask_p1: &pick(&targets.padding_mask_p1)?,
                        },
                        &rl,
                    )?;
                    vh_train::check_finite("pg_loss", &loss.pg_loss)?;
                    vh_train::check_finite("vf_loss", &loss.vf_loss)?;
                    // Accelerate divides each micro-batch's loss by the accumulation steps.
                    let scaled = loss.loss.f_div_scalar(self.sizes.micro_batches_per_mini_batch as f64)?;
                    vh_train::backward(&scaled)?;
                    let entropy = tch::no_grad(|| vh_rl::ppo_entropy(&tempered))?;
                    updates.record(&loss, &entropy)?;
                }
                if let Some(group) = &self.group {
                    // DDP's all-reduce: the mean of the ranks' gradients, before clipping.
                    vh_dist::all_reduce_gradients(group, self.policy.var_store(), vh_dist::DEFAULT_BUCKET_BYTES)?;
                }
                let params: Vec<&Tensor> = self.optimizer.parameters().collect();
                let norm = match cfg.max_grad_norm {
                    Some(max) => vh_train::clip_grad_norm(params, max)?,
                    None => vh_train::total_grad_norm(params)?,
                };
                if let Err(e) = vh_train::check_finite("gradient norm", &norm) {
                    self.optimizer.zero_grad()?;
                    return Err(e.into());
                }
                self.optimizer.step(lr)?;
                self.optimizer.zero_grad()?;
            }
        }

        timings.update = laps.lap();
        let mut stats = PpoStats::default();
        tch::no_grad(|| stats.set_rollout(&targets, &scores))?;
        stats.set_updates(&updates)?;
        stats.val_num_eos_tokens = match self.eos {
            Some(eos) => vh_rl::num_eos_tokens(&responses, eos)? as f64,
            None => 0.0,
        };
        if let Some(group) = &self.group {
            // TRL gathers these over the processes and takes the mean.
            let fields = [
                &mut stats.objective_kl,
                &mut stats.objective_entropy,
                &mut stats.objective_non_score_reward,
                &mut stats.objective_rlhf_reward,
                &mut stats.objective_scores,
                &mut stats.policy_approxkl_avg,
                &mut stats.policy_clipfrac_avg,
                &mut stats.loss_policy_avg,
                &mut stats.loss_value_avg,
                &mut stats.val_clipfrac_avg,
                &mut stats.policy_entropy_avg,
                &mut stats.val_ratio,
                &mut stats.val_ratio_var,
            ];
            let local: Vec<f64> = fields.iter().map(|v| **v).collect();
            let mean = vh_dist::reduce_mean_scalars(group, &local)?;
            for (field, value) in fields.into_iter().zip(mean) {
                *field = value;
            }
        }
        stats.lr = lr;
        stats.episode = self.episode as f64;
        let elapsed = self.started.elapsed().as_secs_f64();
        stats.eps = if elapsed > 0.0 {
            (self.episode as f64 / elapsed).floor()
        } else {
            0.0
        };
        self.step += 1;

        let lengths = Vec::<i64>::try_from(
            &vh_rl::first_true_indices(&postprocessed.s_eq(self.pad)?)?.f_to_device(tch::Device::Cpu)?,
        )?;
        let rows = Vec::<Vec<i64>>::try_from(&postprocessed.f_to_device(tch::Device::Cpu)?)?;
        self.last_rollout = Some(RolloutSample {
            prompt_indices: indices,
            responses: rows
                .iter()
                .zip(&lengths)
                .map(|(r, &n)| r[..n as usize].to_vec())
                .collect(),
            scores: Vec::<f32>::try_from(&scores.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?)?,
        });
        timings.total = laps.total();
        self.last_timings = Some(timings);
        Ok(stats)
    }

    /// Where the last completed [`PpoTrainer::step`] spent its time (`None` before the first).
    pub fn last_timings(&self) -> Option<StepTimings> {
        self.last_timings
    }

    /// The generator's and data order's state, with the counters.
    pub fn state(&self) -> TrainerState {
        TrainerState {
            step: self.step,
            episode: self.episode,
            rng_seed: self.rng.get_seed(),
            rng_stream: self.rng.get_stream(),
            rng_word_pos: self.rng.get_word_pos().to_string(),
            order: self.order.clone(),
            cursor: self.cursor,
            optimizer_steps: self.optimizer.steps(),
        }
    }

    /// Saves a resumable checkpoint into `dir` (created; files replaced): the policy
    /// (`policy/`, as `save_pretrained`: an adapter folder for a LoRA policy, which names its
    /// base), the reference (`reference/`, unless it is the policy's base), the optimiser's moments
    /// (`optimizer.safetensors`) and `trainer_state.json` (configuration, counters, generator,
    /// prompt order). `trainer_state.json` is written last, so a checkpoint without it is
    /// incomplete.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        // Under data parallelism every rank holds the same state: rank 0 writes it, and the
        // barrier makes the checkpoint complete on return everywhere.
        if let Some(group) = &self.group {
            if !group.is_main() {
                group.barrier()?;
                return Ok(());
            }
            // The barrier even when writing failed, so the other ranks are not left waiting.
            let written = self.write_checkpoint(dir);
            group.barrier()?;
            return written;
        }
        self.write_checkpoint(dir)
    }

    fn write_checkpoint(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PpoError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let state_path = dir.join("trainer_state.json");
        if state_path.exists() {
            std::fs::remove_file(&state_path).map_err(io(&state_path))?;
        }
        self.policy.save_pretrained(dir.join("policy"), None)?;
        match &self.reference {
            ReferenceModel::Model(m) => m.save_pretrained(dir.join("reference"), None)?,
            ReferenceModel::AdapterDisabled => {
                // A stale reference of an earlier run in the same folder would be loaded on resume.
                let stale = dir.join("reference");
                if stale.exists() {
                    std::fs::remove_dir_all(&stale).map_err(io(&stale))?;
                }
            }
        }
        self.optimizer.save(&dir.join("optimizer.safetensors"))?;
        let json = serde_json::json!({
            "config": self.config,
            "state": self.state(),
            "prompts": self.prompts,
        });
        let tmp = dir.join("trainer_state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&json).expect("JSON of plain data")).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &state_path).map_err(io(&state_path))?;
        Ok(())
    }

    /// Resumes from a checkpoint of [`PpoTrainer::save_checkpoint`] with `reward` (the same as
    /// the interrupted run's, for the same next step): the policy, reference, optimiser,
    /// configuration, prompts, counters and generator come from `dir`.
    pub fn resume(dir: &Path, reward: Reward, options: &LoadOptions) -> Result<Self> {
        let state_path = dir.join("trainer_state.json");
        let bytes = std::fs::read(&state_path).map_err(|source| PpoError::Io {
            path: state_path.clone(),
            source,
        })?;
        let json_err = |message: String| PpoError::Json {
            path: state_path.clone(),
            message,
        };
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| json_err(e.to_string()))?;
        let config: PpoConfig =
            serde_json::from_value(json["config"].clone()).map_err(|e| json_err(format!("config: {e}")))?;
        let state: TrainerState =
            serde_json::from_value(json["state"].clone()).map_err(|e| json_err(format!("state: {e}")))?;
        let prompts: Vec<Vec<i64>> =
            serde_json::from_value(json["prompts"].clone()).map_err(|e| json_err(format!("prompts: {e}")))?;
        let policy_dir = dir.join("policy");
        let mut trainer = if policy_dir.join("adapter_config.json").exists() {
            // A LoRA policy: its adapter folder names the base, which is also the reference.
            let policy = CausalLmWithValueHead::from_adapter_folder(&policy_dir, options)?;
            Self::build(policy, ReferenceModel::AdapterDisabled, reward, prompts, config)?
        } else {
            let policy = CausalLmWithValueHead::from_folder(&policy_dir, options)?;
            let mut frozen = CausalLmWithValueHead::from_folder(dir.join("reference"), options)?;
            frozen.set_train(false);
            for (_, t) in frozen.var_store().variables() {
                let _ = t.set_requires_grad(false);
            }
            Self::with_reference(policy, frozen, reward, prompts, config)?
        };
        if state.order.len() != trainer.prompts.len() || state.cursor > state.order.len() {
            return Err(json_err("the prompt order does not match the prompts".into()));
        }
        let word_pos: u128 = state
            .rng_word_pos
            .parse()
            .map_err(|_| json_err(format!("rng_word_pos {:?} is not a number", state.rng_word_pos)))?;
        let mut rng = ChaCha8Rng::from_seed(state.rng_seed);
        rng.set_stream(state.rng_stream);
        rng.set_word_pos(word_pos);
        trainer.rng = rng;
        trainer.order = state.order;
        trainer.cursor = state.cursor;
        trainer.step = state.step;
        trainer.episode = state.episode;
        trainer
            .optimizer
            .load(&dir.join("optimizer.safetensors"), state.optimizer_steps)?;
        Ok(trainer)
    }
}
