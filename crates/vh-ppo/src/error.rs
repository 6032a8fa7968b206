//! The PPO trainer's error type.

/// An error from the PPO trainer: a bad configuration or input, a non-finite reward, or an error
/// of the layers below (models, math, optimiser, files).
#[derive(Debug, thiserror::Error)]
pub enum PpoError {
    /// A configuration value is out of range or inconsistent (batch sizes that do not divide, ...).
    #[error("invalid PPO configuration: {0}")]
    Config(String),
    /// An input (prompts, a reward model, a checkpoint) cannot be used.
    #[error("invalid input: {0}")]
    Input(String),
    /// A reward was NaN or infinite: nothing was stepped with it.
    #[error("the reward of row {row} is not finite ({value}); the step was abandoned before any update")]
    NonFiniteReward {
        /// The row (within the rollout batch).
        row: usize,
        /// The reward given.
        value: f64,
    },
    /// The model or the reward model failed.
    #[error(transparent)]
    Model(#[from] valuehead::Error),
    /// PPO's math refused its inputs.
    #[error(transparent)]
    Rl(#[from] vh_rl::RlError),
    /// The optimiser or a loss check failed (a NaN loss or gradient norm, ...).
    #[error(transparent)]
    Train(#[from] vh_train::TrainError),
    /// A collective of the data-parallel process group failed (a rank died, a timeout, ...).
    #[error(transparent)]
    Dist(#[from] vh_dist::DistError),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// Reading or writing a checkpoint failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A checkpoint's JSON could not be read.
    #[error("{path}: {message}")]
    Json {
        /// The file concerned.
        path: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl From<vh_core::Error> for PpoError {
    fn from(e: vh_core::Error) -> Self {
        Self::Model(e.into())
    }
}

/// A `Result` with [`PpoError`].
pub type Result<T> = std::result::Result<T, PpoError>;
