//! Model folders from the Hugging Face Hub, through the `hf-hub` crate and its cache (the same
//! layout and environment variables as the Python client: HF_ENDPOINT, HF_HOME, HF_HUB_CACHE,
//! HF_TOKEN; HF_HUB_OFFLINE is honoured here).

use crate::error::{HubError, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The files a checkpoint folder may need; others in the repo are not downloaded.
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
    /// First delay between retries of failed idempotent requests (the client's default when unset).
    pub retry_base_delay: Option<Duration>,
}

/// Whether `value` has the form of a Hub repo id (`name` or `owner/name`).
pub fn looks_like_repo_id(value: &str) -> bool {
    let parts: Vec<&str> = value.split('/').collect();
    let ok = |p: &str| {
        !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.')
    };
    matches!(parts.len(), 1 | 2) && parts.iter().all(|p| ok(p))
}

fn env_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Describes a client error without ever including the token.
fn describe(e: hf_hub::HFError, repo_id: &str) -> HubError {
    let message = e.to_string();
    match e {
        hf_hub::HFError::AuthRequired { .. } | hf_hub::HFError::Forbidden { .. } => {
            HubError::Auth(format!("{repo_id}: {message}"))
        }
        hf_hub::HFError::RepoNotFound { .. }
        | hf_hub::HFError::RevisionNotFound { .. }
        | hf_hub::HFError::EntryNotFound { .. } => HubError::NotFound {
            what: format!("{message} (Hub)"),
            path: PathBuf::from(repo_id),
        },
        hf_hub::HFError::Http { context } if matches!(context.status.as_u16(), 401 | 403) => {
            HubError::Auth(format!("{repo_id}: {message}"))
        }
        _ => HubError::Http(format!("{repo_id}: {message}")),
    }
}

/// A local folder holding the checkpoint `id_or_path`: the path itself when it is a folder,
/// else the Hub repo's snapshot in the cache, downloaded if needed (only the checkpoint files).
pub fn resolve_model(id_or_path: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(id_or_path);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(id_or_path) {
        return Err(HubError::NotFound {
            what: "model folder or Hub repo id".into(),
            path: path.to_path_buf(),
        });
    }
    let mut builder = hf_hub::HFClient::builder();
    if let Some(endpoint) = &options.endpoint {
        builder = builder.endpoint(endpoint.clone());
    }
    if let Some(token) = &options.token {
        builder = builder.token(token.clone());
    }
    if let Some(cache_dir) = &options.cache_dir {
        builder = builder.cache_dir(cache_dir.clone());
    }
    if let Some(delay) = options.retry_base_delay {
        builder = builder.retry_base_delay(delay);
    }
    let client = builder.build().map_err(|e| describe(e, id_or_path))?;
    let client = hf_hub::HFClientSync::from_inner(client).map_err(|e| describe(e, id_or_path))?;
    let (owner, name) = match id_or_path.split_once('/') {
        Some((owner, name)) => (owner, name),
        None => ("", id_or_path),
    };
    let offline = options.offline || env_offline();
    let snapshot = client
        .model(owner, name)
        .snapshot_download()
        .maybe_revision(options.revision.clone())
        .allow_patterns(CHECKPOINT_FILES.iter().map(|p| p.to_string()).collect())
        .local_files_only(offline)
        .progress(hf_hub::progress::Progress::new(crate::progress::DownloadBar::new(
            &format!("downloading {id_or_path}"),
        )))
        .send()
        .map_err(|e| {
            if offline {
                HubError::Offline(format!(
                    "{id_or_path} is not in the cache and HF_HUB_OFFLINE is set ({e})"
                ))
            } else {
                describe(e, id_or_path)
            }
        })?;
    if !offline {
        let tree = client
            .model(owner, name)
            .list_tree()
            .maybe_revision(options.revision.clone())
            .recursive(true)
            .send()
            .map_err(|e| describe(e, id_or_path))?;
        // Every file is checked (and a bad one removed) before any error is returned.
        let problems: Vec<String> = tree
            .into_iter()
            .filter_map(|entry| match entry {
                hf_hub::repository::RepoTreeEntry::File { path, size, lfs, .. } => {
                    verify_cached_file(&snapshot.join(&path), size, lfs.and_then(|l| l.sha256)).err()
                }
                _ => None,
            })
            .map(|e| e.to_string())
            .collect();
        if !problems.is_empty() {
            return Err(HubError::Http(problems.join("; ")));
        }
    }
    Ok(snapshot)
}

/// Checks a downloaded file against the size (and, for LFS files, the SHA-256) the Hub lists
/// for it. A file that does not match, e.g. a download cut short, is removed from the cache
/// (link and blob) so that it can never be taken for a complete one.
fn verify_cached_file(path: &Path, size: u64, sha256: Option<String>) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(()); // not one of the checkpoint files fetched
    };
    let mut problem = (meta.len() != size).then(|| format!("{} of {size} bytes arrived", meta.len()));
    if problem.is_none() {
        if let Some(expected) = sha256 {
            use sha2::Digest;
            let mut hasher = sha2::Sha256::new();
            let mut file = std::fs::File::open(path).map_err(|e| HubError::io(path, e))?;
            std::io::copy(&mut file, &mut hasher).map_err(|e| HubError::io(path, e))?;
            let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
            if actual != expected {
                problem = Some("its SHA-256 differs from the Hub's".to_string());
            }
        }
    }
    let Some(problem) = problem else { return Ok(()) };
    if let Ok(blob) = std::fs::canonicalize(path) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(path);
    Err(HubError::Http(format!(
        "download of {} is incomplete ({problem}); removed it from the cache",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_recognised() {
        assert!(looks_like_repo_id("gpt2"));
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("./model"));
        assert!(!looks_like_repo_id(""));
    }
}
