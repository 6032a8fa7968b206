//! Data parallelism is exact: N ranks with per-rank batch B, after k AdamW steps, hold the
//! parameters one process gets on the global batch N*B (f32, within 1e-6 relative).

mod common;

use common::{is_child, spawn_ranks};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};
use vh_dist::ProcessGroup;
use vh_train::{AdamW, AdamWConfig};

const IN: i64 = 6;
const B: i64 = 4;
const STEPS: i64 = 3;

/// Two linear layers with a tanh, seeded so that each rank starts from different weights.
fn model(seed: i64) -> (VarStore, impl Module) {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let net = nn::seq()
        .add(nn::linear(&root / "l1", IN, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(&root / "l2", 16, 1, Default::default()));
    (vs, net)
}

/// Step `s`'s global batch, the same on every rank.
fn global_batch(s: i64, n: i64) -> (Tensor, Tensor) {
    tch::manual_seed(1000 + s);
    let x = Tensor::randn([n * B, IN], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([n * B, 1], (Kind::Float, Device::Cpu));
    (x, y)
}

fn config() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    }
}

fn mse(net: &impl Module, x: &Tensor, y: &Tensor) -> Tensor {
    (net.forward(x) - y).square().mean(Kind::Float)
}

fn sorted(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn body(bucket_bytes: usize) {
    let pg = ProcessGroup::from_env().unwrap();
    let (rank, n) = (pg.rank() as i64, pg.world_size() as i64);

    // Single process on the global batch, from rank 0's initial weights.
    let (ref_vs, ref_net) = model(100);
    let mut ref_opt = AdamW::hf(&ref_vs, config()).unwrap();
    for s in 0..STEPS {
        let (x, y) = global_batch(s, n);
        ref_opt.zero_grad().unwrap();
        mse(&ref_net, &x, &y).backward();
        ref_opt.step().unwrap();
    }

    // Data parallel: different initial weights per rank until the broadcast.
    let (vs, net) = model(100 + rank);
    vh_dist::broadcast_parameters(&pg, &vs, 0).unwrap();
    let mut opt = AdamW::hf(&vs, config()).unwrap();
    for s in 0..STEPS {
        let (x, y) = global_batch(s, n);
        let (x, y) = (x.narrow(0, rank * B, B), y.narrow(0, rank * B, B));
        opt.zero_grad().unwrap();
        mse(&net, &x, &y).backward();
        vh_dist::all_reduce_gradients(&pg, &vs, bucket_bytes).unwrap();
        opt.step().unwrap();
    }

    let mut worst = 0.0f64;
    for ((name, p), (ref_name, r)) in sorted(&vs).iter().zip(sorted(&ref_vs).iter()) {
        assert_eq!(name, ref_name);
        let diff = (p - r).abs().max().double_value(&[]);
        let scale = r.abs().max().double_value(&[]);
        let rel = diff / scale;
        worst = worst.max(rel);
        assert!(rel <= 1e-6, "rank {rank} {name}: relative difference {rel:e}");
        // And every rank holds exactly rank 0's parameters.
        let all = pg.all_gather(p).unwrap();
        for (k, pk) in all.iter().enumerate() {
            assert!(pk.equal(&all[0]), "{name}: rank {k} differs from rank 0");
        }
    }
    // The initial weights did differ, so the broadcast mattered.
    let (_, first) = &sorted(&model(100 + rank).0)[0];
    let firsts = pg.all_gather(first).unwrap();
    if n > 1 {
        assert!(!firsts[0].equal(&firsts[1]));
    }
    println!("rank {rank}/{n}: worst relative difference to one process on the global batch: {worst:e}");
}

#[test]
fn two_ranks_equal_one_process_on_the_global_batch() {
    if is_child() {
        return body(vh_dist::DEFAULT_BUCKET_BYTES);
    }
    let outs = spawn_ranks("two_ranks_equal_one_process_on_the_global_batch", 2);
    println!(
        "{}",
        String::from_utf8_lossy(&outs[0].stdout)
            .lines()
            .filter(|l| l.contains("worst"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Three ranks, with 256-byte buckets so that the gradients travel in several all-reduces.
#[test]
fn three_ranks_with_small_buckets_equal_one_process() {
    if is_child() {
        return body(256);
    }
    let outs = spawn_ranks("three_ranks_with_small_buckets_equal_one_process", 3);
    println!(
        "{}",
        String::from_utf8_lossy(&outs[0].stdout)
            .lines()
            .filter(|l| l.contains("worst"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A parameter used on one rank only still gets the same averaged gradient on every rank.
#[test]
fn unused_parameters_on_some_ranks_do_not_desynchronise() {
    if is_child() {
        let pg = ProcessGroup::from_env().unwrap();
        let vs = VarStore::new(Device::Cpu);
        let a = vs.root().ones("a", &[3]);
        let b = vs.root().ones("b", &[2]);
        let c = vs.root().ones("c", &[2]); // unused everywhere
        let loss = if pg.rank() == 0 {
            a.sum(Kind::Float) * 2.0 + b.sum(Kind::Float)
        } else {
            a.sum(Kind::Float) * 4.0
        };
        loss.backward();
        vh_dist::all_reduce_gradients(&pg, &vs, 8).unwrap();
        assert_eq!(Vec::<f32>::try_from(&a.grad()).unwrap(), vec![3.0; 3]);
        assert_eq!(Vec::<f32>::try_from(&b.grad()).unwrap(), vec![0.5; 2]);
        assert!(!c.grad().defined());
        return;
    }
    spawn_ranks("unused_parameters_on_some_ranks_do_not_desynchronise", 2);
}
