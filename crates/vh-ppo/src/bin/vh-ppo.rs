//! `vh-ppo` (also `vh ppo`): PPO on a value-head model from the command line.
//!
//! ```sh
//! vh ppo --model DIR --prompts FILE (--reward-model DIR | --reward-word W) --steps N --out DIR
//! vh ppo --resume OUT/checkpoint (--reward-model DIR | --reward-word W) --steps N --out DIR
//! vh ppo --model BASE --lora-r 16 ...       # train a fresh LoRA adapter (or --adapter DIR)
//! ```
//!
//! One prompt per line of FILE (UTF-8; blank lines skipped), encoded with the model's
//! tokenizer.json (`--chat` formats each as a user message with the chat template). Each
//! iteration prints its statistics (TRL's names): a live line on a terminal, JSON lines
//! otherwise. Ctrl-C finishes the iteration in flight, saves `OUT/checkpoint` (model, reference,
//! optimiser state, step, generator) and exits; `--resume OUT/checkpoint` continues exactly where
//! it stopped. At the end the trained model is saved to `OUT/model`.
//!
//! Under torchrun's variables with `WORLD_SIZE` > 1 (torchrun, or `cargo xtask launch --nproc N
//! -- vh ppo ...`) each process is one rank of a data-parallel run: rank 0 prints and saves.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use valuehead::{CausalLmWithValueHead, LoadOptions, LoraConfig, Message, SequenceClassifier};
use vh_ppo::{PpoConfig, PpoTrainer, Reward};

/// Set by SIGINT; checked between iterations.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The longest prompts file read (prompts are short; a huge file is a mistake).
const MAX_PROMPTS_BYTES: u64 = 64 << 20;

#[derive(Parser)]
#[command(name = "vh ppo", about = "PPO (TRL 0.26.2's loop) on a value-head model")]
struct Args {
    /// The policy: a model folder with tokenizer.json (a fresh value head is added if it has none).
    #[arg(long, required_unless_present = "resume")]
    model: Option<PathBuf>,
    /// Prompts, one per line (UTF-8).
    #[arg(long, required_unless_present = "resume")]
    prompts: Option<PathBuf>,
    /// A *ForSequenceClassification folder that scores each reply (same vocabulary as the policy).
    #[arg(long, conflicts_with = "reward_word", required_unless_present = "reward_word")]
    reward_model: Option<PathBuf>,
    /// Reward +1 when the decoded reply contains this word, -0.01 per reply token.
    #[arg(long)]
    reward_word: Option<String>,
    /// PPO iterations (each rolls out `--batch-size` prompts on every rank).
    #[arg(long)]
    steps: usize,
    /// Output folder: `model/` at the end, `checkpoint/` on Ctrl-C and at the end.
    #[arg(long)]
    out: PathBuf,
    /// Continue from a checkpoint folder (its model, configuration and prompts).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Format each prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Rollouts per iteration (TRL's batch_size; each mini-batch is one micro-batch of
    /// batch_size / num_mini_batches).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens generated per reply.
    #[arg(long, default_value_t = 53)]
    response_length: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 5e-5)]
    learning_rate: f64,
    /// PPO epochs per iteration.
    #[arg(long, default_value_t = 4)]
    num_ppo_epochs: usize,
    /// Mini-batches per epoch.
    #[arg(long, default_value_t = 1)]
    num_mini_batches: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// KL penalty coefficient.
    #[arg(long, default_value_t = 0.05)]
    kl_coef: f64,
    /// Stop token (replies are truncated after it); default: config.json's eos_token_id.
    #[arg(long)]
    stop_token_id: Option<i64>,
    /// Padding token; default: config.json's pad_token_id, else eos_token_id.
    #[arg(long)]
    pad_token_id: Option<i64>,
    /// Subtracted from the score of replies without the stop token.
    #[arg(long)]
    missing_eos_penalty: Option<f64>,
    /// Seed of the prompt order, sampling and shuffles.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train this peft LoRA adapter folder on `--model` (the base) instead of the whole model;
    /// the base with the adapter off is the reference, as in TRL with a peft model.
    #[arg(long, conflicts_with = "lora_r")]
    adapter: Option<PathBuf>,
    /// Train a fresh LoRA adapter of this rank (peft's initialisation) instead of the whole model.
    #[arg(long)]
    lora_r: Option<i64>,
    /// The fresh adapter's `lora_alpha` (peft's default).
    #[arg(long, default_value_t = 8.0)]
    lora_alpha: f64,
    /// The fresh adapter's `target_modules`: "all-linear" or comma-separated module names.
    #[arg(long, default_value = "all-linear")]
    lora_target_modules: String,
    /// Intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: i32,
}

