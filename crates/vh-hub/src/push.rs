//! Uploading a checkpoint folder to the Hub through its HTTP API: repo create, preupload, Git LFS
//! (basic transfer) for large files, then one NDJSON commit. The same HTTP layer as downloads
//! (timeouts, bounded retries of idempotent requests, capped JSON answers, the token sent to
//! the endpoint only).
//!
//! What is uploaded is decided before the first request: the regular files at the top of the
//! folder (hidden ones skipped). The repo id and revision are validated and percent-encoded, so
//! they cannot point the commit, and the token, at another URL. Symlinks are followed only
//! when they resolve to a file inside the folder, or, when the folder is a snapshot of the
//! Hugging Face cache (`…/models--x--y/snapshots/{commit}`), inside that repo's `blobs/`
//! (where all of a snapshot's files live); any other symlink is an error naming it, so a
//! link to e.g. /etc/passwd never has its target uploaded. Files are opened without following
//! a final symlink and re-hashed when read for the upload, so a file swapped after the check
//! is refused rather than sent.

use crate::error::{HubError, Result};
use crate::http::Client;
use crate::validate::{
    encode_segment, is_commit_id, printable, validate_repo_id, validate_repo_path, validate_revision,
};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How to push; unset fields come from the environment (HF_ENDPOINT, HF_TOKEN or the token file).
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// The Hub's base URL.
    pub endpoint: Option<String>,
    /// Access token with write access.
    pub token: Option<String>,
    /// Create the repo as private when it does not exist yet.
    pub private: bool,
    /// The branch to commit to (default "main").
    pub revision: Option<String>,
    /// The commit message (default "Upload model with valuehead").
    pub commit_message: Option<String>,
    /// First delay between retries of idempotent requests (default 500 ms, then doubled).
    pub retry_base_delay: Option<Duration>,
    /// Time to open a connection to the Hub (default 10 s).
    pub connect_timeout: Option<Duration>,
    /// Time to wait for each read or write on a connection (default 60 s).
    pub read_timeout: Option<Duration>,
}

struct FileToPush {
    path_in_repo: String,
    /// Where the bytes are read (the file itself, or a symlink's allowed target).
    local: PathBuf,
    size: u64,
    sha256: String,
}

/// The folder of the cache's blobs when `root` (canonical) is a snapshot folder of the Hugging
/// Face cache, `…/models--x--y/snapshots/{commit}`.
fn cache_blobs_of(root: &Path) -> Option<PathBuf> {
    let snapshots = root.parent()?;
    let repo = snapshots.parent()?;
    let is_snapshot = snapshots.file_name()? == "snapshots" && repo.file_name()?.to_str()?.starts_with("models--");
    is_snapshot.then(|| repo.join("blobs"))
}

fn unsafe_upload(path: &Path, reason: impl Into<String>) -> HubError {
    HubError::UnsafeUpload {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Where the bytes of `path`, an entry of the folder `folder` being uploaded, may be read:
/// `Some(path)` for a regular file, `Some(target)` for a symlink whose target is a regular
/// file inside `folder` (or inside the cache's `blobs/` when `folder` is a cache snapshot),
/// `None` for a folder (or a symlink to a folder inside; folders are not uploaded). A symlink
/// leading elsewhere or to nothing, and anything but files and folders (a FIFO, a device), is
/// an [`HubError::UnsafeUpload`] naming `path`.
pub fn uploadable_file(folder: &Path, path: &Path) -> Result<Option<PathBuf>> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| HubError::io(path, e))?;
    if meta.is_dir() {
        return Ok(None);
    }
    if meta.is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    if !meta.file_type().is_symlink() {
        return Err(unsafe_upload(path, "not a regular file"));
    }
    let Ok(target) = std::fs::canonicalize(path) else {
        return Err(unsafe_upload(path, "a symlink to nothing"));
    };
    let root = std::fs::canonicalize(folder).map_err(|e| HubError::io(folder, e))?;
    let inside = target.starts_with(&root) || cache_blobs_of(&root).is_some_and(|blobs| target.starts_with(blobs));
    if !inside {
        return Err(unsafe_upload(
            path,
            format!(
                "a symlink to {}, outside the folder (only links inside it, or into the cache's blobs for a cache snapshot, are followed)",
                target.display()
            ),
        ));
    }
    let target_meta = std::fs::metadata(&target).map_err(|e| HubError::io(&target, e))?;
    if target_meta.is_dir() {
        Ok(None)
    } else if target_meta.is_file() {
        Ok(Some(target))
    } else {
        Err(unsafe_upload(path, "a symlink to something that is not a regular file"))
    }
}

