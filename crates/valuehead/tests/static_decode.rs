//! Decoding without host synchronisation and over a static cache, on CPU: the decode loop's
//! device reads are counted (none when `min_new_tokens == max_new_tokens`, at most one per step
//! otherwise), the static cache gives the growing cache's tokens and, within 1e-5, its values
//! and log-probabilities (GPT-2 eager and sdpa, Llama, Qwen2, Cohere; padded and unpadded; eos, pad and
//! min_new_tokens), `Decoding::CudaGraphs` on CPU falls back to the static cache with the same
//! numbers, checking for finished rows every k steps changes nothing, and unsupported settings
//! fall back to eager.

mod common;

use common::{max_abs_diff, write_tiny};
use serde_json::json;
use tch::{Kind, Tensor};
use valuehead::{
    last_generate_host_syncs, CausalLmWithValueHead, Decoding, GenerateOutput, GenerationConfig, LoadOptions,
};

/// The largest allowed difference of values and log-probabilities between the static and the
/// growing cache (attention sums over a longer, masked key range in another order).
const STATIC_TOLERANCE: f64 = 1e-5;

fn tiny(model_type: &str, overrides: serde_json::Value) -> (tempfile::TempDir, CausalLmWithValueHead) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(model_type, dir.path(), overrides);
    let model = CausalLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    (dir, model)
}

/// Four decoder-only architectures (Cohere for its interleaved rotary, q/k norms and
/// `logit_scale`), each with room for 64 positions, with their CPU default attention; GPT-2 also
/// with the fused kernel (its default on CUDA).
fn models() -> Vec<(&'static str, tempfile::TempDir, CausalLmWithValueHead)> {
    let mut models: Vec<_> = [
        ("gpt2", json!({"n_positions": 64})),
        ("llama", json!({})),
        ("qwen2", json!({})),
        ("cohere", json!({})),
    ]
    .into_iter()
    .map(|(name, overrides)| {
        let (dir, model) = tiny(name, overrides);
        (name, dir, model)
    })
    .collect();
    let dir = tempfile::tempdir().unwrap();
    write_tiny("gpt2", dir.path(), json!({"n_positions": 64}));
    let options = LoadOptions {
        attn_implementation: Some(valuehead::AttnImplementation::Sdpa),
        ..LoadOptions::default()
    };
    let model = CausalLmWithValueHead::from_folder(dir.path(), &options).unwrap();
    models.push(("gpt2 sdpa", dir, model));
    models
}

/// A left-padded batch [3, 6] and its mask.
fn padded_batch() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice2(&[[0i64, 0, 5, 9, 13, 21], [3, 7, 11, 17, 23, 29], [0, 12, 14, 16, 18, 20]]);
    let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]);
    (ids, mask)
}

fn greedy(max_new: usize, min_new: usize, eos: Vec<i64>) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: Some(max_new),
        min_new_tokens: min_new,
        eos_token_id: eos,
        pad_token_id: Some(0),
        ..GenerationConfig::default()
    }
}

fn generate(
    model: &CausalLmWithValueHead,
    ids: &Tensor,
    mask: Option<&Tensor>,
    config: &GenerationConfig,
) -> GenerateOutput {
    tch::no_grad(|| model.generate(ids, mask, config)).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    Vec::<Vec<i64>>::try_from(t).unwrap()
}

/// Same tokens, mask and sequences; values and log-probs within `tolerance`.
fn assert_same(what: &str, a: &GenerateOutput, b: &GenerateOutput, tolerance: f64) {
    assert_eq!(rows(&a.sequences), rows(&b.sequences), "{what}: sequences");
    assert_eq!(rows(&a.new_tokens), rows(&b.new_tokens), "{what}: new tokens");
    assert!(a.generated_mask.equal(&b.generated_mask), "{what}: generated mask");
    let values = max_abs_diff(&a.values, &b.values);
    let logprobs = max_abs_diff(&a.logprobs, &b.logprobs);
    println!("{what}: values {values:.2e}, logprobs {logprobs:.2e}");
    assert!(values <= tolerance, "{what}: values differ by {values:e}");
    assert!(logprobs <= tolerance, "{what}: log-probs differ by {logprobs:e}");
    assert_eq!(a.values.kind(), Kind::Float);
    assert_eq!(a.logprobs.kind(), Kind::Float);
}

