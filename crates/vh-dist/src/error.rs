//! Typed errors of vh-dist.

/// What failed inside c10d, from the C++ exception class the shim caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The rendezvous key-value store (`c10::DistStoreError`), its timeouts included.
    Store,
    /// Sockets of the store: a peer unreachable (`c10::DistNetworkError`).
    Network,
    /// The collective backend (`c10::DistBackendError`), e.g. a Gloo timeout.
    Backend,
    /// Any other libtorch error (`c10::Error`): bad tensor, bad argument.
    Torch,
    /// Any other C++ exception, gloo's own included (e.g. "Connection closed by peer" when a
    /// rank died).
    Other,
}

impl FailureKind {
    /// The kind for a shim return code (never 0).
    pub(crate) fn from_code(code: i32) -> Self {
        match code {
            1 => Self::Store,
            2 => Self::Network,
            3 => Self::Backend,
            4 => Self::Torch,
            _ => Self::Other,
        }
    }
}

/// Errors of process-group set-up, collectives and data-parallel helpers.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A torchrun variable is not set.
    #[error("environment variable {0} is not set (launch with torchrun or `cargo xtask launch`)")]
    MissingEnv(&'static str),
    /// A torchrun variable is set to something unusable.
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    InvalidEnv {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// An argument was refused before reaching c10d.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// c10d raised an error (or timed out) in an operation.
    #[error("{op} failed ({kind:?}): {message}")]
    Collective {
        /// The operation: "init", "all_reduce", "broadcast", "barrier", "all_gather".
        op: &'static str,
        /// Which part of c10d failed.
        kind: FailureKind,
        /// c10d's message, without its C++ backtrace.
        message: String,
    },
    /// A tensor operation around a collective failed.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl DistError {
    /// Whether the failure is a timeout (a peer that never answered, e.g. a dead rank).
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::Collective { message, .. } => {
                let m = message.to_ascii_lowercase();
                m.contains("timed out") || m.contains("timeout")
            }
            _ => false,
        }
    }
}

/// Result with [`DistError`].
pub type Result<T> = std::result::Result<T, DistError>;
