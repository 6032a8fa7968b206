//! Writing checkpoint folders as transformers does (config.json, generation_config.json,
//! model.safetensors or shards with model.safetensors.index.json), atomically and so that a
//! process killed at any point leaves the old or the new checkpoint, never a mixture.
//!
//! # The save protocol
//!
//! For a target `parent/name`, every name this module creates lives beside it, hidden, and
//! carries the saving process's pid and a per-process counter `n`:
//!
//! - `.name.saving-{pid}-{n}`: the staging folder. The weights, generation_config.json and the
//!   files kept from the old folder are written first, config.json last (so a staging folder
//!   without config.json is never loadable), each file flushed to disk, then the folder itself.
//!   The saver holds an exclusive `flock` on it while it lives.
//! - `.name.old-{pid}-{n}`: the old folder, moved aside by the two-rename fallback only. It is a
//!   complete checkpoint: while the target is missing, the next save or load renames it back.
//! - `.name.trash-{pid}-{n}`: the old folder after the swap, being deleted.
//!
//! The swap runs under an exclusive `flock` on the parent folder (held only for the renames,
//! never while writing): the staging folder and the target are exchanged in one step with
//! Linux's `renameat2(RENAME_EXCHANGE)`; where the file system does not support it (EINVAL,
//! ENOSYS, EOPNOTSUPP), the target is renamed to `.old-…` and the staging folder renamed in.
//! The parent folder is flushed, the old folder renamed to `.trash-…`, the lock released, and the
//! trash deleted. Leftovers of processes that no longer exist (the pid is gone and the folder's
//! lock is free) are removed by the next save of the same target; those of a live process are
//! left alone. `docs/robustness.md` lists what a kill at each step leaves.

use crate::error::{HubError, Result};
use crate::folder::{CONFIG, GENERATION_CONFIG, SAFETENSORS_WEIGHTS};
use serde_json::{json, Value};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tch::Tensor;

/// The index file of a sharded safetensors checkpoint.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// Whether a file name is one of the weight files this writer replaces.
fn is_weight_file(name: &str) -> bool {
    name == SAFETENSORS_WEIGHTS
        || name == SAFETENSORS_INDEX
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// Splits tensors into shards of at most `max_shard_size` bytes (a tensor larger than that gets
/// a shard of its own), keeping their order, as transformers' `split_torch_state_dict_into_shards`.
fn shard(tensors: &[(String, Tensor)], max_shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current = 0u64;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if shards.is_empty() || current + bytes > max_shard_size {
            shards.push(Vec::new());
            current = 0;
        }
        shards.last_mut().expect("pushed above").push(i);
        current += bytes;
    }
    shards
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| HubError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    crate::atomic_write(path, format!("{text}\n").as_bytes())
}

thread_local! {
    /// Whether this thread's saves try the one-step exchange (tests turn it off to exercise the
    /// two-rename fallback that file systems without `RENAME_EXCHANGE` take).
    static EXCHANGE_ENABLED: Cell<bool> = const { Cell::new(true) };
}

thread_local! {
    /// How long this thread's fallback saves wait between their two renames (zero but in tests,
    /// which widen the window so that random kills land in it).
    static PAUSE_BETWEEN_RENAMES: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Makes this thread's fallback saves wait `pause` between their two renames; for kill tests.
#[doc(hidden)]
pub fn set_pause_between_renames(pause: Duration) {
    PAUSE_BETWEEN_RENAMES.with(|p| p.set(pause));
}

/// Makes this thread's saves use the two-rename fallback (`false`) or the atomic exchange where
/// supported (`true`, the default); for tests of the fallback.
#[doc(hidden)]
pub fn set_rename_exchange(enabled: bool) {
    EXCHANGE_ENABLED.with(|e| e.set(enabled));
}

/// Numbers this process's saves, so that concurrent saves from several threads never share a
/// staging name.
static SAVE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What a hidden folder beside a target is, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leftover {
    /// `.name.saving-{pid}-{n}`: a staging folder (or, after an exchange, the old folder).
    Saving,
    /// `.name.old-{pid}-{n}`: the old folder moved aside by the two-rename fallback; complete.
    Old,
    /// `.name.trash-{pid}-{n}`: an old folder being deleted.
    Trash,
}

impl Leftover {
    fn tag(self) -> &'static str {
        match self {
            Leftover::Saving => "saving",
            Leftover::Old => "old",
            Leftover::Trash => "trash",
        }
    }
}

