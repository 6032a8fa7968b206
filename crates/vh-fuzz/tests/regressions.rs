//! Replays, in-process, every input of `regressions/<target>/` (inputs that once crashed a
//! target, kept after the fix) and every seed of `corpus/<target>/` through its target: none may
//! panic (a death would end this test binary too). The seeds must also reach the code behind
//! the parsers (each target's seeds include inputs that load), and the generated seeds must be
//! the checked-in ones, so that `vh-fuzz --make-seeds` reproduces the corpus.

use std::path::{Path, PathBuf};
use vh_fuzz::TargetKind;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

/// The features that show a target's seeds got past its parsers.
fn expected_ok(kind: TargetKind) -> &'static [&'static str] {
    match kind {
        TargetKind::Config => &["load:ok:causal", "load:ok:seq2seq", "forward:ok", "generate:ok"],
        TargetKind::Safetensors | TargetKind::TorchBin => &["read:ok"],
        TargetKind::Index => &["st:ok", "bin:ok"],
        TargetKind::Inputs => &["gpt2:ok", "llama:ok", "t5:ok"],
        TargetKind::Hub => &["model_info:ok", "tree:ok", "repo_id:ok", "revision:ok", "repo_path:ok"],
        TargetKind::SelfTest => &[],
    }
}

#[test]
fn regressions_and_seeds_run_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let mut replayed = 0;
    for kind in TargetKind::ALL {
        let fixtures = tmp.path().join(kind.name()).join("fixtures");
        kind.prepare(&fixtures).unwrap();
        let mut target = kind
            .open(&fixtures, &tmp.path().join(kind.name()).join("scratch"))
            .unwrap();
        let seeds = files(&crate_dir().join("corpus").join(kind.name()));
        assert!(!seeds.is_empty(), "{}: no seeds checked in", kind.name());
        let regressions = files(&crate_dir().join("regressions").join(kind.name()));
        let mut seen = Vec::new();
        for (path, bytes) in seeds.iter().chain(&regressions) {
            let features = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.execute(bytes)))
                .unwrap_or_else(|_| panic!("{} panicked on {}", kind.name(), path.display()));
            assert!(!features.is_empty(), "{}", path.display());
            seen.extend(features);
            replayed += 1;
        }
        for want in expected_ok(kind) {
            assert!(
                seen.iter().any(|f| f.starts_with(want)),
                "{}: no seed gives `{want}`; features: {seen:?}",
                kind.name()
            );
        }
    }
    assert!(replayed > 30, "{replayed}");
}

#[test]
fn checked_in_seeds_are_the_generated_ones() {
    for kind in TargetKind::ALL {
        let dir = crate_dir().join("corpus").join(kind.name());
        for (name, bytes) in kind.seeds().unwrap() {
            let path = dir.join(&name);
            let checked_in = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                checked_in == bytes,
                "{} differs from the generated seed: run `vh-fuzz --make-seeds`",
                path.display()
            );
        }
    }
}
