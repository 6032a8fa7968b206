//! Loading by Hub repo id through the HF cache, against the local Hub server: the library, the
//! `vh` command with the HF_* environment, offline mode, and Python TRL downloading the same repo.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use tch::Tensor;
use valuehead::{CausalLmWithValueHead, LoadOptions};
use vh_hub::test_server::HubServer;

/// A tiny GPT-2 checkpoint (with tokenizer) published as `user/tiny` on a new server.
fn serve_tiny() -> (HubServer, tempfile::TempDir) {
    let source = tempfile::tempdir().unwrap();
    write_tiny_gpt2(source.path(), json!({}));
    write_word_tokenizer(source.path(), 50);
    let server = HubServer::start(Some("hub-token")).unwrap();
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(source.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    server.seed("user/tiny", &files);
    (server, source)
}

#[test]
fn from_pretrained_by_repo_id_matches_the_local_folder() {
    let (server, source) = serve_tiny();
    let cache = tempfile::tempdir().unwrap();
    let mut options = LoadOptions::default();
    options.hub.endpoint = Some(server.endpoint());
    options.hub.token = Some("hub-token".into());
    options.hub.cache_dir = Some(cache.path().into());
    let remote = CausalLmWithValueHead::from_pretrained("user/tiny", &options).unwrap();
    let local = CausalLmWithValueHead::from_folder(source.path(), &LoadOptions::default()).unwrap();
    let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
    let (a, b) = (
        remote.forward(&ids, None, None, None).unwrap(),
        local.forward(&ids, None, None, None).unwrap(),
    );
    assert!(a.logits.equal(&b.logits) && a.values.equal(&b.values));
    // A local path still wins over the Hub.
    CausalLmWithValueHead::from_pretrained(source.path().to_str().unwrap(), &options).unwrap();
}

#[test]
fn vh_takes_repo_ids_with_the_hf_environment() {
    let (server, _source) = serve_tiny();
    let home = tempfile::tempdir().unwrap();
    let run = |home: &Path, extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vh"));
        cmd.args([
            "generate",
            "--model",
            "user/tiny",
            "--prompt",
            "w3 w4",
            "--max-new-tokens",
            "3",
        ])
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let ok = run(home.path(), &[("HF_TOKEN", "hub-token")]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(
        home.path().join("hub/models--user--tiny").is_dir(),
        "downloaded into HF_HOME/hub"
    );
    // Offline with the filled cache works; offline with an empty cache is a clear error.
    let offline = run(home.path(), &[("HF_HUB_OFFLINE", "1")]);
    assert!(offline.status.success(), "{}", String::from_utf8_lossy(&offline.stderr));
    let empty = tempfile::tempdir().unwrap();
    let failed = run(empty.path(), &[("HF_HUB_OFFLINE", "1"), ("HF_TOKEN", "hub-token")]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("offline"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    let denied = run(empty.path(), &[("HF_TOKEN", "not-the-token")]);
    assert_eq!(denied.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains("authentication failed") && !stderr.contains("not-the-token"),
        "{stderr}"
    );
}

#[test]
fn python_trl_downloads_the_same_repo_with_the_same_outputs() {
    tch::set_num_threads(1);
    let (server, source) = serve_tiny();
    let home = tempfile::tempdir().unwrap();
    let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
    let local = CausalLmWithValueHead::from_folder(source.path(), &LoadOptions::default()).unwrap();
    let expected = local.forward(&ids, None, None, None).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let (inputs, out) = (
        scratch.path().join("in.safetensors"),
        scratch.path().join("out.safetensors"),
    );
    vh_hub::write_safetensors(&inputs, &[("input_ids".to_string(), ids.shallow_clone())]).unwrap();
    let env = [
        ("HF_ENDPOINT", server.endpoint()),
        ("HF_HOME", home.path().display().to_string()),
        ("HF_TOKEN", "hub-token".to_string()),
        ("HF_HUB_OFFLINE", "0".to_string()),
        ("HF_HUB_DISABLE_XET", "1".to_string()),
    ];
    run_reference_with_env(
        "load_saved.py",
        &[Path::new("causal"), Path::new("user/tiny"), &inputs, &out],
        &env,
    );
    let got = read_tensors(&out);
    assert!(max_abs_diff(&got["logits"], &expected.logits) <= TOLERANCE);
    assert!(max_abs_diff(&got["values"], &expected.values) <= TOLERANCE);
}

#[test]
fn push_to_hub_then_load_in_rust_and_in_python() {
    tch::set_num_threads(1);
    let (server, source) = serve_tiny();
    let model = CausalLmWithValueHead::from_folder(source.path(), &LoadOptions::default()).unwrap();
    let push = vh_hub::PushOptions {
        endpoint: Some(server.endpoint()),
        token: Some("hub-token".into()),
        commit_message: Some("from rust".into()),
        ..Default::default()
    };
    model.push_to_hub("user/pushed", &push).unwrap();
    let files = server.files("user/pushed", "main").unwrap();
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(files.contains_key(name), "{name} was not pushed: {:?}", files.keys());
    }
    let cache = tempfile::tempdir().unwrap();
    let options = LoadOptions {
        hub: vh_hub::HubOptions {
            endpoint: Some(server.endpoint()),
            token: Some("hub-token".into()),
            cache_dir: Some(cache.path().into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
    let expected = model.forward(&ids, None, None, None).unwrap();
    let back = CausalLmWithValueHead::from_pretrained("user/pushed", &options).unwrap();
    let got = back.forward(&ids, None, None, None).unwrap();
    assert!(got.logits.equal(&expected.logits) && got.values.equal(&expected.values));

    // Python TRL's from_pretrained through the same endpoint.
    let home = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let (inputs, out) = (
        scratch.path().join("in.safetensors"),
        scratch.path().join("out.safetensors"),
    );
    vh_hub::write_safetensors(&inputs, &[("input_ids".to_string(), ids.shallow_clone())]).unwrap();
    let env = [
        ("HF_ENDPOINT", server.endpoint()),
        ("HF_HOME", home.path().display().to_string()),
        ("HF_TOKEN", "hub-token".to_string()),
        ("HF_HUB_OFFLINE", "0".to_string()),
        ("HF_HUB_DISABLE_XET", "1".to_string()),
    ];
    run_reference_with_env(
        "load_saved.py",
        &[Path::new("causal"), Path::new("user/pushed"), &inputs, &out],
        &env,
    );
    let python = read_tensors(&out);
    assert!(max_abs_diff(&python["logits"], &expected.logits) <= TOLERANCE);
    assert!(max_abs_diff(&python["values"], &expected.values) <= TOLERANCE);

    // `vh push` of a folder, then the pushed repo answers.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vh"))
        .args(["push", "--model"])
        .arg(source.path())
        .args(["--repo-id", "user/cli-push", "--private", "--message", "cli"])
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_TOKEN", "hub-token")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(server
        .files("user/cli-push", "main")
        .unwrap()
        .contains_key("model.safetensors"));
    let denied = std::process::Command::new(env!("CARGO_BIN_EXE_vh"))
        .args(["push", "--model"])
        .arg(source.path())
        .args(["--repo-id", "user/cli-push"])
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_TOKEN", "wrong-secret")
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&denied.stderr).contains("wrong-secret"));
}

#[test]
fn progress_bars_show_on_a_terminal_only() {
    let (server, source) = serve_tiny();
    let vh = env!("CARGO_BIN_EXE_vh");
    let home = tempfile::tempdir().unwrap();
    let download = format!("{vh} generate --model user/tiny --prompt 'w3 w4' --max-new-tokens 2");
    let upload = format!("{vh} push --model {} --repo-id user/tty", source.path().display());
    for (command, label) in [(&download, "downloading user/tiny"), (&upload, "uploading to user/tty")] {
        let env = |cmd: &mut std::process::Command| {
            cmd.env("HF_ENDPOINT", server.endpoint())
                .env("HF_HOME", home.path())
                .env("HF_TOKEN", "hub-token")
                .env_remove("HF_HUB_OFFLINE")
                .env_remove("HF_HUB_CACHE");
        };
        // Piped stderr: silent.
        let mut piped = std::process::Command::new("sh");
        piped.args(["-c", command]);
        env(&mut piped);
        let out = piped.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains(label),
            "a bar was drawn into a pipe"
        );
        // A pseudo-terminal (script(1) from util-linux/bsdutils): the bar is drawn.
        let _ = std::fs::remove_dir_all(home.path().join("hub"));
        let mut tty = std::process::Command::new("script");
        tty.args(["-qec", command, "/dev/null"]);
        env(&mut tty);
        let out = tty.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(label),
            "no bar on a terminal: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn corrupt_weights_and_missing_shards_on_the_hub_are_errors() {
    let (server, source) = serve_tiny();
    let config = std::fs::read(source.path().join("config.json")).unwrap();
    let good = std::fs::read(source.path().join("model.safetensors")).unwrap();
    let mut corrupt = good.clone();
    corrupt[8] = b'!'; // inside the JSON header
    server.seed(
        "user/corrupt",
        &[("config.json", config.clone()), ("model.safetensors", corrupt)],
    );
    let index = serde_json::json!({"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00002-of-00002.safetensors"}});
    server.seed(
        "user/missing-shard",
        &[
            ("config.json", config),
            ("model.safetensors.index.json", index.to_string().into_bytes()),
            ("model-00001-of-00002.safetensors", good),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let options = LoadOptions {
        hub: vh_hub::HubOptions {
            endpoint: Some(server.endpoint()),
            token: Some("hub-token".into()),
            cache_dir: Some(cache.path().into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = CausalLmWithValueHead::from_pretrained("user/corrupt", &options).unwrap_err();
    assert!(
        matches!(err, valuehead::Error::Hub(vh_hub::HubError::Safetensors { .. })),
        "{err}"
    );
    let err = CausalLmWithValueHead::from_pretrained("user/missing-shard", &options).unwrap_err();
    assert!(
        matches!(err, valuehead::Error::Hub(vh_hub::HubError::NotFound { .. })),
        "{err}"
    );
}

/// Runs `python/hub_cache_check.py` offline on `cache` and returns its JSON report.
fn python_cache_report(cache: &Path, repo_id: &str) -> serde_json::Value {
    let out = std::process::Command::new(python())
        .arg(workspace_root().join("python/hub_cache_check.py"))
        .arg(cache)
        .arg(repo_id)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// The blob names (file names in `blobs/`) of a cached repo.
fn blob_names(repo_dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn python_reads_the_cache_rust_wrote_offline() {
    tch::set_num_threads(1);
    let (server, source) = serve_tiny();
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    let options = LoadOptions {
        hub: vh_hub::HubOptions {
            endpoint: Some(server.endpoint()),
            token: Some("hub-token".into()),
            cache_dir: Some(cache.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let snapshot = vh_hub::resolve_model("user/tiny", &options.hub).unwrap();
    let commit = snapshot.file_name().unwrap().to_str().unwrap().to_string();
    drop(server); // Python must not need the Hub.

    let report = python_cache_report(&cache, "user/tiny");
    assert_eq!(
        report["warnings"],
        json!([]),
        "huggingface_hub sees a broken layout: {report}"
    );
    assert_eq!(report["snapshot"], json!(snapshot.display().to_string()), "{report}");
    let revision = &report["repos"]["user/tiny"]["revisions"][&commit];
    assert_eq!(revision["refs"], json!(["main"]), "{report}");
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let blob = std::fs::canonicalize(snapshot.join(name)).unwrap();
        assert_eq!(
            revision["files"][name],
            json!(blob.file_name().unwrap().to_str().unwrap()),
            "{name}: {report}"
        );
    }
    assert_eq!(
        report["config_bytes"],
        json!(std::fs::read(source.path().join("config.json")).unwrap().len())
    );

    // TRL's from_pretrained, offline, on the cache Rust wrote: the same outputs.
    let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
    let expected = CausalLmWithValueHead::from_folder(source.path(), &LoadOptions::default())
        .unwrap()
        .forward(&ids, None, None, None)
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let (inputs, out) = (
        scratch.path().join("in.safetensors"),
        scratch.path().join("out.safetensors"),
    );
    vh_hub::write_safetensors(&inputs, &[("input_ids".to_string(), ids.shallow_clone())]).unwrap();
    let env = [
        ("HF_ENDPOINT", "http://127.0.0.1:9".to_string()),
        ("HF_HOME", home.path().display().to_string()),
        ("HF_HUB_OFFLINE", "1".to_string()),
    ];
    run_reference_with_env(
        "load_saved.py",
        &[Path::new("causal"), Path::new("user/tiny"), &inputs, &out],
        &env,
    );
    let got = read_tensors(&out);
    assert!(max_abs_diff(&got["logits"], &expected.logits) <= TOLERANCE);
    assert!(max_abs_diff(&got["values"], &expected.values) <= TOLERANCE);
}

#[test]
fn rust_reads_the_cache_python_wrote_offline_with_the_same_blob_names() {
    let (server, _source) = serve_tiny();
    let home = tempfile::tempdir().unwrap();
    let script = "import sys; from huggingface_hub import snapshot_download; \
                  print(snapshot_download('user/tiny', allow_patterns=['*.json', '*.safetensors']))";
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_HOME", home.path())
        .env("HF_TOKEN", "hub-token")
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_OFFLINE", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let python_snapshot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let offline = vh_hub::HubOptions {
        cache_dir: Some(home.path().join("hub")),
        offline: true,
        ..Default::default()
    };
    let folder = vh_hub::resolve_model("user/tiny", &offline).unwrap();
    assert_eq!(folder, Path::new(&python_snapshot));
    CausalLmWithValueHead::from_folder(&folder, &LoadOptions::default()).unwrap();
    // Our own download of the same repo names its blobs as Python did (ETags = listing hashes).
    let ours = tempfile::tempdir().unwrap();
    let online = vh_hub::HubOptions {
        endpoint: Some(server.endpoint()),
        token: Some("hub-token".into()),
        cache_dir: Some(ours.path().into()),
        ..Default::default()
    };
    vh_hub::resolve_model("user/tiny", &online).unwrap();
    let (ours, theirs) = (
        blob_names(&ours.path().join("models--user--tiny")),
        blob_names(&home.path().join("hub/models--user--tiny")),
    );
    assert!(
        ours.len() >= 3 && ours.is_subset(&theirs),
        "ours {ours:?}, Python's {theirs:?}"
    );
    // Online over Python's cache: every blob is re-verified and kept.
    let shared = vh_hub::HubOptions {
        cache_dir: Some(home.path().join("hub")),
        ..online
    };
    assert_eq!(vh_hub::resolve_model("user/tiny", &shared).unwrap(), folder);
}

#[test]
fn vh_refuses_hostile_repo_ids_and_local_files_without_a_request() {
    let (server, source) = serve_tiny();
    let vh = env!("CARGO_BIN_EXE_vh");
    let run = |args: &[&str]| {
        std::process::Command::new(vh)
            .args(args)
            .current_dir(source.path())
            .env("HF_ENDPOINT", server.endpoint())
            .env("HF_TOKEN", "hub-token")
            .env("HF_HOME", source.path().join("hf-home"))
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap()
    };
    let folder = source.path().to_str().unwrap();
    for (args, expected) in [
        (
            vec!["push", "--model", folder, "--repo-id", "../../evil"],
            "invalid Hub repo id",
        ),
        (
            vec!["push", "--model", folder, "--repo-id", "a/b?x=1#f"],
            "invalid Hub repo id",
        ),
        (
            vec![
                "push",
                "--model",
                folder,
                "--repo-id",
                "user/x",
                "--revision",
                "../../x",
            ],
            "invalid revision",
        ),
        (
            vec!["score", "--model", "./config.json", "--input-ids", "1 2"],
            "not a model folder",
        ),
        (
            vec!["score", "--model", "config.json", "--input-ids", "1 2"],
            "not a model folder",
        ),
        (
            vec![
                "score",
                "--model",
                "user/tiny",
                "--revision",
                "../../x",
                "--input-ids",
                "1 2",
            ],
            "invalid revision",
        ),
    ] {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("hub-token"), "{stderr}");
    }
    assert_eq!(server.requests(), 0, "a hostile argument reached the Hub");
}

#[test]
fn push_to_hub_follows_cache_links_and_refuses_links_out_of_the_source_folder() {
    let (server, source) = serve_tiny();
    let cache = tempfile::tempdir().unwrap();
    let options = LoadOptions {
        hub: vh_hub::HubOptions {
            endpoint: Some(server.endpoint()),
            token: Some("hub-token".into()),
            cache_dir: Some(cache.path().into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let push = vh_hub::PushOptions {
        endpoint: Some(server.endpoint()),
        token: Some("hub-token".into()),
        ..Default::default()
    };
    // Loaded from the Hub: the tokenizer files are links into the cache's blobs, and are pushed.
    let from_hub = CausalLmWithValueHead::from_pretrained("user/tiny", &options).unwrap();
    from_hub.push_to_hub("user/republished", &push).unwrap();
    let files = server.files("user/republished", "main").unwrap();
    assert_eq!(
        files["tokenizer.json"],
        std::fs::read(source.path().join("tokenizer.json")).unwrap()
    );

    // A local folder whose tokenizer.json links outside it: an error naming the link.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"root:x:0:0").unwrap();
    let folder = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(source.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "tokenizer.json" {
            std::fs::copy(entry.path(), folder.path().join(entry.file_name())).unwrap();
        }
    }
    std::os::unix::fs::symlink(outside.path().join("secret"), folder.path().join("tokenizer.json")).unwrap();
    let model = CausalLmWithValueHead::from_folder(folder.path(), &LoadOptions::default()).unwrap();
    let err = model.push_to_hub("user/leak", &push).unwrap_err();
    assert!(
        matches!(&err, valuehead::Error::Hub(vh_hub::HubError::UnsafeUpload { path, .. }) if path.ends_with("tokenizer.json")),
        "{err}"
    );
    assert!(server.files("user/leak", "main").is_none(), "the repo was created");
}