/// The parent folder and the file name of a target folder.
fn split_target(dir: &Path) -> Result<(PathBuf, OsString)> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .ok_or_else(|| HubError::io(dir, std::io::Error::other("not a folder path")))?;
    Ok((parent.to_path_buf(), name.to_os_string()))
}

/// `parent/.name.{tag}-{pid}-{n}`.
fn leftover_path(parent: &Path, name: &OsStr, kind: Leftover, n: u64) -> PathBuf {
    let mut file = OsString::from(".");
    file.push(name);
    file.push(format!(".{}-{}-{n}", kind.tag(), std::process::id()));
    parent.join(file)
}

/// Parses a folder name beside target `name` as one of this module's leftovers: its kind and
/// owner pid. Also recognises the staging name of earlier versions, `.name.saving-{pid}`.
fn parse_leftover(name: &OsStr, entry: &OsStr) -> Option<(Leftover, u32)> {
    let rest = entry.as_bytes().strip_prefix(b".")?.strip_prefix(name.as_bytes())?;
    let rest = std::str::from_utf8(rest.strip_prefix(b".")?).ok()?;
    let (tag, numbers) = rest.split_once('-')?;
    let kind = [Leftover::Saving, Leftover::Old, Leftover::Trash]
        .into_iter()
        .find(|k| k.tag() == tag)?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let pid = match numbers.split_once('-') {
        Some((pid, n)) if all_digits(pid) && all_digits(n) => pid,
        None if kind == Leftover::Saving && all_digits(numbers) => numbers,
        _ => return None,
    };
    Some((kind, pid.parse().ok()?))
}

/// Whether `path` names a staging or trash folder of a save (running, killed or being
/// deleted), which may be incomplete and is never a checkpoint to load. A `.name.old-…` aside is
/// complete and not included.
pub fn is_unfinished_save(path: &Path) -> bool {
    let Some(file) = path.file_name() else { return false };
    // The target's name is unknown here: try every split of `.{name}.{tag}-…` at a dot.
    let bytes = file.as_bytes();
    bytes.first() == Some(&b'.')
        && bytes
            .iter()
            .enumerate()
            .skip(2)
            .filter(|(_, &b)| b == b'.')
            .any(|(i, _)| {
                parse_leftover(OsStr::from_bytes(&bytes[1..i]), file).is_some_and(|(kind, _)| kind != Leftover::Old)
            })
}

/// Whether process `pid` exists (signal 0 only checks; EPERM means it exists under another user).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: kill with signal 0 sends nothing; it only reports whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// An exclusive `flock` on a file or folder, released when dropped (the descriptor closes).
struct FolderLock {
    _file: File,
}

impl FolderLock {
    /// Waits for the lock on `path`. File systems that do not support `flock`, and folders
    /// that cannot be opened for reading, give no lock (the save goes on without one).
    fn acquire(path: &Path) -> Result<Option<Self>> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(None),
            Err(e) => return Err(HubError::io(path, e)),
        };
        loop {
            // SAFETY: flock on a descriptor owned by `file`.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Some(Self { _file: file }));
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => return Ok(None),
                _ => return Err(HubError::io(path, err)),
            }
        }
    }

    /// Takes the lock on `path` if no one holds it; `None` if someone does (or it cannot be
    /// opened).
    fn try_acquire(path: &Path) -> Option<Self> {
        let file = File::open(path).ok()?;
        // SAFETY: flock on a descriptor owned by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        (rc == 0).then_some(Self { _file: file })
    }
}

