//! The error type shared by the model-side crates.

/// An error from model construction, weight loading or a forward pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller-supplied tensor or argument is unusable (wrong rank, shape, kind or range).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The model configuration is missing a field, has a wrong type or an unsupported value.
    #[error("invalid config: {0}")]
    Config(String),
    /// A tensor the model needs is absent from the checkpoint.
    #[error("missing tensor `{0}` in the checkpoint")]
    MissingTensor(String),
    /// A checkpoint tensor's shape differs from the parameter it should fill.
    #[error("tensor `{name}` has shape {actual:?} in the checkpoint, the model expects {expected:?}")]
    TensorShape {
        /// The parameter name, as in HF's state dict.
        name: String,
        /// The parameter's shape.
        expected: Vec<i64>,
        /// The checkpoint tensor's shape.
        actual: Vec<i64>,
    },
    /// A checkpoint tensor's dtype cannot fill the parameter (integers or booleans where float
    /// weights belong: torch refuses them too).
    #[error("tensor `{name}` holds {actual:?} values in the checkpoint, the model expects floating-point weights")]
    TensorKind {
        /// The parameter name, as in HF's state dict.
        name: String,
        /// The checkpoint tensor's kind.
        actual: tch::Kind,
    },
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Builds an [`Error::InvalidInput`] from a message.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidInput(msg.into())
}

/// Checks that every named size is positive.
pub fn check_positive(sizes: &[(&str, i64)]) -> Result<()> {
    match sizes.iter().find(|(_, v)| *v <= 0) {
        Some((name, v)) => Err(Error::Config(format!("{name} must be positive, got {v}"))),
        None => Ok(()),
    }
}

/// Checks that every named epsilon is finite and not negative: a negative one makes every
/// normalised value NaN, which would pass silently as output.
pub fn check_epsilons(values: &[(&str, f64)]) -> Result<()> {
    match values.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
        Some((name, v)) => Err(Error::Config(format!("{name} must be finite and >= 0, got {v}"))),
        None => Ok(()),
    }
}

/// Checks that every named probability lies in [0, 1].
pub fn check_probabilities(values: &[(&str, f64)]) -> Result<()> {
    match values.iter().find(|(_, v)| !(0.0..=1.0).contains(v)) {
        Some((name, v)) => Err(Error::Config(format!("{name} must be in [0, 1], got {v}"))),
        None => Ok(()),
    }
}

/// Deserialises a model config from config.json, naming the architecture in the error.
pub fn parse_config<T: serde::de::DeserializeOwned>(config: &serde_json::Value, architecture: &str) -> Result<T> {
    serde_json::from_value(config.clone()).map_err(|e| Error::Config(format!("{architecture} config.json: {e}")))
}
