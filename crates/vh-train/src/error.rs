//! The training utilities' error type.

/// An error from an optimiser, a schedule, a loss or a backward pass.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The optimiser was given no trainable parameter (PyTorch: "optimizer got an empty
    /// parameter list").
    #[error("the optimiser got an empty parameter list")]
    NoParameters,
    /// A backward pass was asked of a tensor that no autograd graph produced (computed under
    /// `no_grad`, from detached tensors, or from parameters that do not require gradients).
    #[error("`{0}` does not require grad: it has no autograd graph to differentiate (computed under no_grad, or from detached tensors?)")]
    NoGraph(String),
    /// A loss term, a loss or a gradient norm is NaN or infinite; nothing was stepped.
    #[error("{term} is not finite ({value}); no gradient was applied")]
    NonFinite {
        /// Which term: `lm_loss`, `value_loss`, `loss`, `gradient norm`, ...
        term: String,
        /// The value found.
        value: f64,
    },
    /// Two tensors that must have the same shape do not (values vs targets, a mask vs its values).
    #[error("shape mismatch: `{left}` is {left_shape:?} but `{right}` is {right_shape:?}")]
    Shape {
        /// The first tensor's name.
        left: String,
        /// Its shape.
        left_shape: Vec<i64>,
        /// The second tensor's name.
        right: String,
        /// Its shape.
        right_shape: Vec<i64>,
    },
    /// A mask selects nothing, so the mean over it is undefined (PyTorch would give NaN).
    #[error("`{0}` selects no element: the masked mean is undefined")]
    EmptyMask(String),
    /// An argument is outside its valid range (a negative learning rate, betas outside [0, 1), ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A tensor operation of the shared model crates failed.
    #[error(transparent)]
    Core(#[from] vh_core::Error),
    /// libtorch reported an error (e.g. a second backward through a freed graph).
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

/// Checks that `left` and `right` have the same shape.
pub fn same_shape(left: (&str, &tch::Tensor), right: (&str, &tch::Tensor)) -> Result<()> {
    let (ls, rs) = (left.1.size(), right.1.size());
    if ls != rs {
        return Err(TrainError::Shape {
            left: left.0.to_string(),
            left_shape: ls,
            right: right.0.to_string(),
            right_shape: rs,
        });
    }
    Ok(())
}
