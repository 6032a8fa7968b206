//! A lying or hostile Hub (issue 12): each test builds the hostile input with the local test
//! server's fault switches and checks that the client refuses it with a typed error, writes
//! nothing outside the cache, caches nothing unverified, and sends nothing it should not.

use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vh_hub::test_server::{Faults, HubServer};
use vh_hub::validate::{is_blob_name, is_commit_id};
use vh_hub::{push_folder, resolve_model, HubError, HubOptions, ModelFolder, PushOptions};

fn safetensors_bytes() -> Vec<u8> {
    let tensors = vec![(
        "w".to_string(),
        tch::Tensor::arange(4000, (tch::Kind::Float, tch::Device::Cpu)),
    )];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    vh_hub::write_safetensors(&path, &tensors).unwrap();
    std::fs::read(path).unwrap()
}

/// A checkpoint with a regular file (config.json), an LFS file (model.safetensors) and a nested
/// LFS file.
fn checkpoint_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("config.json", br#"{"model_type": "gpt2"}"#.to_vec()),
        ("model.safetensors", safetensors_bytes()),
        ("sub/adapter.safetensors", b"nested weights".to_vec()),
        ("README.md", b"not a checkpoint file".to_vec()),
    ]
}

fn serve() -> HubServer {
    let server = HubServer::start(Some("tok")).unwrap();
    server.seed("user/tiny", &checkpoint_files());
    server
}

fn options(server: &HubServer, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: Some(server.endpoint()),
        token: Some("tok".into()),
        cache_dir: Some(cache.to_path_buf()),
        retry_base_delay: Some(Duration::from_millis(10)),
        connect_timeout: Some(Duration::from_secs(5)),
        read_timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    }
}

fn push_options(server: &HubServer) -> PushOptions {
    PushOptions {
        endpoint: Some(server.endpoint()),
        token: Some("tok".into()),
        retry_base_delay: Some(Duration::from_millis(10)),
        ..Default::default()
    }
}

/// Every file, link and folder below `dir` (links not followed).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        out.push(path.clone());
        if path.is_dir() && !path.is_symlink() {
            out.extend(walk(&path));
        }
    }
    out
}

/// A work folder holding `cache/` and a file `victim.txt` beside it that an escape would hit.
struct Scene {
    root: tempfile::TempDir,
}

impl Scene {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("victim.txt"), b"precious").unwrap();
        Self { root }
    }

    fn cache(&self) -> PathBuf {
        self.root.path().join("cache")
    }

    /// Checks that the victim is intact and that nothing exists outside the cache.
    fn assert_nothing_escaped(&self) {
        assert_eq!(std::fs::read(self.root.path().join("victim.txt")).unwrap(), b"precious");
        let outside: Vec<PathBuf> = walk(self.root.path())
            .into_iter()
            .filter(|p| !p.starts_with(self.cache()) && !p.ends_with("victim.txt"))
            .collect();
        assert!(outside.is_empty(), "written outside the cache: {outside:?}");
    }

    fn repo_dir(&self) -> PathBuf {
        self.cache().join("models--user--tiny")
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn git_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn weights(folder: &Path) -> f64 {
    ModelFolder::open(folder).unwrap().tensors().unwrap()[0]
        .1
        .double_value(&[3999])
}

#[test]
fn the_cache_has_the_layout_of_huggingface_hub() {
    let server = serve();
    let scene = Scene::new();
    let folder = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap();
    let repo = scene.repo_dir();
    let commit = folder.file_name().unwrap().to_str().unwrap().to_string();
    assert!(is_commit_id(&commit), "{commit}");
    assert_eq!(folder, repo.join("snapshots").join(&commit));
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), commit);
    let files: std::collections::HashMap<_, _> = checkpoint_files().into_iter().collect();
    // Regular files are stored under their git blob SHA-1, LFS files under their SHA-256, and
    // linked relatively, one more `../` per folder level, as the Python client does.
    let expect = [
        (
            "config.json",
            format!("../../blobs/{}", git_sha1(&files["config.json"])),
        ),
        (
            "model.safetensors",
            format!("../../blobs/{}", sha256_hex(&files["model.safetensors"])),
        ),
        (
            "sub/adapter.safetensors",
            format!("../../../blobs/{}", sha256_hex(&files["sub/adapter.safetensors"])),
        ),
    ];
    for (path, target) in expect {
        assert_eq!(
            std::fs::read_link(folder.join(path)).unwrap(),
            PathBuf::from(&target),
            "{path}"
        );
        assert_eq!(std::fs::read(folder.join(path)).unwrap(), files[path], "{path}");
    }
    assert!(!folder.join("README.md").exists(), "only checkpoint files are fetched");
    for blob in walk(&repo.join("blobs")) {
        assert!(
            is_blob_name(blob.file_name().unwrap().to_str().unwrap()),
            "{}",
            blob.display()
        );
    }
    assert_eq!(weights(&folder), 3999.0);
    scene.assert_nothing_escaped();
}

