//! Model folders from the Hugging Face Hub, downloaded into the Hugging Face cache with the
//! same layout and environment variables as the Python client (HF_ENDPOINT, HF_HOME,
//! HF_HUB_CACHE, HF_TOKEN and the token file, HF_HUB_OFFLINE), so that both share one cache.
//!
//! The Hub (or whatever answers at the endpoint) is not trusted with the local file system:
//!
//! - every cache path is built from validated components only: the repo id (huggingface_hub's
//!   rules), the revision (safe segments, for `refs/`), the commit id from the model info (40
//!   hex digits), file paths from the tree listing (relative, no `.`/`..`/empty segments, no
//!   backslash or control characters) and blob names from the same listing (40 or 64 hex
//!   digits). Response headers (ETag, X-Repo-Commit) are never used for paths;
//! - every downloaded file is hashed while it streams and compared with the listing (SHA-256
//!   against `lfs.oid` for LFS files, the git blob SHA-1 against `oid` for the others), refused
//!   past its listed size, and renamed into `blobs/` only when it matches; links are made only
//!   when every file is in place;
//! - requests have connect and read timeouts and bounded retries, JSON answers a size cap.
//!
//! See docs/security-hub.md for what this does not protect against.

use crate::error::{HubError, Result};
use crate::http::Client;
use crate::validate::{encode_path, encode_segment, is_commit_id, is_sha256, printable};
use serde_json::Value;
use sha2::Digest;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::validate::{validate_repo_id, validate_repo_path, validate_revision};

/// The files a checkpoint folder may need; others in the repo are not downloaded. Matched
/// against the whole path as Python's `fnmatch` does for `allow_patterns` (`*` also matches `/`).
const CHECKPOINT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// The most pages of a tree listing followed (the Hub pages by 1000 entries or fewer).
const MAX_TREE_PAGES: usize = 1000;
/// The most bytes read from a `refs/` file (it holds one commit id).
const MAX_REF_FILE: u64 = 1024;

/// How to reach the Hub; unset fields come from the environment as in the Python client.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// The Hub's base URL (HF_ENDPOINT, else https://huggingface.co).
    pub endpoint: Option<String>,
    /// Access token (HF_TOKEN, else the token file of `huggingface-cli login`).
    pub token: Option<String>,
    /// The cache folder (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).
    pub cache_dir: Option<PathBuf>,
    /// Branch, tag or commit (default "main").
    pub revision: Option<String>,
    /// Use only the cache (HF_HUB_OFFLINE=1 also sets it).
    pub offline: bool,
    /// First delay between retries of failed idempotent requests (default 500 ms, then doubled).
    pub retry_base_delay: Option<Duration>,
    /// Time to open a connection to the Hub (default 10 s).
    pub connect_timeout: Option<Duration>,
    /// Time to wait for each read from the Hub (default 60 s); a JSON answer (model info, a
    /// listing page) must also arrive whole within it.
    pub read_timeout: Option<Duration>,
}

/// Whether `value` is a valid Hub repo id (`name` or `owner/name`, see [`validate_repo_id`]).
pub fn looks_like_repo_id(value: &str) -> bool {
    validate_repo_id(value).is_ok()
}

/// What the model info API (`/api/models/{repo}/revision/{rev}`) says that downloads need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The commit the revision points to: 40 lowercase hex digits.
    pub sha: String,
}

/// A file of a repo at one commit, as the tree listing gives it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// The path in the repo (passes [`validate_repo_path`]).
    pub path: String,
    /// The size in bytes of the content.
    pub size: u64,
    /// The git blob SHA-1 (for an LFS file, of its pointer), 40 lowercase hex digits.
    pub oid: String,
    /// For an LFS file, the SHA-256 of the content, 64 lowercase hex digits.
    pub lfs_sha256: Option<String>,
}

impl RepoFile {
    /// The file's name in the cache's `blobs/`: the SHA-256 for LFS files, else the git blob
    /// SHA-1, the names the Hub's ETags give and Python's client uses.
    pub fn blob_name(&self) -> &str {
        self.lfs_sha256.as_deref().unwrap_or(&self.oid)
    }
}