/// Whether the owner of a leftover is gone: it is not this process, the pid no longer exists,
/// and no one holds the folder's lock (which also protects the save of a live process in
/// another pid namespace sharing the folder). A reused pid keeps a leftover until that process
/// exits: harmless.
fn owner_gone(pid: u32, path: &Path) -> bool {
    pid != std::process::id() && !process_alive(pid) && FolderLock::try_acquire(path).is_some()
}

/// Flushes a folder's entries to disk (file systems that cannot sync folders are let be).
fn sync_dir(path: &Path) -> Result<()> {
    let result = File::open(path).and_then(|f| f.sync_all());
    match result {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)) => Ok(()),
        other => other.map_err(|e| HubError::io(path, e)),
    }
}

/// Removes a folder tree; one already gone (another save's tidy-up got there first) is fine.
fn remove_tree(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(_) if std::fs::symlink_metadata(path).is_err() => Ok(()),
        Err(e) => Err(HubError::io(path, e)),
    }
}

/// Swaps two paths in one step (Linux `renameat2` with `RENAME_EXCHANGE`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    if !EXCHANGE_ENABLED.with(Cell::get) {
        return Err(std::io::Error::from_raw_os_error(libc::ENOSYS));
    }
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: renameat2 with two NUL-terminated paths relative to the working directory. The
    // raw syscall is used because glibc only wraps it from 2.28 on.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Other systems have no exchange here; saves take the two-rename fallback.
#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Whether an exchange failed because the system or file system lacks it.
fn exchange_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// The leftovers beside target `name` in `parent`, with their kind and owner.
fn leftovers(parent: &Path, name: &OsStr) -> Vec<(PathBuf, Leftover, u32)> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let (kind, pid) = parse_leftover(name, &e.file_name())?;
            Some((e.path(), kind, pid))
        })
        .collect()
}

/// With the parent's lock held: if the target is missing and a save killed between the
/// fallback's two renames left the old folder aside, renames it back. Returns whether it did.
fn restore_if_missing(parent: &Path, name: &OsStr) -> Result<bool> {
    let dir = parent.join(name);
    if std::fs::symlink_metadata(&dir).is_ok() {
        return Ok(false);
    }
    // Under the lock no save is between its renames, so every aside is a dead save's. There is
    // at most one (each save restores before it moves a folder aside); the newest wins anyway.
    let newest = leftovers(parent, name)
        .into_iter()
        .filter(|(_, kind, _)| *kind == Leftover::Old)
        .max_by_key(|(path, _, _)| std::fs::symlink_metadata(path).and_then(|m| m.modified()).ok());
    let Some((aside, _, _)) = newest else { return Ok(false) };
    std::fs::rename(&aside, &dir).map_err(|e| HubError::io(&dir, e))?;
    sync_dir(parent)?;
    Ok(true)
}

/// With the parent's lock held: restores a missing target from its aside copy, then removes
/// the leftovers of saves whose process is gone (staging and trash folders) and asides that
/// are no longer needed (the target exists).
fn tidy(parent: &Path, name: &OsStr) -> Result<()> {
    restore_if_missing(parent, name)?;
    for (path, kind, pid) in leftovers(parent, name) {
        let garbage = match kind {
            Leftover::Old => true,
            Leftover::Saving | Leftover::Trash => owner_gone(pid, &path),
        };
        if garbage {
            // Best effort: a leftover this process may not delete (another user's) must not
            // stop the save; the next one tries again.
            let _ = remove_tree(&path);
        }
    }
    Ok(())
}