/// Reads the prompts file: UTF-8, at least one non-blank line.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_PROMPTS_BYTES {
        bail!(
            "{}: {len} bytes is more than the {MAX_PROMPTS_BYTES} a prompts file may have",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!("{}: not UTF-8 (line {line}, byte {at})", path.display())
    })?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        bail!("{}: no prompts (the file is empty or blank)", path.display());
    }
    Ok(prompts)
}

/// Encodes each prompt with the folder's tokenizer (and chat template with `chat`).
fn encode_prompts(
    dir: &Path,
    tokenizer: &tokenizers::Tokenizer,
    prompts: &[String],
    chat: bool,
) -> Result<Vec<Vec<i64>>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (text, special) = if chat {
                (
                    valuehead::apply_chat_template(dir, &[Message::user(p.as_str())], true)?,
                    false,
                )
            } else {
                (p.clone(), true)
            };
            let enc = tokenizer
                .encode(text.as_str(), special)
                .map_err(|e| anyhow::anyhow!("prompt {} ({p:?}): {e}", i + 1))?;
            if enc.get_ids().is_empty() {
                bail!("prompt {} ({p:?}) encodes to no tokens", i + 1);
            }
            Ok(enc.get_ids().iter().map(|&t| i64::from(t)).collect())
        })
        .collect()
}

/// Copies the tokenizer files of `from` (when present) into the model folder `to`, so the folder
/// is complete for tools that need them (and for `--resume` without `--model`).
fn copy_tokenizer(from: Option<&Path>, to: &Path) -> Result<()> {
    let Some(from) = from else { return Ok(()) };
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        if from.join(f).exists() && from != to {
            std::fs::copy(from.join(f), to.join(f)).with_context(|| format!("copying {f}"))?;
        }
    }
    Ok(())
}

fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    valuehead::load_tokenizer(dir)?.with_context(|| format!("{} has no tokenizer.json", dir.display()))
}

/// The reward the flags ask for; a reward model whose tokenizer differs from the policy's is
/// refused (same-size vocabularies with other tokens would score nonsense silently).
fn reward(args: &Args, tokenizer: &tokenizers::Tokenizer) -> Result<Reward> {
    if let Some(dir) = &args.reward_model {
        if let Some(theirs) = valuehead::load_tokenizer(dir)? {
            if theirs.get_vocab(true) != tokenizer.get_vocab(true) {
                bail!(
                    "the reward model's tokenizer ({}) has another vocabulary than the policy's",
                    dir.join("tokenizer.json").display()
                );
            }
        }
        let model = SequenceClassifier::from_folder(dir, &LoadOptions::default())?;
        return Ok(Reward::Model(Box::new(model)));
    }
    let word = args
        .reward_word
        .clone()
        .context("--reward-model or --reward-word is needed")?
        .to_lowercase();
    if word.trim().is_empty() {
        bail!("--reward-word is empty");
    }
    let tokenizer = tokenizer.clone();
    Ok(Reward::function(move |_prompt, response| {
        let ids: Vec<u32> = response.iter().map(|&t| t as u32).collect();
        let text = tokenizer.decode(&ids, true).unwrap_or_default().to_lowercase();
        f32::from(u8::from(text.contains(&word))) - 0.01 * response.len() as f32
    }))
}

/// Whether Ctrl-C reached this process or, under data parallelism, any rank: every rank must
/// stop at the same iteration, or the others would wait in the next collective.
fn interrupted_anywhere(trainer: &PpoTrainer) -> Result<bool> {
    let here = INTERRUPTED.load(Ordering::SeqCst);
    let Some(group) = trainer.process_group() else {
        return Ok(here);
    };
    let mut flag = tch::Tensor::from_slice(&[f32::from(u8::from(here))]);
    group.all_reduce_sum(&mut flag)?;
    Ok(flag.double_value(&[0]) > 0.0)
}

