//! The RL math's error type.

use tch::Tensor;

/// An error from the PPO math: mismatched shapes, empty masks, bad arguments.
#[derive(Debug, thiserror::Error)]
pub enum RlError {
    /// Tensors whose shapes must agree do not.
    #[error("shape mismatch: `{left}` is {left_shape:?} but `{right}` must be {right_shape:?}")]
    Shape {
        /// The tensor whose shape is wrong.
        left: String,
        /// Its shape.
        left_shape: Vec<i64>,
        /// What it was compared with (another tensor, or a description).
        right: String,
        /// The shape it must have.
        right_shape: Vec<i64>,
    },
    /// A mask selects too few elements for the statistic (TRL raises for an empty mask in
    /// `masked_var` and returns NaN from `masked_mean`; a variance of one element divides by 0).
    #[error("`{what}` selects {count} element(s): {why}")]
    EmptyMask {
        /// The statistic or tensor concerned.
        what: String,
        /// How many elements the mask selects.
        count: i64,
        /// Why that is too few.
        why: String,
    },
    /// An argument is out of range (a token id outside the vocabulary, a negative clip range, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A tensor operation of the shared model crates failed.
    #[error(transparent)]
    Core(#[from] vh_core::Error),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A `Result` with [`RlError`].
pub type Result<T> = std::result::Result<T, RlError>;

/// Checks that `t` has exactly the shape `expected` (described by `what`).
pub(crate) fn expect_shape(name: &str, t: &Tensor, what: &str, expected: &[i64]) -> Result<()> {
    if t.size() != expected {
        return Err(RlError::Shape {
            left: name.to_string(),
            left_shape: t.size(),
            right: what.to_string(),
            right_shape: expected.to_vec(),
        });
    }
    Ok(())
}

/// Checks that two tensors have the same shape.
pub(crate) fn same_shape(a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<()> {
    expect_shape(a.0, a.1, b.0, &b.1.size())
}

/// Checks that `t` holds integers.
pub(crate) fn expect_integer(name: &str, t: &Tensor) -> Result<()> {
    if !vh_core::tensor::is_integer_kind(t.kind()) {
        return Err(RlError::InvalidArgument(format!(
            "`{name}` must hold integers, got {:?}",
            t.kind()
        )));
    }
    Ok(())
}

/// Checks that `t` holds floating-point values.
pub(crate) fn expect_float(name: &str, t: &Tensor) -> Result<()> {
    if !vh_core::tensor::is_float_kind(t.kind()) {
        return Err(RlError::InvalidArgument(format!(
            "`{name}` must hold floating-point values, got {:?}",
            t.kind()
        )));
    }
    Ok(())
}
