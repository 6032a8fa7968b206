//! PPO on SmolLM2-135M-Instruct with a reward anyone can read: +1 when the reply mentions a cat,
//! minus 0.01 per reply token (so rambling costs; a reply cut at `response_length` pays for every
//! token). No missing-eos penalty: SmolLM2's replies rarely end within a short response length,
//! so a flat -1 on nearly every rollout would drown the signal (measured: see docs/ppo.md).
//!
//! ```sh
//! cargo run --release --example ppo            # 25 iterations of 8 rollouts, out in target/ppo-example
//! cargo run --release --example ppo -- 40 DIR  # 40 iterations, out in DIR
//! ```
//!
//! Prints greedy replies before and after, one line of statistics per iteration, and writes
//! `stats.jsonl` (TRL's metric names), `curve.svg` (reward and KL per iteration), the trained
//! model (`model/`, as `save_pretrained`, with the tokenizer files) and `greedy.json` (prompts
//! and our greedy replies), then asks Python TRL to load `model/` and reproduce the replies
//! (`python/ppo_check.py`), when the reference environment is installed.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use valuehead::{CausalLmWithValueHead, GenerationConfig, LoadOptions, Message};
use vh_ppo::{PpoConfig, PpoTrainer, Reward};

/// The word the reward asks for.
const TARGET: &str = "cat";
/// `<|endoftext|>`: padding (distinct from `<|im_end|>`, which ends replies and must stay visible).
const PAD: i64 = 0;
/// `<|im_end|>`: the end of a reply.
const IM_END: i64 = 2;
/// Tokens sampled per reply (TRL's `response_length`).
const RESPONSE_LENGTH: usize = 48;
/// Sampled replies per prompt in the before/after evaluation.
const EVAL_ROUNDS: u64 = 4;

const PROMPTS: [&str; 16] = [
    "Name an animal.",
    "What pet should I get?",
    "Tell me about your favorite animal.",
    "What animal makes a good companion?",
    "Suggest a name for a story about an animal.",
    "What is a small animal that lives in houses?",
    "Which animal would you like to be?",
    "Write one sentence about a pet.",
    "What animal sleeps a lot?",
    "Name a furry animal.",
    "What animal is independent?",
    "What do people keep at home to catch mice?",
    "Describe a cute animal in one sentence.",
    "What animal purrs?",
    "Give me an idea for a children's book character.",
    "Which animal is common on the internet?",
];

/// Whether `text` mentions the target word (or its plural) as a word, in any case.
fn mentions_target(text: &str) -> bool {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .any(|w| w == TARGET || w == format!("{TARGET}s"))
}

/// The score of a reply: +1 for mentioning the target, -0.01 per token.
fn score(text: &str, tokens: usize) -> f32 {
    f32::from(u8::from(mentions_target(text))) - 0.01 * tokens as f32
}

fn greedy_replies(
    model: &CausalLmWithValueHead,
    tokenizer: &tokenizers::Tokenizer,
    prompts: &[Vec<i64>],
) -> Result<Vec<Vec<i64>>> {
    let config = GenerationConfig {
        max_new_tokens: Some(32),
        do_sample: false,
        eos_token_id: vec![IM_END],
        pad_token_id: Some(PAD),
        ..Default::default()
    };
    let _ = tokenizer;
    let mut replies = Vec::new();
    for p in prompts {
        let ids = tch::Tensor::from_slice(p).view([1, -1]);
        let out = tch::no_grad(|| model.generate(&ids, None, &config))?;
        let mut reply = Vec::<i64>::try_from(out.new_tokens.get(0))?;
        // Up to and including <|im_end|>, as the Python check compares.
        if let Some(end) = reply.iter().position(|&t| t == IM_END) {
            reply.truncate(end + 1);
        }
        replies.push(reply);
    }
    Ok(replies)
}

