//! The `vh` command line: run value-head models on files or token ids.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};
use valuehead::{parse_device, parse_dtype, CausalLmWithValueHead, LoadOptions};

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
    model: PathBuf,
    /// Backbone dtype: f32, f16 or bf16 (the value head and the outputs stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run one forward pass over the tensors of a safetensors file and write logits, values and loss.
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        /// Input file: `input_ids` (i64 [B,T]), optional `attention_mask` and `labels`.
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
        /// Token ids, separated by spaces or commas.
        #[arg(long)]
        input_ids: String,
    },
}

fn load(args: &ModelArgs) -> Result<CausalLmWithValueHead> {
    let options = LoadOptions {
        dtype: parse_dtype(&args.dtype)?,
        device: parse_device(&args.device)?,
        ..Default::default()
    };
    CausalLmWithValueHead::from_folder(&args.model, &options)
        .with_context(|| format!("loading the model from {}", args.model.display()))
}

fn forward(model: &ModelArgs, inputs: &PathBuf, out: &PathBuf) -> Result<()> {
    let vh = load(model)?;
    let mut tensors: HashMap<String, Tensor> = vh_hub::read_safetensors(inputs)?.into_iter().collect();
    let known = ["input_ids", "attention_mask", "labels"];
    if let Some(other) = tensors.keys().find(|k| !known.contains(&k.as_str())) {
        bail!("{}: unexpected tensor `{other}` (expected {known:?})", inputs.display());
    }
    let input_ids = tensors
        .remove("input_ids")
        .with_context(|| format!("{} has no `input_ids`", inputs.display()))?;
    let attention_mask = tensors.remove("attention_mask");
    let labels = tensors.remove("labels");
    let output = tch::no_grad(|| vh.forward(&input_ids, attention_mask.as_ref(), None, labels.as_ref()))?;
    let mut written = vec![
        ("logits".to_string(), output.logits),
        ("values".to_string(), output.values),
    ];
    if let Some(loss) = output.loss {
        written.push(("loss".to_string(), loss));
    }
    vh_hub::write_safetensors(out, &written)?;
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

fn score(model: &ModelArgs, input_ids: &str) -> Result<()> {
    let vh = load(model)?;
    let ids = parse_ids(input_ids)?;
    let input = Tensor::from_slice(&ids).unsqueeze(0);
    let output = tch::no_grad(|| vh.forward(&input, None, None, None))?;
    let logprobs = output.logits.log_softmax(-1, Kind::Float);
    println!("model: {}", model.model.display());
    println!("{:>4}  {:>8}  {:>12}  {:>10}", "pos", "token", "log p(token)", "value");
    for (t, id) in ids.iter().enumerate() {
        let value = output.values.double_value(&[0, t as i64]);
        let logprob = if t == 0 {
            "-".to_string()
        } else {
            format!("{:.4}", logprobs.double_value(&[0, t as i64 - 1, *id]))
        };
        println!("{t:>4}  {id:>8}  {logprob:>12}  {value:>10.4}");
    }
    Ok(())
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match &cli.command {
        Command::Forward { model, inputs, out } => forward(model, inputs, out),
        Command::Score { model, input_ids } => score(model, input_ids),
    }
}
