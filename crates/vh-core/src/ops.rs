//! Tensor-with-number operations that report every failure as an error.
//!
//! tch 0.24's fallible functions that take a number (`f_mul_scalar`, `f_masked_fill`, `f_eq`,
//! `f_clamp`, ...) convert it into a temporary `Scalar` that is dropped before libtorch's error
//! is read, and the `Scalar`'s destructor panics when it finds that error pending. So an
//! allocation that fails inside one of them (a long input under a memory limit) panics instead
//! of returning `Err`, and the panic, short of memory itself, may never finish. The methods here
//! do the same operations with the number as a zero-dimensional CPU tensor, which is what
//! PyTorch turns a Python number into before it reaches a kernel (a "CPU scalar"): the kernels,
//! the type promotion and therefore the results are the same, on CPU and CUDA alike, with no
//! host synchronisation.
//!
//! Creation functions that take a number (`arange`, `full`) are left as they are: their sizes
//! are those of an input that already exists.

use crate::error::Result;
use tch::{Kind, Tensor};

/// A number that becomes a zero-dimensional tensor for an operation with `other`.
pub trait Number: Copy {
    /// The number as a 0-dim CPU tensor whose kind gives the same type promotion with `other`
    /// as a Python number would.
    fn scalar_for(self, other: &Tensor) -> Result<Tensor>;
}

impl Number for f64 {
    fn scalar_for(self, other: &Tensor) -> Result<Tensor> {
        // A float with an integer tensor gives the default float kind, as a Python float does;
        // with a float tensor, the tensor's kind wins and the value keeps double precision
        // until the kernel reads it (as a wrapped Python number).
        let kind = if crate::tensor::is_float_kind(other.kind()) {
            Kind::Double
        } else {
            Kind::Float
        };
        Ok(Tensor::f_from_slice(&[self])?
            .f_to_kind(kind)?
            .f_reshape([] as [i64; 0])?)
    }
}

impl Number for i64 {
    fn scalar_for(self, _other: &Tensor) -> Result<Tensor> {
        Ok(Tensor::f_from_slice(&[self])?.f_reshape([] as [i64; 0])?)
    }
}

impl Number for i32 {
    fn scalar_for(self, other: &Tensor) -> Result<Tensor> {
        i64::from(self).scalar_for(other)
    }
}

/// Fallible tensor-with-number operations (see the module documentation for why they exist);
/// each equals the tch function of the same name without the `s_` prefix.
pub trait ScalarOps {
    /// `self * v`.
    fn s_mul(&self, v: impl Number) -> Result<Tensor>;
    /// `self / v`.
    fn s_div(&self, v: impl Number) -> Result<Tensor>;
    /// `self + v`.
    fn s_add(&self, v: impl Number) -> Result<Tensor>;
    /// `self - v`.
    fn s_sub(&self, v: impl Number) -> Result<Tensor>;
    /// `v` where `mask` is true, `self` elsewhere.
    fn s_masked_fill(&self, mask: &Tensor, v: impl Number) -> Result<Tensor>;
    /// `self == v`.
    fn s_eq(&self, v: impl Number) -> Result<Tensor>;
    /// `self != v`.
    fn s_ne(&self, v: impl Number) -> Result<Tensor>;
    /// `self < v`.
    fn s_lt(&self, v: impl Number) -> Result<Tensor>;
    /// `self <= v`.
    fn s_le(&self, v: impl Number) -> Result<Tensor>;
    /// `self > v`.
    fn s_gt(&self, v: impl Number) -> Result<Tensor>;
    /// `self >= v`.
    fn s_ge(&self, v: impl Number) -> Result<Tensor>;
    /// `max(self, lo)`.
    fn s_clamp_min(&self, lo: impl Number) -> Result<Tensor>;
    /// `min(self, hi)`.
    fn s_clamp_max(&self, hi: impl Number) -> Result<Tensor>;
    /// `min(max(self, lo), hi)`.
    fn s_clamp(&self, lo: impl Number, hi: impl Number) -> Result<Tensor>;
    /// `self` with the entries `index` along `dim` set to `v`.
    fn s_index_fill(&self, dim: i64, index: &Tensor, v: impl Number) -> Result<Tensor>;
    /// Sets every element to `v`, in place.
    fn s_fill_(&mut self, v: impl Number) -> Result<()>;
}