/// Sampled replies to every prompt (`rounds` each, temperature 0.7 as the rollouts, fixed
/// seeds) scored like the rollouts: (mean score, share mentioning the target). A fixed
/// evaluation set before and after training measures the change with far less noise than the
/// 8 rollouts of one iteration.
fn sampled_eval(
    model: &CausalLmWithValueHead,
    tokenizer: &tokenizers::Tokenizer,
    prompts: &[Vec<i64>],
    rounds: u64,
    response_length: usize,
) -> Result<(f64, f64)> {
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for p in prompts {
        ids.extend(std::iter::repeat_n(PAD, width - p.len()));
        ids.extend_from_slice(p);
        mask.extend(std::iter::repeat_n(0i64, width - p.len()));
        mask.extend(std::iter::repeat_n(1i64, p.len()));
    }
    let shape = [prompts.len() as i64, width as i64];
    let ids = tch::Tensor::from_slice(&ids).view(shape);
    let mask = tch::Tensor::from_slice(&mask).view(shape);
    let (mut total, mut mentions, mut n) = (0.0, 0usize, 0usize);
    for round in 0..rounds {
        let config = GenerationConfig {
            max_new_tokens: Some(response_length),
            do_sample: true,
            temperature: 0.7,
            top_k: 0,
            eos_token_id: vec![IM_END],
            pad_token_id: Some(PAD),
            seed: Some(1000 + round),
            ..Default::default()
        };
        let out = tch::no_grad(|| model.generate(&ids, Some(&mask), &config))?;
        for row in Vec::<Vec<i64>>::try_from(&out.new_tokens)? {
            // As the trainer hands replies to the reward: up to and including <|im_end|>.
            let reply = match row.iter().position(|&t| t == IM_END) {
                Some(end) => &row[..=end],
                None => &row[..],
            };
            let text = decode(tokenizer, reply)?;
            total += f64::from(score(&text, reply.len()));
            mentions += usize::from(mentions_target(&text));
            n += 1;
        }
    }
    Ok((total / n as f64, mentions as f64 / n as f64))
}

fn decode(tokenizer: &tokenizers::Tokenizer, ids: &[i64]) -> Result<String> {
    let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
    tokenizer
        .decode(&ids, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))
}

/// A two-panel SVG: the mean score (top) and the KL to the reference (bottom) per iteration.
fn write_svg(path: &Path, scores: &[f64], kls: &[f64]) -> Result<()> {
    let (w, panel_h, left, top) = (640.0, 200.0, 60.0, 30.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * panel_h + 3.0 * top + 20.0
    );
    let n = scores.len().max(2);
    for (i, (name, values, colour)) in [
        ("objective/scores (mean reward)", scores, "#1f77b4"),
        ("objective/kl (to the reference)", kls, "#d62728"),
    ]
    .into_iter()
    .enumerate()
    {
        let y0 = top + i as f64 * (panel_h + top);
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        let (lo, hi) = if hi - lo < 1e-9 { (lo - 1.0, hi + 1.0) } else { (lo, hi) };
        let x = |k: usize| left + k as f64 * (w - left - 20.0) / (n - 1) as f64;
        let y = |v: f64| y0 + panel_h - (v - lo) / (hi - lo) * panel_h;
        svg += &format!(
            "<text x=\"{left}\" y=\"{}\">{name}</text>\n<rect x=\"{left}\" y=\"{y0}\" width=\"{}\" height=\"{panel_h}\" fill=\"none\" stroke=\"#999\"/>\n",
            y0 - 8.0,
            w - left - 20.0
        );
        for v in [lo, (lo + hi) / 2.0, hi] {
            svg += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.2}</text>\n",
                left - 4.0,
                y(v) + 4.0
            );
        }
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(k, &v)| format!("{:.1},{:.1}", x(k), y(v)))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n",
            points.join(" ")
        );
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">PPO iteration (1..{})</text>\n</svg>\n",
        w / 2.0,
        2.0 * panel_h + 3.0 * top + 10.0,
        scores.len()
    );
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

