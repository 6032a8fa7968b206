//! Soak: many `generate` calls in one process (a tiny GPT-2 and a tiny Llama, greedy and
//! sampled, several prompt shapes) keep the resident memory flat and the outputs the same.
//!
//! `VH_SOAK_CALLS` sets the number of calls (default 1,000, the CI run; the full soak is 10,000).
//! RSS (`VmRSS` of /proc/self/status) is sampled 20 times; the drift is measured from the end of
//! the warm-up (the first tenth of the calls) to the end. This file holds one test so that
//! nothing else runs in the process while it measures.

mod common;

use common::{write_tiny_gpt2, write_tiny_llama};
use serde_json::json;
use std::time::Instant;
use tch::Tensor;
use valuehead::{CausalLmWithValueHead, GenerateOutput, GenerationConfig, LoadOptions};

/// Largest RSS growth allowed from the end of the warm-up to the end of the CI run (1,000
/// calls, 900 measured), in KiB. The smallest per-call leak that matters, one generation's KV
/// cache (2 layers x keys and values x 3 rows x 16 positions x 16 floats = 12 KiB for these
/// models) or its output tensors, would add at least 10 MiB over 900 calls; allocator noise
/// measured here stays below 1 MiB (see docs/robustness.md). 4 MiB separates the two.
const MAX_DRIFT_KIB: i64 = 4096;

/// The process's resident set size, in KiB.
fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The prompts: left-padded batches of 1 to 3 rows, 2 to 6 tokens.
fn prompts() -> Vec<(Tensor, Tensor)> {
    vec![
        (Tensor::from_slice2(&[[5i64, 6]]), Tensor::from_slice2(&[[1i64, 1]])),
        (
            Tensor::from_slice2(&[[0i64, 0, 7, 8, 9], [10, 11, 12, 13, 14]]),
            Tensor::from_slice2(&[[0i64, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
        ),
        (
            Tensor::from_slice2(&[[0i64, 3, 4, 5, 6, 7], [0, 0, 0, 0, 8, 9], [20, 21, 22, 23, 24, 25]]),
            Tensor::from_slice2(&[[0i64, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]]),
        ),
    ]
}

/// Call `i`'s settings: models, decoding modes and prompts cycle with period 12, and a sampled
/// call's seed depends on `i % 12` only, so calls `i` and `i + 12k` must give the same output.
fn settings(i: usize, base: &GenerationConfig) -> (usize, usize, GenerationConfig) {
    let slot = i % 12;
    let sampled = slot % 4 >= 2;
    let config = GenerationConfig {
        max_new_tokens: Some(8),
        do_sample: sampled,
        temperature: 0.8,
        top_k: 20,
        top_p: 0.95,
        seed: Some(slot as u64),
        ..base.clone()
    };
    (slot % 2, slot % 3, config)
}

fn same(a: &GenerateOutput, b: &GenerateOutput) -> bool {
    a.sequences.equal(&b.sequences)
        && a.values.equal(&b.values)
        && a.logprobs.equal(&b.logprobs)
        && a.generated_mask.equal(&b.generated_mask)
}

#[test]
fn generate_soak_keeps_resident_memory_flat() {
    let calls: usize = std::env::var("VH_SOAK_CALLS").map_or(1000, |v| v.parse().unwrap());
    assert!(calls >= 100, "VH_SOAK_CALLS must be at least 100");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    write_tiny_gpt2(dirs[0].path(), json!({"n_positions": 32}));
    write_tiny_llama(dirs[1].path(), json!({}));
    let models: Vec<CausalLmWithValueHead> = dirs
        .iter()
        .map(|d| CausalLmWithValueHead::from_folder(d.path(), &LoadOptions::default()).unwrap())
        .collect();
    let bases: Vec<GenerationConfig> = models
        .iter()
        .map(|m| m.default_generation_config().unwrap())
        .collect();
    let prompts = prompts();

    let every = calls / 20;
    let warm_up = calls / 10;
    let mut first_round: Vec<GenerateOutput> = Vec::new();
    let mut samples: Vec<(usize, i64)> = vec![(0, rss_kib())];
    let started = Instant::now();
    let mut after_warm_up = None;
    for i in 0..calls {
        let (m, p, config) = settings(i, &bases[i % 12 % 2]);
        let (ids, mask) = &prompts[p];
        let out = tch::no_grad(|| models[m].generate(ids, Some(mask), &config)).unwrap();
        if i < 12 {
            first_round.push(out);
        } else {
            assert!(same(&out, &first_round[i % 12]), "call {i} differs from call {}", i % 12);
        }
        if (i + 1) % every == 0 {
            samples.push((i + 1, rss_kib()));
        }
        if i + 1 == warm_up {
            after_warm_up = Some((rss_kib(), started.elapsed()));
        }
    }
    let elapsed = started.elapsed();
    let (rss_warm, warm_time) = after_warm_up.unwrap();
    let rss_end = rss_kib();
    let measured = &samples[samples.iter().position(|(n, _)| *n >= warm_up).unwrap()..];
    let low = measured.iter().map(|(_, r)| *r).min().unwrap();
    let high = measured.iter().map(|(_, r)| *r).max().unwrap();
    println!("calls | RSS (KiB)");
    for (n, rss) in &samples {
        println!("{n:>5} | {rss}");
    }
    let per_call = |d: std::time::Duration, n: usize| d.as_secs_f64() * 1e3 / n as f64;
    println!(
        "{calls} generate calls (tiny GPT-2 and Llama, greedy and sampled, 8 new tokens, batches of 1-3): \
         {:.2} ms per call ({:.2} ms after warm-up); RSS at start {} KiB, after {warm_up} calls of warm-up {rss_warm} \
         KiB, at the end {rss_end} KiB: drift {} KiB ({:.1} B per call), range after warm-up {low}..{high} KiB",
        per_call(elapsed, calls),
        per_call(elapsed - warm_time, calls - warm_up),
        samples[0].1,
        rss_end - rss_warm,
        (rss_end - rss_warm) as f64 * 1024.0 / (calls - warm_up) as f64,
    );
    assert!(
        rss_end - rss_warm <= MAX_DRIFT_KIB,
        "RSS grew by {} KiB over {} calls after warm-up",
        rss_end - rss_warm,
        calls - warm_up
    );
}