fn invalid(what: &str, reason: impl Into<String>) -> HubError {
    HubError::InvalidAnswer {
        what: what.to_string(),
        reason: reason.into(),
    }
}

/// Parses a model info answer and checks its `sha` (the commit id). Never panics.
pub fn parse_model_info(bytes: &[u8]) -> Result<ModelInfo> {
    let what = "model info";
    let value: Value = serde_json::from_slice(bytes).map_err(|e| invalid(what, format!("not JSON: {e}")))?;
    let sha = value
        .get("sha")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(what, "no `sha` string"))?;
    if !is_commit_id(sha) {
        return Err(invalid(
            what,
            format!(
                "`sha` is not a commit id (40 lowercase hex digits): `{}`",
                printable(sha)
            ),
        ));
    }
    Ok(ModelInfo { sha: sha.to_string() })
}

/// Parses one page of a tree listing (`/api/models/{repo}/tree/{commit}?recursive=true`): the
/// `file` entries, each with a valid path, size and oid (and for LFS files a SHA-256 and the
/// same size); directory entries are skipped. A listing with a duplicate path, or a file that
/// is also a folder of another, is refused too (a real Hub never lists one). Never panics.
pub fn parse_tree_listing(bytes: &[u8]) -> Result<Vec<RepoFile>> {
    let what = "tree listing";
    let value: Value = serde_json::from_slice(bytes).map_err(|e| invalid(what, format!("not JSON: {e}")))?;
    let entries = value.as_array().ok_or_else(|| invalid(what, "not a JSON array"))?;
    let mut files = Vec::new();
    for entry in entries {
        let kind = entry
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(what, "an entry has no `type` string"))?;
        if kind != "file" {
            continue;
        }
        let path = entry
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(what, "a file has no `path` string"))?;
        validate_repo_path(path)?;
        let bad = |reason: &str| invalid(what, format!("`{}`: {reason}", printable(path)));
        let size = entry
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no `size` (a non-negative integer)"))?;
        let oid = entry
            .get("oid")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no `oid` string"))?;
        if !is_commit_id(oid) {
            return Err(bad(&format!(
                "`oid` is not a git SHA-1 (40 lowercase hex digits): `{}`",
                printable(oid)
            )));
        }
        let lfs_sha256 = match entry.get("lfs") {
            None | Some(Value::Null) => None,
            Some(lfs) => {
                let sha = lfs
                    .get("oid")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("`lfs` has no `oid` string"))?;
                if !is_sha256(sha) {
                    return Err(bad(&format!(
                        "`lfs.oid` is not a SHA-256 (64 lowercase hex digits): `{}`",
                        printable(sha)
                    )));
                }
                if lfs.get("size").and_then(Value::as_u64) != Some(size) {
                    return Err(bad("`lfs.size` differs from `size`"));
                }
                Some(sha.to_string())
            }
        };
        files.push(RepoFile {
            path: path.to_string(),
            size,
            oid: oid.to_string(),
            lfs_sha256,
        });
    }
    check_listing(&files)?;
    Ok(files)
}

/// Refuses listings whose files cannot all exist in one folder: the same path twice, or a path
/// that is also the folder of another (`a` and `a/b`).
fn check_listing(files: &[RepoFile]) -> Result<()> {
    let mut paths = HashSet::new();
    for f in files {
        if !paths.insert(f.path.as_str()) {
            return Err(invalid(
                "tree listing",
                format!("`{}` is listed twice", printable(&f.path)),
            ));
        }
    }
    for f in files {
        let mut folder = f.path.as_str();
        while let Some((parent, _)) = folder.rsplit_once('/') {
            if paths.contains(parent) {
                return Err(invalid(
                    "tree listing",
                    format!("`{}` is both a file and a folder", printable(parent)),
                ));
            }
            folder = parent;
        }
    }
    Ok(())
}

