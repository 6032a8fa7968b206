//! The fuzzing loop of one target: the corpus (seeds, regressions, then every input that shows
//! a feature not seen before), mutation, one worker process at a time, and what to do with
//! panics, deaths and hangs (save the input, report it once per kind, restart the worker).

use crate::worker::{Outcome, Worker, WorkerSpec};
use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vh_fuzz::mutate::MAX_INPUT_LEN;
use vh_fuzz::{Rng, TargetKind};

/// The settings of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time budget per target.
    pub seconds: f64,
    /// Execution budget per target (in addition to the time budget).
    pub runs: Option<u64>,
    /// The random seed (mixed with the target's name).
    pub seed: u64,
    /// No answer for this long is a hang.
    pub hang: Duration,
    /// The address space a worker may add after start-up, in MiB.
    pub mem_mb: u64,
    /// Where crashing inputs are saved.
    pub crash_dir: PathBuf,
    /// The checked-in seeds, one folder per target.
    pub corpus_dir: PathBuf,
    /// Regression inputs (crashes found and fixed), one folder per target, also used as seeds.
    pub regressions_dir: PathBuf,
    /// Where to save the grown corpus, if anywhere.
    pub save_corpus: Option<PathBuf>,
    /// Seconds between status lines (0: none).
    pub status_every: f64,
    /// Print every new feature and every slow execution or mutation (for tuning targets).
    pub verbose: bool,
}

/// A failure found: a panic, a death or a hang.
#[derive(Debug, Clone)]
pub struct Finding {
    /// `panic`, `death` or `hang`.
    pub kind: &'static str,
    /// What identifies it (panic location, signal and stderr, ...), for de-duplication.
    pub signature: String,
    /// Where its input was saved.
    pub path: PathBuf,
}

/// What a run of one target did.
#[derive(Debug)]
pub struct Summary {
    /// The target.
    pub kind: TargetKind,
    /// Executions (corpus replay included).
    pub execs: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Seeds (and regression inputs) the run started from.
    pub seeds: usize,
    /// Corpus size at the end.
    pub corpus: usize,
    /// Distinct features seen.
    pub features: usize,
    /// Every failing execution.
    pub failures: u64,
    /// Workers started.
    pub workers: u64,
    /// Distinct failures, first input of each.
    pub findings: Vec<Finding>,
}

impl Summary {
    /// One line for the report.
    pub fn line(&self) -> String {
        format!(
            "{}: {} execs in {:.0} s ({:.0}/s), corpus {} (from {} seeds), {} features, {} failing execs, {} distinct findings, {} workers",
            self.kind.name(),
            self.execs,
            self.seconds,
            self.execs as f64 / self.seconds.max(1e-9),
            self.corpus,
            self.seeds,
            self.features,
            self.failures,
            self.findings.len(),
            self.workers
        )
    }
}

/// A 64-bit FNV-1a hash, for file names of inputs.
pub fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The files of `dir` (not recursive), sorted by name, as (name, bytes); nothing when it does
/// not exist.
pub fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            files.push((name, bytes));
        }
    }
    files.sort();
    Ok(files)
}

/// A folder for the run's fixtures and the workers' files, on tmpfs when there is one (the
/// targets write a file per execution, and atomic writes sync to disk).
pub fn run_dir(kind: TargetKind) -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("vh-fuzz-{}-{}", std::process::id(), kind.name()))
}

/// The first line of a panic message that identifies it: its location when it has one.
fn panic_signature(message: &str) -> String {
    match message.rsplit_once(" at ") {
        Some((_, location)) => format!("panic at {location}"),
        None => format!("panic: {}", vh_fuzz::targets::normalize(message, &[])),
    }
}

/// The signature of a death: how it died and the last line of stderr, numbers merged.
fn death_signature(detail: &str) -> String {
    let mut lines = detail.lines();
    let how = lines.next().unwrap_or_default();
    let last = lines.rfind(|l| !l.trim().is_empty()).unwrap_or_default();
    format!("death: {how}: {}", vh_fuzz::targets::normalize(last, &[]))
}

/// Everything one target's loop keeps.
struct Run<'a> {
    kind: TargetKind,
    settings: &'a Settings,
    spec: WorkerSpec,
    worker: Option<Worker>,
    corpus: Vec<Vec<u8>>,
    /// The bytes the corpus holds, kept under [`MAX_CORPUS_BYTES`].
    corpus_bytes: usize,
    /// Corpus entries below this index are seeds, never evicted.
    seeds: usize,
    known: HashSet<u64>,
    features: HashSet<String>,
    execs: u64,
    failures: u64,
    workers: u64,
    findings: Vec<Finding>,
    saved_per_signature: HashMap<String, usize>,
}

/// Inputs kept at most: past this, new finds replace older ones at random.
const MAX_CORPUS: usize = 20_000;
/// Bytes the corpus may hold: mutants grow (long strings, huge arrays) and each one with a new
/// feature is kept, so without a cap the fuzzer itself would run out of memory.
const MAX_CORPUS_BYTES: usize = 256 << 20;
/// Inputs saved per distinct failure (the first is reported).
const SAVED_PER_FINDING: usize = 3;