fn main() -> Result<()> {
    // As every binary of ours: freed tensor memory stays for reuse (see the function's doc).
    valuehead::keep_freed_tensor_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let args = Args::parse();
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    // Under torchrun (or `cargo xtask launch`), WORLD_SIZE > 1: one rank of a data-parallel run.
    let world: usize = match std::env::var("WORLD_SIZE") {
        Ok(v) => v.parse().with_context(|| format!("WORLD_SIZE={v:?} is not a number"))?,
        Err(_) => 1,
    };
    let mut trainer = match &args.resume {
        Some(ckpt) => {
            let tokenizer = match &args.model {
                Some(dir) => load_tokenizer(dir)?,
                None => load_tokenizer(&ckpt.join("policy"))?,
            };
            let reward = reward(&args, &tokenizer)?;
            PpoTrainer::resume(ckpt, reward, &LoadOptions::default())?
        }
        None => {
            let (model_dir, prompts_path) = (args.model.as_ref().expect("clap"), args.prompts.as_ref().expect("clap"));
            let tokenizer = load_tokenizer(model_dir)?;
            let prompts = read_prompts(prompts_path)?;
            let prompts = encode_prompts(model_dir, &tokenizer, &prompts, args.chat)?;
            let reward = reward(&args, &tokenizer)?;
            // Each mini-batch is one micro-batch; sizes that do not divide are left for
            // `batch_sizes` to report in TRL's words.
            let (per_device, accumulation) =
                if args.num_mini_batches > 0 && args.batch_size.is_multiple_of(args.num_mini_batches) {
                    (args.batch_size / args.num_mini_batches, args.num_mini_batches)
                } else {
                    (args.batch_size, 1)
                };
            let config = PpoConfig {
                learning_rate: args.learning_rate,
                per_device_train_batch_size: per_device,
                gradient_accumulation_steps: accumulation,
                num_mini_batches: args.num_mini_batches,
                num_ppo_epochs: args.num_ppo_epochs,
                // `--steps` iterations of the global batch (every rank's `--batch-size`).
                total_episodes: Some(args.steps * args.batch_size * world.max(1)),
                response_length: args.response_length,
                temperature: args.temperature,
                kl_coef: args.kl_coef,
                stop_token_id: args.stop_token_id,
                pad_token_id: args.pad_token_id,
                missing_eos_penalty: args.missing_eos_penalty,
                seed: args.seed,
                ..Default::default()
            };
            // Checked before the model is loaded: a configuration error costs nothing.
            config.batch_sizes(prompts.len())?;
            let options = LoadOptions::default();
            let policy = match (&args.adapter, args.lora_r) {
                (Some(adapter), _) => CausalLmWithValueHead::from_folder_with_adapter(model_dir, adapter, &options)?,
                (None, Some(r)) => {
                    let targets = match args.lora_target_modules.as_str() {
                        "all-linear" => serde_json::json!("all-linear"),
                        list => serde_json::json!(list.split(',').map(str::trim).collect::<Vec<_>>()),
                    };
                    let lora = LoraConfig::from_json(&serde_json::json!({
                        "peft_type": "LORA",
                        "task_type": "CAUSAL_LM",
                        "r": r,
                        "lora_alpha": args.lora_alpha,
                        "target_modules": targets,
                    }))?;
                    CausalLmWithValueHead::with_new_adapter(model_dir, &lora, &options)?
                }
                (None, None) => CausalLmWithValueHead::from_folder(model_dir, &options)?,
            };
            PpoTrainer::new(policy, reward, prompts, config)?
        }
    };
    if world > 1 {
        let group = vh_dist::ProcessGroup::from_env()?;
        trainer = trainer.with_data_parallel(group)?;
    }
    let main_process = trainer.is_main_process();
    // Keep the tokenizer files with the saved model so it is a complete folder.
    let tokenizer_dir = args
        .model
        .clone()
        .or_else(|| args.resume.as_ref().map(|c| c.join("policy")));
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    let terminal = std::io::stdout().is_terminal();
    let total = trainer.sizes().num_total_batches;
    let checkpoint = args.out.join("checkpoint");
    let mut stdout = std::io::stdout().lock();
    while !trainer.is_done() {
        if interrupted_anywhere(&trainer)? {
            trainer.save_checkpoint(&checkpoint)?;
            if main_process {
                copy_tokenizer(tokenizer_dir.as_deref(), &checkpoint.join("policy"))?;
            }
            if terminal {
                writeln!(stdout)?;
            }
            eprintln!(
                "interrupted after iteration {}: checkpoint saved to {} (continue with --resume {})",
                trainer.steps_done(),
                checkpoint.display(),
                checkpoint.display()
            );
            std::process::exit(130);
        }
        let stats = trainer.step()?;
        let step = trainer.steps_done();
        if !main_process {
            continue;
        }
        if terminal {
            let width = 30;
            let done = step as usize * width / total.max(1);
            write!(
                stdout,
                "\r[{}{}] {step}/{total}  reward {:+.3}  kl {:.3}  entropy {:.2}  approxkl {:.4}  clipfrac {:.3}  lr {:.2e}   ",
                "#".repeat(done),
                "-".repeat(width - done),
                stats.objective_scores,
                stats.objective_kl,
                stats.objective_entropy,
                stats.policy_approxkl_avg,
                stats.policy_clipfrac_avg,
                stats.lr
            )?;
        } else {
            writeln!(stdout, "{}", vh_ppo::stats_json(step, &stats))?;
        }
        stdout.flush()?;
    }
    if terminal {
        writeln!(stdout)?;
    }
    let model_out = args.out.join("model");
    if main_process {
        trainer.policy().save_pretrained(&model_out, None)?;
        copy_tokenizer(tokenizer_dir.as_deref(), &model_out)?;
    }
    trainer.save_checkpoint(&checkpoint)?;
    if main_process {
        copy_tokenizer(tokenizer_dir.as_deref(), &checkpoint.join("policy"))?;
        eprintln!("saved {} and {}", model_out.display(), checkpoint.display());
    }
    Ok(())
}
