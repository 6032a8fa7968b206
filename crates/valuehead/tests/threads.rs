//! Models and threads: the value-head models are `Send` but not `Sync` (libtorch tensors are
//! not safe to use from two threads at once), so a model can be moved into another thread, or
//! shared behind a `Mutex`, and gives the same outputs there. Sharing `&model` across threads
//! does not compile: see the `compile_fail` example in the `valuehead` crate docs.

mod common;

use common::{write_tiny_gpt2, write_tiny_llama, write_tiny_t5};
use serde_json::json;
use std::sync::{Arc, Mutex};
use tch::Tensor;
use valuehead::{
    CausalLmWithValueHead, GenerateOutput, GenerationConfig, LoadOptions, Seq2SeqLmWithValueHead, ValueHeadModel,
};

fn assert_send<T: Send>() {}

#[test]
fn models_are_send() {
    assert_send::<CausalLmWithValueHead>();
    assert_send::<Seq2SeqLmWithValueHead>();
    assert_send::<ValueHeadModel>();
    assert_send::<GenerateOutput>();
}

/// What one model computes: a forward pass's logits and values, and a greedy and a sampled
/// generation.
struct Outputs {
    logits: Tensor,
    values: Tensor,
    generated: Vec<GenerateOutput>,
}

impl Outputs {
    fn equal(&self, other: &Outputs) -> bool {
        self.logits.equal(&other.logits)
            && self.values.equal(&other.values)
            && self.generated.len() == other.generated.len()
            && self.generated.iter().zip(&other.generated).all(|(a, b)| {
                a.sequences.equal(&b.sequences)
                    && a.values.equal(&b.values)
                    && a.logprobs.equal(&b.logprobs)
                    && a.generated_mask.equal(&b.generated_mask)
            })
    }
}

fn configs() -> Vec<GenerationConfig> {
    let greedy = GenerationConfig {
        max_new_tokens: Some(6),
        ..Default::default()
    };
    let sampled = GenerationConfig {
        do_sample: true,
        seed: Some(5),
        top_k: 10,
        ..greedy.clone()
    };
    vec![greedy, sampled]
}

fn run(model: &ValueHeadModel) -> Outputs {
    let ids = Tensor::from_slice2(&[[0i64, 3, 4, 5], [6, 7, 8, 9]]);
    let mask = Tensor::from_slice2(&[[0i64, 1, 1, 1], [1, 1, 1, 1]]);
    tch::no_grad(|| {
        let (logits, values) = match model {
            ValueHeadModel::Causal(m) => {
                let out = m.forward(&ids, Some(&mask), None, None).unwrap();
                (out.logits, out.values)
            }
            ValueHeadModel::Seq2Seq(m) => {
                // Right padding for the encoder.
                let ids = Tensor::from_slice2(&[[3i64, 4, 5, 0], [6, 7, 8, 9]]);
                let mask = Tensor::from_slice2(&[[1i64, 1, 1, 0], [1, 1, 1, 1]]);
                let decoder = Tensor::from_slice2(&[[0i64, 9], [0, 11]]);
                let out = m
                    .forward(Some(&ids), Some(&mask), Some(&decoder), None, None, None, None)
                    .unwrap();
                (out.logits, out.values)
            }
        };
        let generated = configs()
            .iter()
            .map(|c| model.generate(&ids, Some(&mask), c).unwrap())
            .collect();
        Outputs {
            logits,
            values,
            generated,
        }
    })
}

/// Loads a tiny GPT-2, a tiny Llama and a tiny T5.
fn load_all(dirs: &[tempfile::TempDir; 3]) -> Vec<ValueHeadModel> {
    dirs.iter()
        .map(|d| ValueHeadModel::from_folder(d.path(), &LoadOptions::default()).unwrap())
        .collect()
}

fn folders() -> [tempfile::TempDir; 3] {
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    write_tiny_gpt2(dirs[0].path(), json!({}));
    write_tiny_llama(dirs[1].path(), json!({}));
    write_tiny_t5(dirs[2].path(), json!({}));
    dirs
}

#[test]
fn models_moved_into_worker_threads_give_the_main_threads_outputs() {
    let dirs = folders();
    let expected: Vec<Outputs> = load_all(&dirs).iter().map(run).collect();
    // Two rounds of each model, all threads running at once; each thread owns its model and
    // hands it back.
    let models: Vec<ValueHeadModel> = load_all(&dirs).into_iter().chain(load_all(&dirs)).collect();
    let workers: Vec<_> = models
        .into_iter()
        .enumerate()
        .map(|(i, model)| {
            std::thread::spawn(move || {
                let mut outputs = Vec::new();
                for _ in 0..3 {
                    outputs.push(run(&model));
                }
                (i, model, outputs)
            })
        })
        .collect();
    for worker in workers {
        let (i, model, outputs) = worker.join().unwrap();
        for out in &outputs {
            assert!(
                out.equal(&expected[i % 3]),
                "model {i} gives other outputs in its thread"
            );
        }
        // Moved back to this thread, it still works.
        assert!(run(&model).equal(&expected[i % 3]));
    }
}

#[test]
fn a_model_behind_a_mutex_is_shared_by_threads() {
    let dirs = folders();
    let expected = run(&load_all(&dirs).remove(1));
    let shared = Arc::new(Mutex::new(load_all(&dirs).remove(1)));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let shared = Arc::clone(&shared);
                s.spawn(move || {
                    let model = shared.lock().unwrap();
                    run(&model)
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap().equal(&expected));
        }
    });
}