#[test]
fn hostile_etag_and_commit_headers_never_choose_cache_paths() {
    let server = serve();
    let scene = Scene::new();
    // Relative to blobs/ (ETag) and snapshots/ (commit), these lead to the victim beside the cache.
    server.set_faults(Faults {
        etag: Some("../../../victim.txt".into()),
        commit_header: Some("../../../victim.txt".into()),
        ..Default::default()
    });
    let folder = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap();
    assert!(
        folder.starts_with(scene.repo_dir().join("snapshots")),
        "{}",
        folder.display()
    );
    assert_eq!(weights(&folder), 3999.0);
    scene.assert_nothing_escaped();
}

#[test]
fn a_commit_id_that_is_not_a_hash_is_refused_before_any_write() {
    let server = serve();
    let scene = Scene::new();
    for sha in [
        "../../../victim.txt",
        "main",
        "0123456789abcdef0123456789abcdef0123456",
        "0123456789ABCDEF0123456789ABCDEF01234567",
    ] {
        server.set_faults(Faults {
            info_sha: Some(sha.into()),
            ..Default::default()
        });
        let err = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap_err();
        assert!(matches!(err, HubError::InvalidAnswer { .. }), "{sha}: {err}");
        assert!(!scene.repo_dir().exists(), "{sha}: the cache was written to");
    }
    scene.assert_nothing_escaped();

    // A pinned commit that the model info contradicts is refused too.
    server.set_faults(Faults::default());
    let folder = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap();
    let commit = folder.file_name().unwrap().to_str().unwrap().to_string();
    server.set_faults(Faults {
        info_sha: Some("f".repeat(40)),
        ..Default::default()
    });
    let pinned = HubOptions {
        revision: Some(commit),
        ..options(&server, &scene.cache())
    };
    let err = resolve_model("user/tiny", &pinned).unwrap_err();
    assert!(matches!(err, HubError::InvalidAnswer { .. }), "{err}");
}

#[test]
fn path_traversal_names_and_bad_oids_in_the_listing_are_refused() {
    let server = serve();
    let scene = Scene::new();
    let sha1 = "0123456789abcdef0123456789abcdef01234567";
    let absolute = format!("{}/abs-escape.safetensors", scene.root.path().display());
    let names = [
        "../x.safetensors",
        "../../../../escape.safetensors",
        "a/../../b.safetensors",
        "..\\..\\x.safetensors",
        "a/./b.safetensors",
        "a//b.safetensors",
        "x.safetensors\0",
        absolute.as_str(),
        "/etc/x.safetensors",
    ];
    for name in names {
        server.set_faults(Faults {
            extra_tree_entries: vec![serde_json::json!({"type": "file", "path": name, "oid": sha1, "size": 1})],
            ..Default::default()
        });
        let err = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap_err();
        assert!(matches!(err, HubError::InvalidRepoPath { .. }), "{name:?}: {err}");
    }
    let bad_entries = [
        serde_json::json!({"type": "file", "path": "x.safetensors", "oid": "../../../victim.txt", "size": 1}),
        serde_json::json!({"type": "file", "path": "x.safetensors", "oid": sha1, "size": 1,
                           "lfs": {"oid": "../../../victim.txt", "size": 1}}),
        serde_json::json!({"type": "file", "path": "config.json", "oid": sha1, "size": 1}),
        serde_json::json!({"type": "file", "path": "config.json/x", "oid": sha1, "size": 1}),
    ];
    for entry in bad_entries {
        server.set_faults(Faults {
            extra_tree_entries: vec![entry.clone()],
            ..Default::default()
        });
        let err = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap_err();
        assert!(matches!(err, HubError::InvalidAnswer { .. }), "{entry}: {err}");
    }
    assert!(!scene.root.path().join("escape.safetensors").exists());
    assert!(!Path::new(&absolute).exists());
    assert!(
        !scene.repo_dir().join("snapshots").exists(),
        "nothing is linked from a bad listing"
    );
    scene.assert_nothing_escaped();
}

