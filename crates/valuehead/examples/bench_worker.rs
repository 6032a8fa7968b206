//! The Rust side of `cargo xtask bench`, speaking the same line protocol as
//! python/bench_worker.py (one JSON object per line on stdin, one reply per line on stdout):
//! `init`, `load`, `prepare`, `run`, `rss`, plus `bandwidth` (memory read speed).
//!
//! Every pass runs under `no_grad` with the model in eval mode, as the Python side runs under
//! `inference_mode`, except the `train` task: one step in train mode (forward with labels, LM
//! loss + 0.5 * value MSE, backward, AdamW with HF's decay groups), as the Python side.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::time::Instant;
use tch::{Kind, Tensor};
use valuehead::{GenerationConfig, LoadOptions, ValueHeadModel};

/// The optimiser and targets of the `train` task.
struct Training {
    optimizer: vh_train::AdamW,
    value_targets: Tensor,
    first_lm_loss: Option<f64>,
}

struct Task {
    kind: String,
    training: Option<std::cell::RefCell<Training>>,
    input_ids: Tensor,
    attention_mask: Tensor,
    decoder_input_ids: Option<Tensor>,
    generation: GenerationConfig,
    /// The `reward` task's model: AutoModelForSequenceClassification of the loaded folder, one
    /// label, its `score` the value head's weight (the same on both sides).
    reward_model: Option<valuehead::SequenceClassifier>,
    /// The `lora` task's model: the loaded folder with a fresh LoRA adapter (r=16, every linear
    /// layer), trained instead of the full model.
    lora_model: Option<valuehead::CausalLmWithValueHead>,
}

#[derive(Default)]
struct Worker {
    model: Option<ValueHeadModel>,
    task: Option<Task>,
    /// The loaded folder and its options (the reward task loads it again as a classifier).
    loaded: Option<(String, LoadOptions)>,
}

/// The loaded value-head folder as a one-label sequence classifier, as the Python worker builds
/// it: `score.weight` = `v_head.summary.weight`, pad token = eos when the config has none.
fn reward_model(dir: &str, options: &LoadOptions) -> Result<valuehead::SequenceClassifier> {
    let folder = vh_hub::ModelFolder::open(std::path::Path::new(dir))?;
    let mut config = folder.config()?;
    if config.get("pad_token_id").is_none_or(Value::is_null) {
        config["pad_token_id"] = config["eos_token_id"].clone();
    }
    config["num_labels"] = json!(1);
    if let Some(map) = config.as_object_mut() {
        map.remove("id2label");
        map.remove("label2id");
    }
    let mut tensors = Vec::new();
    for (name, t) in folder.tensors()? {
        if name == "v_head.summary.weight" {
            tensors.push(("score.weight".to_string(), t));
        } else if !name.starts_with("v_head.") {
            tensors.push((name, t));
        }
    }
    if !tensors.iter().any(|(name, _)| name == "score.weight") {
        // No value head in the folder (SmolLM2): the fixed pattern python/bench_worker.py's
        // `score_weight` uses, w[j] = ((j % 7) - 3) / (10 * hidden).
        let hidden = config["hidden_size"]
            .as_i64()
            .or_else(|| config["n_embd"].as_i64())
            .context("the config's hidden size")?;
        let j = Tensor::arange(hidden, (Kind::Double, tch::Device::Cpu));
        let w = (j.fmod(7) - 3.0) / (10.0 * hidden as f64);
        tensors.push(("score.weight".to_string(), w.to_kind(Kind::Float).reshape([1, hidden])));
    }
    Ok(valuehead::SequenceClassifier::from_parts(config, tensors, options)?)
}

fn ids(value: &Value, key: &str) -> Result<Tensor> {
    let rows: Vec<Vec<i64>> = serde_json::from_value(value.get(key).cloned().context(key.to_string())?)?;
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_slice(&flat).reshape([rows.len() as i64, width as i64]))
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<i64>>> {
    Ok(Vec::<Vec<i64>>::try_from(t.to_kind(Kind::Int64))?)
}

/// The last position's logits of the first row, to compare precisions and sides.
fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        logits.f_get(0)?.f_get(-1)?.f_to_kind(Kind::Float)?,
    )?)
}

fn sum(t: &Tensor) -> Result<f64> {
    Ok(t.f_to_kind(Kind::Double)?.f_sum(Kind::Double)?.f_double_value(&[])?)
}

