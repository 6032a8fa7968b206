//! Opening untrusted input files and choosing output paths safely.
//!
//! A checkpoint folder, an input file or a tokenizer may be hostile: a FIFO that never delivers
//! a byte, `/dev/zero` that never ends, a symlink to a device node. Every file this project reads
//! goes through [`open_regular`], which opens without blocking and refuses anything but a regular
//! file, and small metadata files are read with a size cap ([`read_capped`]). Every file it
//! writes goes through [`check_output_path`] first, so a write never replaces a device node, a
//! FIFO or a folder, and never lands on a file the same command reads.

use crate::error::{HubError, Result};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Size cap of JSON metadata files (config.json, generation_config.json, shard indexes).
pub const MAX_JSON_BYTES: u64 = 64 << 20;
/// Size cap of tokenizer files (tokenizer.json of large vocabularies reaches tens of MB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;
/// Size cap of chat templates.
pub const MAX_TEMPLATE_BYTES: u64 = 4 << 20;

/// Opens `path` for reading if (after following symlinks) it is a regular file. The open itself
/// does not block on a FIFO (`O_NONBLOCK`), and the check is made on the opened descriptor, so
/// the file cannot be swapped for another between check and use.
pub fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| HubError::io(path, e))?;
    let meta = file.metadata().map_err(|e| HubError::io(path, e))?;
    if !meta.is_file() {
        return Err(HubError::NotRegularFile {
            path: path.to_path_buf(),
            what: describe_file_type(&meta.file_type()),
        });
    }
    // O_NONBLOCK has no effect on regular files; it is cleared anyway so later reads behave as
    // ordinary blocking reads on every platform.
    // SAFETY: fcntl on a descriptor this function owns, with flags read from it just before.
    unsafe {
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&file);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Reads a regular file of at most `max_bytes` bytes into memory.
pub fn read_capped(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| HubError::io(path, e))?.len();
    if len > max_bytes {
        return Err(HubError::TooLarge {
            path: path.to_path_buf(),
            limit: max_bytes,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows while it is read.
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| HubError::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(HubError::TooLarge {
            path: path.to_path_buf(),
            limit: max_bytes,
        });
    }
    Ok(bytes)
}

/// Reads a regular UTF-8 text file of at most `max_bytes` bytes.
pub fn read_text_capped(path: &Path, max_bytes: u64) -> Result<String> {
    let bytes = read_capped(path, max_bytes)?;
    String::from_utf8(bytes).map_err(|e| HubError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

fn describe_file_type(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a folder"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Checks that `path` may receive an output file written by atomic rename: it does not exist,
/// or it is a regular file, or a symbolic link (which the rename replaces, never writing through
/// it). A device node, FIFO, socket or folder there is an error: renaming over `/dev/null` as
/// root would replace the device itself.
pub fn check_output_path(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HubError::io(path, e)),
        Ok(meta) if meta.is_file() || meta.file_type().is_symlink() => Ok(()),
        Ok(meta) => Err(HubError::NotRegularFile {
            path: path.to_path_buf(),
            what: describe_file_type(&meta.file_type()),
        }),
    }
}

/// Checks that the output `out` is none of the files in `inputs` (the same file by device and
/// inode, so other spellings of a path and hard links are caught; for a symlink at `out`, its
/// target counts too, as a reader would follow it). Writing a checkpoint's outputs over its own
/// weights is refused before anything runs.
pub fn check_not_an_input(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let identities: Vec<(u64, u64)> = [std::fs::symlink_metadata(out).ok(), std::fs::metadata(out).ok()]
        .into_iter()
        .flatten()
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if identities.is_empty() {
        return Ok(());
    }
    for input in inputs {
        if let Ok(m) = std::fs::metadata(input) {
            if identities.contains(&(m.dev(), m.ino())) {
                return Err(HubError::OutputIsInput {
                    out: out.to_path_buf(),
                    input: input.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Every regular file directly inside `dir` (the files a model folder's loader may read).
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_folders_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_capped(&fifo, 100).unwrap_err();
        assert!(matches!(err, HubError::NotRegularFile { what: "a FIFO", .. }), "{err}");
        let err = read_capped(Path::new("/dev/zero"), 100).unwrap_err();
        assert!(matches!(err, HubError::NotRegularFile { .. }), "{err}");
        assert!(matches!(
            read_capped(dir.path(), 100),
            Err(HubError::NotRegularFile { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(read_capped(&link, 100), Err(HubError::NotRegularFile { .. })));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 101]).unwrap();
        assert!(matches!(read_capped(&big, 100), Err(HubError::TooLarge { .. })));
        assert_eq!(read_capped(&big, 101).unwrap().len(), 101);
    }

    #[test]
    fn outputs_never_replace_devices_or_inputs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_output_path(Path::new("/dev/null")).is_err());
        assert!(check_output_path(dir.path()).is_err());
        let fifo = dir.path().join("out");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(check_output_path(&fifo).is_err());
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, b"w").unwrap();
        check_output_path(&file).unwrap();
        check_output_path(&dir.path().join("new")).unwrap();
        let other_spelling = dir.path().join(".").join("model.safetensors");
        assert!(matches!(
            check_not_an_input(&other_spelling, std::slice::from_ref(&file)),
            Err(HubError::OutputIsInput { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(check_not_an_input(&link, std::slice::from_ref(&file)).is_err());
        check_not_an_input(&dir.path().join("new"), &[file]).unwrap();
    }
}