#[test]
fn bytes_that_differ_from_the_listing_are_never_cached() {
    let server = serve();
    for (file, algorithm) in [("config.json", "git-sha1"), ("model.safetensors", "sha256")] {
        let scene = Scene::new();
        server.set_faults(Faults {
            corrupt_files: vec![file.to_string()],
            ..Default::default()
        });
        let err = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap_err();
        match &err {
            HubError::HashMismatch { path, algorithm: a, .. } => assert_eq!((path.as_str(), *a), (file, algorithm)),
            other => panic!("{file}: expected a hash mismatch, got {other}"),
        }
        assert!(
            !scene.repo_dir().join("snapshots").exists(),
            "{file}: a snapshot was linked"
        );
        let leftovers: Vec<_> = walk(&scene.repo_dir().join("blobs"))
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("incomplete"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // Once the server serves the right bytes, the same cache completes.
        server.set_faults(Faults::default());
        assert_eq!(
            weights(&resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap()),
            3999.0
        );
        scene.assert_nothing_escaped();
    }
}

#[test]
fn more_bytes_than_listed_are_refused() {
    let server = serve();
    let scene = Scene::new();
    server.set_faults(Faults {
        pad_downloads: 100,
        ..Default::default()
    });
    let err = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap_err();
    assert!(matches!(err, HubError::Oversized { .. }), "{err}");
    assert!(!scene.repo_dir().join("snapshots").exists());
}

#[test]
fn a_bad_blob_already_in_the_cache_is_replaced() {
    let server = serve();
    let scene = Scene::new();
    let folder = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap();
    let good = std::fs::read(folder.join("model.safetensors")).unwrap();
    let blob = std::fs::canonicalize(folder.join("model.safetensors")).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();
    resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap();
    assert_eq!(std::fs::read(&blob).unwrap(), good);
}

#[test]
fn a_server_that_never_answers_times_out() {
    let server = serve();
    let scene = Scene::new();
    server.set_faults(Faults {
        never_answer: true,
        ..Default::default()
    });
    let quick = HubOptions {
        read_timeout: Some(Duration::from_millis(300)),
        ..options(&server, &scene.cache())
    };
    let start = Instant::now();
    let err = resolve_model("user/tiny", &quick).unwrap_err();
    assert!(matches!(err, HubError::Timeout(_)), "{err}");
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());

    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("config.json"), b"{}").unwrap();
    let push = PushOptions {
        read_timeout: Some(Duration::from_millis(300)),
        ..push_options(&server)
    };
    let start = Instant::now();
    let err = push_folder("user/pushed", folder.path(), &push).unwrap_err();
    assert!(matches!(err, HubError::Timeout(_)), "{err}");
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
}

#[test]
fn an_endless_json_answer_is_cut_at_the_cap() {
    let server = serve();
    let scene = Scene::new();
    server.set_faults(Faults {
        endless_json: true,
        ..Default::default()
    });
    let err = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap_err();
    match err {
        HubError::AnswerTooLarge { limit, .. } => assert_eq!(limit, vh_hub::http::MAX_JSON_ANSWER),
        other => panic!("expected AnswerTooLarge, got {other}"),
    }
}