impl Run<'_> {
    fn worker(&mut self) -> Result<&mut Worker> {
        if self.worker.is_none() {
            self.worker = Some(Worker::spawn(&self.spec)?);
            self.workers += 1;
        }
        Ok(self.worker.as_mut().expect("started above"))
    }

    /// Runs one input; keeps it when it shows a new feature. Returns its outcome.
    fn execute(&mut self, input: &[u8], rng: &mut Rng) -> Result<Outcome> {
        let hang = self.settings.hang;
        let started = Instant::now();
        let outcome = self.worker()?.run(input, hang);
        self.execs += 1;
        if self.settings.verbose && started.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "[{}] slow execution: {:.1} s for {} bytes",
                self.kind.name(),
                started.elapsed().as_secs_f64(),
                input.len()
            );
        }
        match &outcome {
            Outcome::Features(features) => {
                let mut new = false;
                for f in features {
                    if !self.features.contains(f) {
                        if self.settings.verbose {
                            eprintln!("[{}] new feature: {f}", self.kind.name());
                        }
                        self.features.insert(f.clone());
                        new = true;
                    }
                }
                if new && self.known.insert(fnv64(input)) {
                    self.keep(input, rng);
                }
            }
            Outcome::Panic(message) => {
                let detail = message.clone();
                self.record("panic", panic_signature(message), detail, input)?;
            }
            Outcome::Died(detail) => {
                let detail = detail.clone();
                self.worker = None;
                self.record("death", death_signature(&detail), detail, input)?;
            }
            Outcome::Hang => {
                if let Some(mut w) = self.worker.take() {
                    w.kill();
                }
                let detail = format!("no answer within {:?}", self.settings.hang);
                self.record("hang", "hang".to_string(), detail, input)?;
            }
        }
        Ok(outcome)
    }

    /// Adds an input to the corpus, evicting random non-seed entries while it holds more than
    /// [`MAX_CORPUS`] entries or [`MAX_CORPUS_BYTES`] bytes.
    fn keep(&mut self, input: &[u8], rng: &mut Rng) {
        self.corpus.push(input.to_vec());
        self.corpus_bytes += input.len();
        while (self.corpus.len() > MAX_CORPUS || self.corpus_bytes > MAX_CORPUS_BYTES)
            && self.corpus.len() > self.seeds + 1
        {
            // Never the entry just added (the last one).
            let i = self.seeds + rng.below(self.corpus.len() - 1 - self.seeds);
            let evicted = self.corpus.swap_remove(i);
            self.corpus_bytes -= evicted.len();
        }
    }

    /// Saves a failing input (a few per signature) and reports the first of each signature.
    fn record(&mut self, kind: &'static str, signature: String, detail: String, input: &[u8]) -> Result<()> {
        self.failures += 1;
        let saved = self.saved_per_signature.entry(signature.clone()).or_default();
        if *saved >= SAVED_PER_FINDING {
            return Ok(());
        }
        *saved += 1;
        let first = *saved == 1;
        std::fs::create_dir_all(&self.settings.crash_dir)
            .with_context(|| format!("creating {}", self.settings.crash_dir.display()))?;
        let path = self
            .settings
            .crash_dir
            .join(format!("{}-{:016x}", self.kind.name(), fnv64(input)));
        std::fs::write(&path, input).with_context(|| format!("writing {}", path.display()))?;
        let note = format!(
            "target: {}\nkind: {kind}\nsignature: {signature}\n\n{detail}\n\nreplay: cargo run --profile test -p vh-fuzz -- {} --replay {}\n",
            self.kind.name(),
            self.kind.name(),
            path.display()
        );
        std::fs::write(path.with_extension("txt"), note).with_context(|| format!("writing {}", path.display()))?;
        if first {
            eprintln!(
                "[{}] FOUND {kind}: {signature}\n    input saved to {}\n    {}",
                self.kind.name(),
                path.display(),
                detail.lines().take(6).collect::<Vec<_>>().join("\n    ")
            );
            self.findings.push(Finding { kind, signature, path });
        }
        Ok(())
    }
}

/// The starting corpus of a target: its checked-in seeds and regression inputs, or the seeds
/// it generates when none are checked in.
pub fn initial_corpus(kind: TargetKind, settings: &Settings) -> Result<Vec<Vec<u8>>> {
    let mut files = read_dir_sorted(&settings.corpus_dir.join(kind.name()))?;
    files.extend(read_dir_sorted(&settings.regressions_dir.join(kind.name()))?);
    if files.is_empty() {
        files = kind.seeds()?;
    }
    Ok(files
        .into_iter()
        .map(|(_, mut bytes)| {
            bytes.truncate(MAX_INPUT_LEN);
            bytes
        })
        .collect())
}

