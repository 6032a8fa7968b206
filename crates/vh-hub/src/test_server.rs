//! A local Hub-compatible HTTP server for tests: the routes that downloads and uploads use
//! (resolve with ETag / X-Repo-Commit / Content-Length, model info, the tree listing with its
//! pages, repo create, preupload, LFS batch and upload, NDJSON commit), in memory, on
//! 127.0.0.1 with a free port, plus switches to inject faults, hostile ones included (lying
//! headers and hashes, path-traversal names, answers that never come or never end). Enabled by
//! the `test-server` feature; never serves other addresses.

use base64::Engine;
use serde_json::{json, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tiny_http::{Header, Method, Request, Response, ResponseBox, Server, StatusCode};

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
    /// Send this as the ETag (and X-Linked-Etag) of every download instead of the blob's hash,
    /// e.g. a `../../..` path.
    pub etag: Option<String>,
    /// Send this as the X-Repo-Commit of every download instead of the commit id.
    pub commit_header: Option<String>,
    /// Give this as `sha` in model info answers instead of the commit id.
    pub info_sha: Option<String>,
    /// Serve these files (paths in the repo) with their last byte flipped: same size, wrong
    /// bytes for the hash the listing gives.
    pub corrupt_files: Vec<String>,
    /// Add these raw entries to tree listings (e.g. a file named `../x`, or a bad `oid`).
    pub extra_tree_entries: Vec<Value>,
    /// Serve tree listings in pages of this many entries, linked by `Link: <…>; rel="next"`
    /// as the Hub does.
    pub tree_page_size: Option<usize>,
    /// Point the tree listing's next-page links at this base URL instead of this server.
    pub next_link_base: Option<String>,
    /// Accept requests and never answer them (until the server is dropped).
    pub never_answer: bool,
    /// Answer model info and tree requests with a JSON body that never ends.
    pub endless_json: bool,
    /// Append this many bytes to every download: more than the listing gives.
    pub pad_downloads: usize,
}

#[derive(Debug, Default)]
struct State {
    repos: HashMap<String, Repo>,
    lfs: HashMap<String, Arc<Vec<u8>>>,
    token: Option<String>,
    faults: Faults,
    requests: usize,
    commit_counter: usize,
    /// Requests held unanswered (`Faults::never_answer`), dropped with the server.
    parked: Vec<Request>,
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

fn json_response(status: u16, body: Value) -> ResponseBox {
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
        .boxed()
}

/// A JSON array that never ends: `[` then the same entry again and again.
struct EndlessJson {
    sent_open: bool,
    entry: Vec<u8>,
    offset: usize,
}

impl std::io::Read for EndlessJson {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !self.sent_open {
            self.sent_open = true;
            buf[0] = b'[';
            return Ok(1);
        }
        let mut n = 0;
        while n < buf.len() {
            let take = (self.entry.len() - self.offset).min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&self.entry[self.offset..self.offset + take]);
            n += take;
            self.offset = (self.offset + take) % self.entry.len();
        }
        Ok(n)
    }
}

fn endless_json() -> ResponseBox {
    let entry = br#"{"type": "file", "path": "x", "oid": "0000000000000000000000000000000000000000", "size": 1},"#;
    Response::new(
        StatusCode(200),
        vec![header("Content-Type", "application/json")],
        EndlessJson {
            sent_open: false,
            entry: entry.to_vec(),
            offset: 0,
        },
        None,
        None,
    )
    .boxed()
}

/// Decodes `%XX` escapes (as the Hub decodes its URL segments); bad escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The git blob SHA-1 of `bytes`: the `oid` the Hub lists for a file stored in git.
fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {}\0", bytes.len()).as_bytes());
    hasher.update(bytes);
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The Git LFS pointer file git stores for an LFS file.
fn lfs_pointer(bytes: &[u8]) -> String {
    format!(
        "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
        sha256_hex(bytes),
        bytes.len()
    )
}

fn error(status: u16, message: &str) -> ResponseBox {
    Response::from_data(json!({ "error": message }).to_string().into_bytes())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
        .with_header(header("X-Error-Message", message))
        .boxed()
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
        if st.faults.never_answer {
            st.parked.push(request);
            return;
        }
        route(&mut st, &method, &url, auth.as_deref(), &body, port)
    };
    let _ = request.respond(response);
}

fn route(st: &mut State, method: &Method, url: &str, auth: Option<&str>, body: &[u8], port: u16) -> ResponseBox {
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
        (Method::Get, ["api", "models", ..]) if st.faults.endless_json => endless_json(),
        (Method::Get, ["api", "models", rest @ ..]) => match split_repo(rest) {
            Some((repo_id, ["revision", revision @ ..])) => {
                model_info(st, &repo_id, &percent_decode(&revision.join("/")))
            }
            Some((repo_id, [])) => model_info(st, &repo_id, "main"),
            Some((repo_id, ["tree", revision @ ..])) => {
                let query = url.split_once('?').map_or("", |(_, q)| q);
                tree(st, &repo_id, &percent_decode(&revision.join("/")), path, query, port)
            }
            _ => error(404, "unknown route"),
        },
        (Method::Post, ["api", "models", rest @ ..]) => match split_repo(rest) {
            Some((repo_id, ["preupload", _revision @ ..])) => preupload(st, &repo_id, body),
            Some((repo_id, ["commit", revision @ ..])) => {
                commit(st, &repo_id, &percent_decode(&revision.join("/")), body, port)
            }
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
            Response::from_data(Vec::new()).with_status_code(200).boxed()
        }
        (Method::Get | Method::Head, [namespace, name, "resolve", revision, file @ ..]) => resolve(
            st,
            &format!("{namespace}/{name}"),
            &percent_decode(revision),
            &percent_decode(&file.join("/")),
        ),
        _ => error(404, "unknown route"),
    }
}