/// An eos that row 0 produces after a few tokens when nothing stops it, and no row produces
/// first (so rows finish at different steps, not all at once).
fn early_token(model: &CausalLmWithValueHead, ids: &Tensor, mask: Option<&Tensor>) -> i64 {
    let free = rows(&generate(model, ids, mask, &greedy(10, 0, vec![])).new_tokens);
    let firsts: Vec<i64> = free.iter().map(|row| row[0]).collect();
    free[0][1..]
        .iter()
        .copied()
        .find(|t| !firsts.contains(t))
        .unwrap_or(free[0][2])
}

#[test]
fn the_decode_loop_reads_the_device_only_for_the_stop_test() {
    for (name, _dir, model) in models() {
        let (ids, mask) = padded_batch();
        let eos = early_token(&model, &ids, Some(&mask));
        for decoding in [Decoding::Eager, Decoding::StaticCache] {
            let with = |max_new, min_new, interval| GenerationConfig {
                stop_check_interval: interval,
                decoding,
                ..greedy(max_new, min_new, vec![eos])
            };
            // min == max: no row can finish early, so nothing is read back.
            let out = generate(&model, &ids, Some(&mask), &with(12, 12, 1));
            assert_eq!(out.new_tokens.size()[1], 12);
            assert_eq!(
                last_generate_host_syncs(),
                0,
                "{name} {decoding:?}: min == max must not sync"
            );
            // No eos at all: nothing to test either.
            generate(&model, &ids, Some(&mask), &greedy(12, 0, vec![]));
            assert_eq!(last_generate_host_syncs(), 0, "{name} {decoding:?}: no eos");
            // Otherwise at most one read per generated token.
            let out = generate(&model, &ids, Some(&mask), &with(12, 0, 1));
            let steps = out.new_tokens.size()[1] as usize;
            let syncs = last_generate_host_syncs();
            println!("{name} {decoding:?}: {syncs} reads for {steps} tokens");
            assert!(
                syncs >= 1 && syncs <= steps,
                "{name} {decoding:?}: {syncs} reads for {steps} tokens"
            );
            // Reads only from min_new_tokens on.
            generate(&model, &ids, Some(&mask), &with(12, 8, 1));
            assert!(
                last_generate_host_syncs() <= 4,
                "{name} {decoding:?}: reads before min_new_tokens"
            );
            // Every 4 tokens: at most 12 / 4 reads plus one to cut the columns at the end.
            generate(&model, &ids, Some(&mask), &with(12, 0, 4));
            assert!(last_generate_host_syncs() <= 4, "{name} {decoding:?}: interval 4");
            // Never: only the read that cuts the columns.
            generate(&model, &ids, Some(&mask), &with(12, 0, 0));
            assert_eq!(last_generate_host_syncs(), 1, "{name} {decoding:?}: interval 0");
        }
    }
}