#[test]
fn listing_pages_are_followed_on_the_endpoint_only() {
    let server = serve();
    let scene = Scene::new();
    server.set_faults(Faults {
        tree_page_size: Some(1),
        ..Default::default()
    });
    let folder = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap();
    assert!(folder.join("sub/adapter.safetensors").is_file());
    assert_eq!(weights(&folder), 3999.0);

    // A next-page link to another host would carry the token there: refused, never followed.
    let elsewhere = HubServer::start(None).unwrap();
    server.set_faults(Faults {
        tree_page_size: Some(1),
        next_link_base: Some(elsewhere.endpoint()),
        ..Default::default()
    });
    let other_cache = tempfile::tempdir().unwrap();
    let err = resolve_model("user/tiny", &options(&server, other_cache.path())).unwrap_err();
    assert!(matches!(err, HubError::InvalidAnswer { .. }), "{err}");
    assert_eq!(elsewhere.requests(), 0, "the other host was contacted");
}

#[test]
fn local_paths_and_invalid_ids_are_never_sent_to_the_hub() {
    let server = serve();
    let scene = Scene::new();
    let opts = options(&server, &scene.cache());
    let file = scene.root.path().join("victim.txt");
    let links = tempfile::tempdir().unwrap();
    let dangling = links.path().join("dangling");
    std::os::unix::fs::symlink(links.path().join("nothing"), &dangling).unwrap();
    // Integration tests run in the package folder, so these relative paths name files.
    for local_file in [
        file.to_str().unwrap(),
        dangling.to_str().unwrap(),
        "Cargo.toml",
        "src/lib.rs",
    ] {
        let err = resolve_model(local_file, &opts).unwrap_err();
        assert!(matches!(err, HubError::NotAModelFolder { .. }), "{local_file}: {err}");
    }
    for path in [
        "./missing",
        "../missing",
        "/nonexistent/x",
        "~/x",
        "a\\b",
        "a/b/c",
        "../../evil",
        "user/tiny/",
    ] {
        let err = resolve_model(path, &opts).unwrap_err();
        assert!(matches!(err, HubError::NotFound { .. }), "{path}: {err}");
    }
    for id in ["a/b?x=1#f", "foo--bar", "-a/b", "a/b.git", "a b"] {
        let err = resolve_model(id, &opts).unwrap_err();
        assert!(matches!(err, HubError::InvalidRepoId { .. }), "{id}: {err}");
    }
    for revision in ["../../x", "/abs", "a\\b", "a//b", ""] {
        let err = resolve_model(
            "user/tiny",
            &HubOptions {
                revision: Some(revision.into()),
                ..opts.clone()
            },
        )
        .unwrap_err();
        assert!(matches!(err, HubError::InvalidRevision { .. }), "{revision}: {err}");
    }
    assert_eq!(server.requests(), 0, "a local path or invalid id reached the Hub");
    scene.assert_nothing_escaped();
}

#[test]
fn offline_mode_checks_the_refs_it_reads() {
    let server = serve();
    let scene = Scene::new();
    let folder = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap();
    let offline = HubOptions {
        offline: true,
        ..options(&server, &scene.cache())
    };
    assert_eq!(resolve_model("user/tiny", &offline).unwrap(), folder);
    let commit = folder.file_name().unwrap().to_str().unwrap().to_string();
    let by_commit = HubOptions {
        revision: Some(commit),
        ..offline.clone()
    };
    assert_eq!(resolve_model("user/tiny", &by_commit).unwrap(), folder);
    let refs = scene.repo_dir().join("refs/main");
    std::fs::write(&refs, "../../../victim.txt").unwrap();
    let err = resolve_model("user/tiny", &offline).unwrap_err();
    assert!(matches!(err, HubError::CorruptCache { .. }), "{err}");
    std::fs::write(&refs, "a".repeat(40)).unwrap();
    let err = resolve_model("user/tiny", &offline).unwrap_err();
    assert!(matches!(err, HubError::Offline(_)), "{err}");
}