/// Whether `name` matches `pattern` as `fnmatch` does (`*` any run of characters, `?` one).
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                backtrack = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match backtrack {
                Some((star, matched)) => {
                    pi = star + 1;
                    ni = matched + 1;
                    backtrack = Some((star, matched + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn is_checkpoint_file(path: &str) -> bool {
    CHECKPOINT_FILES.iter().any(|p| glob_match(p, path))
}

fn env_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn expand_home(path: String) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface (as the Python client).
fn hf_home() -> PathBuf {
    if let Some(home) = env_nonempty("HF_HOME") {
        return expand_home(home);
    }
    let cache = env_nonempty("XDG_CACHE_HOME")
        .map(expand_home)
        .unwrap_or_else(|| expand_home("~/.cache".to_string()));
    cache.join("huggingface")
}

/// The Hub cache folder: `options.cache_dir`, HF_HUB_CACHE (or its old name
/// HUGGINGFACE_HUB_CACHE), else HF_HOME/hub.
pub(crate) fn cache_dir(options: &HubOptions) -> PathBuf {
    options
        .cache_dir
        .clone()
        .or_else(|| {
            env_nonempty("HF_HUB_CACHE")
                .or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE"))
                .map(expand_home)
        })
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// The endpoint: the given one, HF_ENDPOINT, else https://huggingface.co.
pub(crate) fn endpoint(given: Option<&String>) -> String {
    given
        .cloned()
        .or_else(|| env_nonempty("HF_ENDPOINT"))
        .unwrap_or_else(|| "https://huggingface.co".into())
}

/// The token: the given one, HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), else the file
/// HF_TOKEN_PATH or HF_HOME/token that `huggingface-cli login` writes.
pub(crate) fn token(given: Option<&String>) -> Option<String> {
    if let Some(token) = given {
        return Some(token.clone()).filter(|t| !t.is_empty());
    }
    if let Some(token) = env_nonempty("HF_TOKEN").or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN")) {
        return Some(token.trim().to_string());
    }
    let path = env_nonempty("HF_TOKEN_PATH")
        .map(expand_home)
        .unwrap_or_else(|| hf_home().join("token"));
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_string(&mut text))
        .ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// `name` or `namespace/name`, each part percent-encoded (a no-op for a valid id, kept so that
/// the URL stays right even if the rules change).
fn encode_repo_id(repo_id: &str) -> String {
    repo_id.split('/').map(encode_segment).collect::<Vec<_>>().join("/")
}

/// The cache folder of a model repo, as Python's `repo_folder_name`: `models--owner--name`.
/// Valid ids have no `--`, so the mapping is one-to-one.
fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// Whether `value` reads as a file system path rather than a repo id.
fn looks_like_path(value: &str) -> bool {
    value.starts_with('/')
        || value.starts_with("./")
        || value.starts_with("../")
        || value.starts_with('~')
        || value.contains('\\')
        || value == "."
        || value == ".."
        || value.ends_with('/')
        || value.matches('/').count() > 1
}

/// A local folder holding the checkpoint `id_or_path`: the path itself when it is a folder,
/// else the Hub repo's snapshot in the cache, downloaded if needed (only the checkpoint files).
///
/// A path that exists but is not a folder (e.g. `./config.json`), or a string that reads as a
/// path (`/…`, `./…`, `../…`, `~…`, a backslash, several `/`), is a local error and never a
/// Hub request; so is a repo id or revision that fails validation.
pub fn resolve_model(id_or_path: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(id_or_path);
    if std::fs::symlink_metadata(path).is_err() {
        // A local folder missing only because a save was killed mid-swap is restored here, so
        // that it is not mistaken for a repo id.
        crate::checkpoint::recover_missing_folder(path);
    }
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let reason = if meta.file_type().is_symlink() && std::fs::metadata(path).is_err() {
            "it is a symlink to nothing"
        } else if meta.is_file() {
            "it is a file; give the folder that holds config.json and the weights, or a Hub repo id"
        } else {
            "it is not a folder"
        };
        return Err(HubError::NotAModelFolder {
            path: path.to_path_buf(),
            reason: reason.into(),
        });
    }
    if looks_like_path(id_or_path) {
        return Err(HubError::NotFound {
            what: "model folder".into(),
            path: path.to_path_buf(),
        });
    }
    validate_repo_id(id_or_path)?;
    let revision = options.revision.clone().unwrap_or_else(|| "main".into());
    validate_revision(&revision)?;
    let repo_dir = cache_dir(options).join(repo_folder_name(id_or_path));
    if options.offline || env_offline() {
        return from_cache(&repo_dir, &revision, id_or_path);
    }
    download(id_or_path, &revision, &repo_dir, options)
}

/// The snapshot of `revision` already in the cache: `snapshots/{revision}` for a commit id,
/// else `snapshots/{commit}` for the commit id written in `refs/{revision}` (checked: a ref
/// that is not a commit id is never joined into a path).
fn from_cache(repo_dir: &Path, revision: &str, repo_id: &str) -> Result<PathBuf> {
    let offline = |detail: &str| {
        HubError::Offline(format!(
            "{repo_id} at revision {revision} is not in the cache and HF_HUB_OFFLINE is set ({detail})"
        ))
    };
    let commit = if is_commit_id(revision) {
        revision.to_string()
    } else {
        let ref_path = repo_dir.join("refs").join(revision);
        let mut text = String::new();
        match std::fs::File::open(&ref_path) {
            Ok(file) => {
                file.take(MAX_REF_FILE)
                    .read_to_string(&mut text)
                    .map_err(|e| HubError::io(&ref_path, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(offline(&format!("no {}", ref_path.display())))
            }
            Err(e) => return Err(HubError::io(&ref_path, e)),
        }
        let commit = text.trim();
        if !is_commit_id(commit) {
            return Err(HubError::CorruptCache {
                path: ref_path,
                reason: format!("holds `{}`, not a commit id", printable(commit)),
            });
        }
        commit.to_string()
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(offline(&format!("no {}", snapshot.display())));
    }
    Ok(snapshot)
}

/// Downloads the checkpoint files of `revision` into the cache and returns the snapshot folder.
fn download(repo_id: &str, revision: &str, repo_dir: &Path, options: &HubOptions) -> Result<PathBuf> {
    let client = Client::new(
        &endpoint(options.endpoint.as_ref()),
        token(options.token.as_ref()),
        options.connect_timeout,
        options.read_timeout,
        options.retry_base_delay,
    )?;
    let api = format!("{}/api/models/{}", client.endpoint(), encode_repo_id(repo_id));
    let info_url = format!("{api}/revision/{}", encode_segment(revision));
    let info = parse_model_info(&client.json("GET", &info_url, None, true, &[])?.body)?;
    if is_commit_id(revision) && info.sha != revision {
        return Err(invalid(
            "model info",
            format!("asked for commit {revision}, got {}", info.sha),
        ));
    }
    let commit = info.sha;
    let files = list_tree(&client, &api, &commit)?;
    let wanted: Vec<&RepoFile> = files.iter().filter(|f| is_checkpoint_file(&f.path)).collect();

    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| HubError::io(&blobs, e))?;
    // Blobs already cached are hashed too (they may come from a client that does not check),
    // and a bad one is replaced.
    let mut missing = Vec::new();
    for &file in &wanted {
        let blob = blobs.join(file.blob_name());
        if std::fs::symlink_metadata(&blob).is_ok() {
            if verify_cached_blob(&blob, file)? {
                continue;
            }
            std::fs::remove_file(&blob).map_err(|e| HubError::io(&blob, e))?;
        }
        missing.push(file);
    }
    let bar = crate::progress::Bar::new(&format!("downloading {repo_id}"), missing.iter().map(|f| f.size).sum());
    bar.set(0);
    let mut done = 0;
    for file in missing {
        let url = format!(
            "{}/{}/resolve/{commit}/{}",
            client.endpoint(),
            encode_repo_id(repo_id),
            encode_path(&file.path)
        );
        download_blob(&client, &url, file, &blobs.join(file.blob_name()), &bar, done)?;
        done += file.size;
    }
    bar.finish();

    // Links only once every blob is in place, so a failed download leaves no snapshot file.
    let snapshot = repo_dir.join("snapshots").join(&commit);
    for file in &wanted {
        link_into_snapshot(&snapshot, file)?;
    }
    std::fs::create_dir_all(&snapshot).map_err(|e| HubError::io(&snapshot, e))?;
    if revision != commit {
        let ref_path = repo_dir.join("refs").join(revision);
        if let Some(parent) = ref_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, e))?;
        }
        crate::atomic_write(&ref_path, commit.as_bytes())?;
    }
    Ok(snapshot)
}

/// Every file of `commit`, following the listing's pages on the endpoint only (a next-page
/// link elsewhere would receive the token, and lead anywhere).
fn list_tree(client: &Client, api: &str, commit: &str) -> Result<Vec<RepoFile>> {
    let mut url = format!("{api}/tree/{commit}?recursive=true");
    let mut files = Vec::new();
    for _ in 0..MAX_TREE_PAGES {
        let answer = client.json("GET", &url, None, true, &[])?;
        files.extend(parse_tree_listing(&answer.body)?);
        match answer.next {
            None => {
                check_listing(&files)?;
                return Ok(files);
            }
            Some(next) if client.is_on_endpoint(&next) => url = next,
            Some(next) => {
                return Err(invalid(
                    "tree listing",
                    format!("the next page is on another host: {}", printable(&next)),
                ))
            }
        }
    }
    Err(invalid("tree listing", format!("more than {MAX_TREE_PAGES} pages")))
}

/// The hash a listed file's content must have, computed as it streams.
enum ContentHash {
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
}

impl ContentHash {
    /// SHA-256 for LFS files; for the others the git blob SHA-1, `sha1("blob {size}\0" +
    /// content)`, so that every file is checked, not only LFS ones.
    fn for_file(file: &RepoFile) -> Self {
        match file.lfs_sha256 {
            Some(_) => Self::Sha256(sha2::Sha256::new()),
            None => {
                let mut hasher = sha1::Sha1::new();
                hasher.update(format!("blob {}\0", file.size).as_bytes());
                Self::GitSha1(hasher)
            }
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::GitSha1(h) => h.update(bytes),
        }
    }

    fn algorithm(&self) -> &'static str {
        match self {
            Self::Sha256(_) => "sha256",
            Self::GitSha1(_) => "git-sha1",
        }
    }

    fn finish(self) -> String {
        let digest: Vec<u8> = match self {
            Self::Sha256(h) => h.finalize().to_vec(),
            Self::GitSha1(h) => h.finalize().to_vec(),
        };
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Whether a blob already in the cache is a regular file with the listed size and hash.
fn verify_cached_blob(blob: &Path, file: &RepoFile) -> Result<bool> {
    let meta = std::fs::symlink_metadata(blob).map_err(|e| HubError::io(blob, e))?;
    if !meta.is_file() || meta.len() != file.size {
        return Ok(false);
    }
    let mut hash = ContentHash::for_file(file);
    let mut reader = std::fs::File::open(blob).map_err(|e| HubError::io(blob, e))?;
    let mut buf = vec![0u8; 1 << 18];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HubError::io(blob, e)),
        };
        hash.update(&buf[..n]);
    }
    Ok(hash.finish() == file.blob_name())
}

