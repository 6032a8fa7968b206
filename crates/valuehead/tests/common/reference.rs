//! Running the reference scripts of python/ in the reference environment. Kept apart from the
//! rest of the helpers so that test suites of other crates can include it by path.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The reference environment's Python. Parity tests fail (never skip) without it.
pub fn python() -> PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "the Python reference environment is missing ({}): run `cargo xtask setup` (or `cargo xtask test`)",
        python.display()
    );
    python
}

/// Runs `python/<script>` with `args` in the reference environment, failing the test with its
/// output if it fails.
pub fn run_reference(script: &str, args: &[&Path]) {
    run_reference_with_env(script, args, &[]);
}

/// [`run_reference`] with extra environment variables.
pub fn run_reference_with_env(script: &str, args: &[&Path], env: &[(&str, String)]) {
    let script_path = workspace_root().join("python").join(script);
    let out = Command::new(python())
        .arg(&script_path)
        .args(args)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("HF_HUB_OFFLINE", "1")
        // The caller's variables last, so they can override the defaults above.
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("starting the reference Python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Has `python/<script>` write its reference cases into a fresh folder `name` under the test
/// target's temporary folder, and returns that folder.
pub fn generate_reference(script: &str, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    run_reference(script, &[&dir]);
    dir
}