fn create_repo(st: &mut State, body: &[u8]) -> ResponseBox {
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

fn model_info(st: &State, repo_id: &str, revision: &str) -> ResponseBox {
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
    let sha = st.faults.info_sha.clone().unwrap_or(commit);
    json_response(
        200,
        json!({ "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings }),
    )
}

/// The file listing of a revision (the `tree` API, recursive): its folders and files, with the
/// oids the Hub gives (the git blob SHA-1; for LFS files, of the pointer, plus the SHA-256),
/// in pages when `Faults::tree_page_size` is set.
fn tree(st: &State, repo_id: &str, revision: &str, path: &str, query: &str, port: u16) -> ResponseBox {
    let Some(repo) = st.repos.get(repo_id) else {
        return error(404, "Repository not found");
    };
    let Some(commit) = repo.commit_of(revision) else {
        return error(404, "Revision not found");
    };
    let mut folders = std::collections::BTreeSet::new();
    for path in repo.commits[&commit].keys() {
        let mut rest = path.as_str();
        while let Some((parent, _)) = rest.rsplit_once('/') {
            folders.insert(parent.to_string());
            rest = parent;
        }
    }
    let mut entries: Vec<Value> = folders
        .into_iter()
        .map(
            |folder| json!({ "type": "directory", "path": folder, "size": 0, "oid": git_blob_sha1(folder.as_bytes()) }),
        )
        .collect();
    entries.extend(repo.commits[&commit].iter().map(|(path, f)| {
        if f.lfs {
            let pointer = lfs_pointer(&f.bytes);
            json!({ "type": "file", "path": path, "size": f.bytes.len(), "oid": git_blob_sha1(pointer.as_bytes()),
                    "lfs": { "oid": sha256_hex(&f.bytes), "size": f.bytes.len(), "pointerSize": pointer.len() } })
        } else {
            json!({ "type": "file", "path": path, "size": f.bytes.len(), "oid": git_blob_sha1(&f.bytes) })
        }
    }));
    entries.extend(st.faults.extra_tree_entries.iter().cloned());
    let Some(page_size) = st.faults.tree_page_size.filter(|&n| n > 0) else {
        return json_response(200, Value::Array(entries));
    };
    let start: usize = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("cursor="))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let end = (start + page_size).min(entries.len());
    let page = entries.get(start..end).map(<[Value]>::to_vec).unwrap_or_default();
    let mut response = json_response(200, Value::Array(page));
    if end < entries.len() {
        let base = st
            .faults
            .next_link_base
            .clone()
            .unwrap_or_else(|| format!("http://127.0.0.1:{port}"));
        response = response.with_header(header(
            "Link",
            &format!("<{base}{path}?recursive=true&cursor={end}>; rel=\"next\""),
        ));
    }
    response
}

/// Files of 1 MiB and more, and weights, go through LFS, as on the Hub.
fn is_lfs(path: &str, size: u64) -> bool {
    size >= 1 << 20 || [".safetensors", ".bin", ".gguf"].iter().any(|e| path.ends_with(e))
}

fn preupload(st: &State, repo_id: &str, body: &[u8]) -> ResponseBox {
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

fn lfs_batch(st: &State, repo_id: &str, body: &[u8], port: u16) -> ResponseBox {
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

fn commit(st: &mut State, repo_id: &str, revision: &str, body: &[u8], port: u16) -> ResponseBox {
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

fn resolve(st: &State, repo_id: &str, revision: &str, file: &str) -> ResponseBox {
    let Some(repo) = st.repos.get(repo_id) else {
        return error(404, "Repository not found");
    };
    let Some(commit) = repo.commit_of(revision) else {
        return error(404, "Revision not found");
    };
    let Some(stored) = repo.commits[&commit].get(file) else {
        return error(404, "Entry not found").with_header(header("X-Error-Code", "EntryNotFound"));
    };
    // The Hub's ETags: the SHA-256 for LFS files, the git blob SHA-1 for the others.
    let etag = if stored.lfs {
        sha256_hex(&stored.bytes)
    } else {
        git_blob_sha1(&stored.bytes)
    };
    let etag = st.faults.etag.clone().unwrap_or(etag);
    let size = stored.bytes.len();
    let mut data = if st.faults.truncate_downloads {
        stored.bytes[..size / 2].to_vec()
    } else {
        stored.bytes.to_vec()
    };
    data.extend(std::iter::repeat_n(b'#', st.faults.pad_downloads));
    if st.faults.corrupt_files.iter().any(|f| f == file) {
        if let Some(last) = data.last_mut() {
            *last ^= 0xff;
        }
    }
    let commit_header = st.faults.commit_header.clone().unwrap_or(commit);
    let mut response = Response::from_data(data)
        .with_status_code(200)
        .with_header(header("ETag", &format!("\"{etag}\"")))
        .with_header(header("X-Repo-Commit", &commit_header));
    if stored.lfs {
        response = response
            .with_header(header("X-Linked-Etag", &format!("\"{etag}\"")))
            .with_header(header("X-Linked-Size", &size.to_string()));
    }
    if st.faults.truncate_downloads {
        // Announce the full size, as a connection cut mid-transfer would.
        response = response.with_header(header("X-Linked-Size", &size.to_string()));
    }
    response.boxed()
}