#[test]
fn revisions_with_slashes_are_percent_encoded_and_kept_under_refs() {
    let server = serve();
    let scene = Scene::new();
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(
        folder.path().join("config.json"),
        br#"{"model_type": "gpt2", "branch": 1}"#,
    )
    .unwrap();
    std::fs::write(folder.path().join("model.safetensors"), safetensors_bytes()).unwrap();
    let branch = PushOptions {
        revision: Some("feature/x".into()),
        ..push_options(&server)
    };
    let commit = push_folder("user/tiny", folder.path(), &branch).unwrap();
    assert!(
        server.files("user/tiny", "feature/x").is_some(),
        "the branch is `feature/x`"
    );
    let opts = HubOptions {
        revision: Some("feature/x".into()),
        ..options(&server, &scene.cache())
    };
    let snapshot = resolve_model("user/tiny", &opts).unwrap();
    assert_eq!(snapshot.file_name().unwrap().to_str().unwrap(), commit);
    assert_eq!(
        std::fs::read_to_string(scene.repo_dir().join("refs/feature/x")).unwrap(),
        commit
    );
    assert!(std::fs::read_to_string(snapshot.join("config.json"))
        .unwrap()
        .contains("branch"));
    let offline = HubOptions { offline: true, ..opts };
    assert_eq!(resolve_model("user/tiny", &offline).unwrap(), snapshot);
    scene.assert_nothing_escaped();
}

#[test]
fn push_refuses_hostile_repo_ids_and_revisions_before_any_request() {
    let server = serve();
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("config.json"), b"{}").unwrap();
    for id in [
        "../../evil",
        "a/b?x=1#f",
        "a/b/c",
        "a/../b",
        "a/b#f",
        "evil",
        "a/b%2F..%2F",
    ] {
        let err = push_folder(id, folder.path(), &push_options(&server)).unwrap_err();
        assert!(matches!(err, HubError::InvalidRepoId { .. }), "{id}: {err}");
    }
    for revision in ["../../x", "a/../../b", "/abs", "x?y=1", "x#f", ""] {
        let opts = PushOptions {
            revision: Some(revision.into()),
            ..push_options(&server)
        };
        let err = push_folder("user/ok", folder.path(), &opts).unwrap_err();
        assert!(matches!(err, HubError::InvalidRevision { .. }), "{revision}: {err}");
    }
    assert_eq!(server.requests(), 0, "a hostile id or revision reached the Hub");
}

#[test]
fn push_uploads_regular_files_and_refuses_links_out_of_the_folder() {
    let server = serve();
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("secret.txt");
    std::fs::write(&secret, b"root:x:0:0").unwrap();
    let folder = work.path().join("model");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("config.json"), b"{}").unwrap();
    let link = folder.join("tokenizer.json");
    for target in [
        secret.clone(),
        PathBuf::from("/etc/passwd"),
        work.path().join("nothing"),
    ] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = push_folder("user/pushed", &folder, &push_options(&server)).unwrap_err();
        match &err {
            HubError::UnsafeUpload { path, .. } => assert_eq!(path, &link),
            other => panic!("{}: expected UnsafeUpload, got {other}", target.display()),
        }
    }
    // A FIFO is not a file: refused (and never opened in a way that blocks).
    std::fs::remove_file(&link).unwrap();
    let fifo = folder.join("pipe.json");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let err = push_folder("user/pushed", &folder, &push_options(&server)).unwrap_err();
    assert!(matches!(err, HubError::UnsafeUpload { .. }), "{err}");
    assert_eq!(server.requests(), 0, "nothing is sent before every file is checked");
    std::fs::remove_file(&fifo).unwrap();

    // A link to a file inside the folder is followed: its content is uploaded under its name.
    std::fs::write(folder.join("real-tokenizer.json"), b"{\"inside\": true}").unwrap();
    std::os::unix::fs::symlink("real-tokenizer.json", &link).unwrap();
    push_folder("user/pushed", &folder, &push_options(&server)).unwrap();
    let files = server.files("user/pushed", "main").unwrap();
    assert_eq!(files["tokenizer.json"], b"{\"inside\": true}");
    assert!(!files.values().any(|bytes| bytes.starts_with(b"root:")));
}

#[test]
fn a_cache_snapshot_pushes_through_its_blob_links() {
    let server = serve();
    let scene = Scene::new();
    let snapshot = resolve_model("user/tiny", &options(&server, &scene.cache())).unwrap();
    push_folder("user/copy", &snapshot, &push_options(&server)).unwrap();
    let copied = server.files("user/copy", "main").unwrap();
    let original: std::collections::HashMap<_, _> = checkpoint_files().into_iter().collect();
    assert_eq!(copied["config.json"], original["config.json"]);
    assert_eq!(copied["model.safetensors"], original["model.safetensors"]);
}