/// Prepares a target's fixtures and a worker spec in a fresh run folder.
fn prepare(kind: TargetKind, settings: &Settings) -> Result<(PathBuf, WorkerSpec)> {
    let dir = run_dir(kind);
    let _ = std::fs::remove_dir_all(&dir);
    let fixtures = dir.join("fixtures");
    std::fs::create_dir_all(&fixtures).with_context(|| format!("creating {}", fixtures.display()))?;
    kind.prepare(&fixtures)
        .with_context(|| format!("preparing the {} fixtures", kind.name()))?;
    let spec = WorkerSpec {
        kind,
        fixtures,
        scratch: dir.join("worker"),
        mem_mb: settings.mem_mb,
        stderr: dir.join("worker-stderr.log"),
    };
    Ok((dir, spec))
}

fn new_run(kind: TargetKind, settings: &Settings, spec: WorkerSpec) -> Run<'_> {
    Run {
        kind,
        settings,
        spec,
        worker: None,
        corpus: Vec::new(),
        corpus_bytes: 0,
        seeds: 0,
        known: HashSet::new(),
        features: HashSet::new(),
        execs: 0,
        failures: 0,
        workers: 0,
        findings: Vec::new(),
        saved_per_signature: HashMap::new(),
    }
}

/// Fuzzes one target within the settings' budget.
pub fn fuzz(kind: TargetKind, settings: &Settings) -> Result<Summary> {
    let start = Instant::now();
    let (dir, spec) = prepare(kind, settings)?;
    let mut run = new_run(kind, settings, spec);
    let mut rng = Rng::new(settings.seed ^ fnv64(kind.name().as_bytes()));
    let seeds = initial_corpus(kind, settings)?;
    let seed_count = seeds.len();
    let out_of_budget = |run: &Run<'_>| {
        start.elapsed().as_secs_f64() >= settings.seconds || settings.runs.is_some_and(|n| run.execs >= n)
    };
    // Every seed runs once (and joins the corpus), so their features are known before mutating.
    for seed in &seeds {
        if run.known.insert(fnv64(seed)) {
            run.corpus.push(seed.clone());
            run.corpus_bytes += seed.len();
        }
    }
    run.seeds = run.corpus.len();
    for seed in &seeds {
        run.execute(seed, &mut rng)?;
    }
    let mut last_status = Instant::now();
    while !out_of_budget(&run) && !run.corpus.is_empty() {
        // Half the time, one of the most recent finds: they are where new paths were last seen.
        let n = run.corpus.len();
        let i = if rng.one_in(2) {
            n - 1 - rng.below(n.div_ceil(4))
        } else {
            rng.below(n)
        };
        let j = rng.below(n);
        let started = Instant::now();
        let input = kind.mutate(&run.corpus[i], &mut rng, &run.corpus[j]);
        if settings.verbose && started.elapsed() > Duration::from_millis(200) {
            eprintln!(
                "[{}] slow mutation: {:.1} s for {} bytes",
                kind.name(),
                started.elapsed().as_secs_f64(),
                input.len()
            );
        }
        run.execute(&input, &mut rng)?;
        if settings.status_every > 0.0 && last_status.elapsed().as_secs_f64() >= settings.status_every {
            last_status = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "[{}] {:.0} s: {} execs ({:.0}/s), corpus {} ({} MiB), features {}, failing execs {}, workers {}, fuzzer RSS {} MiB",
                kind.name(),
                secs,
                run.execs,
                run.execs as f64 / secs,
                run.corpus.len(),
                run.corpus_bytes >> 20,
                run.features.len(),
                run.failures,
                run.workers,
                crate::worker::status_bytes("VmRSS").unwrap_or(0) >> 20
            );
        }
    }
    if let Some(worker) = run.worker.take() {
        worker.finish();
    }
    if let Some(save) = &settings.save_corpus {
        let out = save.join(kind.name());
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        for input in &run.corpus[run.seeds..] {
            std::fs::write(out.join(format!("{:016x}", fnv64(input))), input)?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Summary {
        kind,
        execs: run.execs,
        seconds: start.elapsed().as_secs_f64(),
        seeds: seed_count,
        corpus: run.corpus.len(),
        features: run.features.len(),
        failures: run.failures,
        workers: run.workers,
        findings: run.findings,
    })
}

/// Runs the given files once each through a target and prints what happened to each. Returns
/// the number of files that failed (panic, death or hang).
pub fn replay(kind: TargetKind, settings: &Settings, files: &[PathBuf]) -> Result<usize> {
    let (dir, spec) = prepare(kind, settings)?;
    let mut run = new_run(kind, settings, spec);
    let mut rng = Rng::new(0);
    let mut failed = 0;
    for file in files {
        let input = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        match run.execute(&input, &mut rng)? {
            Outcome::Features(features) => {
                println!("{}: ok", file.display());
                for f in features {
                    println!("    {f}");
                }
            }
            Outcome::Panic(message) => {
                failed += 1;
                println!("{}: PANIC {message}", file.display());
            }
            Outcome::Died(detail) => {
                failed += 1;
                println!("{}: DIED {detail}", file.display());
            }
            Outcome::Hang => {
                failed += 1;
                println!("{}: HANG", file.display());
            }
        }
    }
    if let Some(worker) = run.worker.take() {
        worker.finish();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(failed)
}
