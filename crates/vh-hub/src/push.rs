//! Uploading a checkpoint folder to the Hub through its HTTP API: repo create, preupload, Git LFS
//! (basic transfer) for large files, then one NDJSON commit. hf-hub 1.0 creates repos and
//! commits but sends large files through Xet only, so the LFS path is written here.

use crate::error::{HubError, Result};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How to push; unset fields come from the environment (HF_ENDPOINT, HF_TOKEN).
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
    /// First delay between retries of idempotent requests (default 500 ms).
    pub retry_base_delay: Option<Duration>,
}

struct FileToPush {
    path_in_repo: String,
    local: PathBuf,
    size: u64,
    sha256: String,
}

struct Client {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
    retry_base_delay: Duration,
}

impl Client {
    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self.agent.request(method, url).set("User-Agent", "valuehead");
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// Sends a request; server errors (5xx) and transport errors are retried with backoff when
    /// `idempotent`, then reported. The token never appears in errors.
    fn send(&self, method: &str, url: &str, body: &[u8], content_type: &str, idempotent: bool) -> Result<Vec<u8>> {
        let attempts = if idempotent { 4 } else { 1 };
        let mut delay = self.retry_base_delay;
        let mut last = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                std::thread::sleep(delay);
                delay *= 2;
            }
            match self
                .request(method, url)
                .set("Content-Type", content_type)
                .send_bytes(body)
            {
                Ok(response) => {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes)
                        .map_err(|e| HubError::Http(format!("{method} {url}: {e}")))?;
                    return Ok(bytes);
                }
                Err(ureq::Error::Status(status @ (401 | 403), response)) => {
                    let message = response.into_string().unwrap_or_default();
                    return Err(HubError::Auth(format!("{method} {url} answered {status}: {message}")));
                }
                Err(ureq::Error::Status(status, response)) if status >= 500 => {
                    last = format!(
                        "{method} {url} answered {status}: {}",
                        response.into_string().unwrap_or_default()
                    );
                }
                Err(ureq::Error::Status(404, _)) => {
                    return Err(HubError::NotFound {
                        what: format!("{method} {url}"),
                        path: PathBuf::from(url),
                    });
                }
                Err(ureq::Error::Status(status, response)) => {
                    let message = response.into_string().unwrap_or_default();
                    return Err(HubError::Http(format!("{method} {url} answered {status}: {message}")));
                }
                Err(e) => last = format!("{method} {url}: {e}"),
            }
        }
        Err(HubError::Http(format!("{last} (after {attempts} attempts)")))
    }

    fn post_json(&self, url: &str, body: &Value, idempotent: bool) -> Result<Value> {
        let bytes = self.send("POST", url, body.to_string().as_bytes(), "application/json", idempotent)?;
        serde_json::from_slice(&bytes).map_err(|e| HubError::Http(format!("POST {url}: invalid JSON answer: {e}")))
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).map_err(|e| HubError::io(path, e))?;
    std::io::copy(&mut file, &mut hasher).map_err(|e| HubError::io(path, e))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn sample(path: &Path) -> Result<String> {
    let mut buf = vec![0u8; 512];
    let mut file = std::fs::File::open(path).map_err(|e| HubError::io(path, e))?;
    let n = std::io::Read::read(&mut file, &mut buf).map_err(|e| HubError::io(path, e))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(&buf[..n]))
}

