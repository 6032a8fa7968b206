//! `vh-fuzz`: a coverage-less mutation fuzzer for valuehead's parsers, on the stable toolchain.
//! See docs/fuzzing.md.

mod engine;
mod worker;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vh_fuzz::TargetKind;

#[derive(Parser)]
#[command(
    name = "vh-fuzz",
    about = "Mutation fuzzing of valuehead's parsers: config, safetensors, torch-bin, index, inputs, hub"
)]
struct Cli {
    /// Targets to fuzz (config, safetensors, torch-bin, index, inputs, hub).
    targets: Vec<String>,
    /// Fuzz every target, one after the other.
    #[arg(long)]
    all: bool,
    /// Time budget per target, in seconds.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Also stop a target after this many executions (with --seed, a reproducible run).
    #[arg(long)]
    runs: Option<u64>,
    /// Seed of the mutations: the same seed and --runs make the same inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// An input still running after this many seconds is a hang.
    #[arg(long, default_value_t = 10)]
    hang_seconds: u64,
    /// Address space (MiB) a worker may map beyond what it maps after start-up; 0 = no cap.
    #[arg(long, default_value_t = 3072)]
    mem_mb: u64,
    /// Where failing inputs are saved.
    #[arg(long)]
    crash_dir: Option<PathBuf>,
    /// Seed corpus folder (one folder per target).
    #[arg(long)]
    corpus_dir: Option<PathBuf>,
    /// Save the inputs the run added to the corpus under DIR/<target>/.
    #[arg(long, value_name = "DIR")]
    save_corpus: Option<PathBuf>,
    /// Seconds between status lines (0 = none).
    #[arg(long, default_value_t = 30.0)]
    status_every: f64,
    /// Print every new feature and every slow execution or mutation.
    #[arg(long)]
    verbose: bool,
    /// Run these files once through the (single) target and print what happens.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    replay: Vec<PathBuf>,
    /// Write the generated seeds into the corpus folder (and, with the reference Python
    /// environment, the torch.save seeds), then exit.
    #[arg(long)]
    make_seeds: bool,
    /// Run as a worker process (internal).
    #[arg(long, hide = true)]
    worker: Option<String>,
    /// The fixtures folder of a worker (internal).
    #[arg(long, hide = true)]
    fixtures: Option<PathBuf>,
    /// The scratch folder of a worker (internal).
    #[arg(long, hide = true)]
    scratch: Option<PathBuf>,
}

/// Address space (MiB) the fuzzer's own process may map beyond what it maps at start-up.
const PARENT_MEM_MB: u64 = 2048;

/// This crate's folder: the default home of the corpus, crashes and regressions.
fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn targets(cli: &Cli) -> Result<Vec<TargetKind>> {
    if cli.all {
        return Ok(TargetKind::ALL.to_vec());
    }
    if cli.targets.is_empty() {
        bail!("name targets to fuzz or pass --all (targets: config, safetensors, torch-bin, index, inputs, hub)");
    }
    Ok(cli
        .targets
        .iter()
        .map(|t| TargetKind::from_name(t))
        .collect::<Result<_, _>>()?)
}

fn make_seeds(targets: &[TargetKind], corpus: &Path) -> Result<()> {
    for kind in targets {
        let dir = corpus.join(kind.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let seeds = kind.seeds()?;
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).with_context(|| format!("writing {name}"))?;
        }
        println!("{}: {} generated seeds in {}", kind.name(), seeds.len(), dir.display());
        if *kind == TargetKind::TorchBin {
            let python = crate_dir().join("../../.venv/bin/python");
            if python.exists() {
                let status = std::process::Command::new(&python)
                    .arg(crate_dir().join("make_torch_seeds.py"))
                    .arg(&dir)
                    .status()
                    .context("running make_torch_seeds.py")?;
                if !status.success() {
                    bail!("make_torch_seeds.py failed: {status}");
                }
            } else {
                println!("torch-bin: no reference Python (.venv): torch.save seeds not regenerated");
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(name) = &cli.worker {
        let kind = TargetKind::from_name(name)?;
        let fixtures = cli.fixtures.as_deref().context("--worker needs --fixtures")?;
        let scratch = cli.scratch.as_deref().context("--worker needs --scratch")?;
        return worker::worker_main(kind, fixtures, scratch, cli.mem_mb);
    }
    let targets = targets(&cli)?;
    let corpus_dir = cli.corpus_dir.clone().unwrap_or_else(|| crate_dir().join("corpus"));
    if cli.make_seeds {
        return make_seeds(&targets, &corpus_dir);
    }
    let settings = engine::Settings {
        seconds: cli.seconds,
        runs: cli.runs,
        seed: cli.seed,
        hang: Duration::from_secs(cli.hang_seconds),
        mem_mb: cli.mem_mb,
        crash_dir: cli.crash_dir.clone().unwrap_or_else(|| crate_dir().join("crashes")),
        corpus_dir,
        regressions_dir: crate_dir().join("regressions"),
        save_corpus: cli.save_corpus.clone(),
        status_every: cli.status_every,
        verbose: cli.verbose,
    };
    if !cli.replay.is_empty() {
        let [kind] = targets[..] else {
            bail!("--replay takes exactly one target");
        };
        let failed = engine::replay(kind, &settings, &cli.replay)?;
        if failed > 0 {
            bail!("{failed} of {} inputs failed", cli.replay.len());
        }
        return Ok(());
    }
    // The fuzzer's own process is capped too (its corpus and features are bounded, but a bug
    // there must not take the machine's memory from everyone else); workers set their own cap.
    worker::limit_address_space(PARENT_MEM_MB, true)?;
    let mut summaries = Vec::new();
    for kind in targets {
        let summary = engine::fuzz(kind, &settings)?;
        println!("{}", summary.line());
        for f in &summary.findings {
            println!("    {} {} -> {}", f.kind, f.signature, f.path.display());
        }
        summaries.push(summary);
    }
    let found: usize = summaries.iter().map(|s| s.findings.len()).sum();
    if found > 0 {
        bail!(
            "{found} distinct failures found (inputs in {})",
            settings.crash_dir.display()
        );
    }
    Ok(())
}
