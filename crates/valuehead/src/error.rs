//! The facade's error type.

/// An error from loading or running a value-head model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model-side error: bad input, bad config, missing or misshapen tensors, libtorch.
    #[error(transparent)]
    Model(#[from] vh_core::Error),
    /// A checkpoint file could not be found, read or written.
    #[error(transparent)]
    Hub(#[from] vh_hub::HubError),
    /// config.json names an architecture this library does not implement.
    #[error("unsupported model_type `{0}`")]
    UnsupportedModel(String),
    /// The checkpoint is a backbone without a language-model head.
    #[error("the model has no language-model head: {0}")]
    NoLmHead(String),
    /// A load option is unknown or has an invalid value.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// A CUDA graph could not be replayed (a failed capture is not an error: decoding goes on
    /// eagerly, with a warning).
    #[error(transparent)]
    CudaGraph(#[from] vh_cuda_graph::GraphError),
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Model(e.into())
    }
}

/// A `Result` with the facade's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