/// Uploads every (non-hidden) file of `folder` to the model repo `repo_id` in one commit,
/// creating the repo when missing, and returns the commit id. Files the Hub's preupload marks
/// as LFS are uploaded with Git LFS (basic transfer) before the commit; the others travel
/// base64-encoded inside the NDJSON commit.
pub fn push_folder(repo_id: &str, folder: &Path, options: &PushOptions) -> Result<String> {
    let (namespace, name) = repo_id
        .split_once('/')
        .ok_or_else(|| HubError::Http(format!("repo id `{repo_id}` must be namespace/name")))?;
    let endpoint = options
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .unwrap_or_else(|| "https://huggingface.co".into());
    let client = Client {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        token: options.token.clone().or_else(|| std::env::var("HF_TOKEN").ok()),
        agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(300)).build(),
        retry_base_delay: options.retry_base_delay.unwrap_or(Duration::from_millis(500)),
    };
    let revision = options.revision.clone().unwrap_or_else(|| "main".into());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(|e| HubError::io(folder, e))? {
        let entry = entry.map_err(|e| HubError::io(folder, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let local = entry.path();
        if name.starts_with('.') || !local.is_file() {
            continue;
        }
        let size = std::fs::metadata(&local).map_err(|e| HubError::io(&local, e))?.len();
        files.push(FileToPush {
            sha256: sha256_file(&local)?,
            path_in_repo: name,
            local,
            size,
        });
    }
    files.sort_by(|a, b| a.path_in_repo.cmp(&b.path_in_repo));

    // The repo: created when missing (409 means it exists, so repeating the request is safe).
    let create = json!({ "name": name, "organization": namespace, "private": options.private, "type": "model" });
    match client.post_json(&format!("{}/api/repos/create", client.endpoint), &create, true) {
        Ok(_) => {}
        Err(HubError::Http(message)) if message.contains(" 409") => {}
        Err(e) => return Err(e),
    }

    // Which files go through LFS.
    let listing: Vec<Value> = files
        .iter()
        .map(|f| Ok(json!({ "path": f.path_in_repo, "size": f.size, "sample": sample(&f.local)? })))
        .collect::<Result<_>>()?;
    let preupload_url = format!("{}/api/models/{repo_id}/preupload/{revision}", client.endpoint);
    let modes = client.post_json(&preupload_url, &json!({ "files": listing }), true)?;
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
                            "hash_algo": "sha256", "ref": { "name": revision } });
        let batch_url = format!("{}/{repo_id}.git/info/lfs/objects/batch", client.endpoint);
        let body = batch.to_string();
        let answer = client.send(
            "POST",
            &batch_url,
            body.as_bytes(),
            "application/vnd.git-lfs+json",
            true,
        )?;
        let answer: Value = serde_json::from_slice(&answer).map_err(|e| HubError::Http(format!("LFS batch: {e}")))?;
        for object in answer["objects"].as_array().into_iter().flatten() {
            let Some(upload) = object["actions"]["upload"]["href"].as_str() else {
                continue;
            };
            let oid = object["oid"].as_str().unwrap_or_default();
            let file = lfs_files
                .iter()
                .find(|f| f.sha256 == oid)
                .ok_or_else(|| HubError::Http(format!("LFS batch answered an unknown object {oid}")))?;
            let bytes = std::fs::read(&file.local).map_err(|e| HubError::io(&file.local, e))?;
            // Pre-signed storage URLs carry their own authorisation.
            let storage = Client {
                token: None,
                agent: client.agent.clone(),
                endpoint: String::new(),
                ..client
            };
            storage.send("PUT", upload, &bytes, "application/octet-stream", true)?;
            bar.add(file.size);
            if let Some(verify) = object["actions"]["verify"]["href"].as_str() {
                client.post_json(verify, &json!({ "oid": oid, "size": file.size }), true)?;
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
            let content = std::fs::read(&f.local).map_err(|e| HubError::io(&f.local, e))?;
            let content = base64::engine::general_purpose::STANDARD.encode(content);
            json!({ "key": "file", "value": { "path": f.path_in_repo, "content": content, "encoding": "base64" } })
        };
        ndjson.push('\n');
        ndjson.push_str(&line.to_string());
    }
    let commit_url = format!("{}/api/models/{repo_id}/commit/{revision}", client.endpoint);
    let answer = client.send("POST", &commit_url, ndjson.as_bytes(), "application/x-ndjson", false)?;
    bar.finish();
    let answer: Value = serde_json::from_slice(&answer).map_err(|e| HubError::Http(format!("commit: {e}")))?;
    answer["commitOid"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| HubError::Http(format!("commit answered without a commit id: {answer}")))
}
