//! The key/value cache a caller holds between incremental forward passes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tch::Tensor;
use vh_core::Result;

/// Buffers with room for more positions than are cached, so that a step writes its keys and
/// values in place instead of copying the whole cache into a longer tensor.
#[derive(Debug)]
struct Reserve {
    /// [batch, heads, capacity, head_dim].
    keys: Tensor,
    values: Tensor,
    /// Positions written so far. Only the cache whose length equals it may write in place; an
    /// older cache continued again (a branch) falls back to copying, so it never overwrites the
    /// positions a newer cache already shows.
    filled: Arc<AtomicI64>,
}

/// One attention layer's cached keys and values, each [batch, heads, seq, head_dim].
///
/// A *static* layer cache (see [`Cache::to_static`]) holds buffers of a fixed length: `keys`
/// and `values` are the whole buffers, a step writes its one new position at the device-side
/// index `slot`, and attention runs over the whole length, the positions after `slot` hidden by
/// the mask (see [`crate::inputs::StaticKeys`]). Its shapes never change, so a decode step over it
/// reads nothing from the host and can be captured as a CUDA graph.
#[derive(Debug)]
pub struct LayerCache {
    /// Cached keys.
    pub keys: Tensor,
    /// Cached values.
    pub values: Tensor,
    reserve: Option<Reserve>,
    /// For a static cache: the index (i64 [1], on the cache's device) where the next position
    /// is written.
    slot: Option<Tensor>,
}

impl LayerCache {
    /// A cache holding exactly `keys` and `values`.
    pub fn new(keys: Tensor, values: Tensor) -> Self {
        Self {
            keys,
            values,
            reserve: None,
            slot: None,
        }
    }

    /// A static cache over the buffers `keys` and `values` [batch, heads, capacity, head_dim],
    /// writing the next position at `slot` (i64 [1] on their device; shared, so the caller
    /// moves it between steps).
    pub fn new_static(keys: Tensor, values: Tensor, slot: &Tensor) -> Self {
        Self {
            keys,
            values,
            reserve: None,
            slot: Some(slot.shallow_clone()),
        }
    }

    /// Whether this is a static cache (fixed-length buffers written at a device-side index).
    pub fn is_static(&self) -> bool {
        self.slot.is_some()
    }

    /// A cheap copy sharing storage.
    pub fn shallow_clone(&self) -> LayerCache {
        LayerCache {
            keys: self.keys.shallow_clone(),
            values: self.values.shallow_clone(),
            reserve: self.reserve.as_ref().map(|r| Reserve {
                keys: r.keys.shallow_clone(),
                values: r.values.shallow_clone(),
                filled: r.filled.clone(),
            }),
            slot: self.slot.as_ref().map(Tensor::shallow_clone),
        }
    }

    /// Cached positions.
    pub fn seq_len(&self) -> i64 {
        self.keys.size()[2]
    }

    /// The same keys and values in buffers with room for `capacity` positions (at least the
    /// current length), so that later steps append without copying the cache.
    pub fn with_capacity(&self, capacity: i64) -> Result<LayerCache> {
        let len = self.seq_len();
        let buffer = |t: &Tensor| -> Result<(Tensor, Tensor)> {
            let mut size = t.size();
            size[2] = capacity.max(len);
            let full = Tensor::f_empty(size.as_slice(), (t.kind(), t.device()))?;
            let mut head = full.f_narrow(2, 0, len)?;
            head.f_copy_(t)?;
            Ok((full, head))
        };
        let (keys_buffer, keys) = buffer(&self.keys)?;
        let (values_buffer, values) = buffer(&self.values)?;
        Ok(LayerCache {
            keys,
            values,
            reserve: Some(Reserve {
                keys: keys_buffer,
                values: values_buffer,
                filled: Arc::new(AtomicI64::new(len)),
            }),
            slot: None,
        })
    }