/// Opens a file to upload without following a final symlink (O_NOFOLLOW) and without blocking
/// on a FIFO (O_NONBLOCK), and checks that what was opened is a regular file.
fn open_regular(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => unsafe_upload(path, "it became a symlink"),
            _ => HubError::io(path, e),
        })?;
    let meta = file.metadata().map_err(|e| HubError::io(path, e))?;
    if !meta.is_file() {
        return Err(unsafe_upload(path, "not a regular file"));
    }
    Ok(file)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The size and SHA-256 of a file to upload.
fn size_and_sha256(path: &Path) -> Result<(u64, String)> {
    let mut file = open_regular(path)?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher).map_err(|e| HubError::io(path, e))?;
    Ok((size, hex(&hasher.finalize())))
}

/// The bytes of a file to upload, checked against the hash taken when the upload was planned
/// (a file changed or swapped since is refused, not sent).
fn read_checked(f: &FileToPush) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular(&f.local)?
        .read_to_end(&mut bytes)
        .map_err(|e| HubError::io(&f.local, e))?;
    if hex(&Sha256::digest(&bytes)) != f.sha256 {
        return Err(unsafe_upload(&f.local, "it changed while it was being uploaded"));
    }
    Ok(bytes)
}

fn sample(path: &Path) -> Result<String> {
    let mut buf = Vec::with_capacity(512);
    open_regular(path)?
        .take(512)
        .read_to_end(&mut buf)
        .map_err(|e| HubError::io(path, e))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(&buf))
}

/// The files to upload: the regular files at the top of `folder`, hidden ones skipped, with
/// their sizes and hashes; see [`uploadable_file`] for symlinks.
fn files_to_push(folder: &Path) -> Result<Vec<FileToPush>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(|e| HubError::io(folder, e))? {
        let entry = entry.map_err(|e| HubError::io(folder, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(unsafe_upload(&path, "its name is not UTF-8, so the Hub cannot name it"));
        };
        if name.starts_with('.') {
            continue;
        }
        let Some(local) = uploadable_file(folder, &path)? else {
            continue;
        };
        validate_repo_path(&name)?;
        let (size, sha256) = size_and_sha256(&local)?;
        files.push(FileToPush {
            path_in_repo: name,
            local,
            size,
            sha256,
        });
    }
    files.sort_by(|a, b| a.path_in_repo.cmp(&b.path_in_repo));
    Ok(files)
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| HubError::InvalidAnswer {
        what: what.to_string(),
        reason: format!("not JSON: {e}"),
    })
}

