//! A local Hub-compatible HTTP server for tests: the routes that downloads and uploads use
//! (resolve with ETag / X-Repo-Commit / Content-Length, model info, repo create, preupload,
//! LFS batch and upload, NDJSON commit), in memory, on 127.0.0.1 with a free port, plus
//! switches to inject faults. Enabled by the `test-server` feature; never serves other addresses.

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tiny_http::{Header, Method, Request, Response, Server};

/// A file in a commit: its bytes, and whether it was stored through LFS.
#[derive(Debug, Clone)]
struct StoredFile {
    bytes: Arc<Vec<u8>>,
    lfs: bool,
}

#[derive(Debug, Default)]
struct Repo {
    private: bool,
    /// Commit id -> files; commits are full snapshots.
    commits: HashMap<String, BTreeMap<String, StoredFile>>,
    /// Branch -> head commit id.
    branches: HashMap<String, String>,
}

impl Repo {
    /// The commit a branch name or commit id designates.
    fn commit_of(&self, revision: &str) -> Option<String> {
        self.branches
            .get(revision)
            .cloned()
            .or_else(|| self.commits.contains_key(revision).then(|| revision.to_string()))
    }
}

/// Faults the server injects, for tests of the clients' error handling.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Answer this many of the next requests with `status` (e.g. 500) before serving normally.
    pub fail_next: usize,
    /// The status for `fail_next`.
    pub status: u16,
    /// Send only the first half of file bodies (with the full Content-Length announced).
    pub truncate_downloads: bool,
}

#[derive(Debug, Default)]
struct State {
    repos: HashMap<String, Repo>,
    lfs: HashMap<String, Arc<Vec<u8>>>,
    token: Option<String>,
    faults: Faults,
    requests: usize,
    commit_counter: usize,
}

/// A running local Hub server; stops when dropped.
pub struct HubServer {
    server: Arc<Server>,
    state: Arc<Mutex<State>>,
    thread: Option<JoinHandle<()>>,
    port: u16,
}

impl HubServer {
    /// Starts a server on 127.0.0.1 with a free port. With `token`, every request must carry
    /// `Authorization: Bearer <token>` (401 without one, 403 with another).
    pub fn start(token: Option<&str>) -> std::io::Result<Self> {
        let server = Arc::new(Server::http("127.0.0.1:0").map_err(std::io::Error::other)?);
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or_else(|| std::io::Error::other("no port"))?;
        let state = Arc::new(Mutex::new(State {
            token: token.map(str::to_string),
            ..Default::default()
        }));
        let (srv, st) = (server.clone(), state.clone());
        let thread = std::thread::spawn(move || {
            for request in srv.incoming_requests() {
                handle(&st, request, port);
            }
        });
        Ok(Self {
            server,
            state,
            thread: Some(thread),
            port,
        })
    }

