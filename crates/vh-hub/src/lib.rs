//! Checkpoint files for valuehead: model folders, safetensors reading, atomic writing.
//!
//! This crate knows files and tensors, not architectures.

pub mod checkpoint;
pub mod error;
pub mod files;
pub mod folder;
pub mod http;
pub mod hub;
pub mod progress;
pub mod push;
pub mod safetensors_io;
#[cfg(feature = "test-server")]
pub mod test_server;
pub mod torch_bin;
pub mod validate;

pub use checkpoint::write_checkpoint;
pub use error::{HubError, Result};
pub use folder::ModelFolder;
pub use hub::{parse_model_info, parse_tree_listing, resolve_model, HubOptions, ModelInfo, RepoFile};
pub use push::{push_folder, uploadable_file, PushOptions};
pub use safetensors_io::{read_safetensors, write_safetensors};
pub use validate::{validate_repo_id, validate_repo_path, validate_revision};

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: into a temporary file beside it, flushed to disk, then
/// renamed over `path`, so a reader never sees a half-written file. `path` must not be a device
/// node, FIFO or folder ([`files::check_output_path`]).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    files::check_output_path(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| HubError::io(path, std::io::Error::other("not a file path")))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(HubError::io(path, e));
    }
    Ok(())
}
