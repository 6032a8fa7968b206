//! Errors reading and writing checkpoint files.

use std::path::{Path, PathBuf};

/// An error reading or writing checkpoint files.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A file or folder the checkpoint needs does not exist.
    #[error("{what} not found: {path}")]
    NotFound {
        /// What was looked for (e.g. "config.json").
        what: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON or not of the expected form.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A safetensors file is malformed or truncated, or holds an unsupported dtype.
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The Hub refused the credentials (401/403). The token is never part of the message.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A Hub request failed (after retries, for idempotent requests).
    #[error("Hub request failed: {0}")]
    Http(String),
    /// The files are not in the cache and offline mode forbids downloading them.
    #[error("offline: {0}")]
    Offline(String),
    /// A path that must be a regular file is something else (a FIFO, a device, a folder).
    #[error("{path} is {what}, not a regular file")]
    NotRegularFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// A file is larger than what this kind of file may be.
    #[error("{path} is larger than the {limit} bytes allowed for it")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The cap in bytes.
        limit: u64,
    },
    /// An output path names a file the same command reads.
    #[error("refusing to write {out}: it is the input {input}")]
    OutputIsInput {
        /// The output path.
        out: PathBuf,
        /// The input it would overwrite.
        input: PathBuf,
    },
    /// A tensor could not be created or converted.
    #[error(transparent)]
    Core(#[from] vh_core::Error),
}

impl HubError {
    /// An I/O error on `path`; a missing file becomes [`HubError::NotFound`].
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            let what = path
                .file_name()
                .map_or("file".to_string(), |n| n.to_string_lossy().into_owned());
            return HubError::NotFound {
                what,
                path: path.to_path_buf(),
            };
        }
        HubError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A malformed safetensors file.
    pub fn safetensors(path: &Path, message: impl Into<String>) -> Self {
        HubError::Safetensors {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

impl From<tch::TchError> for HubError {
    fn from(e: tch::TchError) -> Self {
        HubError::Core(e.into())
    }
}

/// A `Result` with [`HubError`].
pub type Result<T> = std::result::Result<T, HubError>;
