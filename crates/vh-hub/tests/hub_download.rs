//! Downloading checkpoints from a Hub (the local test server) into the HF cache, and the
//! faults a client meets: auth errors, missing repos, 5xx with retries, cut-short downloads,
//! offline mode.

use std::time::Duration;
use vh_hub::test_server::{Faults, HubServer};
use vh_hub::{resolve_model, HubError, HubOptions, ModelFolder};

fn checkpoint_files() -> Vec<(&'static str, Vec<u8>)> {
    let tensors = vec![(
        "w".to_string(),
        tch::Tensor::arange(4000, (tch::Kind::Float, tch::Device::Cpu)),
    )];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    vh_hub::write_safetensors(&path, &tensors).unwrap();
    vec![
        ("config.json", br#"{"model_type": "gpt2"}"#.to_vec()),
        ("model.safetensors", std::fs::read(path).unwrap()),
        ("README.md", b"not downloaded: not a checkpoint file".to_vec()),
    ]
}

fn options(server: &HubServer, cache: &std::path::Path, token: &str) -> HubOptions {
    HubOptions {
        endpoint: Some(server.endpoint()),
        token: Some(token.to_string()),
        cache_dir: Some(cache.to_path_buf()),
        retry_base_delay: Some(Duration::from_millis(10)),
        ..Default::default()
    }
}

#[test]
fn downloads_into_the_cache_and_reuses_it_offline() {
    let server = HubServer::start(Some("tok")).unwrap();
    server.seed("user/tiny", &checkpoint_files());
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&server, cache.path(), "tok");
    let folder = resolve_model("user/tiny", &opts).unwrap();
    assert!(
        folder.starts_with(cache.path().join("models--user--tiny")),
        "{}",
        folder.display()
    );
    assert!(!folder.join("README.md").exists(), "only checkpoint files are fetched");
    let tensors = ModelFolder::open(&folder).unwrap().tensors().unwrap();
    assert_eq!(tensors[0].1.double_value(&[3999]), 3999.0);
    let before = server.requests();
    let offline = resolve_model(
        "user/tiny",
        &HubOptions {
            offline: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(offline, folder);
    assert_eq!(server.requests(), before, "offline mode must not reach the server");
    let empty = tempfile::tempdir().unwrap();
    let err = resolve_model(
        "user/tiny",
        &HubOptions {
            offline: true,
            cache_dir: Some(empty.path().into()),
            ..opts
        },
    );
    assert!(matches!(err, Err(HubError::Offline(_))), "{err:?}");
}

#[test]
fn auth_and_missing_repos_are_clear_errors_without_the_token() {
    let server = HubServer::start(Some("right-token")).unwrap();
    server.seed("user/tiny", &checkpoint_files());
    let cache = tempfile::tempdir().unwrap();
    for token in ["", "wrong-token-value"] {
        let opts = HubOptions {
            token: (!token.is_empty()).then(|| token.to_string()),
            ..options(&server, cache.path(), "x")
        };
        let err = resolve_model("user/tiny", &opts).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, HubError::Auth(_)), "{text}");
        assert!(
            token.is_empty() || !text.contains(token),
            "the token leaked into: {text}"
        );
    }
    let err = resolve_model("user/absent", &options(&server, cache.path(), "right-token")).unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err}");
}

#[test]
fn server_errors_are_retried_then_reported() {
    let server = HubServer::start(None).unwrap();
    server.seed("user/tiny", &checkpoint_files());
    let cache = tempfile::tempdir().unwrap();
    server.set_faults(Faults {
        fail_next: 2,
        status: 503,
        ..Default::default()
    });
    resolve_model("user/tiny", &options(&server, cache.path(), "t")).expect("two 503s are retried");
    let other_cache = tempfile::tempdir().unwrap();
    server.set_faults(Faults {
        fail_next: 1000,
        status: 500,
        ..Default::default()
    });
    let err = resolve_model("user/tiny", &options(&server, other_cache.path(), "t")).unwrap_err();
    assert!(matches!(err, HubError::Http(_)), "{err}");
}

#[test]
fn a_download_cut_short_is_detected_and_leaves_nothing_loadable() {
    let server = HubServer::start(None).unwrap();
    server.seed("user/tiny", &checkpoint_files());
    let cache = tempfile::tempdir().unwrap();
    server.set_faults(Faults {
        truncate_downloads: true,
        ..Default::default()
    });
    let result = resolve_model("user/tiny", &options(&server, cache.path(), "t"));
    let err = result.expect_err("a truncated download must be reported");
    assert!(err.to_string().contains("incomplete"), "{err}");
    let leftovers: Vec<_> = walk(cache.path())
        .into_iter()
        .filter(|p| p.ends_with("model.safetensors"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "a truncated file stayed in the cache: {leftovers:?}"
    );
    // Once the server is healthy the same cache completes the download.
    server.set_faults(Faults::default());
    let folder = resolve_model("user/tiny", &options(&server, cache.path(), "t")).unwrap();
    assert_eq!(
        ModelFolder::open(&folder).unwrap().tensors().unwrap()[0].1.size(),
        vec![4000]
    );
}

/// Every file (and link) below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn pushed_folders_download_identically_and_push_errors_are_clear() {
    let server = HubServer::start(Some("tok")).unwrap();
    let folder = tempfile::tempdir().unwrap();
    for (name, bytes) in checkpoint_files() {
        std::fs::write(folder.path().join(name), bytes).unwrap();
    }
    let push = vh_hub::PushOptions {
        endpoint: Some(server.endpoint()),
        token: Some("tok".into()),
        private: true,
        commit_message: Some("first".into()),
        retry_base_delay: Some(Duration::from_millis(5)),
        ..Default::default()
    };
    server.set_faults(Faults {
        fail_next: 0,
        ..Default::default()
    });
    let commit = vh_hub::push_folder("user/pushed", folder.path(), &push).unwrap();
    let files = server.files("user/pushed", "main").unwrap();
    assert_eq!(files.len(), 3);
    assert_eq!(
        files["model.safetensors"],
        std::fs::read(folder.path().join("model.safetensors")).unwrap()
    );
    assert_eq!(server.files("user/pushed", &commit).unwrap().len(), 3);
    // A second push to another branch, after two transient 503s (retried).
    server.set_faults(Faults {
        fail_next: 0,
        ..Default::default()
    });
    std::fs::write(folder.path().join("config.json"), br#"{"model_type": "gpt2", "v": 2}"#).unwrap();
    let branch = vh_hub::PushOptions {
        revision: Some("dev".into()),
        ..push.clone()
    };
    vh_hub::push_folder("user/pushed", folder.path(), &branch).unwrap();
    assert_ne!(
        server.files("user/pushed", "dev").unwrap()["config.json"],
        server.files("user/pushed", "main").unwrap()["config.json"]
    );

    let cache = tempfile::tempdir().unwrap();
    let downloaded = resolve_model("user/pushed", &options(&server, cache.path(), "tok")).unwrap();
    assert_eq!(
        std::fs::read(downloaded.join("model.safetensors")).unwrap(),
        files["model.safetensors"]
    );

    let err = vh_hub::push_folder(
        "user/pushed",
        folder.path(),
        &vh_hub::PushOptions {
            token: Some("bad-secret".into()),
            ..push.clone()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, HubError::Auth(_)) && !err.to_string().contains("bad-secret"),
        "{err}"
    );
    server.set_faults(Faults {
        fail_next: 1000,
        status: 502,
        ..Default::default()
    });
    let err = vh_hub::push_folder("user/pushed", folder.path(), &push).unwrap_err();
    assert!(matches!(err, HubError::Http(_)), "{err}");
}
