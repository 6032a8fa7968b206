//! The collectives on 1, 2 and 3 CPU processes, errors before C++, and timeouts of dead ranks.

mod common;

use common::{is_child, spawn_ranks, spawn_ranks_expect};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
use vh_dist::{DistEnv, DistError, ProcessGroup};

fn single() -> ProcessGroup {
    let mut env = DistEnv::single(common::free_port());
    env.timeout = Duration::from_secs(30);
    ProcessGroup::new(&env).unwrap()
}

#[test]
fn world_of_one_runs_every_collective() {
    let pg = single();
    assert_eq!((pg.rank(), pg.world_size(), pg.is_main()), (0, 1, true));
    let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    pg.all_reduce_sum(&mut t).unwrap();
    pg.all_reduce_mean(&mut t).unwrap();
    pg.broadcast(&mut t, 0).unwrap();
    pg.barrier().unwrap();
    let g = pg.all_gather(&t).unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(Vec::<f32>::try_from(&g[0]).unwrap(), vec![1.0, 2.0, 3.0]);
    assert_eq!(
        vh_dist::reduce_mean_scalars(&pg, &[0.5, -2.0]).unwrap(),
        vec![0.5, -2.0]
    );
}

#[test]
fn bad_arguments_are_typed_errors() {
    let pg = single();
    let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
    assert!(matches!(pg.broadcast(&mut t, 1), Err(DistError::InvalidArgument(_))));
    let mut nc = Tensor::ones([3, 4], (Kind::Float, tch::Device::Cpu)).transpose(0, 1);
    assert!(matches!(pg.all_reduce_sum(&mut nc), Err(DistError::InvalidArgument(_))));
    let mut ints = Tensor::from_slice(&[1i64, 2]);
    assert!(matches!(
        pg.all_reduce_mean(&mut ints),
        Err(DistError::InvalidArgument(_))
    ));
    let mut undefined = Tensor::new();
    assert!(matches!(
        pg.all_reduce_sum(&mut undefined),
        Err(DistError::InvalidArgument(_))
    ));
    // The group still works after refusals.
    pg.all_reduce_sum(&mut t).unwrap();
}

#[test]
fn rendezvous_without_peers_times_out() {
    let env = DistEnv {
        world_size: 2,
        timeout: Duration::from_secs(2),
        ..DistEnv::single(common::free_port())
    };
    let start = Instant::now();
    let err = ProcessGroup::new(&env).unwrap_err();
    let took = start.elapsed();
    assert!(err.is_timeout(), "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// The rank's side of `collectives_on_n_ranks`.
fn collectives_body() {
    let pg = ProcessGroup::from_env().unwrap();
    let (r, n) = (pg.rank() as f32, pg.world_size());
    // all_reduce: sum over ranks of (r + i).
    let mut t = Tensor::from_slice(&[r, r + 1.0, r + 2.0]);
    pg.all_reduce_sum(&mut t).unwrap();
    let s: f32 = (0..n).map(|k| k as f32).sum();
    let nf = n as f32;
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![s, s + nf, s + 2.0 * nf]);
    // mean in f64.
    let m = vh_dist::reduce_mean_scalars(&pg, &[f64::from(r)]).unwrap();
    assert_eq!(m, vec![f64::from(s) / n as f64]);
    // broadcast from the last rank, an integer tensor.
    let root = n - 1;
    let mut b = Tensor::from_slice(&[pg.rank() as i64 * 10, 7]);
    pg.broadcast(&mut b, root).unwrap();
    assert_eq!(Vec::<i64>::try_from(&b).unwrap(), vec![root as i64 * 10, 7]);
    // all_gather of a 2-D tensor.
    let x = Tensor::full([2, 2], f64::from(r), (Kind::Double, tch::Device::Cpu));
    let g = pg.all_gather(&x).unwrap();
    assert_eq!(g.len(), n);
    for (k, gk) in g.iter().enumerate() {
        assert_eq!(gk.size(), vec![2, 2]);
        assert_eq!(Vec::<f64>::try_from(gk.reshape([-1])).unwrap(), vec![k as f64; 4]);
    }
    pg.barrier().unwrap();
}

#[test]
fn collectives_on_two_ranks() {
    if is_child() {
        return collectives_body();
    }
    spawn_ranks("collectives_on_two_ranks", 2);
}

#[test]
fn collectives_on_three_ranks() {
    if is_child() {
        return collectives_body();
    }
    spawn_ranks("collectives_on_three_ranks", 3);
}

/// Rank 1 joins, then dies; rank 0's next collective must fail, not hang.
#[test]
fn a_dead_rank_fails_the_others_within_the_timeout() {
    if is_child() {
        let pg = ProcessGroup::from_env().unwrap();
        pg.barrier().unwrap();
        if pg.rank() == 1 {
            std::process::exit(3);
        }
        let start = Instant::now();
        let mut t = Tensor::ones([16], (Kind::Float, tch::Device::Cpu));
        let err = pg.all_reduce_sum(&mut t).unwrap_err();
        let took = start.elapsed();
        eprintln!("rank 0 got after {took:?}: {err}");
        assert!(matches!(err, DistError::Collective { .. }), "{err:?}");
        assert!(took <= pg.timeout() + Duration::from_secs(5), "took {took:?}");
        return;
    }
    let outs = spawn_ranks_expect("a_dead_rank_fails_the_others_within_the_timeout", 2, 5, |r| {
        if r == 1 {
            3
        } else {
            0
        }
    });
    eprintln!("{}", String::from_utf8_lossy(&outs[0].stderr));
}
