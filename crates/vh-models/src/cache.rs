//! The key/value cache a caller holds between incremental forward passes.

use tch::Tensor;

/// One attention layer's cached keys and values, each [batch, heads, seq, head_dim].
#[derive(Debug)]
pub struct LayerCache {
    /// Cached keys.
    pub keys: Tensor,
    /// Cached values.
    pub values: Tensor,
}

impl LayerCache {
    /// A cheap copy sharing storage.
    pub fn shallow_clone(&self) -> LayerCache {
        LayerCache {
            keys: self.keys.shallow_clone(),
            values: self.values.shallow_clone(),
        }
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
        self.layers.first().map_or(0, |l| l.keys.size()[2])
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
}
