//! Data-parallel helpers: start every rank from rank 0's weights, and average gradients in
//! buckets after backward (what PyTorch's DDP does, without overlapping backward).

use crate::error::Result;
use crate::group::ProcessGroup;
use tch::{Device, Kind, Tensor};

/// Bucket size of gradient all-reduces: DDP's default `bucket_cap_mb=25`.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Splits tensors, in order, into runs of one kind and device of at most `cap` bytes each (a
/// larger tensor gets a bucket of its own); returns index lists.
pub(crate) fn plan_buckets(sizes: &[(Kind, Device, usize)], cap: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0usize;
    for (i, &(kind, device, n)) in sizes.iter().enumerate() {
        let same_type = current
            .first()
            .is_none_or(|&j| sizes[j].0 == kind && sizes[j].1 == device);
        if !current.is_empty() && (!same_type || bytes + n > cap) {
            buckets.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += n;
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

fn bytes_of(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Runs `op` on each bucket of `tensors` flattened into one contiguous tensor, then copies the
/// result back into the tensors (one collective per bucket instead of one per tensor).
fn bucketed(tensors: &[Tensor], cap: usize, mut op: impl FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
    let sizes: Vec<_> = tensors.iter().map(|t| (t.kind(), t.device(), bytes_of(t))).collect();
    for bucket in plan_buckets(&sizes, cap) {
        let parts: Vec<Tensor> = bucket.iter().map(|&i| tensors[i].detach().reshape([-1])).collect();
        let mut flat = Tensor::f_cat(&parts, 0)?;
        op(&mut flat)?;
        let mut offset = 0i64;
        for &i in &bucket {
            let t = &tensors[i];
            let n = t.numel() as i64;
            let src = flat.f_narrow(0, offset, n)?.f_view(t.size().as_slice())?;
            tch::no_grad(|| t.shallow_clone().f_copy_(&src))?;
            offset += n;
        }
    }
    Ok(())
}

/// Overwrites every variable of `vs` (trainable or frozen, in name order) with rank `root`'s.
pub fn broadcast_parameters(pg: &ProcessGroup, vs: &tch::nn::VarStore, root: usize) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    // HashMap order differs between processes; every rank must flatten in the same order.
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors: Vec<Tensor> = vars.into_iter().map(|(_, t)| t).collect();
    bucketed(&tensors, DEFAULT_BUCKET_BYTES, |flat| pg.broadcast(flat, root))
}

/// Averages the gradients of `vs`'s trainable parameters over all ranks, `bucket_bytes` per
/// all-reduce; call after backward (after the last micro-batch when accumulating), before
/// clipping and the optimizer step.
///
/// A parameter whose gradient is missing on some ranks (unused in their forward) gets a zero
/// gradient there, so that all ranks reduce the same buckets; one unused on every rank keeps no
/// gradient, as with DDP.
pub fn all_reduce_gradients(pg: &ProcessGroup, vs: &tch::nn::VarStore, bucket_bytes: usize) -> Result<()> {
    if bucket_bytes == 0 {
        return Err(crate::DistError::InvalidArgument(
            "bucket_bytes must be positive".into(),
        ));
    }
    let params = vh_train::named_parameters(vs);
    if params.is_empty() {
        return Ok(());
    }
    let defined: Vec<f32> = params
        .iter()
        .map(|(_, p)| f32::from(u8::from(p.grad().defined())))
        .collect();
    let mut mask = Tensor::from_slice(&defined);
    pg.all_reduce_sum(&mut mask)?;
    let mask = Vec::<f32>::try_from(&mask)?;
    let mut grads = Vec::with_capacity(params.len());
    for ((_, p), used) in params.iter().zip(mask) {
        if used == 0.0 {
            continue;
        }
        if !p.grad().defined() {
            // tch has no `p.grad = zeros` setter; a backward through `0 * sum(p)` defines it.
            (p * 0.0).f_sum(p.kind())?.f_backward()?;
        }
        grads.push(p.grad());
    }
    let world = pg.world_size() as f64;
    bucketed(&grads, bucket_bytes, |flat| {
        pg.all_reduce_sum(flat)?;
        let _ = flat.f_div_scalar_(world)?;
        Ok(())
    })
}

/// Averages a few statistics (losses, rewards, KL) over all ranks, in f64.
pub fn reduce_mean_scalars(pg: &ProcessGroup, values: &[f64]) -> Result<Vec<f64>> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let mut t = Tensor::from_slice(values);
    pg.all_reduce_mean(&mut t)?;
    Ok(Vec::<f64>::try_from(&t)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_cap_kind_and_order() {
        let c = Device::Cpu;
        let f = Kind::Float;
        let sizes = [
            (f, c, 10),
            (f, c, 10),
            (f, c, 10),
            (Kind::Double, c, 4),
            (f, c, 50),
            (f, c, 1),
        ];
        assert_eq!(
            plan_buckets(&sizes, 25),
            vec![vec![0, 1], vec![2], vec![3], vec![4], vec![5]]
        );
        assert_eq!(plan_buckets(&sizes, 1000), vec![vec![0, 1, 2], vec![3], vec![4, 5]]);
        assert!(plan_buckets(&[], 10).is_empty());
    }
}
