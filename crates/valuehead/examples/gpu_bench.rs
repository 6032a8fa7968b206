//! Our side of the GPU bench (`scripts/device_bench.sh`, driven by python/gpu_bench.py): loads
//! one model folder on CUDA and times the workloads named on the command line, printing one
//! JSON object per line.
//!
//! ```text
//! gpu_bench --model DIR [--device cuda|cpu] [--dtype f32|bf16] [--reps 5] [--prompt 32] [--new 64]
//!           [--workload generate:1:eager] [--workload generate:64:graphs] [--workload forward:8:128] ...
//! ```
//!
//! `generate:B:MODE`: batch B, a `--prompt`-token prompt, `--new` greedy tokens with
//! `min_new_tokens = max_new_tokens` (so no row stops early and the loop never syncs), MODE
//! `eager` (growing cache), `static` (static cache, eager) or `graphs` (static cache, CUDA graph
//! replay). `forward:B:T`: one scoring pass (logits and values) over B x T tokens. Prompt tokens
//! are `(b * 1009 + t * 31 + 7) % vocab`, the same formula as the Python side, so the tokens can
//! be compared. Each workload: one warm-up call (captures the graph), then `--reps` timed calls,
//! each between two device synchronisations; the median is reported with the peak GPU memory
//! (libtorch's caching allocator, reset before the warm-up: the same counter as
//! `torch.cuda.max_memory_allocated`).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use valuehead::{CausalLmWithValueHead, Decoding, GenerationConfig, LoadOptions};

struct Args {
    model: String,
    device: Device,
    dtype: Kind,
    reps: usize,
    prompt: i64,
    new: usize,
    workloads: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: String::new(),
        device: Device::Cuda(0),
        dtype: Kind::Float,
        reps: 5,
        prompt: 32,
        new: 64,
        workloads: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?,
            "--device" => args.device = valuehead::parse_device(&value()?)?,
            "--dtype" => args.dtype = valuehead::parse_dtype(&value()?)?,
            "--reps" => args.reps = value()?.parse()?,
            "--prompt" => args.prompt = value()?.parse()?,
            "--new" => args.new = value()?.parse()?,
            "--workload" => args.workloads.push(value()?),
            other => bail!("unknown argument {other}"),
        }
    }
    if args.model.is_empty() || args.workloads.is_empty() || args.reps == 0 {
        bail!("usage: gpu_bench --model DIR [--dtype f32|bf16] [--reps N] --workload KIND:... [...]");
    }
    Ok(args)
}

/// The shared prompt formula: `(b * 1009 + t * 31 + 7) % vocab`, i64 [batch, len].
fn prompt(batch: i64, len: i64, vocab: i64) -> Tensor {
    let ids: Vec<i64> = (0..batch)
        .flat_map(|b| (0..len).map(move |t| (b * 1009 + t * 31 + 7) % vocab))
        .collect();
    Tensor::from_slice(&ids).reshape([batch, len])
}

/// Waits for the device's queued work (nothing to wait for on CPU).
fn sync(device: Device) -> Result<()> {
    if let Device::Cuda(i) = device {
        vh_cuda_graph::synchronize(i)?;
    }
    Ok(())
}

/// Median, min and max of `reps` timed runs of `f` in milliseconds.
fn time(device: Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        sync(device)?;
        let started = Instant::now();
        f()?;
        sync(device)?;
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    Ok((samples[samples.len() / 2], samples[0], samples[samples.len() - 1]))
}

fn run(args: &Args) -> Result<()> {
    let device = args.device;
    let options = LoadOptions {
        device,
        dtype: args.dtype,
        ..LoadOptions::default()
    };
    let started = Instant::now();
    let model = CausalLmWithValueHead::from_folder(&args.model, &options).context("loading the model")?;
    let load_s = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"event": "loaded", "model": args.model, "load_s": load_s, "graphs": vh_cuda_graph::is_available(),
               "graphs_unavailable": vh_cuda_graph::unavailable_reason()})
    );
    for workload in &args.workloads {
        // A workload that fails is reported and the others still run.
        if let Err(e) = run_workload(args, &model, workload) {
            println!("{}", json!({"workload": workload, "error": format!("{e:#}")}));
        }
    }
    Ok(())
}

fn run_workload(args: &Args, model: &CausalLmWithValueHead, workload: &str) -> Result<()> {
    let device = args.device;
    let cuda = match device {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    let vocab = model.vocab_size();
    {
        let parts: Vec<&str> = workload.split(':').collect();
        if let Some(i) = cuda {
            vh_cuda_graph::reset_peak_memory(i)?;
        }
        let result = match parts.as_slice() {
            ["generate", batch, mode] => {
                let batch: i64 = batch.parse()?;
                let decoding = match *mode {
                    "eager" => Decoding::Eager,
                    "static" => Decoding::StaticCache,
                    "graphs" => Decoding::CudaGraphs,
                    other => bail!("unknown decoding {other}"),
                };
                let ids = prompt(batch, args.prompt, vocab).to_device(device);
                let mask = Tensor::ones([batch, args.prompt], (Kind::Int64, device));
                let config = GenerationConfig {
                    max_new_tokens: Some(args.new),
                    min_new_tokens: args.new,
                    decoding,
                    ..model.default_generation_config()?
                };
                let config = GenerationConfig {
                    do_sample: false,
                    repetition_penalty: 1.0,
                    ..config
                };
                let warm = tch::no_grad(|| model.generate(&ids, Some(&mask), &config))?;
                let tokens: Vec<i64> = Vec::<i64>::try_from(warm.new_tokens.get(0).to_device(Device::Cpu))?;
                let mut syncs = 0;
                let (ms, min, max) = time(device, args.reps, || {
                    tch::no_grad(|| model.generate(&ids, Some(&mask), &config))?;
                    syncs = valuehead::last_generate_host_syncs();
                    Ok(())
                })?;
                json!({"ms": ms, "min_ms": min, "max_ms": max, "tokens": tokens, "host_syncs": syncs})
            }
            ["forward", batch, len] => {
                let (batch, len): (i64, i64) = (batch.parse()?, len.parse()?);
                let ids = prompt(batch, len, vocab).to_device(device);
                let mask = Tensor::ones([batch, len], (Kind::Int64, device));
                tch::no_grad(|| model.forward(&ids, Some(&mask), None, None))?;
                let (ms, min, max) = time(device, args.reps, || {
                    tch::no_grad(|| model.forward(&ids, Some(&mask), None, None))?;
                    Ok(())
                })?;
                json!({"ms": ms, "min_ms": min, "max_ms": max})
            }
            _ => bail!("unknown workload {workload}"),
        };
        let (peak_allocated, peak_reserved) = match cuda {
            Some(i) => vh_cuda_graph::peak_memory(i)?,
            None => (0, 0),
        };
        let mut line = result;
        line["workload"] = json!(workload);
        line["peak_allocated_mb"] = json!(peak_allocated as f64 / (1u64 << 20) as f64);
        line["peak_reserved_mb"] = json!(peak_reserved as f64 / (1u64 << 20) as f64);
        println!("{line}");
    }
    Ok(())
}

fn main() {
    let result = parse_args().and_then(|args| run(&args));
    if let Err(e) = result {
        println!("{}", json!({"event": "error", "error": format!("{e:#}")}));
        std::process::exit(1);
    }
}