    /// The endpoint to use as HF_ENDPOINT.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sets the faults to inject from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.state.lock().expect("server state").faults = faults;
    }

    /// How many requests the server has answered.
    pub fn requests(&self) -> usize {
        self.state.lock().expect("server state").requests
    }

    /// Creates `repo_id` (if needed) and commits `files` to `main`, as an upload would.
    pub fn seed(&self, repo_id: &str, files: &[(&str, Vec<u8>)]) {
        let mut st = self.state.lock().expect("server state");
        st.commit_counter += 1;
        let oid = sha256_hex(format!("{repo_id}:{}", st.commit_counter).as_bytes())[..40].to_string();
        let repo = st.repos.entry(repo_id.to_string()).or_default();
        let mut snapshot = repo
            .branches
            .get("main")
            .and_then(|c| repo.commits.get(c).cloned())
            .unwrap_or_default();
        for (path, bytes) in files {
            let lfs = is_lfs(path, bytes.len() as u64);
            snapshot.insert(
                path.to_string(),
                StoredFile {
                    bytes: Arc::new(bytes.clone()),
                    lfs,
                },
            );
        }
        repo.commits.insert(oid.clone(), snapshot);
        repo.branches.insert("main".to_string(), oid);
    }

    /// The files of a repo at a branch or commit, if both exist.
    pub fn files(&self, repo_id: &str, revision: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let state = self.state.lock().expect("server state");
        let repo = state.repos.get(repo_id)?;
        let commit = repo.branches.get(revision).map(String::as_str).unwrap_or(revision);
        Some(
            repo.commits
                .get(commit)?
                .iter()
                .map(|(k, v)| (k.clone(), v.bytes.to_vec()))
                .collect(),
        )
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

fn json_response(status: u16, body: Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

fn error(status: u16, message: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    json_response(status, json!({ "error": message })).with_header(header("X-Error-Message", message))
}

/// The signature of a pre-signed upload URL.
fn upload_signature(path: &str) -> String {
    sha256_hex(format!("local-hub:{path}").as_bytes())[..16].to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits `/api/models/{namespace}/{name}/{action}/{revision...}` style paths: the repo id is
/// the two segments after `prefix`.
fn split_repo<'a>(segments: &'a [&'a str]) -> Option<(String, &'a [&'a str])> {
    if segments.len() < 2 {
        return None;
    }
    Some((format!("{}/{}", segments[0], segments[1]), &segments[2..]))
}

fn handle(state: &Arc<Mutex<State>>, mut request: Request, port: u16) {
    let mut body = Vec::new();
    let _ = std::io::Read::read_to_end(request.as_reader(), &mut body);
    let auth = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .map(|h| h.value.as_str().to_string());
    let method = request.method().clone();
    let url = request.url().to_string();
    let response = {
        let mut st = state.lock().expect("server state");
        st.requests += 1;
        route(&mut st, &method, &url, auth.as_deref(), &body, port)
    };
    let _ = request.respond(response);
}

fn route(
    st: &mut State,
    method: &Method,
    url: &str,
    auth: Option<&str>,
    body: &[u8],
    port: u16,
) -> Response<std::io::Cursor<Vec<u8>>> {
    if st.faults.fail_next > 0 {
        st.faults.fail_next -= 1;
        return error(st.faults.status, "injected fault");
    }
    let path = url.split('?').next().unwrap_or("");
    // LFS uploads go to a pre-signed URL, as the Hub's storage URLs are: no bearer token.
    let presigned = path.starts_with("/lfs-upload/") && url.ends_with(&format!("?sig={}", upload_signature(path)));
    if let Some(token) = st.token.as_ref().filter(|_| !presigned) {
        match auth.and_then(|a| a.strip_prefix("Bearer ")) {
            None => return error(401, "authentication required"),
            Some(given) if given != token => return error(403, "invalid token"),
            Some(_) => {}
        }
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::Post, ["api", "repos", "create"]) => create_repo(st, body),
        // The client validates model cards (README.md metadata) before committing them.
        (Method::Post, ["api", "validate-yaml"]) => json_response(200, json!({ "errors": [], "warnings": [] })),
        (Method::Get, ["api", "models", rest @ ..]) => match split_repo(rest) {
            Some((repo_id, ["revision", revision @ ..])) => model_info(st, &repo_id, &revision.join("/")),
            Some((repo_id, [])) => model_info(st, &repo_id, "main"),
            Some((repo_id, ["tree", revision @ ..])) => tree(st, &repo_id, &revision.join("/")),
            _ => error(404, "unknown route"),
        },
        (Method::Post, ["api", "models", rest @ ..]) => match split_repo(rest) {
            Some((repo_id, ["preupload", _revision @ ..])) => preupload(st, &repo_id, body),
            Some((repo_id, ["commit", revision @ ..])) => commit(st, &repo_id, &revision.join("/"), body, port),
            _ => error(404, "unknown route"),
        },
        (Method::Post, [namespace, repo_git, "info", "lfs", "objects", "batch"]) => {
            let repo_id = format!("{namespace}/{}", repo_git.trim_end_matches(".git"));
            lfs_batch(st, &repo_id, body, port)
        }
        (Method::Put, ["lfs-upload", oid]) => {
            if sha256_hex(body) != *oid {
                return error(400, "uploaded bytes do not match the oid");
            }
            st.lfs.insert(oid.to_string(), Arc::new(body.to_vec()));
            Response::from_data(Vec::new()).with_status_code(200)
        }
        (Method::Get | Method::Head, [namespace, name, "resolve", revision, file @ ..]) => {
            resolve(st, &format!("{namespace}/{name}"), revision, &file.join("/"))
        }
        _ => error(404, "unknown route"),
    }
}

fn create_repo(st: &mut State, body: &[u8]) -> Response<std::io::Cursor<Vec<u8>>> {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return error(400, "invalid JSON");
    };
    let Some(name) = req.get("name").and_then(Value::as_str) else {
        return error(400, "missing name");
    };
    let namespace = req.get("organization").and_then(Value::as_str).unwrap_or("user");
    let repo_id = format!("{namespace}/{name}");
    if st.repos.contains_key(&repo_id) {
        return json_response(
            409,
            json!({"error": "You already created this model repo", "url": repo_id}),
        );
    }
    let private = req.get("private").and_then(Value::as_bool).unwrap_or(false);
    let mut repo = Repo {
        private,
        ..Default::default()
    };
    repo.commits.insert("0".repeat(40), BTreeMap::new());
    repo.branches.insert("main".into(), "0".repeat(40));
    st.repos.insert(repo_id.clone(), repo);
    json_response(200, json!({ "url": format!("/{repo_id}"), "name": repo_id }))
}

fn model_info(st: &State, repo_id: &str, revision: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let Some(repo) = st.repos.get(repo_id) else {
        return error(404, "Repository not found");
    };
    let Some(commit) = repo.commit_of(revision) else {
        return error(404, "Revision not found");
    };
    let siblings: Vec<Value> = repo.commits[&commit]
        .keys()
        .map(|k| json!({ "rfilename": k }))
        .collect();
    json_response(
        200,
        json!({ "id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private, "siblings": siblings }),
    )
}

/// The file listing of a revision (the `tree` API, recursive; every file at top level here).
fn tree(st: &State, repo_id: &str, revision: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let Some(repo) = st.repos.get(repo_id) else {
        return error(404, "Repository not found");
    };
    let Some(commit) = repo.commit_of(revision) else {
        return error(404, "Revision not found");
    };
    let entries: Vec<Value> = repo.commits[&commit]
        .iter()
        .map(|(path, f)| {
            let sha = sha256_hex(&f.bytes);
            let mut entry = json!({ "type": "file", "path": path, "size": f.bytes.len(), "oid": &sha[..40] });
            if f.lfs {
                entry["lfs"] = json!({ "oid": sha, "size": f.bytes.len(), "pointerSize": 134 });
            }
            entry
        })
        .collect();
    json_response(200, Value::Array(entries))
}

/// Files of 1 MiB and more, and weights, go through LFS, as on the Hub.
fn is_lfs(path: &str, size: u64) -> bool {
    size >= 1 << 20 || [".safetensors", ".bin", ".gguf"].iter().any(|e| path.ends_with(e))
}

fn preupload(st: &State, repo_id: &str, body: &[u8]) -> Response<std::io::Cursor<Vec<u8>>> {
    if !st.repos.contains_key(repo_id) {
        return error(404, "Repository not found");
    }
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return error(400, "invalid JSON");
    };
    let files: Vec<Value> = req["files"]
        .as_array()
        .map(|files| {
            files
                .iter()
                .map(|f| {
                    let path = f["path"].as_str().unwrap_or_default();
                    let size = f["size"].as_u64().unwrap_or(0);
                    let mode = if is_lfs(path, size) { "lfs" } else { "regular" };
                    json!({ "path": path, "uploadMode": mode, "shouldIgnore": false })
                })
                .collect()
        })
        .unwrap_or_default();
    json_response(200, json!({ "files": files }))
}

fn lfs_batch(st: &State, repo_id: &str, body: &[u8], port: u16) -> Response<std::io::Cursor<Vec<u8>>> {
    if !st.repos.contains_key(repo_id) {
        return error(404, "Repository not found");
    }
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return error(400, "invalid JSON");
    };
    let objects: Vec<Value> = req["objects"]
        .as_array()
        .map(|objects| {
            objects
                .iter()
                .map(|o| {
                    let oid = o["oid"].as_str().unwrap_or_default();
                    let size = o["size"].as_u64().unwrap_or(0);
                    if st.lfs.contains_key(oid) {
                        json!({ "oid": oid, "size": size })
                    } else {
                        let path = format!("/lfs-upload/{oid}");
                        let href = format!("http://127.0.0.1:{port}{path}?sig={}", upload_signature(&path));
                        json!({ "oid": oid, "size": size, "actions": { "upload": { "href": href } } })
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    json_response(200, json!({ "transfer": "basic", "objects": objects }))
        .with_header(header("Content-Type", "application/vnd.git-lfs+json"))
}

fn commit(st: &mut State, repo_id: &str, revision: &str, body: &[u8], port: u16) -> Response<std::io::Cursor<Vec<u8>>> {
    let Some(repo) = st.repos.get(repo_id) else {
        return error(404, "Repository not found");
    };
    let base = repo
        .branches
        .get(revision)
        .cloned()
        .or_else(|| repo.branches.get("main").cloned());
    let mut files = base.and_then(|c| repo.commits.get(&c).cloned()).unwrap_or_default();
    let text = String::from_utf8_lossy(body);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(op) = serde_json::from_str::<Value>(line) else {
            return error(400, "invalid NDJSON line");
        };
        let value = &op["value"];
        let path = value["path"].as_str().unwrap_or_default().to_string();
        match op["key"].as_str() {
            Some("header") => {}
            Some("file") => {
                let content = value["content"].as_str().unwrap_or_default();
                let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(content) else {
                    return error(400, "invalid base64 content");
                };
                files.insert(
                    path,
                    StoredFile {
                        bytes: Arc::new(bytes),
                        lfs: false,
                    },
                );
            }
            Some("lfsFile") => {
                let oid = value["oid"].as_str().unwrap_or_default();
                let Some(bytes) = st.lfs.get(oid).cloned() else {
                    return error(422, "LFS object was not uploaded");
                };
                files.insert(path, StoredFile { bytes, lfs: true });
            }
            Some("deletedFile") => {
                files.remove(&path);
            }
            other => return error(400, &format!("unsupported commit operation {other:?}")),
        }
    }
    st.commit_counter += 1;
    let oid = sha256_hex(format!("{repo_id}:{}", st.commit_counter).as_bytes())[..40].to_string();
    let repo = st.repos.get_mut(repo_id).expect("checked above");
    repo.commits.insert(oid.clone(), files);
    repo.branches.insert(revision.to_string(), oid.clone());
    json_response(
        200,
        json!({ "commitOid": oid, "commitUrl": format!("http://127.0.0.1:{port}/{repo_id}/commit/{oid}") }),
    )
}

fn resolve(st: &State, repo_id: &str, revision: &str, file: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let Some(repo) = st.repos.get(repo_id) else {
        return error(404, "Repository not found");
    };
    let Some(commit) = repo.commit_of(revision) else {
        return error(404, "Revision not found");
    };
    let Some(stored) = repo.commits[&commit].get(file) else {
        return error(404, "Entry not found").with_header(header("X-Error-Code", "EntryNotFound"));
    };
    let etag = if stored.lfs {
        sha256_hex(&stored.bytes)
    } else {
        sha256_hex(&stored.bytes)[..40].to_string()
    };
    let size = stored.bytes.len();
    let data = if st.faults.truncate_downloads {
        stored.bytes[..size / 2].to_vec()
    } else {
        stored.bytes.to_vec()
    };
    let mut response = Response::from_data(data)
        .with_status_code(200)
        .with_header(header("ETag", &format!("\"{etag}\"")))
        .with_header(header("X-Repo-Commit", &commit));
    if stored.lfs {
        response = response
            .with_header(header("X-Linked-Etag", &format!("\"{etag}\"")))
            .with_header(header("X-Linked-Size", &size.to_string()));
    }
    if st.faults.truncate_downloads {
        // Announce the full size, as a connection cut mid-transfer would.
        response = response.with_header(header("X-Linked-Size", &size.to_string()));
    }
    response
}