    /// This cache followed by `keys` and `values` [batch, heads, new, head_dim]: written in place
    /// when the reserve has room and this is its newest cache, else concatenated into new tensors.
    ///
    /// A static cache writes one new position in place at its slot (no host read, no new
    /// tensor) and returns itself: attention then runs over the whole buffer.
    pub fn append(&self, keys: &Tensor, values: &Tensor) -> Result<LayerCache> {
        if let Some(slot) = &self.slot {
            if keys.size()[2] != 1 {
                return Err(vh_core::error::invalid(format!(
                    "a static cache takes one new position per pass, got {}",
                    keys.size()[2]
                )));
            }
            let _ = self.keys.shallow_clone().f_index_copy_(2, slot, keys)?;
            let _ = self.values.shallow_clone().f_index_copy_(2, slot, values)?;
            return Ok(self.shallow_clone());
        }
        let (len, new) = (self.seq_len(), keys.size()[2]);
        if let Some(r) = &self.reserve {
            let fits = len + new <= r.keys.size()[2];
            if fits
                && r.filled
                    .compare_exchange(len, len + new, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                r.keys.f_narrow(2, len, new)?.f_copy_(keys)?;
                r.values.f_narrow(2, len, new)?.f_copy_(values)?;
                return Ok(LayerCache {
                    keys: r.keys.f_narrow(2, 0, len + new)?,
                    values: r.values.f_narrow(2, 0, len + new)?,
                    reserve: Some(Reserve {
                        keys: r.keys.shallow_clone(),
                        values: r.values.shallow_clone(),
                        filled: r.filled.clone(),
                    }),
                    slot: None,
                });
            }
        }
        Ok(LayerCache::new(
            Tensor::f_cat(&[&self.keys, keys], 2)?,
            Tensor::f_cat(&[&self.values, values], 2)?,
        ))
    }
}

/// The keys and values of every attention layer for the tokens seen so far.
#[derive(Debug, Default)]
pub struct Cache {
    /// One entry per layer, in layer order.
    pub layers: Vec<LayerCache>,
}

impl Cache {
    /// Number of cached positions (0 for an empty cache).
    pub fn seq_len(&self) -> i64 {
        self.layers.first().map_or(0, LayerCache::seq_len)
    }