/// Uploads every (non-hidden) regular file of `folder` to the model repo `repo_id` in one
/// commit, creating the repo when missing, and returns the commit id. Files the Hub's preupload
/// marks as LFS are uploaded with Git LFS (basic transfer) before the commit; the others travel
/// base64-encoded inside the NDJSON commit. The repo id, the revision and the folder's files
/// are all checked before the first request.
pub fn push_folder(repo_id: &str, folder: &Path, options: &PushOptions) -> Result<String> {
    validate_repo_id(repo_id)?;
    let Some((namespace, name)) = repo_id.split_once('/') else {
        return Err(HubError::InvalidRepoId {
            repo_id: printable(repo_id),
            reason: "pushing needs `namespace/name`".into(),
        });
    };
    let revision = options.revision.clone().unwrap_or_else(|| "main".into());
    validate_revision(&revision)?;
    let files = files_to_push(folder)?;
    let client = Client::new(
        &crate::hub::endpoint(options.endpoint.as_ref()),
        crate::hub::token(options.token.as_ref()),
        options.connect_timeout,
        options.read_timeout,
        options.retry_base_delay,
    )?;
    let repo_path = format!("{}/{}", encode_segment(namespace), encode_segment(name));
    let api = format!("{}/api/models/{repo_path}", client.endpoint());
    let revision_segment = encode_segment(&revision);

    // The repo: created when missing (409 means it exists, so repeating the request is safe).
    let create = json!({ "name": name, "organization": namespace, "private": options.private, "type": "model" });
    client.json(
        "POST",
        &format!("{}/api/repos/create", client.endpoint()),
        Some((create.to_string().as_bytes(), "application/json")),
        true,
        &[409],
    )?;

    // Which files go through LFS.
    let listing: Vec<Value> = files
        .iter()
        .map(|f| Ok(json!({ "path": f.path_in_repo, "size": f.size, "sample": sample(&f.local)? })))
        .collect::<Result<_>>()?;
    let preupload = json!({ "files": listing }).to_string();
    let modes = client.json(
        "POST",
        &format!("{api}/preupload/{revision_segment}"),
        Some((preupload.as_bytes(), "application/json")),
        true,
        &[],
    )?;
    let modes = parse_json(&modes.body, "preupload")?;
    let lfs_paths: Vec<String> = modes["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["uploadMode"] == "lfs")
        .filter_map(|f| f["path"].as_str().map(str::to_string))
        .collect();
    let is_lfs = |f: &FileToPush| f.size > 0 && lfs_paths.contains(&f.path_in_repo);

    let bar = crate::progress::Bar::new(&format!("uploading to {repo_id}"), files.iter().map(|f| f.size).sum());
    // LFS uploads (basic transfer): the batch API says which objects it still needs, and where.
    let lfs_files: Vec<&FileToPush> = files.iter().filter(|f| is_lfs(f)).collect();
    if !lfs_files.is_empty() {
        let objects: Vec<Value> = lfs_files
            .iter()
            .map(|f| json!({ "oid": f.sha256, "size": f.size }))
            .collect();
        let batch = json!({ "operation": "upload", "transfers": ["basic"], "objects": objects,
                            "hash_algo": "sha256", "ref": { "name": revision } })
        .to_string();
        let answer = client.json(
            "POST",
            &format!("{}/{repo_path}.git/info/lfs/objects/batch", client.endpoint()),
            Some((batch.as_bytes(), "application/vnd.git-lfs+json")),
            true,
            &[],
        )?;
        let answer = parse_json(&answer.body, "LFS batch")?;
        for object in answer["objects"].as_array().into_iter().flatten() {
            let oid = object["oid"].as_str().unwrap_or_default();
            if let Some(error) = object.get("error") {
                return Err(HubError::Http(format!(
                    "LFS batch refused {}: {}",
                    printable(oid),
                    printable(&error.to_string())
                )));
            }
            let Some(upload) = object["actions"]["upload"]["href"].as_str() else {
                continue;
            };
            let file = lfs_files
                .iter()
                .find(|f| f.sha256 == oid)
                .ok_or_else(|| HubError::InvalidAnswer {
                    what: "LFS batch".into(),
                    reason: format!("an unknown object {}", printable(oid)),
                })?;
            let bytes = read_checked(file)?;
            // Pre-signed storage URLs carry their own authorisation; the token only ever goes
            // to the endpoint (see `Client::request`).
            client.retrying(true, || {
                client
                    .send("PUT", upload, Some((&bytes, "application/octet-stream")), &[], None)
                    .map(drop)
            })?;
            bar.add(file.size);
            if let Some(verify) = object["actions"]["verify"]["href"].as_str() {
                let body = json!({ "oid": oid, "size": file.size }).to_string();
                client.json(
                    "POST",
                    verify,
                    Some((body.as_bytes(), "application/vnd.git-lfs+json")),
                    true,
                    &[],
                )?;
            }
        }
    }

    // One commit with every file.
    let summary = options
        .commit_message
        .clone()
        .unwrap_or_else(|| "Upload model with valuehead".into());
    let mut ndjson = json!({ "key": "header", "value": { "summary": summary, "description": "" } }).to_string();
    for f in &files {
        let line = if is_lfs(f) {
            json!({ "key": "lfsFile", "value": { "path": f.path_in_repo, "algo": "sha256", "oid": f.sha256, "size": f.size } })
        } else {
            let content = base64::engine::general_purpose::STANDARD.encode(read_checked(f)?);
            json!({ "key": "file", "value": { "path": f.path_in_repo, "content": content, "encoding": "base64" } })
        };
        ndjson.push('\n');
        ndjson.push_str(&line.to_string());
    }
    // Not idempotent: a retried commit could land twice, so it is sent once.
    let answer = client.json(
        "POST",
        &format!("{api}/commit/{revision_segment}"),
        Some((ndjson.as_bytes(), "application/x-ndjson")),
        false,
        &[],
    )?;
    bar.finish();
    let answer = parse_json(&answer.body, "commit")?;
    match answer["commitOid"].as_str() {
        Some(oid) if is_commit_id(oid) => Ok(oid.to_string()),
        other => Err(HubError::InvalidAnswer {
            what: "commit".into(),
            reason: format!("no commit id: {}", printable(&format!("{other:?}"))),
        }),
    }
}