/// Restores the target folder `dir` if it is missing because a save was killed between the
/// two renames of the fallback path (see the module docs). Called by [`crate::ModelFolder::open`]
/// for a folder that does not exist; errors (e.g. a read-only parent) leave things as they are.
pub fn recover_missing_folder(dir: &Path) -> bool {
    let Ok((parent, name)) = split_target(dir) else {
        return false;
    };
    // Most missing folders are simply missing: look before taking any lock.
    if !leftovers(&parent, &name)
        .iter()
        .any(|(_, kind, _)| *kind == Leftover::Old)
    {
        return false;
    }
    let Ok(_lock) = FolderLock::acquire(&parent) else {
        return false;
    };
    restore_if_missing(&parent, &name).unwrap_or(false)
}

/// Writes a checkpoint folder: `config.json`, `generation_config.json` (when given) and the
/// tensors, in one `model.safetensors` or, when `max_shard_size` (bytes) is exceeded, in
/// `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`.
///
/// The folder is written aside, flushed to disk and swapped into place in one step where the
/// file system allows it, so a process killed at any point leaves `dir` as the old or the new
/// checkpoint (see the module docs for the protocol and the fallback). Other files already in
/// `dir` (tokenizer, README) are kept; its previous weight files are replaced. Leftovers of
/// earlier saves of `dir` killed mid-way are removed.
pub fn write_checkpoint(
    dir: &Path,
    config: &Value,
    generation_config: Option<&Value>,
    tensors: &[(String, Tensor)],
    max_shard_size: Option<u64>,
) -> Result<()> {
    let (parent, name) = split_target(dir)?;
    std::fs::create_dir_all(&parent).map_err(|e| HubError::io(&parent, e))?;
    {
        let _lock = FolderLock::acquire(&parent)?;
        tidy(&parent, &name)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(dir) {
        // A symlink to a folder is replaced by the new folder (its target is left untouched);
        // anything else that is not a folder is refused rather than swapped away.
        if !(meta.is_dir() || meta.file_type().is_symlink() && dir.is_dir()) {
            return Err(HubError::NotAModelFolder {
                path: dir.to_path_buf(),
                reason: "it exists and is not a folder; refusing to replace it with a checkpoint".to_string(),
            });
        }
    }
    let n = SAVE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let staging = leftover_path(&parent, &name, Leftover::Saving, n);
    if std::fs::symlink_metadata(&staging).is_ok() {
        remove_tree(&staging)?;
    }
    std::fs::create_dir(&staging).map_err(|e| HubError::io(&staging, e))?;
    // Held until the save ends, so no other process's tidy-up takes this folder for a dead one.
    let staging_lock = FolderLock::try_acquire(&staging);
    let result = fill_staging(&staging, dir, config, generation_config, tensors, max_shard_size)
        .and_then(|()| sync_dir(&staging))
        .and_then(|()| swap_into_place(&parent, &name, &staging, n));
    drop(staging_lock);
    if result.is_err() {
        let _ = remove_tree(&staging);
    }
    result
}

/// Copies a file and flushes the copy to disk.
fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map_err(|e| HubError::io(from, e))?;
    File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(|e| HubError::io(to, e))
}

fn fill_staging(
    staging: &Path,
    dir: &Path,
    config: &Value,
    generation_config: Option<&Value>,
    tensors: &[(String, Tensor)],
    max_shard_size: Option<u64>,
) -> Result<()> {
    // Keep what the folder already holds besides the files written here.
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(|e| HubError::io(dir, e))? {
            let entry = entry.map_err(|e| HubError::io(dir, e))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let written = file_name == CONFIG || file_name == GENERATION_CONFIG || is_weight_file(&file_name);
            if entry.path().is_file() && !written {
                copy_synced(&entry.path(), &staging.join(&file_name))?;
            }
        }
    }
    if let Some(generation_config) = generation_config {
        write_json(&staging.join(GENERATION_CONFIG), generation_config)?;
    }
    write_weights(staging, tensors, max_shard_size)?;
    // config.json last: a staging folder is never loadable before every other file is complete
    // and on disk (each file is flushed by `atomic_write`).
    write_json(&staging.join(CONFIG), config)
}