fn main() -> Result<()> {
    valuehead::keep_freed_tensor_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let mut args = std::env::args().skip(1);
    let steps: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()
        .context("the number of iterations")?
        .unwrap_or(25);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "target/ppo-example".into()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model_dir = root.join(".models/smollm2-135m-instruct");
    if !model_dir.join("config.json").exists() {
        bail!("{} is missing: run `cargo xtask setup`", model_dir.display());
    }
    tch::set_num_threads(2);
    std::fs::create_dir_all(&out)?;
    let started = std::time::Instant::now();

    let tokenizer = valuehead::load_tokenizer(&model_dir)?.context("the model folder has no tokenizer.json")?;
    let mut prompts = Vec::new();
    for p in PROMPTS {
        let text = valuehead::apply_chat_template(&model_dir, &[Message::user(p)], true)?;
        let enc = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("encoding: {e}"))?;
        prompts.push(enc.get_ids().iter().map(|&t| i64::from(t)).collect::<Vec<_>>());
    }
    // A fresh value head (the checkpoint has none): the critic starts from scratch, as in TRL.
    tch::manual_seed(0);
    let policy = CausalLmWithValueHead::from_folder(&model_dir, &LoadOptions::default())?;
    let shown: Vec<Vec<i64>> = prompts.iter().take(4).cloned().collect();
    let before = greedy_replies(&policy, &tokenizer, &shown)?;
    let eval_before = sampled_eval(&policy, &tokenizer, &prompts, EVAL_ROUNDS, RESPONSE_LENGTH)?;
    println!(
        "evaluation before training ({} sampled replies): mean reward {:+.3}, mentioning \"{TARGET}\" {:.0}%",
        EVAL_ROUNDS as usize * prompts.len(),
        eval_before.0,
        100.0 * eval_before.1
    );

    let reward_tokenizer = tokenizer.clone();
    let reward = Reward::function(move |_prompt, response| {
        let ids: Vec<u32> = response.iter().map(|&t| t as u32).collect();
        let text = reward_tokenizer.decode(&ids, true).unwrap_or_default();
        score(&text, response.len())
    });
    let config = PpoConfig {
        learning_rate: 1e-5,
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2,
        num_mini_batches: 2,
        num_ppo_epochs: 2,
        total_episodes: Some(steps * 8),
        response_length: RESPONSE_LENGTH,
        stop_token_id: Some(IM_END),
        missing_eos_penalty: None,
        pad_token_id: Some(PAD),
        eos_token_id: Some(IM_END),
        max_grad_norm: Some(1.0),
        seed: 42,
        ..Default::default()
    };
    println!(
        "== PPO on SmolLM2-135M-Instruct: reward = +1 if the reply mentions \"{TARGET}\", -0.01 per reply token =="
    );
    println!("config: {}", serde_json::to_string(&config)?);
    let training = std::time::Instant::now();
    let mut trainer = PpoTrainer::new(policy, reward, prompts.clone(), config)?;
    let stats_path = out.join("stats.jsonl");
    let mut stats_file = std::io::BufWriter::new(std::fs::File::create(&stats_path)?);
    let (mut scores, mut kls) = (Vec::new(), Vec::new());
    while !trainer.is_done() {
        let t = std::time::Instant::now();
        let stats = trainer.step()?;
        let step = trainer.steps_done();
        writeln!(stats_file, "{}", vh_ppo::stats_json(step, &stats))?;
        stats_file.flush()?;
        let rollout = trainer.last_rollout().expect("a step was taken");
        let mentions = rollout
            .responses
            .iter()
            .filter(|r| decode(&tokenizer, r).map(|t| mentions_target(&t)).unwrap_or(false))
            .count();
        println!(
            "iter {step:>3}  reward {:+.3}  kl {:.3}  mentions {mentions}/8  mean len {:.1}  approxkl {:.4}  clipfrac {:.3}  vf {:.3}  ({:.1} s)",
            stats.objective_scores,
            stats.objective_kl,
            rollout.responses.iter().map(Vec::len).sum::<usize>() as f64 / 8.0,
            stats.policy_approxkl_avg,
            stats.policy_clipfrac_avg,
            stats.loss_value_avg,
            t.elapsed().as_secs_f64()
        );
        scores.push(stats.objective_scores);
        kls.push(stats.objective_kl);
    }
    let train_time = training.elapsed().as_secs_f64();
    let after = greedy_replies(trainer.policy(), &tokenizer, &shown)?;
    let eval_after = sampled_eval(trainer.policy(), &tokenizer, &prompts, EVAL_ROUNDS, RESPONSE_LENGTH)?;
    println!("\n== greedy replies, before -> after ==");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        println!("[{}] {}", i, PROMPTS[i]);
        println!("  before: {:?}", decode(&tokenizer, b)?);
        println!("  after:  {:?}", decode(&tokenizer, a)?);
    }
    let k = (scores.len() / 4).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "\nmean reward: first {k} iterations {:+.3}, last {k} {:+.3}; objective/kl max {:.3}, last {:.3}; {:.0} s of training, {:.0} s in all",
        mean(&scores[..k]),
        mean(&scores[scores.len() - k..]),
        kls.iter().cloned().fold(f64::MIN, f64::max),
        kls.last().copied().unwrap_or(0.0),
        train_time,
        started.elapsed().as_secs_f64()
    );
    println!(
        "evaluation ({} sampled replies, same seeds): mean reward {:+.3} -> {:+.3}, mentioning \"{TARGET}\" {:.0}% -> {:.0}%",
        EVAL_ROUNDS as usize * prompts.len(),
        eval_before.0,
        eval_after.0,
        100.0 * eval_before.1,
        100.0 * eval_after.1
    );
    let summary = serde_json::json!({
        "iterations": scores.len(),
        "train_seconds": train_time,
        "total_seconds": started.elapsed().as_secs_f64(),
        "eval_replies": EVAL_ROUNDS as usize * prompts.len(),
        "eval_reward_before": eval_before.0,
        "eval_reward_after": eval_after.0,
        "eval_mentions_before": eval_before.1,
        "eval_mentions_after": eval_after.1,
        "objective_kl_max": kls.iter().cloned().fold(f64::MIN, f64::max),
    });
    std::fs::write(out.join("summary.json"), serde_json::to_vec_pretty(&summary)?)?;

    write_svg(&out.join("curve.svg"), &scores, &kls)?;
    let saved = out.join("model");
    trainer.policy().save_pretrained(&saved, None)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        if model_dir.join(f).exists() {
            std::fs::copy(model_dir.join(f), saved.join(f))?;
        }
    }
    let greedy = serde_json::json!({"prompts": shown, "replies": after, "max_new_tokens": 32, "eos_token_id": IM_END, "pad_token_id": PAD});
    std::fs::write(out.join("greedy.json"), serde_json::to_vec_pretty(&greedy)?)?;
    println!(
        "wrote {}, {}, {}/ and greedy.json",
        stats_path.display(),
        out.join("curve.svg").display(),
        saved.display()
    );

    let python = root.join(".venv/bin/python");
    if python.exists() {
        let status = std::process::Command::new(python)
            .arg(root.join("python/ppo_check.py"))
            .arg(&saved)
            .arg(out.join("greedy.json"))
            .env("TRANSFORMERS_VERBOSITY", "error")
            .status()?;
        if !status.success() {
            bail!(
                "Python TRL did not reproduce our greedy replies from {}",
                saved.display()
            );
        }
    } else {
        println!(
            "(no .venv: run `python python/ppo_check.py {} {}` to check with TRL)",
            saved.display(),
            out.join("greedy.json").display()
        );
    }
    Ok(())
}
