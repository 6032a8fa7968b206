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
    /// A string given as a Hub repo id that huggingface_hub's `validate_repo_id` would refuse
    /// (e.g. `../../evil`, `a/b?x=1`); nothing was sent to the Hub.
    #[error("invalid Hub repo id `{repo_id}`: {reason}")]
    InvalidRepoId {
        /// The id as given (control characters escaped).
        repo_id: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// A revision that could leave the cache's `refs/` folder (e.g. `../../x`); nothing was sent.
    #[error("invalid revision `{revision}`: {reason}")]
    InvalidRevision {
        /// The revision as given (control characters escaped).
        revision: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// A file path in a repo (listed by the Hub, or to upload) that could escape its folder
    /// (e.g. `../x`, `/etc/x`, `a/../../b`).
    #[error("unsafe file path `{path}` for a Hub repo: {reason}")]
    InvalidRepoPath {
        /// The path (control characters escaped).
        path: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// The Hub answered something a real Hub never does: malformed JSON, a commit id or blob
    /// name that is not a hash, a listing with duplicate files, a link to another host.
    #[error("invalid answer from the Hub to {what}: {reason}")]
    InvalidAnswer {
        /// The request.
        what: String,
        /// What is wrong with the answer.
        reason: String,
    },
    /// A JSON answer longer than the cap on metadata: a broken or hostile server.
    #[error("the Hub's answer to {what} is longer than {limit} bytes; refused")]
    AnswerTooLarge {
        /// The request.
        what: String,
        /// The cap, in bytes.
        limit: u64,
    },
    /// The Hub did not connect or answer within the timeouts (after retries).
    #[error("Hub request timed out: {0}")]
    Timeout(String),
    /// A downloaded file whose content hash differs from the Hub's listing; it was not cached.
    #[error("download of {path} does not match the Hub's listing ({algorithm} {actual}, listed {expected}); nothing was cached")]
    HashMismatch {
        /// The file in the repo.
        path: String,
        /// `sha256` (LFS files) or `git-sha1` (other files).
        algorithm: &'static str,
        /// The hash the listing gives.
        expected: String,
        /// The hash of the bytes received.
        actual: String,
    },
    /// A download that ended before the size the Hub lists (after retries); it was not cached.
    #[error("download of {path} is incomplete: {received} of {expected} bytes arrived; nothing was cached")]
    Incomplete {
        /// The file in the repo.
        path: String,
        /// The listed size.
        expected: u64,
        /// The bytes that arrived.
        received: u64,
    },
    /// A download that sent more bytes than the Hub lists; it was cut and not cached.
    #[error("download of {path} sent more than the {expected} bytes the Hub lists; nothing was cached")]
    Oversized {
        /// The file in the repo.
        path: String,
        /// The listed size.
        expected: u64,
    },
    /// A local file that an upload refuses: a symlink leading outside the folder, a dangling
    /// one, or something that is not a regular file.
    #[error("refusing to upload {path}: {reason}")]
    UnsafeUpload {
        /// The file in the folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A local path given as a model that is not a model folder (a file, or a string that is
    /// a path, not a repo id); nothing was sent to the Hub.
    #[error("{path} is not a model folder: {reason}")]
    NotAModelFolder {
        /// The path.
        path: PathBuf,
        /// What it is instead, and what to give.
        reason: String,
    },
    /// The cache holds something the client never writes (e.g. a ref that is not a commit id).
    #[error("corrupt Hub cache entry {path}: {reason}")]
    CorruptCache {
        /// The cache file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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
