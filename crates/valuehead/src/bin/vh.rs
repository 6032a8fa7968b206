//! The `vh` command line: run value-head models on files or token ids.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};
use valuehead::{parse_device, parse_dtype, LoadOptions, ValueHeadModel};

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
        /// Input file: `input_ids` (i64 [B,T]), optional `attention_mask` and `labels`; for
        /// encoder-decoder models also `decoder_input_ids` and `decoder_attention_mask`.
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
}

fn load(args: &ModelArgs) -> Result<ValueHeadModel> {
    let options = LoadOptions {
        dtype: parse_dtype(&args.dtype)?,
        device: parse_device(&args.device)?,
        ..Default::default()
    };
    ValueHeadModel::from_folder(&args.model, &options)
        .with_context(|| format!("loading the model from {}", args.model.display()))
}

/// (logits, values, loss) of one forward pass.
type Outputs = (Tensor, Tensor, Option<Tensor>);

fn run_forward(model: &ValueHeadModel, inputs: &HashMap<String, Tensor>) -> Result<Outputs> {
    let input_ids = inputs.get("input_ids").context("the inputs have no `input_ids`")?;
    let get = |name: &str| inputs.get(name);
    Ok(tch::no_grad(|| -> Result<Outputs> {
        Ok(match model {
            ValueHeadModel::Causal(m) => {
                if let Some(extra) = ["decoder_input_ids", "decoder_attention_mask"]
                    .iter()
                    .find(|n| get(n).is_some())
                {
                    bail!("`{extra}` is for encoder-decoder models; this model is decoder-only");
                }
                let out = m.forward(input_ids, get("attention_mask"), None, get("labels"))?;
                (out.logits, out.values, out.loss)
            }
            ValueHeadModel::Seq2Seq(m) => {
                let out = m.forward(
                    Some(input_ids),
                    get("attention_mask"),
                    get("decoder_input_ids"),
                    get("decoder_attention_mask"),
                    None,
                    None,
                    get("labels"),
                )?;
                (out.logits, out.values, out.loss)
            }
        })
    })?)
}

fn forward(model: &ModelArgs, inputs: &PathBuf, out: &PathBuf) -> Result<()> {
    let vh = load(model)?;
    let tensors: HashMap<String, Tensor> = vh_hub::read_safetensors(inputs)?.into_iter().collect();
    let known = [
        "input_ids",
        "attention_mask",
        "labels",
        "decoder_input_ids",
        "decoder_attention_mask",
    ];
    if let Some(other) = tensors.keys().find(|k| !known.contains(&k.as_str())) {
        bail!("{}: unexpected tensor `{other}` (expected {known:?})", inputs.display());
    }
    let (logits, values, loss) = run_forward(&vh, &tensors).with_context(|| format!("running {}", inputs.display()))?;
    let mut written = vec![("logits".to_string(), logits), ("values".to_string(), values)];
    if let Some(loss) = loss {
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

fn score(model: &ModelArgs, input_ids: &str, decoder_input_ids: Option<&str>) -> Result<()> {
    let vh = load(model)?;
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
    let (logits, values, _) = run_forward(&vh, &inputs)?;
    let logprobs = logits.log_softmax(-1, Kind::Float);
    println!("model: {}", model.model.display());
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

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match &cli.command {
        Command::Forward { model, inputs, out } => forward(model, inputs, out),
        Command::Score {
            model,
            input_ids,
            decoder_input_ids,
        } => score(model, input_ids, decoder_input_ids.as_deref()),
    }
}
