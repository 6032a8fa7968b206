//! The local Hub server speaks the real protocol: the official Python client
//! (`huggingface_hub`) creates a repo, uploads regular and LFS files, downloads them back,
//! downloads by commit, and sees the Hub's errors.

use std::path::PathBuf;
use std::process::Command;
use vh_hub::test_server::HubServer;

fn python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        python.exists(),
        "the Python reference environment is missing: run `cargo xtask setup`"
    );
    python
}

#[test]
fn the_official_python_client_uploads_and_downloads() {
    let server = HubServer::start(Some("secret-token")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let folder = work.path().join("upload");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("config.json"), br#"{"model_type": "gpt2"}"#).unwrap();
    std::fs::write(folder.join("README.md"), b"# a model\n").unwrap();
    let weights: Vec<u8> = (0..70_000u32).flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(folder.join("model.safetensors"), &weights).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../python/hub_client_check.py");
    let out = Command::new(python())
        .arg(script)
        .arg("secret-token")
        .arg(&folder)
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_HOME", work.path().join("hf-home"))
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for name in ["README.md", "config.json", "model.safetensors"] {
        assert_eq!(report["files"][name], true, "{name} came back different: {report}");
    }
    assert_eq!(report["by_commit"], true);
    assert_eq!(
        report["siblings"],
        serde_json::json!(["README.md", "config.json", "extra.txt", "model.safetensors"])
    );
    assert_eq!(report["missing"], "EntryNotFoundError");
    assert_eq!(report["wrong_token"], 403);
    let files = server.files("user/client-check", "main").unwrap();
    assert_eq!(files["model.safetensors"], weights);
    assert_eq!(files["extra.txt"], b"second");
}