/// A unique temporary name beside `path` (hidden, so nothing takes it for a blob).
fn temp_beside(path: &Path, tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{}-{n}.{tag}", std::process::id()))
}

/// Downloads one file into `blob`: streamed into a temporary file beside it while hashed,
/// refused past the listed size, renamed into place only when size and hash match. A cut or
/// timed-out transfer is retried; a wrong hash or too many bytes are not (the server lies).
fn download_blob(
    client: &Client,
    url: &str,
    file: &RepoFile,
    blob: &Path,
    bar: &crate::progress::Bar,
    done_before: u64,
) -> Result<()> {
    use crate::http::Failure;
    client.retrying(true, || {
        let tmp = temp_beside(blob, "vh-incomplete");
        let result = (|| {
            let response = client.send("GET", url, None, &[], None)?;
            let mut out = std::fs::File::create_new(&tmp).map_err(|e| Failure::Fatal(HubError::io(&tmp, e)))?;
            let mut reader = response.into_reader().take(file.size.saturating_add(1));
            let mut hash = ContentHash::for_file(file);
            let mut received: u64 = 0;
            let mut buf = vec![0u8; 1 << 18];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(Failure::Retry(match crate::http::io_error(url, &e) {
                            timeout @ HubError::Timeout(_) => timeout,
                            _ => HubError::Incomplete {
                                path: printable(&file.path),
                                expected: file.size,
                                received,
                            },
                        }))
                    }
                };
                received += n as u64;
                if received > file.size {
                    return Err(Failure::Fatal(HubError::Oversized {
                        path: printable(&file.path),
                        expected: file.size,
                    }));
                }
                hash.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| Failure::Fatal(HubError::io(&tmp, e)))?;
                bar.set(done_before + received);
            }
            if received < file.size {
                return Err(Failure::Retry(HubError::Incomplete {
                    path: printable(&file.path),
                    expected: file.size,
                    received,
                }));
            }
            let algorithm = hash.algorithm();
            let actual = hash.finish();
            if actual != file.blob_name() {
                return Err(Failure::Fatal(HubError::HashMismatch {
                    path: printable(&file.path),
                    algorithm,
                    expected: file.blob_name().to_string(),
                    actual,
                }));
            }
            out.sync_all().map_err(|e| Failure::Fatal(HubError::io(&tmp, e)))?;
            std::fs::rename(&tmp, blob).map_err(|e| Failure::Fatal(HubError::io(blob, e)))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    })
}

