//! A Rust rank and a Python `torch.distributed` rank join one Gloo group and run collectives
//! together: the same engine (c10d), the same store keys and the same wire protocol.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;
use tch::{Kind, Tensor};
use vh_dist::{DistEnv, ProcessGroup};

fn python() -> std::path::PathBuf {
    let p = common::workspace_root().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run `cargo xtask setup`", p.display());
    p
}

/// The Rust side of python/dist_rank.py's sequence.
fn rust_rank(env: &DistEnv) {
    let pg = ProcessGroup::new(env).unwrap();
    let (r, n) = (pg.rank() as f32, pg.world_size());
    let mut t = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0]) + 10.0 * f64::from(r);
    pg.all_reduce_sum(&mut t).unwrap();
    let s: f32 = (0..n).map(|k| k as f32).sum();
    let want: Vec<f32> = (0..4).map(|i| i as f32 * n as f32 + 10.0 * s).collect();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), want);

    let root = n - 1;
    let mut b = if pg.rank() == root {
        Tensor::from_slice(&[1.5f32, 2.5, 3.5])
    } else {
        Tensor::zeros([3], (Kind::Float, tch::Device::Cpu))
    };
    pg.broadcast(&mut b, root).unwrap();
    assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![1.5, 2.5, 3.5]);

    let g = pg
        .all_gather(&Tensor::full([2], f64::from(r), (Kind::Double, tch::Device::Cpu)))
        .unwrap();
    for (k, gk) in g.iter().enumerate() {
        assert_eq!(Vec::<f64>::try_from(gk).unwrap(), vec![k as f64; 2]);
    }
    pg.barrier().unwrap();
}

fn run_with_python(rust_rank_id: usize) {
    let port = common::free_port();
    let py_rank = 1 - rust_rank_id;
    let child = Command::new(python())
        .arg(common::workspace_root().join("python/dist_rank.py"))
        .env("RANK", py_rank.to_string())
        .env("LOCAL_RANK", py_rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let env = DistEnv {
        rank: rust_rank_id,
        world_size: 2,
        local_rank: rust_rank_id,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(90),
    };
    // The Python side may fail first; collect its output before judging ours.
    let rust = std::panic::catch_unwind(|| rust_rank(&env));
    let out = common::wait_all(vec![child], Duration::from_secs(120)).remove(0);
    let py_out = String::from_utf8_lossy(&out.stdout);
    let py_err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && rust.is_ok(),
        "python {}:\n{py_out}\n{py_err}\nrust: {rust:?}",
        out.status
    );
    assert!(py_out.contains("agree"), "{py_out}");
    println!("{}", py_out.trim());
}

#[test]
fn rust_hosts_the_store_and_python_joins() {
    run_with_python(0);
}

#[test]
fn python_hosts_the_store_and_rust_joins() {
    run_with_python(1);
}