impl ScalarOps for Tensor {
    fn s_mul(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_mul(&v.scalar_for(self)?)?)
    }
    fn s_div(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_div(&v.scalar_for(self)?)?)
    }
    fn s_add(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_add(&v.scalar_for(self)?)?)
    }
    fn s_sub(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_sub(&v.scalar_for(self)?)?)
    }
    fn s_masked_fill(&self, mask: &Tensor, v: impl Number) -> Result<Tensor> {
        Ok(self.f_masked_fill_tensor(mask, &v.scalar_for(self)?)?)
    }
    fn s_eq(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_eq_tensor(&v.scalar_for(self)?)?)
    }
    fn s_ne(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_ne_tensor(&v.scalar_for(self)?)?)
    }
    fn s_lt(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_lt_tensor(&v.scalar_for(self)?)?)
    }
    fn s_le(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_le_tensor(&v.scalar_for(self)?)?)
    }
    fn s_gt(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_gt_tensor(&v.scalar_for(self)?)?)
    }
    fn s_ge(&self, v: impl Number) -> Result<Tensor> {
        Ok(self.f_ge_tensor(&v.scalar_for(self)?)?)
    }
    fn s_clamp_min(&self, lo: impl Number) -> Result<Tensor> {
        // `maximum` takes a CPU scalar on any device; `clamp_min.Tensor` does not. For finite
        // and infinite values the two agree, and both propagate NaN.
        Ok(self.f_maximum(&lo.scalar_for(self)?.f_to_kind(self.kind())?)?)
    }
    fn s_clamp_max(&self, hi: impl Number) -> Result<Tensor> {
        Ok(self.f_minimum(&hi.scalar_for(self)?.f_to_kind(self.kind())?)?)
    }
    fn s_clamp(&self, lo: impl Number, hi: impl Number) -> Result<Tensor> {
        self.s_clamp_min(lo)?.s_clamp_max(hi)
    }
    fn s_index_fill(&self, dim: i64, index: &Tensor, v: impl Number) -> Result<Tensor> {
        Ok(self.f_index_fill_int_tensor(dim, index, &v.scalar_for(self)?)?)
    }
    fn s_fill_(&mut self, v: impl Number) -> Result<()> {
        let value = v.scalar_for(self)?;
        let _ = self.f_fill_tensor_(&value)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn equal_to_tch_scalar_functions_bit_for_bit() {
        tch::manual_seed(7);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double] {
            let x = Tensor::randn([64], (kind, Device::Cpu)) * 3.0;
            let same = |a: Tensor, b: Tensor| {
                assert_eq!(a.kind(), b.kind(), "{kind:?}");
                assert!(a.equal(&b), "{kind:?}");
            };
            same(x.s_mul(0.044715).unwrap(), x.f_mul_scalar(0.044715).unwrap());
            same(x.s_div(7.3).unwrap(), x.f_div_scalar(7.3).unwrap());
            same(x.s_add(1.0).unwrap(), x.f_add_scalar(1.0).unwrap());
            same(x.s_sub(0.625).unwrap(), x.f_sub_scalar(0.625).unwrap());
            same(x.s_clamp(-1.5, 2.25).unwrap(), x.f_clamp(-1.5, 2.25).unwrap());
            let mask = x.f_gt(0.0).unwrap();
            same(x.s_gt(0.0).unwrap(), mask.shallow_clone());
            same(
                x.s_masked_fill(&mask, crate::tensor::min_value(kind)).unwrap(),
                x.f_masked_fill(&mask, crate::tensor::min_value(kind)).unwrap(),
            );
        }
        let ids = Tensor::from_slice(&[-100i64, 3, 7]);
        assert_eq!(ids.s_ne(-100).unwrap().kind(), Kind::Bool);
        assert_eq!(ids.s_add(1).unwrap().kind(), Kind::Int64);
        // A float with integers gives the default float kind, as in PyTorch.
        assert_eq!(ids.s_mul(0.5).unwrap().kind(), Kind::Float);
        let mut t = Tensor::zeros([3], (Kind::Int64, Device::Cpu));
        t.s_fill_(4).unwrap();
        assert_eq!(Vec::<i64>::try_from(&t).unwrap(), vec![4, 4, 4]);
    }

    #[test]
    fn failed_allocations_are_errors_not_panics() {
        // A [2^40] float view: any operation on it must allocate 4 TiB and fail.
        let huge = Tensor::zeros([1], (Kind::Float, Device::Cpu)).expand([1i64 << 40], false);
        assert!(huge.s_mul(2.0).is_err());
        assert!(huge
            .s_masked_fill(&huge.s_gt(0.0).unwrap_or_else(|_| Tensor::from(true)), 1.0)
            .is_err());
    }
}