/// Bytes of weights one decode step reads: every parameter except those the architecture
/// reports as lookup-only (position tables, an untied input embedding, an encoder that runs once
/// per prompt).
fn decode_bytes(model: &ValueHeadModel) -> i64 {
    let vs = match model {
        ValueHeadModel::Causal(m) => m.var_store(),
        ValueHeadModel::Seq2Seq(m) => m.var_store(),
    };
    let lookup_only = |name: &str| match model {
        ValueHeadModel::Causal(m) => m.backbone().is_lookup_only(name),
        ValueHeadModel::Seq2Seq(m) => m.model().is_lookup_only(name),
    };
    vh_core::state::state_dict(vs)
        .iter()
        .filter(|(name, _)| !lookup_only(name))
        .map(|(_, t)| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
        .sum()
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
    fn model(&self) -> Result<&ValueHeadModel> {
        self.model.as_ref().ok_or_else(|| anyhow!("no model loaded"))
    }

    fn load(&mut self, request: &Value) -> Result<Value> {
        self.model = None;
        let dir = request["dir"].as_str().context("dir")?;
        let options = LoadOptions {
            dtype: match request["dtype"].as_str() {
                Some("f32") => Kind::Float,
                Some("bf16") => Kind::BFloat16,
                other => bail!("unknown dtype {other:?}"),
            },
            ..Default::default()
        };
        let model = ValueHeadModel::from_folder(dir, &options)?;
        let bytes = decode_bytes(&model);
        self.model = Some(model);
        self.loaded = Some((dir.to_string(), options));
        Ok(json!({"decode_bytes": bytes}))
    }

    fn prepare(&mut self, task: &Value) -> Result<()> {
        // The previous task's optimiser state goes before this task's peak RSS is measured.
        self.task = None;
        let input_ids = ids(task, "input_ids")?;
        let attention_mask = input_ids.ones_like();
        let decoder_input_ids = task
            .get("decoder_input_ids")
            .map(|_| ids(task, "decoder_input_ids"))
            .transpose()?;
        let mut generation = match self.model()? {
            ValueHeadModel::Causal(m) => m.default_generation_config()?,
            ValueHeadModel::Seq2Seq(m) => m.default_generation_config()?,
        };
        if let Some(n) = task.get("max_new_tokens").and_then(Value::as_u64) {
            generation.max_new_tokens = Some(n as usize);
            generation.min_new_tokens = n as usize;
        }
        generation.do_sample = false;
        let kind = task["type"].as_str().context("type")?.to_string();
        let train = kind == "train" || kind == "lora";
        let mut lora_model = if kind == "lora" {
            let (dir, options) = self.loaded.as_ref().context("no model loaded")?;
            let config = valuehead::LoraConfig::from_json(&json!({
                "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM"
            }))?;
            Some(valuehead::CausalLmWithValueHead::with_new_adapter(
                dir, &config, options,
            )?)
        } else {
            None
        };
        let reward_model = if kind == "reward" {
            let (dir, options) = self.loaded.as_ref().context("no model loaded")?;
            Some(reward_model(dir, options)?)
        } else {
            None
        };
        let model = self.model.as_mut().ok_or_else(|| anyhow!("no model loaded"))?;
        let training = match model {
            _ if lora_model.is_some() => {
                let m = lora_model.as_mut().expect("checked");
                m.set_train(true);
                let config = vh_train::AdamWConfig {
                    lr: 1e-5,
                    weight_decay: 0.01,
                    ..Default::default()
                };
                Some(std::cell::RefCell::new(Training {
                    optimizer: vh_train::AdamW::hf(m.var_store(), config)?,
                    value_targets: input_ids.zeros_like().to_kind(Kind::Float),
                    first_lm_loss: None,
                }))
            }
            ValueHeadModel::Causal(m) => {
                m.set_train(train);
                if train {
                    let config = vh_train::AdamWConfig {
                        lr: 1e-5,
                        weight_decay: 0.01,
                        ..Default::default()
                    };
                    Some(std::cell::RefCell::new(Training {
                        optimizer: vh_train::AdamW::hf(m.var_store(), config)?,
                        value_targets: input_ids.zeros_like().to_kind(Kind::Float),
                        first_lm_loss: None,
                    }))
                } else {
                    None
                }
            }
            ValueHeadModel::Seq2Seq(m) => {
                m.set_train(false);
                if train {
                    bail!("the train task is for causal models");
                }
                None
            }
        };
        self.task = Some(Task {
            training,
            kind,
            input_ids,
            attention_mask,
            decoder_input_ids,
            generation,
            reward_model,
            lora_model,
        });
        std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")?;
        self.run_once()?;
        Ok(())
    }

    /// One training step: forward with labels, LM + value loss, backward, AdamW, zero grad.
    fn train_step(task: &Task, model: &ValueHeadModel) -> Result<Value> {
        let m = match (&task.lora_model, model) {
            (Some(lora), _) => lora,
            (None, ValueHeadModel::Causal(m)) => m,
            _ => bail!("the train task is for causal models"),
        };
        let mut training = task.training.as_ref().context("train task not prepared")?.borrow_mut();
        let out = m.forward(&task.input_ids, Some(&task.attention_mask), None, Some(&task.input_ids))?;
        let lm_loss = out.loss.context("no loss")?;
        let terms = vh_train::lm_value_loss(
            &lm_loss,
            &out.values,
            &training.value_targets,
            &task.attention_mask,
            0.5,
        )?;
        vh_train::backward(&terms.total)?;
        training.optimizer.step()?;
        training.optimizer.zero_grad()?;
        let lm = terms.lm_loss.f_double_value(&[])?;
        let first = *training.first_lm_loss.get_or_insert(lm);
        Ok(json!({"loss": terms.total.f_double_value(&[])?, "lm_loss": lm, "first_lm_loss": first}))
    }

    fn run_once(&self) -> Result<Value> {
        let task = self.task.as_ref().ok_or_else(|| anyhow!("no task prepared"))?;
        let model = self.model()?;
        if task.kind == "train" || task.kind == "lora" {
            return Self::train_step(task, model);
        }
        tch::no_grad(|| -> Result<Value> {
            match (task.kind.as_str(), model) {
                ("forward", ValueHeadModel::Causal(m)) => {
                    let out = m.forward(&task.input_ids, Some(&task.attention_mask), None, None)?;
                    Ok(json!({"values_sum": sum(&out.values)?, "last_logits": last_logits(&out.logits)?}))
                }
                ("forward", ValueHeadModel::Seq2Seq(m)) => {
                    let out = m.forward(
                        Some(&task.input_ids),
                        Some(&task.attention_mask),
                        task.decoder_input_ids.as_ref(),
                        None,
                        None,
                        None,
                        None,
                    )?;
                    Ok(json!({"values_sum": sum(&out.values)?, "last_logits": last_logits(&out.logits)?}))
                }
                // Our generate returns values and log-probs from the decoding passes themselves,
                // so generation and the rollout are the same call.
                ("generate" | "rollout", _) => {
                    let out = model.generate(&task.input_ids, Some(&task.attention_mask), &task.generation)?;
                    let mut check = json!({"tokens": to_rows(&out.new_tokens)?});
                    if task.kind == "rollout" {
                        check["logprobs_sum"] = json!(sum(&out.logprobs)?);
                        check["values_sum"] = json!(sum(&out.values)?);
                    }
                    Ok(check)
                }
                ("reward", _) => {
                    let rm = task.reward_model.as_ref().context("reward task not prepared")?;
                    let out = rm.forward(&task.input_ids, Some(&task.attention_mask))?;
                    Ok(json!({"rewards_sum": sum(&out.rewards)?}))
                }
                (other, _) => bail!("unknown task type {other}"),
            }
        })
    }

    fn run(&self, iters: u64) -> Result<Value> {
        let start = Instant::now();
        let mut check = Value::Null;
        for _ in 0..iters.max(1) {
            check = self.run_once()?;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
        Ok(json!({"ms": ms, "check": check}))
    }
}

/// Read bandwidth in GB/s: the best of several sums over a buffer far larger than the caches.
fn bandwidth() -> Result<Value> {
    let buffer = Tensor::f_ones([1 << 27], (Kind::Float, tch::Device::Cpu))?;
    let bytes = (buffer.numel() * 4) as f64;
    let mut best = f64::INFINITY;
    for _ in 0..8 {
        let start = Instant::now();
        let _ = buffer.f_sum(Kind::Float)?.f_double_value(&[])?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(json!({"gb_per_s": bytes / best / 1e9}))
}

fn handle(worker: &mut Worker, request: &Value) -> Result<Value> {
    match request["cmd"].as_str().unwrap_or_default() {
        "init" => {
            let threads = request["threads"].as_i64().context("threads")?;
            tch::set_num_threads(threads as i32);
            tch::set_num_interop_threads(1);
            Ok(json!({"versions": {"valuehead": env!("CARGO_PKG_VERSION")}}))
        }
        "load" => worker.load(request),
        "prepare" => worker.prepare(&request["task"]).map(|_| json!({})),
        "run" => worker.run(request["iters"].as_u64().unwrap_or(1)),
        "rss" => Ok(json!({"peak_rss_mb": peak_rss_mb()?})),
        "bandwidth" => bandwidth(),
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
