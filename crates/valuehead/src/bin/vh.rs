//! The `vh` command line: run value-head models on files or token ids.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};
use valuehead::cli_io::{run_forward, ForwardOutputs};
use valuehead::{load_tokenizer, parse_device, parse_dtype, GenerateOutput, LoadOptions, ValueHeadModel};

#[derive(Parser)]
#[command(
    name = "vh",
    version,
    about = "Value-head language models (TRL-compatible) on libtorch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Model folder (config.json + model.safetensors), e.g. saved by TRL's save_pretrained.
    #[arg(long)]
    model: String,
    /// Branch, tag or commit when --model is a Hub repo id.
    #[arg(long)]
    revision: Option<String>,
    /// Backbone dtype: f32, f16 or bf16 (the value head and the outputs stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A load option as TRL's from_pretrained takes it, e.g. `summary_dropout_prob=0.1`,
    /// `v_head_init_strategy=normal`, `v_head_initializer_range=0.2` (repeatable).
    #[arg(long = "option", value_name = "NAME=VALUE")]
    options: Vec<String>,
    /// A peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors, as peft or
    /// TRL save it) applied to --model; a value head saved beside it (TRL's layout) is used.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// PPO training (TRL 0.26.2's loop): runs the `vh-ppo` program built beside this one with the
    /// arguments that follow (`vh ppo --help` for them; build it with `cargo build -p vh-ppo`).
    #[command(disable_help_flag = true)]
    Ppo {
        /// Arguments for `vh-ppo`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Run one forward pass over the tensors of a safetensors file and write logits, values and loss.
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        /// Input file: `input_ids` (i64 [B,T]), optional `attention_mask`, `labels` and, for
        /// decoder-only models, `position_ids` (default 0..T for every row, as TRL's forward);
        /// for encoder-decoder models also `decoder_input_ids` and `decoder_attention_mask`.
        #[arg(long)]
        inputs: PathBuf,
        /// Output file: `logits` (f32 [B,T,V]), `values` (f32 [B,T]), `loss` (f32, with labels).
        #[arg(long)]
        out: PathBuf,
    },
    /// Score a sequence of token ids and print each token's value and log-probability.
    Score {
        #[command(flatten)]
        model: ModelArgs,
        /// Token ids, separated by spaces or commas (the encoder input for encoder-decoder models).
        #[arg(long)]
        input_ids: String,
        /// Decoder token ids, for encoder-decoder models: the sequence that is scored.
        #[arg(long)]
        decoder_input_ids: Option<String>,
    },
    /// Generate a continuation and print it with each new token's log-probability and value.
    Generate(GenerateArgs),
    /// Score sequences with a reward model (a `*ForSequenceClassification` folder) and write each
    /// row's logits and reward.
    Reward {
        #[command(flatten)]
        model: ModelArgs,
        /// Input file: `input_ids` (i64 [B,T]) and optionally `attention_mask`.
        #[arg(long)]
        inputs: PathBuf,
        /// Output file: `logits` (f32 [B, num_labels], read at each row's last non-pad token, as
        /// HF does) and `rewards` (f32 [B], the first label's logit).
        #[arg(long)]
        out: PathBuf,
    },
    /// Upload a model folder to a Hub repo (created when missing), in one commit. HF_ENDPOINT
    /// and HF_TOKEN apply; the token is never printed.
    Push {
        /// The model folder (checked to load before anything is sent).
        #[arg(long)]
        model: PathBuf,
        /// The target repo, namespace/name.
        #[arg(long)]
        repo_id: String,
        /// Create the repo as private.
        #[arg(long)]
        private: bool,
        /// The branch to commit to (default main).
        #[arg(long)]
        revision: Option<String>,
        /// The commit message.
        #[arg(long)]
        message: Option<String>,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text, encoded with the folder's tokenizer.json.
    #[arg(long, required_unless_present = "inputs", conflicts_with = "inputs")]
    prompt: Option<String>,
    /// Format the prompt as a user message with the folder's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Prompt token ids instead: a safetensors file with `input_ids` (i64 [B,T], left-padded for
    /// decoder-only models), optionally `attention_mask` and, for encoder-decoder models, a
    /// decoder prompt `decoder_input_ids` (continued as HF's generate does).
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Tokens to generate at most (default: the model's generation config).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// End-of-sequence tokens are forbidden until this many tokens are generated.
    #[arg(long)]
    min_new_tokens: Option<usize>,
    /// Sample instead of decoding greedily.
    #[arg(long)]
    do_sample: bool,
    /// Sampling temperature (> 0).
    #[arg(long)]
    temperature: Option<f64>,
    /// Sample from the k most likely tokens (0 = all).
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample from the most likely tokens whose probability reaches p, in (0, 1].
    #[arg(long)]
    top_p: Option<f64>,
    /// Penalty (> 0, 1 = none) on tokens already in the sequence.
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Seed of the sampler.
    #[arg(long)]
    seed: Option<u64>,
    /// How decode steps run: `eager` (growing cache), `static` (static cache) or `graphs`
    /// (static cache replayed as a CUDA graph; elsewhere as `static`). Same tokens for all.
    #[arg(long, default_value = "eager", value_parser = parse_decoding)]
    decoding: valuehead::Decoding,
    /// Check whether every row has finished every this many tokens (0 = never; each check waits
    /// for the GPU). The output is the same.
    #[arg(long, default_value_t = 1)]
    stop_check_interval: usize,
    /// Write `sequences` (i64), `values` and `logprobs` (f32, per generated token) and
    /// `generated_mask` (bool) to this safetensors file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Loads `--model` (a folder, or a Hub repo id fetched through the HF cache: HF_ENDPOINT,
/// HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply) and returns it with its local folder.
fn load(args: &ModelArgs) -> Result<(ValueHeadModel, PathBuf)> {
    let mut options = LoadOptions::from_pairs(args.options.iter().map(String::as_str))?;
    options.dtype = parse_dtype(&args.dtype)?;
    options.device = parse_device(&args.device)?;
    if args.revision.is_some() {
        options.hub.revision = args.revision.clone();
    }
    let folder = vh_hub::resolve_model(&args.model, &options.hub).with_context(|| format!("finding {}", args.model))?;
    let model = match &args.adapter {
        None => ValueHeadModel::from_folder(&folder, &options),
        Some(adapter) => ValueHeadModel::from_folder_with_adapter(&folder, adapter, &options),
    }
    .with_context(|| format!("loading the model from {}", folder.display()))?;
    Ok((model, folder))
}

/// Refuses an output path that is a device node, FIFO or folder, or that is one of the files
/// the command reads (its input file, or any file of the model folder).
fn check_output(out: &Path, inputs: &[&Path], model_folder: &Path) -> Result<()> {
    vh_hub::files::check_output_path(out)?;
    let mut read: Vec<PathBuf> = inputs.iter().map(|p| p.to_path_buf()).collect();
    read.extend(vh_hub::files::files_in(model_folder));
    vh_hub::files::check_not_an_input(out, &read)?;
    Ok(())
}

fn forward(model: &ModelArgs, inputs: &Path, out: &Path) -> Result<()> {
    vh_hub::files::check_output_path(out)?;
    let (vh, folder) = load(model)?;
    check_output(out, &[inputs], &folder)?;
    valuehead::cli_io::forward_file(&vh, inputs, out).with_context(|| format!("running {}", inputs.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn reward(args: &ModelArgs, inputs: &Path, out: &Path) -> Result<()> {
    if args.adapter.is_some() {
        bail!("--adapter is for value-head models (forward, score, generate); reward adapters are not supported by `vh reward`");
    }
    vh_hub::files::check_output_path(out)?;
    let mut options = LoadOptions::from_pairs(args.options.iter().map(String::as_str))?;
    options.dtype = parse_dtype(&args.dtype)?;
    options.device = parse_device(&args.device)?;
    if args.revision.is_some() {
        options.hub.revision = args.revision.clone();
    }
    let folder = vh_hub::resolve_model(&args.model, &options.hub).with_context(|| format!("finding {}", args.model))?;
    check_output(out, &[inputs], &folder)?;
    let model = valuehead::SequenceClassifier::from_folder(&folder, &options)
        .with_context(|| format!("loading the reward model from {}", folder.display()))?;
    let tensors: HashMap<String, Tensor> = vh_hub::read_safetensors(inputs)?.into_iter().collect();
    let known = ["input_ids", "attention_mask"];
    if let Some(other) = tensors.keys().find(|k| !known.contains(&k.as_str())) {
        bail!("{}: unexpected tensor `{other}` (expected {known:?})", inputs.display());
    }
    let input_ids = tensors.get("input_ids").context("the inputs have no `input_ids`")?;
    let scored = tch::no_grad(|| model.forward(input_ids, tensors.get("attention_mask")))
        .with_context(|| format!("scoring {}", inputs.display()))?;
    vh_hub::write_safetensors(
        out,
        &[
            ("logits".to_string(), scored.logits),
            ("rewards".to_string(), scored.rewards),
        ],
    )?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn parse_ids(text: &str) -> Result<Vec<i64>> {
    let ids = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<i64>().with_context(|| format!("`{s}` is not a token id")))
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("no token ids given");
    }
    Ok(ids)
}

fn score(model: &ModelArgs, input_ids: &str, decoder_input_ids: Option<&str>) -> Result<()> {
    let (vh, _) = load(model)?;
    let mut inputs = HashMap::from([(
        "input_ids".to_string(),
        Tensor::from_slice(&parse_ids(input_ids)?).unsqueeze(0),
    )]);
    let scored = match (&vh, decoder_input_ids) {
        (ValueHeadModel::Seq2Seq(_), Some(text)) => {
            let ids = parse_ids(text)?;
            inputs.insert("decoder_input_ids".to_string(), Tensor::from_slice(&ids).unsqueeze(0));
            ids
        }
        (ValueHeadModel::Seq2Seq(_), None) => bail!("encoder-decoder models need --decoder-input-ids to score"),
        (ValueHeadModel::Causal(_), Some(_)) => bail!("--decoder-input-ids is for encoder-decoder models"),
        (ValueHeadModel::Causal(_), None) => parse_ids(input_ids)?,
    };
    let ForwardOutputs { logits, values, .. } = run_forward(&vh, &inputs)?;
    let logprobs = logits.log_softmax(-1, Kind::Float);
    println!("model: {}", model.model);
    println!("{:>4}  {:>8}  {:>12}  {:>10}", "pos", "token", "log p(token)", "value");
    for (t, id) in scored.iter().enumerate() {
        let value = values.double_value(&[0, t as i64]);
        let logprob = if t == 0 {
            "-".to_string()
        } else {
            format!("{:.4}", logprobs.double_value(&[0, t as i64 - 1, *id]))
        };
        println!("{t:>4}  {id:>8}  {logprob:>12}  {value:>10.4}");
    }
    Ok(())
}

fn generate(args: &GenerateArgs) -> Result<()> {
    if let Some(out) = &args.out {
        vh_hub::files::check_output_path(out)?;
    }
    let (vh, folder) = load(&args.model)?;
    if let Some(out) = &args.out {
        let inputs: Vec<&Path> = args.inputs.iter().map(PathBuf::as_path).collect();
        check_output(out, &inputs, &folder)?;
    }
    let tokenizer = load_tokenizer(&folder)?;
    let mut decoder_input_ids = None;
    let (input_ids, attention_mask) = match (&args.prompt, &args.inputs) {
        (Some(prompt), _) => {
            let tokenizer = tokenizer.as_ref().with_context(|| {
                format!(
                    "{} has no tokenizer.json: pass token ids with --inputs",
                    folder.display()
                )
            })?;
            // A chat-formatted prompt already holds its special tokens, as with HF's apply_chat_template.
            let (text, add_special_tokens) = if args.chat {
                let messages = [valuehead::Message::user(prompt.as_str())];
                (valuehead::apply_chat_template(&folder, &messages, true)?, false)
            } else {
                (prompt.clone(), true)
            };
            let encoding = tokenizer
                .encode(text.as_str(), add_special_tokens)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            let ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i as i64).collect();
            if ids.is_empty() {
                bail!("the prompt encodes to no tokens");
            }
            (Tensor::from_slice(&ids).unsqueeze(0), None)
        }
        (None, Some(path)) => {
            let mut tensors: HashMap<String, Tensor> = vh_hub::read_safetensors(path)?.into_iter().collect();
            // Anything else would be silently ignored.
            let known = ["input_ids", "attention_mask", "decoder_input_ids"];
            if let Some(other) = tensors.keys().find(|k| !known.contains(&k.as_str())) {
                bail!(
                    "{}: unexpected tensor `{other}` (generate takes {known:?})",
                    path.display()
                );
            }
            let ids = tensors
                .remove("input_ids")
                .with_context(|| format!("{} has no `input_ids`", path.display()))?;
            decoder_input_ids = tensors.remove("decoder_input_ids");
            (ids, tensors.remove("attention_mask"))
        }
        (None, None) => bail!("give --prompt or --inputs"),
    };
    let mut config = vh.default_generation_config()?;
    config.max_new_tokens = args.max_new_tokens.or(config.max_new_tokens);
    config.min_new_tokens = args.min_new_tokens.unwrap_or(config.min_new_tokens);
    config.do_sample |= args.do_sample;
    config.temperature = args.temperature.unwrap_or(config.temperature);
    config.top_k = args.top_k.unwrap_or(config.top_k);
    config.top_p = args.top_p.unwrap_or(config.top_p);
    config.repetition_penalty = args.repetition_penalty.unwrap_or(config.repetition_penalty);
    config.seed = args.seed.or(config.seed);
    config.decoding = args.decoding;
    config.stop_check_interval = args.stop_check_interval;
    let start = std::time::Instant::now();
    let out =
        tch::no_grad(|| vh.generate_from(&input_ids, attention_mask.as_ref(), decoder_input_ids.as_ref(), &config))?;
    let seconds = start.elapsed().as_secs_f64();
    print_generation(&out, tokenizer.as_ref(), seconds)?;
    if let Some(path) = &args.out {
        vh_hub::write_safetensors(
            path,
            &[
                ("sequences".to_string(), out.sequences.shallow_clone()),
                ("values".to_string(), out.values.shallow_clone()),
                ("logprobs".to_string(), out.logprobs.shallow_clone()),
                ("generated_mask".to_string(), out.generated_mask.shallow_clone()),
            ],
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Prints each row's text (when there is a tokenizer) and a table of its new tokens.
fn print_generation(out: &GenerateOutput, tokenizer: Option<&tokenizers::Tokenizer>, seconds: f64) -> Result<()> {
    let tokens: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&out.new_tokens)?;
    let values: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(&out.values.to_kind(Kind::Double))?;
    let logprobs: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(&out.logprobs.to_kind(Kind::Double))?;
    let kept: Vec<Vec<bool>> = Vec::<Vec<bool>>::try_from(&out.generated_mask)?;
    let mut generated = 0usize;
    for (row, ids) in tokens.iter().enumerate() {
        let real: Vec<u32> = ids
            .iter()
            .zip(&kept[row])
            .filter(|(_, k)| **k)
            .map(|(id, _)| *id as u32)
            .collect();
        generated += real.len();
        if let Some(tok) = tokenizer {
            let text = tok.decode(&real, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
            println!("[{row}] {text}");
        }
        println!(
            "{:>5}  {:>8}  {:<16}  {:>10}  {:>10}",
            "step", "token", "text", "log-prob", "value"
        );
        for (t, id) in ids.iter().enumerate() {
            if !kept[row][t] {
                break;
            }
            let text = match tokenizer {
                Some(tok) => tok
                    .decode(&[*id as u32], false)
                    .map_err(|e| anyhow::anyhow!("decoding: {e}"))?,
                None => String::new(),
            };
            let text = format!("{text:?}");
            println!(
                "{t:>5}  {id:>8}  {:<16}  {:>10.4}  {:>10.4}",
                text, logprobs[row][t], values[row][t]
            );
        }
    }
    // The prompt pass and the decode steps apart: decoding speed is what a longer reply gets.
    let t = &out.timings;
    let batch = tokens.len();
    println!(
        "{generated} tokens in {seconds:.2} s: prompt pass {:.3} s, then {} decode steps at {:.1} tokens/s",
        t.prompt.as_secs_f64(),
        t.decode_steps,
        t.decode_tokens_per_second(batch)
    );
    Ok(())
}

fn push(
    model: &PathBuf,
    repo_id: &str,
    private: bool,
    revision: Option<String>,
    message: Option<String>,
) -> Result<()> {
    ValueHeadModel::from_folder(model, &LoadOptions::default())
        .with_context(|| format!("{} does not load as a model folder", model.display()))?;
    let options = vh_hub::PushOptions {
        private,
        revision,
        commit_message: message,
        ..Default::default()
    };
    let commit = vh_hub::push_folder(repo_id, model, &options).with_context(|| format!("pushing to {repo_id}"))?;
    println!("pushed {} to {repo_id} (commit {commit})", model.display());
    Ok(())
}

/// Runs `vh-ppo` from this program's folder. PPO lives in a crate above this one (it depends on
/// the models, the optimiser and PPO's math), so `vh` hands the subcommand to its program, as git
/// does with `git-<name>`.
fn ppo(args: &[std::ffi::OsString]) -> Result<()> {
    let exe = std::env::current_exe()?;
    let program = exe.with_file_name(format!("vh-ppo{}", std::env::consts::EXE_SUFFIX));
    if !program.exists() {
        bail!(
            "{} is not built: run `cargo build --release -p vh-ppo` (or `cargo build -p vh-ppo` for a debug vh)",
            program.display()
        );
    }
    let status = std::process::Command::new(&program).args(args).status()?;
    std::process::exit(status.code().unwrap_or(130));
}

fn main() -> Result<()> {
    // Freed tensor memory stays for reuse instead of being faulted in again on every layer
    // (see the function's doc); MALLOC_*_ environment settings take precedence.
    valuehead::keep_freed_tensor_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // The supported architectures come from the registry, so the help never goes stale.
    let supported: Vec<String> = valuehead::ARCHITECTURES
        .iter()
        .map(|a| format!("{} ({})", a.model_type, a.name))
        .collect();
    let command = <Cli as clap::CommandFactory>::command()
        .after_help(format!("Supported model_type values: {}.", supported.join(", ")));
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&command.get_matches())?;
    match &cli.command {
        Command::Ppo { args } => ppo(args),
        Command::Forward { model, inputs, out } => forward(model, inputs, out),
        Command::Score {
            model,
            input_ids,
            decoder_input_ids,
        } => score(model, input_ids, decoder_input_ids.as_deref()),
        Command::Generate(args) => generate(args),
        Command::Reward { model, inputs, out } => reward(model, inputs, out),
        Command::Push {
            model,
            repo_id,
            private,
            revision,
            message,
        } => push(model, repo_id, *private, revision.clone(), message.clone()),
    }
}

/// Parses `--decoding`.
fn parse_decoding(name: &str) -> std::result::Result<valuehead::Decoding, String> {
    match name {
        "eager" => Ok(valuehead::Decoding::Eager),
        "static" => Ok(valuehead::Decoding::StaticCache),
        "graphs" => Ok(valuehead::Decoding::CudaGraphs),
        other => Err(format!("unknown decoding `{other}` (expected eager, static or graphs)")),
    }
}