#[test]
fn the_static_cache_gives_the_growing_caches_tokens_values_and_logprobs() {
    for (name, _dir, model) in models() {
        let (padded_ids, padded_mask) = padded_batch();
        let plain_ids = Tensor::from_slice2(&[[4i64, 8, 15, 16, 23, 42], [1, 2, 3, 5, 8, 13]]);
        for (batch, ids, mask) in [
            ("padded", &padded_ids, Some(&padded_mask)),
            ("unpadded", &plain_ids, None),
        ] {
            let eos = early_token(&model, ids, mask);
            for config in [
                greedy(20, 0, vec![]),
                greedy(20, 0, vec![eos]),
                greedy(20, 5, vec![eos, 49]),
                greedy(20, 20, vec![eos]),
                greedy(1, 0, vec![eos]),
                GenerationConfig {
                    stop_check_interval: 3,
                    ..greedy(20, 0, vec![eos])
                },
            ] {
                let what = format!(
                    "{name} {batch} max {:?} min {} eos {:?} interval {}",
                    config.max_new_tokens, config.min_new_tokens, config.eos_token_id, config.stop_check_interval
                );
                let eager = generate(&model, ids, mask, &config);
                let fixed = generate(
                    &model,
                    ids,
                    mask,
                    &GenerationConfig {
                        decoding: Decoding::StaticCache,
                        ..config.clone()
                    },
                );
                assert_same(
                    &format!("{what}: static vs growing cache"),
                    &fixed,
                    &eager,
                    STATIC_TOLERANCE,
                );
                // On CPU, CUDA graphs fall back to the static cache: the very same numbers.
                let graphs = generate(
                    &model,
                    ids,
                    mask,
                    &GenerationConfig {
                        decoding: Decoding::CudaGraphs,
                        ..config.clone()
                    },
                );
                assert_same(&format!("{what}: graphs (CPU) vs static"), &graphs, &fixed, 0.0);
                // Checking for finished rows after every token or never: the same output.
                let unchecked = generate(
                    &model,
                    ids,
                    mask,
                    &GenerationConfig {
                        stop_check_interval: 0,
                        ..config.clone()
                    },
                );
                assert_same(&format!("{what}: never checked vs checked"), &unchecked, &eager, 0.0);
            }
        }
    }
}

#[test]
fn unsupported_settings_fall_back_to_eager_decoding() {
    let (_dir, model) = tiny("gpt2", json!({"n_positions": 64}));
    let (ids, mask) = padded_batch();
    let sampled = GenerationConfig {
        do_sample: true,
        seed: Some(7),
        ..greedy(10, 0, vec![])
    };
    let penalised = GenerationConfig {
        repetition_penalty: 1.3,
        ..greedy(10, 0, vec![])
    };
    for config in [sampled, penalised] {
        let eager = generate(&model, &ids, Some(&mask), &config);
        for decoding in [Decoding::StaticCache, Decoding::CudaGraphs] {
            let other = generate(
                &model,
                &ids,
                Some(&mask),
                &GenerationConfig {
                    decoding,
                    ..config.clone()
                },
            );
            assert_same(&format!("{decoding:?} fallback"), &other, &eager, 0.0);
        }
    }
    // Dynamic-NTK rotary scaling reads the length on the host: eager as well.
    let (_dir, llama) = tiny(
        "llama",
        json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 8}),
    );
    let config = greedy(12, 0, vec![]);
    let eager = generate(&llama, &ids, Some(&mask), &config);
    let fixed = generate(
        &llama,
        &ids,
        Some(&mask),
        &GenerationConfig {
            decoding: Decoding::StaticCache,
            ..config
        },
    );
    assert_same("dynamic rope fallback", &fixed, &eager, 0.0);
}

#[test]
fn static_decoding_outputs_do_not_alias_between_calls() {
    let (_dir, model) = tiny("llama", json!({}));
    let (ids, mask) = padded_batch();
    let config = GenerationConfig {
        decoding: Decoding::CudaGraphs,
        ..greedy(8, 8, vec![])
    };
    let first = generate(&model, &ids, Some(&mask), &config);
    let kept = first.new_tokens.copy();
    let other_ids = ids.flip([1]).abs();
    let _second = generate(&model, &other_ids, None, &config);
    assert!(first.new_tokens.equal(&kept), "a later call changed an earlier output");
    let again = generate(&model, &ids, Some(&mask), &config);
    assert_same("repeated call", &again, &first, 0.0);
}