/// Writes the tensors into `staging` as one file or as shards with their index (last).
fn write_weights(staging: &Path, tensors: &[(String, Tensor)], max_shard_size: Option<u64>) -> Result<()> {
    let shards = match max_shard_size {
        Some(max) => shard(tensors, max),
        None => vec![(0..tensors.len()).collect()],
    };
    if shards.len() <= 1 {
        return crate::write_safetensors(&staging.join(SAFETENSORS_WEIGHTS), tensors);
    }
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    for (n, indices) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", n + 1, shards.len());
        let part: Vec<(String, Tensor)> = indices
            .iter()
            .map(|&i| (tensors[i].0.clone(), tensors[i].1.shallow_clone()))
            .collect();
        for (name, t) in &part {
            weight_map.insert(name.clone(), file.clone());
            total_size += t.numel() * t.kind().elt_size_in_bytes();
        }
        crate::write_safetensors(&staging.join(&file), &part)?;
    }
    write_json(
        &staging.join(SAFETENSORS_INDEX),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    )
}

/// Puts the complete staging folder at `parent/name`, under the parent's lock: exchanged with
/// the old folder in one step where supported, else by the two-rename fallback; then the old
/// folder is renamed to trash and, after the lock is released, deleted.
fn swap_into_place(parent: &Path, name: &OsStr, staging: &Path, n: u64) -> Result<()> {
    let dir = parent.join(name);
    let lock = FolderLock::acquire(parent)?;
    // A save killed between the fallback's renames since this save's tidy-up would otherwise
    // make this save look like the first one and lose the old folder's aside copy for good.
    restore_if_missing(parent, name)?;
    if std::fs::symlink_metadata(&dir).is_err() {
        std::fs::rename(staging, &dir).map_err(|e| HubError::io(&dir, e))?;
        return sync_dir(parent);
    }
    let old = match exchange(staging, &dir) {
        // The old folder now sits at the staging path.
        Ok(()) => staging.to_path_buf(),
        Err(e) if exchange_unsupported(&e) => {
            let aside = leftover_path(parent, name, Leftover::Old, n);
            std::fs::rename(&dir, &aside).map_err(|e| HubError::io(&dir, e))?;
            // Killed here, the target is missing and `aside` complete: the next save or load
            // renames it back (`restore_if_missing`).
            let pause = PAUSE_BETWEEN_RENAMES.with(Cell::get);
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
            if let Err(e) = std::fs::rename(staging, &dir) {
                let _ = std::fs::rename(&aside, &dir);
                return Err(HubError::io(&dir, e));
            }
            aside
        }
        Err(e) => return Err(HubError::io(&dir, e)),
    };
    // The swap reaches the disk before the old copy starts to go, so a power cut cannot lose
    // both.
    sync_dir(parent)?;
    let trash = leftover_path(parent, name, Leftover::Trash, n);
    std::fs::rename(&old, &trash).map_err(|e| HubError::io(&old, e))?;
    drop(lock);
    remove_tree(&trash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelFolder;
    use tch::{Device, Kind};

    fn tensors() -> Vec<(String, Tensor)> {
        (0..5)
            .map(|i| {
                (
                    format!("t{i}"),
                    Tensor::full([16], i as f64, (Kind::Float, Device::Cpu)),
                )
            })
            .collect()
    }

    #[test]
    fn writes_one_file_or_shards_and_reads_them_back() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let config = json!({"model_type": "gpt2"});
        write_checkpoint(&dir, &config, Some(&json!({"eos_token_id": 1})), &tensors(), None).unwrap();
        assert!(dir.join(SAFETENSORS_WEIGHTS).exists() && dir.join(GENERATION_CONFIG).exists());
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();

        // 64 bytes per tensor, shards of at most 130 bytes: 2 + 2 + 1 tensors.
        write_checkpoint(&dir, &config, None, &tensors(), Some(130)).unwrap();
        let files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            files.contains(&"model-00003-of-00003.safetensors".to_string()),
            "{files:?}"
        );
        assert!(
            !files.contains(&SAFETENSORS_WEIGHTS.to_string()),
            "the old single file is replaced"
        );
        assert!(files.contains(&"tokenizer.json".to_string()), "other files are kept");
        assert!(!files.contains(&GENERATION_CONFIG.to_string()));
        let back = ModelFolder::open(&dir).unwrap().tensors().unwrap();
        assert_eq!(back.len(), 5);
        for (name, t) in back {
            let i: f64 = name[1..].parse().unwrap();
            assert_eq!(t.double_value(&[3]), i);
        }
        let leftovers: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no staging folders left: {leftovers:?}");
    }

    /// The names in `root`, sorted.
    fn names(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// The pid of a process that has exited (and been waited for).
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// The value of tensor `t0` of the checkpoint in `dir` (each checkpoint here is filled with
    /// one value).
    fn fill_value(dir: &Path) -> f64 {
        let tensors = ModelFolder::open(dir).unwrap().tensors().unwrap();
        tensors.iter().find(|(n, _)| n == "t0").unwrap().1.double_value(&[0])
    }

    fn filled(value: f64) -> Vec<(String, Tensor)> {
        vec![("t0".into(), Tensor::full([4], value, (Kind::Float, Device::Cpu)))]
    }

    #[test]
    fn the_two_rename_fallback_gives_the_same_folder_and_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        set_rename_exchange(false);
        write_checkpoint(&dir, &json!({"v": 1}), None, &filled(1.0), None).unwrap();
        std::fs::write(dir.join("README.md"), "kept").unwrap();
        write_checkpoint(&dir, &json!({"v": 2}), None, &filled(2.0), Some(8)).unwrap();
        set_rename_exchange(true);
        assert_eq!(fill_value(&dir), 2.0);
        assert_eq!(std::fs::read_to_string(dir.join("README.md")).unwrap(), "kept");
        assert_eq!(names(root.path()), ["ckpt"]);
    }

    #[test]
    fn leftovers_of_dead_saves_are_removed_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        write_checkpoint(&dir, &json!({}), None, &filled(1.0), None).unwrap();
        let dead = dead_pid();
        let mut sleeper = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let live = sleeper.id();
        let make = |name: &str| {
            let path = root.path().join(name);
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("model.safetensors"), b"partial").unwrap();
            path
        };
        let removed = [
            format!(".ckpt.saving-{dead}-0"),
            format!(".ckpt.saving-{dead}"),
            format!(".ckpt.trash-{dead}-3"),
            format!(".ckpt.old-{dead}-1"),
            // Under the parent's lock an aside with the target present is garbage, whoever
            // made it.
            format!(".ckpt.old-{live}-2"),
        ];
        for name in &removed {
            make(name);
        }
        let kept = [
            format!(".ckpt.saving-{live}-0"),
            format!(".ckpt.trash-{live}-0"),
            // This process's own, with a counter its saves do not reach.
            format!(".ckpt.saving-{}-999999", std::process::id()),
            format!(".ckpt.saving-{dead}-7"),
            format!(".other.saving-{dead}-0"),
            format!(".ckpt.saving-{dead}-x"),
            format!(".ckpt.saving-{dead}-1-2"),
        ];
        for name in &kept {
            make(name);
        }
        // A live saver whose pid this process cannot see (another pid namespace) still holds
        // its staging folder's lock.
        let held = FolderLock::try_acquire(&root.path().join(&kept[3])).unwrap();
        write_checkpoint(&dir, &json!({}), None, &filled(2.0), None).unwrap();
        drop(held);
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        let mut expected: Vec<String> = kept.to_vec();
        expected.push("ckpt".to_string());
        expected.sort();
        assert_eq!(names(root.path()), expected);
        assert_eq!(fill_value(&dir), 2.0);
    }

    #[test]
    fn a_folder_left_aside_by_a_killed_fallback_save_is_restored_by_a_load_or_a_save() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let dead = dead_pid();
        // A save killed between the fallback's two renames: the target aside, the new folder
        // still staged.
        let kill_between_renames = |new_value: f64| {
            std::fs::rename(&dir, root.path().join(format!(".ckpt.old-{dead}-0"))).unwrap();
            let staging = root.path().join(format!(".ckpt.saving-{dead}-1"));
            write_checkpoint(&staging, &json!({}), None, &filled(new_value), None).unwrap();
        };
        write_checkpoint(&dir, &json!({}), None, &filled(1.0), None).unwrap();
        kill_between_renames(2.0);
        assert!(!dir.exists());
        assert_eq!(fill_value(&dir), 1.0, "the load restores the old folder");
        assert!(dir.is_dir());

        kill_between_renames(2.0);
        write_checkpoint(&dir, &json!({}), None, &filled(3.0), None).unwrap();
        assert_eq!(fill_value(&dir), 3.0);
        assert_eq!(
            names(root.path()),
            ["ckpt"],
            "the save restored, then replaced, and tidied up"
        );

        // No aside: a missing folder stays missing.
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(ModelFolder::open(&dir), Err(HubError::NotFound { .. })));
    }

    #[test]
    fn staging_folders_are_refused_and_incomplete_ones_have_no_config() {
        let root = tempfile::tempdir().unwrap();
        for (name, unfinished) in [
            (".ckpt.saving-12-0", true),
            (".my.model.saving-12-3", true),
            (".ckpt.trash-12-0", true),
            (".ckpt.saving-12", true),
            (".ckpt.old-12-0", false),
            ("ckpt.saving-12-0", false),
            (".ckpt.saving-x-0", false),
            ("ckpt", false),
        ] {
            let path = root.path().join(name);
            assert_eq!(is_unfinished_save(&path), unfinished, "{name}");
            std::fs::create_dir(&path).unwrap();
            assert_eq!(
                matches!(ModelFolder::open(&path), Err(HubError::NotAModelFolder { .. })),
                unfinished,
                "{name}"
            );
        }
        // The staging folder gets config.json last: while weights are written, it has none.
        let staging = root.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        write_weights(&staging, &tensors(), Some(130)).unwrap();
        assert!(!staging.join(CONFIG).exists());
        assert!(ModelFolder::open(&staging).unwrap().config().is_err());
    }

    #[test]
    fn a_failed_save_leaves_the_old_folder_and_no_staging() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        write_checkpoint(&dir, &json!({}), None, &filled(1.0), None).unwrap();
        let complex = vec![("t0".to_string(), Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu)))];
        assert!(write_checkpoint(&dir, &json!({}), None, &complex, None).is_err());
        assert_eq!(fill_value(&dir), 1.0);
        assert_eq!(names(root.path()), ["ckpt"]);

        // A file where the folder should be is refused, not swapped away.
        let file = root.path().join("file");
        std::fs::write(&file, b"mine").unwrap();
        assert!(matches!(
            write_checkpoint(&file, &json!({}), None, &filled(1.0), None),
            Err(HubError::NotAModelFolder { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"mine");
    }

    #[test]
    fn saving_through_a_symlink_replaces_the_link_and_keeps_its_target() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        write_checkpoint(&real, &json!({}), None, &filled(1.0), None).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_checkpoint(&link, &json!({}), None, &filled(2.0), None).unwrap();
        assert!(!std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(fill_value(&link), 2.0);
        assert_eq!(fill_value(&real), 1.0);
        assert_eq!(names(root.path()), ["link", "real"]);
    }

    #[test]
    fn an_index_naming_a_missing_shard_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        write_checkpoint(&dir, &json!({}), None, &tensors(), Some(130)).unwrap();
        std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
        assert!(matches!(
            ModelFolder::open(&dir).unwrap().tensors(),
            Err(HubError::NotFound { .. })
        ));
    }
}