/// Links `snapshot/{path}` to its blob with a relative link, as Python's client does
/// (`../../blobs/{blob}`, one more `../` per folder level of the path), replacing whatever
/// link was there in one rename.
fn link_into_snapshot(snapshot: &Path, file: &RepoFile) -> Result<()> {
    let link = snapshot.join(&file.path);
    let parent = link.parent().unwrap_or(snapshot);
    std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, e))?;
    let depth = file.path.split('/').count() + 1;
    let target: PathBuf = std::iter::repeat_n("..", depth)
        .collect::<PathBuf>()
        .join("blobs")
        .join(file.blob_name());
    if std::fs::read_link(&link).is_ok_and(|existing| existing == target) {
        return Ok(());
    }
    let tmp = temp_beside(&link, "vh-link");
    let result = std::os::unix::fs::symlink(&target, &tmp).and_then(|()| std::fs::rename(&tmp, &link));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(HubError::io(&link, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA1: &str = "0123456789abcdef0123456789abcdef01234567";
    const SHA256: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn repo_ids_are_recognised() {
        assert!(looks_like_repo_id("gpt2"));
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("./model"));
        assert!(!looks_like_repo_id(""));
    }

    #[test]
    fn checkpoint_patterns_match_as_fnmatch() {
        for yes in [
            "config.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "sub/x.safetensors",
            "pytorch_model.bin",
            "pytorch_model-00001-of-00002.bin",
        ] {
            assert!(is_checkpoint_file(yes), "{yes}");
        }
        for no in [
            "README.md",
            "sub/config.json",
            "config.json.bak",
            "model.safetensors.bak",
            "x.bin",
        ] {
            assert!(!is_checkpoint_file(no), "{no}");
        }
        assert!(glob_match("a?c", "abc") && !glob_match("a?c", "ac") && glob_match("*", ""));
    }

    #[test]
    fn model_info_needs_a_commit_id() {
        let ok = format!(r#"{{"id": "a/b", "sha": "{SHA1}", "siblings": []}}"#);
        assert_eq!(parse_model_info(ok.as_bytes()).unwrap().sha, SHA1);
        for bad in [
            r#"{"sha": "../../../evil"}"#.to_string(),
            r#"{"sha": "0123"}"#.to_string(),
            format!(r#"{{"sha": "{}"}}"#, SHA1.to_uppercase()),
            r#"{"sha": 5}"#.to_string(),
            r#"{}"#.to_string(),
            "[".to_string(),
            String::new(),
        ] {
            assert!(
                matches!(parse_model_info(bad.as_bytes()), Err(HubError::InvalidAnswer { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn tree_listings_are_validated() {
        let listing = format!(
            r#"[{{"type": "directory", "path": "sub", "oid": "{SHA1}", "size": 0}},
                {{"type": "file", "path": "config.json", "oid": "{SHA1}", "size": 3}},
                {{"type": "file", "path": "sub/model.safetensors", "oid": "{SHA1}", "size": 9,
                  "lfs": {{"oid": "{SHA256}", "size": 9, "pointerSize": 130}}}}]"#
        );
        let files = parse_tree_listing(listing.as_bytes()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].blob_name(), SHA1);
        assert_eq!(files[1].blob_name(), SHA256);
        let entry = |path: &str, oid: &str, lfs: &str| {
            format!(r#"[{{"type": "file", "path": {path}, "oid": "{oid}", "size": 9 {lfs}}}]"#)
        };
        for path in [
            r#""../x""#,
            r#""/etc/x""#,
            r#""a/../../b""#,
            r#""a\\b""#,
            r#""a\u0000""#,
            r#""""#,
        ] {
            let text = entry(path, SHA1, "");
            assert!(
                matches!(
                    parse_tree_listing(text.as_bytes()),
                    Err(HubError::InvalidRepoPath { .. })
                ),
                "{text}"
            );
        }
        let bad_answers = [
            entry(r#""x""#, "../../../x", ""),
            entry(r#""x""#, SHA256, ""),
            entry(r#""x""#, SHA1, r#", "lfs": {"oid": "../../x", "size": 9}"#),
            entry(r#""x""#, SHA1, &format!(r#", "lfs": {{"oid": "{SHA256}", "size": 8}}"#)),
            format!(
                r#"[{{"type": "file", "path": "a", "oid": "{SHA1}", "size": 1}}, {{"type": "file", "path": "a", "oid": "{SHA1}", "size": 1}}]"#
            ),
            format!(
                r#"[{{"type": "file", "path": "a", "oid": "{SHA1}", "size": 1}}, {{"type": "file", "path": "a/b", "oid": "{SHA1}", "size": 1}}]"#
            ),
            r#"[{"type": "file", "path": "x", "oid": 1, "size": -1}]"#.to_string(),
            r#"[{"path": "x"}]"#.to_string(),
            r#"{"not": "a list"}"#.to_string(),
        ];
        for text in bad_answers {
            assert!(
                matches!(parse_tree_listing(text.as_bytes()), Err(HubError::InvalidAnswer { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes() {
        // A deterministic stream of mutated listings: the parsers must return, not panic.
        let seed = format!(
            r#"[{{"type": "file", "path": "a/b.safetensors", "oid": "{SHA1}", "size": 9, "lfs": {{"oid": "{SHA256}", "size": 9}}}}]"#
        );
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut bytes = seed.clone().into_bytes();
            for _ in 0..(state % 6) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state % bytes.len() as u64) as usize;
                bytes[i] = (state >> 32) as u8;
            }
            let _ = parse_tree_listing(&bytes);
            let _ = parse_model_info(&bytes);
        }
        let _ = parse_tree_listing(&[b'['; 100_000]);
        let _ = parse_model_info(&[b'{'; 100_000]);
    }

    #[test]
    fn strings_that_read_as_paths_are_not_repo_ids() {
        for path in ["/abs/x", "./x", "../x", "~/x", "~x", "a\\b", "a/b/", "a/b/c", ".", ".."] {
            assert!(looks_like_path(path), "{path}");
        }
        for id in ["gpt2", "user/tiny"] {
            assert!(!looks_like_path(id), "{id}");
        }
    }
}
