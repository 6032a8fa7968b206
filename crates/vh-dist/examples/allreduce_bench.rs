//! All-reduce throughput of a GPT-2-small-sized f32 gradient over the c10d Gloo group.
//!
//! `cargo xtask launch --nproc 2 -- target/release/examples/allreduce_bench [NUMEL] [ITERS]`
//! Prints, on rank 0, the time of one all-reduce of the whole gradient and of the same data in
//! DDP's 25 MB buckets, with the algorithm bandwidth (bytes / time) and the bus bandwidth
//! (× 2(n-1)/n, the bytes each rank actually moves in a ring all-reduce).

use std::time::Instant;
use tch::{Device, Kind, Tensor};
use vh_dist::ProcessGroup;

/// GPT-2 small's parameter count (tied embeddings counted once).
const GPT2_SMALL: i64 = 124_439_808;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let numel: i64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(GPT2_SMALL);
    let iters: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let pg = ProcessGroup::from_env()?;
    let n = pg.world_size() as f64;
    let bytes = numel as f64 * 4.0;
    let mut grad = Tensor::ones([numel], (Kind::Float, Device::Cpu));
    let report = |what: &str, secs: f64| {
        if pg.is_main() {
            let mbs = bytes / secs / 1e6;
            println!(
                "{what}: {:.1} MB in {:.3} s: {:.0} MB/s algorithm bandwidth, {:.0} MB/s bus bandwidth ({} ranks)",
                bytes / 1e6,
                secs,
                mbs,
                mbs * 2.0 * (n - 1.0) / n,
                pg.world_size()
            );
        }
    };
    // Warm-up: connections, pages of the buffer.
    pg.all_reduce_sum(&mut grad)?;
    let mut total = 0.0;
    for _ in 0..iters {
        pg.barrier()?;
        let t = Instant::now();
        pg.all_reduce_sum(&mut grad)?;
        total += t.elapsed().as_secs_f64();
    }
    report("one all-reduce", total / iters as f64);
    let bucket = (vh_dist::DEFAULT_BUCKET_BYTES / 4) as i64;
    let mut chunks: Vec<Tensor> = grad.split(bucket, 0).into_iter().map(|c| c.contiguous()).collect();
    let mut total = 0.0;
    for _ in 0..iters {
        pg.barrier()?;
        let t = Instant::now();
        for c in chunks.iter_mut() {
            pg.all_reduce_sum(c)?;
        }
        total += t.elapsed().as_secs_f64();
    }
    report(
        &format!("{} all-reduces of 25 MB buckets", chunks.len()),
        total / iters as f64,
    );
    Ok(())
}