    /// Batch size of the cached tensors, if any.
    pub fn batch_size(&self) -> Option<i64> {
        self.layers.first().map(|l| l.keys.size()[0])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// A cheap copy sharing storage with this cache.
    pub fn shallow_clone(&self) -> Cache {
        Cache {
            layers: self.layers.iter().map(LayerCache::shallow_clone).collect(),
        }
    }

    /// Bytes the cache holds per cached position (all layers, keys and values, the whole batch).
    pub fn bytes_per_position(&self) -> i64 {
        let len = self.seq_len().max(1);
        let total: usize = self
            .layers
            .iter()
            .map(|l| (l.keys.numel() + l.values.numel()) * l.keys.kind().elt_size_in_bytes())
            .sum();
        total as i64 / len
    }

    /// A static cache (see [`LayerCache`]) of `capacity` positions per layer holding this
    /// cache's positions first and zeros after them (zeros, not garbage: hidden positions get
    /// weight 0, and 0 times a NaN would still poison the sum), writing the next position at
    /// `slot` (i64 [1] on the cache's device, which the caller sets and moves).
    pub fn to_static(&self, capacity: i64, slot: &Tensor) -> Result<Cache> {
        let buffer = |t: &Tensor| -> Result<Tensor> {
            let mut size = t.size();
            size[2] = capacity.max(size[2]);
            Ok(Tensor::f_zeros(size.as_slice(), (t.kind(), t.device()))?)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let layer = LayerCache::new_static(buffer(&l.keys)?, buffer(&l.values)?, slot);
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        let cache = Cache { layers };
        cache.fill_static(self)?;
        Ok(cache)
    }

    /// Refills a static cache in place (its buffers keep their addresses, as a captured CUDA
    /// graph needs) with `prefix`'s positions first and zeros after them.
    pub fn fill_static(&self, prefix: &Cache) -> Result<()> {
        if prefix.layers.len() != self.layers.len() {
            return Err(vh_core::error::invalid(format!(
                "the prefix has {} layers, the static cache {}",
                prefix.layers.len(),
                self.layers.len()
            )));
        }
        for (buffer, layer) in self.layers.iter().zip(&prefix.layers) {
            let len = layer.seq_len();
            for (full, part) in [(&buffer.keys, &layer.keys), (&buffer.values, &layer.values)] {
                if full.size()[2] < len || full.size()[..2] != part.size()[..2] {
                    return Err(vh_core::error::invalid(format!(
                        "a cache of shape {:?} does not fit a static cache of shape {:?}",
                        part.size(),
                        full.size()
                    )));
                }
                let _ = full.shallow_clone().f_zero_()?;
                full.f_narrow(2, 0, len)?.f_copy_(part)?;
            }
        }
        Ok(())
    }

    /// The same cache with room for `capacity` positions per layer, so that incremental passes
    /// write new keys and values in place (generation does this; the numbers are the same).
    /// For inference: writing in place into tensors that autograd saved would fail backward.
    pub fn with_capacity(&self, capacity: i64) -> Result<Cache> {
        Ok(Cache {
            layers: self
                .layers
                .iter()
                .map(|l| l.with_capacity(capacity))
                .collect::<Result<_>>()?,
        })
    }
}

/// The decoder's caches: self-attention keys and values that grow by the new tokens, and
/// cross-attention keys and values computed once from the encoder output.
#[derive(Debug, Default)]
pub struct Seq2SeqCache {
    /// Decoder self-attention, per layer.
    pub self_attention: Cache,
    /// Cross-attention over the encoder output, per layer.
    pub cross_attention: Cache,
}

impl Seq2SeqCache {
    /// Decoder positions cached so far.
    pub fn seq_len(&self) -> i64 {
        self.self_attention.seq_len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.self_attention.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn step(seed: i64) -> (Tensor, Tensor) {
        let t = Tensor::arange(2 * 3 * 4, (Kind::Float, Device::Cpu)).reshape([2, 3, 1, 4]) + seed as f64 * 100.0;
        (t.shallow_clone(), -t)
    }

    #[test]
    fn appending_in_place_equals_concatenation_and_branches_copy() {
        let (k0, v0) = step(0);
        let plain = LayerCache::new(k0.shallow_clone(), v0.shallow_clone());
        let reserved = plain.with_capacity(4).unwrap();
        let (k1, v1) = step(1);
        let a = plain.append(&k1, &v1).unwrap();
        let b = reserved.append(&k1, &v1).unwrap();
        assert!(a.keys.equal(&b.keys) && a.values.equal(&b.values));
        assert!(b.reserve.is_some() && b.seq_len() == 2);
        // Continuing the older cache again must not overwrite position 1 of `b`.
        let (k2, v2) = step(2);
        let branch = reserved.append(&k2, &v2).unwrap();
        assert!(branch.reserve.is_none(), "a branch copies");
        assert!(b.keys.narrow(2, 1, 1).equal(&k1));
        assert!(branch.keys.narrow(2, 1, 1).equal(&k2));
        // The newest cache keeps writing in place until the capacity is reached.
        let c = b.append(&k2, &v2).unwrap();
        let d = c.append(&k1, &v1).unwrap();
        assert!(d.reserve.is_some() && d.seq_len() == 4);
        let e = d.append(&k2, &v2).unwrap();
        assert!(e.reserve.is_none() && e.seq_len() == 5, "past the capacity it copies");
        let expected = Tensor::cat(&[&k0, &k1, &k2, &k1, &k2], 2);
        assert!(e.keys.equal(&expected));
    }
}
