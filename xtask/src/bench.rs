//! `cargo xtask bench`: our workloads and the same workloads through the Python reference, side by
//! side in one run.
//!
//! Two long-lived workers, python/bench_worker.py and the `bench_worker` example of the valuehead
//! crate, load the same seeded random checkpoints and receive the same token ids. For each
//! workload both warm up, then timed samples alternate between them (Python first on even rounds,
//! ours first on odd ones) so that drift hits both sides. During each sample the CPU time of every
//! other process is read from /proc; a sample taken while others used more than a quarter of a
//! core is taken again.

use crate::svg;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

const USAGE: &str = "\
usage: cargo xtask bench [--quick] [--threads N] [--reps N] [--models a,b] [--dtypes f32,bf16]
                         [--workloads forward,generate,rollout,train,ppo] [--out DIR]

  --quick      a small subset (toy models, f32, few tokens): a smoke test of the bench itself
  --threads    intra-op threads on both sides (default 2)
  --reps       timed samples per side and workload (default 3; quick 2)
  --models     gpt2-toy,t5-toy,gpt2-small,t5-small,smollm2 (smollm2 when installed by setup), and
               one toy per further architecture: llama-toy, qwen2-toy, mistral-toy, qwen3-toy,
               gemma-toy, gemma2-toy, phi3-toy, gpt_neox-toy, opt-toy, bloom-toy, cohere-toy, dbrx-toy,
               bart-toy (forward; generate in the full run)
  --workloads  forward,generate,rollout,train,ppo (train: forward + backward + AdamW step, b8x128,
               on gpt2-small and smollm2; ppo: one PPO iteration, 8 prompts of 32 tokens + 64
               sampled, reference and reward forwards, one epoch of 2 mini-batches, f32)
  --out        where results.json and bench.svg go (default: docs/bench for a full run,
               target/bench otherwise)
";

/// Other processes may use at most this many cores during a sample before it is retaken.
const NOISE_LIMIT: f64 = 0.25;
const RETRIES: usize = 3;

#[derive(Debug, Clone)]
struct Options {
    quick: bool,
    threads: u32,
    reps: usize,
    models: Vec<String>,
    dtypes: Vec<String>,
    workloads: Vec<String>,
    out: Option<PathBuf>,
    filtered: bool,
}

fn list(value: &str) -> Vec<String> {
    value.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        quick: false,
        threads: 2,
        reps: 0,
        models: vec![],
        dtypes: vec![],
        workloads: vec![],
        out: None,
        filtered: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value\n\n{USAGE}"));
        match arg.as_str() {
            "--quick" => o.quick = true,
            "--threads" => o.threads = value()?.parse().context("--threads")?,
            "--reps" => o.reps = value()?.parse().context("--reps")?,
            "--models" => (o.models, o.filtered) = (list(value()?), true),
            "--dtypes" => (o.dtypes, o.filtered) = (list(value()?), true),
            "--workloads" => (o.workloads, o.filtered) = (list(value()?), true),
            "--out" => o.out = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n\n{USAGE}"),
        }
    }
    if o.reps == 0 {
        o.reps = if o.quick { 2 } else { 3 };
    }
    if o.threads == 0 {
        bail!("--threads must be at least 1");
    }
    Ok(o)
}

/// One workload: a model, a precision, a task and its shapes.
#[derive(Debug, Clone)]
struct Workload {
    model: String,
    dtype: String,
    task: String,
    batch: usize,
    /// Prompt (or scored sequence) length.
    len: usize,
    max_new: usize,
}

impl Workload {
    fn name(&self) -> String {
        match self.task.as_str() {
            "forward" | "train" | "reward" | "lora" => format!("{} b{}x{}", self.task, self.batch, self.len),
            t => format!("{t} b{} {}+{}", self.batch, self.len, self.max_new),
        }
    }

    /// Tokens produced (or scored) per run, for throughput.
    fn tokens(&self) -> usize {
        match self.task.as_str() {
            "forward" | "train" | "reward" | "lora" => self.batch * self.len,
            _ => self.batch * self.max_new,
        }
    }

    /// The least speedup (Python time / ours) the issue asks for, if any.
    fn target(&self) -> Option<f64> {
        // The further architectures' toys: only the forward target (no slower than Python).
        if ARCH_TOYS.contains(&self.model.as_str()) && self.task != "forward" {
            return None;
        }
        let toy = self.model.ends_with("-toy");
        match (self.task.as_str(), self.model.as_str(), self.batch) {
            ("forward", _, _) => Some(1.0),
            ("train" | "reward" | "lora", _, _) if !toy => Some(1.0),
            ("generate", _, 1) if toy => Some(4.0),
            ("generate", "t5-small", 1) => Some(1.4),
            ("generate", "gpt2-small", 1) => Some(1.1),
            ("generate", "gpt2-small", 8) => Some(1.3),
            ("rollout", "gpt2-small" | "t5-small", _) => Some(1.3),
            ("ppo", "gpt2-small" | "smollm2", _) => Some(1.5),
            _ => None,
        }
    }
}

/// One toy checkpoint per further `model_type` of the registry (python/bench_worker.py builds
/// them): forward and greedy generate at batch 1 in f32, so the bench takes every architecture
/// the library does (encoder-decoders get decoder inputs for the forward, as config.json says).
const ARCH_TOYS: [&str; 13] = [
    "llama-toy",
    "qwen2-toy",
    "mistral-toy",
    "qwen3-toy",
    "gemma-toy",
    "gemma2-toy",
    "phi3-toy",
    "gpt_neox-toy",
    "opt-toy",
    "bloom-toy",
    "cohere-toy",
    "dbrx-toy",
    "bart-toy",
];

fn workloads(o: &Options, smollm2: bool) -> Vec<Workload> {
    let mut models: Vec<&str> = if o.quick {
        vec!["gpt2-toy", "t5-toy"]
    } else {
        vec!["gpt2-toy", "t5-toy", "gpt2-small", "t5-small"]
    };
    if smollm2 && !o.quick {
        models.push("smollm2");
    }
    let dtypes: &[&str] = if o.quick { &["f32"] } else { &["f32", "bf16"] };
    let (prompt, new, scored) = if o.quick { (8, 8, 32) } else { (32, 64, 128) };
    let batches: &[usize] = if o.quick { &[1] } else { &[1, 8] };
    let mut out = vec![];
    for model in models {
        for dtype in dtypes {
            // A train step (forward + backward + AdamW) last: it changes the weights, which the
            // next precision reloads.
            // PPO last of all: it trains its own copy, in f32 only.
            for task in ["forward", "generate", "rollout", "reward", "lora", "train", "ppo"] {
                let ppo_model = if o.quick {
                    model == "gpt2-toy"
                } else {
                    matches!(model, "gpt2-small" | "smollm2")
                };
                if task == "ppo" && (*dtype != "f32" || !ppo_model) {
                    continue;
                }
                let train_batches: &[usize] = if o.quick { &[1] } else { &[8] };
                let task_batches = match task {
                    "train" | "reward" | "lora" => train_batches,
                    "ppo" => &[8],
                    _ => batches,
                };
                // Training is timed on the causal models the issue names (the toy GPT-2 only as
                // the smoke test's).
                let trains = if o.quick {
                    model == "gpt2-toy"
                } else {
                    matches!(model, "gpt2-small" | "smollm2")
                };
                // Reward models (sequence classification) are decoder-only, as training here.
                if matches!(task, "train" | "reward" | "lora") && !trains {
                    continue;
                }
                for &batch in task_batches {
                    let (len, max_new) = match task {
                        "forward" | "train" | "reward" | "lora" => (scored, 0),
                        _ => (prompt, new),
                    };
                    out.push(Workload {
                        model: model.to_string(),
                        dtype: dtype.to_string(),
                        task: task.to_string(),
                        batch,
                        len,
                        max_new,
                    });
                }
            }
        }
    }
    // The other architectures: forward everywhere, generate in the full run (f32, batch 1).
    for model in ARCH_TOYS {
        let tasks: &[&str] = if o.quick {
            &["forward"]
        } else {
            &["forward", "generate"]
        };
        for task in tasks {
            let (len, max_new) = if *task == "forward" { (scored, 0) } else { (prompt, new) };
            out.push(Workload {
                model: model.to_string(),
                dtype: "f32".to_string(),
                task: task.to_string(),
                batch: 1,
                len,
                max_new,
            });
        }
    }
    let keep = |filter: &[String], v: &str| filter.is_empty() || filter.iter().any(|f| f == v);
    out.retain(|w| keep(&o.models, &w.model) && keep(&o.dtypes, &w.dtype) && keep(&o.workloads, &w.task));
    out
}

/// Deterministic token ids in 2..vocab (clear of the usual pad/eos ids 0 and 1).
fn token_ids(batch: usize, len: usize, vocab: u64, salt: u64) -> Vec<Vec<i64>> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    (0..batch)
        .map(|_| {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (2 + state % (vocab - 2)) as i64
                })
                .collect()
        })
        .collect()
}

/// A worker process and its line protocol.
struct Worker {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn start(name: &'static str, cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name} worker: {cmd:?}"))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        Ok(Self {
            name,
            child,
            stdin,
            stdout,
        })
    }

    fn call(&mut self, request: Value) -> Result<Value> {
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the {} worker exited while answering {request}", self.name);
        }
        let reply: Value =
            serde_json::from_str(&line).with_context(|| format!("the {} worker answered `{line}`", self.name))?;
        if reply["ok"] != json!(true) {
            bail!(
                "the {} worker failed on {}: {}",
                self.name,
                request["cmd"],
                reply["error"]
            );
        }
        Ok(reply)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// Busy jiffies of the whole machine (everything but idle and iowait).
fn machine_busy() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    Ok(total - fields.get(3).copied().unwrap_or(0) - fields.get(4).copied().unwrap_or(0))
}

/// User + system jiffies of one process (all its threads).
fn process_cpu(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').context("malformed /proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// The jiffy rate of /proc/stat (USER_HZ); 100 on every Linux this runs on.
const JIFFIES_PER_S: f64 = 100.0;

/// One timed sample: per-iteration milliseconds, the check values, and the cores other
/// processes used meanwhile.
struct Sample {
    ms: f64,
    check: Value,
    others: f64,
}

fn sample(worker: &mut Worker, iters: u64) -> Result<Sample> {
    let pid = worker.pid();
    let (busy0, own0, t0) = (machine_busy()?, process_cpu(pid)?, Instant::now());
    let reply = worker.call(json!({"cmd": "run", "iters": iters}))?;
    let (busy1, own1, elapsed) = (machine_busy()?, process_cpu(pid)?, t0.elapsed().as_secs_f64());
    let others =
        (busy1.saturating_sub(busy0) as f64 - own1.saturating_sub(own0) as f64).max(0.0) / JIFFIES_PER_S / elapsed;
    Ok(Sample {
        ms: reply["ms"].as_f64().context("ms")?,
        check: reply["check"].clone(),
        others,
    })
}

/// A sample retaken while the machine is busy with other work (the last one is kept if it stays busy).
fn quiet_sample(worker: &mut Worker, iters: u64, retaken: &mut usize) -> Result<Sample> {
    let mut s = sample(worker, iters)?;
    for _ in 0..RETRIES {
        if s.others <= NOISE_LIMIT {
            break;
        }
        *retaken += 1;
        s = sample(worker, iters)?;
    }
    Ok(s)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// How both sides did on one workload.
#[derive(Debug, Clone)]
struct Row {
    workload: Workload,
    python_ms: f64,
    ours_ms: f64,
    python_rss_mb: f64,
    ours_rss_mb: f64,
    /// Most cores other processes used during a kept sample.
    others_max: f64,
    retaken: usize,
    /// Share of generated tokens that are the same on both sides.
    token_agreement: Option<f64>,
    /// Bytes of weights a decode step reads (ours), for the bandwidth bound.
    decode_bytes: f64,
    /// What each side's last sample returned (tokens, sums, last logits).
    python_check: Value,
    ours_check: Value,
}

impl Row {
    fn speedup(&self) -> f64 {
        self.python_ms / self.ours_ms
    }
    fn met(&self) -> Option<bool> {
        self.workload.target().map(|t| self.speedup() >= t)
    }
    fn ours_tokens_per_s(&self) -> f64 {
        self.workload.tokens() as f64 / (self.ours_ms / 1e3)
    }
    fn python_tokens_per_s(&self) -> f64 {
        self.workload.tokens() as f64 / (self.python_ms / 1e3)
    }
}

fn token_agreement(a: &Value, b: &Value) -> Option<f64> {
    let flat = |v: &Value| -> Option<Vec<i64>> {
        Some(
            v.get("tokens")?
                .as_array()?
                .iter()
                .flat_map(|r| r.as_array().cloned().unwrap_or_default())
                .filter_map(|t| t.as_i64())
                .collect(),
        )
    };
    let (a, b) = (flat(a)?, flat(b)?);
    if a.is_empty() || a.len() != b.len() {
        return None;
    }
    Some(a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64)
}

fn model_dir(cache: &Path, name: &str, key: &str) -> PathBuf {
    cache.join("bench-models").join(format!("{name}-{key}"))
}

/// Whether the bench model in `dir` is an encoder-decoder model (config.json's
/// `is_encoder_decoder`, as transformers decides: T5, Bart), whose forward needs decoder ids.
fn is_encoder_decoder(dir: &Path) -> Result<bool> {
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    Ok(config["is_encoder_decoder"].as_bool().unwrap_or(false))
}

fn vocab_of(dir: &Path) -> Result<u64> {
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    config["vocab_size"].as_u64().context("config.json has no vocab_size")
}

/// The machine, as the report names it.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    json!({"cpu": cpu, "cores": cores, "memory_gib": (mem_gib * 10.0).round() / 10.0})
}

pub fn bench(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let python = crate::setup()?;
    let root = crate::root();
    let smollm2_dir = root.join(".models").join("smollm2-135m-instruct");
    let list = workloads(&o, smollm2_dir.join("config.json").exists());
    if list.is_empty() {
        bail!("no workload matches the filters");
    }

    // The quick smoke test builds the worker like the tests (no release build in CI); real
    // measurements need the optimised build.
    let profile = if o.quick { "test" } else { "release" };
    crate::run(crate::cargo().args([
        "build",
        "--profile",
        profile,
        "-p",
        "valuehead",
        "--example",
        "bench_worker",
    ]))?;
    let with_ppo = list.iter().any(|w| w.task == "ppo");
    if with_ppo {
        crate::run(crate::cargo().args([
            "build",
            "--profile",
            profile,
            "-p",
            "vh-ppo",
            "--example",
            "ppo_bench_worker",
        ]))?;
    }
    let dir = if o.quick { "debug" } else { "release" };
    let rust_worker = root.join("target").join(dir).join("examples").join("bench_worker");
    let ppo_worker = root.join("target").join(dir).join("examples").join("ppo_bench_worker");

    let script = root.join("python").join("bench_worker.py");
    let key = crate::requirements_key(std::slice::from_ref(&script))?;
    let cache = crate::cache_dir()?;
    let env = |cmd: &mut Command| {
        cmd.env("TRANSFORMERS_VERBOSITY", "error")
            .env("HF_HUB_OFFLINE", "1")
            .env("TQDM_DISABLE", "1")
            .env("TOKENIZERS_PARALLELISM", "false");
    };
    let mut py_cmd = Command::new(&python);
    py_cmd.arg(&script);
    env(&mut py_cmd);
    // Our binaries raise glibc's trim and mmap thresholds at start
    // (`valuehead::keep_freed_tensor_memory`); the Python worker gets the same values through
    // glibc's environment variables, so both sides run under one allocator configuration.
    py_cmd
        .env("MALLOC_TRIM_THRESHOLD_", (256u64 << 20).to_string())
        .env("MALLOC_MMAP_THRESHOLD_", (32u64 << 20).to_string());
    let mut py = Worker::start("Python", &mut py_cmd)?;
    let mut rs_cmd = Command::new(&rust_worker);
    env(&mut rs_cmd);
    let mut rs = Worker::start("Rust", &mut rs_cmd)?;
    // PPO lives in a crate above valuehead, so its side runs in a worker of its own.
    let mut rs_ppo = if with_ppo {
        let mut cmd = Command::new(&ppo_worker);
        env(&mut cmd);
        let mut w = Worker::start("Rust PPO", &mut cmd)?;
        w.call(json!({"cmd": "init", "threads": o.threads}))?;
        Some(w)
    } else {
        None
    };
    let versions = py.call(json!({"cmd": "init", "threads": o.threads}))?["versions"].clone();
    rs.call(json!({"cmd": "init", "threads": o.threads}))?;
    let bandwidth = rs.call(json!({"cmd": "bandwidth"}))?["gb_per_s"]
        .as_f64()
        .context("bandwidth")?;
    eprintln!(
        "bench: memory read bandwidth {bandwidth:.1} GB/s, {} threads per side",
        o.threads
    );

    let mut rows: Vec<Row> = vec![];
    let mut loaded: Option<(String, String)> = None;
    let mut decode_bytes = 0.0;
    for w in &list {
        let dir = if w.model == "smollm2" {
            smollm2_dir.clone()
        } else {
            let dir = model_dir(&cache, &w.model, &key);
            if !dir.join("config.json").exists() {
                eprintln!(
                    "bench: building the seeded random {} checkpoint in {}",
                    w.model,
                    dir.display()
                );
                let parent = dir.parent().context("model folder")?;
                std::fs::create_dir_all(parent)?;
                // Checkpoints of an older worker script are stale: drop them.
                for entry in std::fs::read_dir(parent)? {
                    let path = entry?.path();
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    if name.starts_with(&format!("{}-", w.model)) && path != dir {
                        std::fs::remove_dir_all(&path)?;
                    }
                }
                py.call(json!({"cmd": "make", "name": w.model, "dir": dir}))?;
            }
            dir
        };
        if loaded.as_ref() != Some(&(w.model.clone(), w.dtype.clone())) {
            py.call(json!({"cmd": "load", "dir": dir, "dtype": w.dtype}))?;
            let reply = rs.call(json!({"cmd": "load", "dir": dir, "dtype": w.dtype}))?;
            decode_bytes = reply["decode_bytes"].as_f64().unwrap_or(0.0);
            loaded = Some((w.model.clone(), w.dtype.clone()));
        }
        let vocab = vocab_of(&dir)?;
        let mut task = json!({
            "type": w.task,
            "input_ids": token_ids(w.batch, w.len, vocab, 1),
            "max_new_tokens": w.max_new,
        });
        if is_encoder_decoder(&dir)? && w.task == "forward" {
            task["decoder_input_ids"] = json!(token_ids(w.batch, w.len, vocab, 2));
        }
        if w.task == "ppo" {
            // The Python worker writes the reward model (a classifier on the same backbone, a
            // seeded score head) on first use; both sides load it.
            let reward_dir = cache.join("bench-models").join(format!("{}-reward-{key}", w.model));
            task["reward_dir"] = json!(reward_dir);
            task["model_dir"] = json!(dir);
        }
        let rs = if w.task == "ppo" {
            let worker = rs_ppo.as_mut().context("the PPO worker was not started")?;
            worker.call(json!({"cmd": "load", "dir": dir, "dtype": w.dtype}))?;
            worker
        } else {
            &mut rs
        };
        let mut iters = [1u64; 2];
        for (i, worker) in [&mut py, &mut *rs].into_iter().enumerate() {
            worker.call(json!({"cmd": "prepare", "task": task}))?;
            // Enough iterations per sample that the /proc jiffy counts mean something.
            let probe = sample(worker, 1)?.ms;
            let floor_ms = if o.quick { 30.0 } else { 300.0 };
            iters[i] = ((floor_ms / probe).ceil() as u64).clamp(1, 1000);
        }
        let (mut py_ms, mut rs_ms, mut others_max, mut retaken) = (vec![], vec![], 0.0f64, 0usize);
        let (mut py_check, mut rs_check) = (Value::Null, Value::Null);
        for rep in 0..o.reps {
            for side in if rep % 2 == 0 { [0, 1] } else { [1, 0] } {
                let (worker, times, check) = if side == 0 {
                    (&mut py, &mut py_ms, &mut py_check)
                } else {
                    (&mut *rs, &mut rs_ms, &mut rs_check)
                };
                let s = quiet_sample(worker, iters[side], &mut retaken)?;
                others_max = others_max.max(s.others);
                times.push(s.ms);
                *check = s.check;
            }
        }
        let row = Row {
            workload: w.clone(),
            python_ms: median(&mut py_ms),
            ours_ms: median(&mut rs_ms),
            python_rss_mb: py.call(json!({"cmd": "rss"}))?["peak_rss_mb"].as_f64().unwrap_or(0.0),
            ours_rss_mb: rs.call(json!({"cmd": "rss"}))?["peak_rss_mb"].as_f64().unwrap_or(0.0),
            others_max,
            retaken,
            token_agreement: token_agreement(&py_check, &rs_check),
            decode_bytes,
            python_check: py_check,
            ours_check: rs_check,
        };
        eprintln!(
            "bench: {:<12} {:<4} {:<22} python {:>9.2} ms  ours {:>9.2} ms  x{:.2}",
            w.model,
            w.dtype,
            w.name(),
            row.python_ms,
            row.ours_ms,
            row.speedup()
        );
        rows.push(row);
    }
    drop(py);
    drop(rs);
    drop(rs_ppo);

    let numerics = numerics(&rows);
    let mut table = render_table(&rows, bandwidth);
    table += &render_numerics(&numerics);
    print!("{table}");
    let full_run = !o.quick && !o.filtered;
    let out_dir = o.out.clone().unwrap_or_else(|| {
        if full_run {
            root.join("docs").join("bench")
        } else {
            root.join("target").join("bench")
        }
    });
    std::fs::create_dir_all(&out_dir)?;
    let date = crate::output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    let report = json!({
        "date": date,
        "machine": machine(),
        "threads": o.threads,
        "reps": o.reps,
        "quick": o.quick,
        "versions": versions,
        "memory_read_gb_per_s": bandwidth,
        "results": rows.iter().map(|r| row_json(r, bandwidth)).collect::<Vec<_>>(),
        "numerics": numerics,
    });
    write_atomic(
        &out_dir.join("results.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    write_atomic(&out_dir.join("results.txt"), table)?;
    let title = format!(
        "valuehead vs Python TRL: speedup per workload ({}, {} threads, {})",
        report["machine"]["cpu"].as_str().unwrap_or(""),
        o.threads,
        date
    );
    let bars: Vec<svg::Bar> = rows
        .iter()
        .map(|r| svg::Bar {
            label: format!("{} {} {}", r.workload.model, r.workload.dtype, r.workload.name()),
            value: r.speedup(),
            target: r.workload.target(),
        })
        .collect();
    write_atomic(&out_dir.join("bench.svg"), svg::speedup_chart(&title, &bars))?;
    eprintln!(
        "bench: wrote results.json, results.txt and bench.svg to {}",
        out_dir.display()
    );
    let sanity: Vec<String> = rows
        .iter()
        .filter(|r| !(r.python_ms > 0.0 && r.ours_ms > 0.0 && r.python_ms.is_finite() && r.ours_ms.is_finite()))
        .map(|r| r.workload.name())
        .collect();
    if !sanity.is_empty() {
        bail!("workloads without valid timings: {sanity:?}");
    }
    Ok(())
}

fn last_logits(check: &Value) -> Option<Vec<f64>> {
    Some(
        check
            .get("last_logits")?
            .as_array()?
            .iter()
            .filter_map(Value::as_f64)
            .collect(),
    )
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> Option<f64> {
    (a.len() == b.len() && !a.is_empty()).then(|| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max))
}

/// What the precisions and the two sides compute, from the samples' checks: for each model, the
/// largest last-position logit difference ours vs Python (f32) and bf16 vs f32 (each side),
/// and how many greedy tokens our bf16 run shares with our f32 run.
fn numerics(rows: &[Row]) -> Vec<Value> {
    let find = |model: &str, dtype: &str, task: &str, batch: usize| {
        rows.iter().find(|r| {
            r.workload.model == model
                && r.workload.dtype == dtype
                && r.workload.task == task
                && r.workload.batch == batch
        })
    };
    let mut models: Vec<&str> = rows.iter().map(|r| r.workload.model.as_str()).collect();
    models.dedup();
    models
        .into_iter()
        .map(|model| {
            let logits = |dtype: &str, python: bool| {
                find(model, dtype, "forward", 1)
                    .and_then(|r| last_logits(if python { &r.python_check } else { &r.ours_check }))
            };
            let diff = |a: Option<Vec<f64>>, b: Option<Vec<f64>>| max_abs_diff(&a?, &b?);
            let greedy = |batch: usize| {
                token_agreement(
                    &find(model, "bf16", "generate", batch)?.ours_check,
                    &find(model, "f32", "generate", batch)?.ours_check,
                )
            };
            // The train step's first LM loss (same weights and batch on both sides; dropout
            // masks differ where the model has dropout).
            let first_lm = |dtype: &str| {
                let r = find(model, dtype, "train", 8).or_else(|| find(model, dtype, "train", 1))?;
                Some(
                    (r.ours_check.get("first_lm_loss")?.as_f64()? - r.python_check.get("first_lm_loss")?.as_f64()?)
                        .abs(),
                )
            };
            // The reward model's scores summed over the batch (same weights and inputs).
            let rewards = |dtype: &str| {
                let r = find(model, dtype, "reward", 8).or_else(|| find(model, dtype, "reward", 1))?;
                Some((r.ours_check.get("rewards_sum")?.as_f64()? - r.python_check.get("rewards_sum")?.as_f64()?).abs())
            };
            json!({
                "model": model,
                "reward_sum_ours_vs_python_f32": rewards("f32"),
                "train_first_lm_loss_ours_vs_python_f32": first_lm("f32"),
                "train_first_lm_loss_ours_vs_python_bf16": first_lm("bf16"),
                "f32_logits_ours_vs_python": diff(logits("f32", false), logits("f32", true)),
                "bf16_logits_ours_vs_python": diff(logits("bf16", false), logits("bf16", true)),
                "bf16_vs_f32_logits_ours": diff(logits("bf16", false), logits("f32", false)),
                "bf16_vs_f32_logits_python": diff(logits("bf16", true), logits("f32", true)),
                "bf16_vs_f32_greedy_agreement_ours_b1": greedy(1),
                "bf16_vs_f32_greedy_agreement_ours_b8": greedy(8),
            })
        })
        .collect()
}

fn render_numerics(numerics: &[Value]) -> String {
    let num = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2e}"));
    let pct = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{:.0}%", x * 100.0));
    let mut s =
        "\nnumerics (max abs difference of the last position's logits, batch-1 forward; greedy tokens shared;\n\
         train: first step's LM loss, ours - python; reward: summed scores of the batch, ours - python)\n"
            .to_string();
    s += &format!(
        "{:<12} {:>14} {:>15} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14}\n",
        "model",
        "f32 ours-py",
        "bf16 ours-py",
        "ours bf16-f32",
        "py bf16-f32",
        "greedy b1",
        "greedy b8",
        "train f32",
        "train bf16",
        "reward f32"
    );
    for n in numerics {
        s += &format!(
            "{:<12} {:>14} {:>15} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14}\n",
            n["model"].as_str().unwrap_or(""),
            num(&n["f32_logits_ours_vs_python"]),
            num(&n["bf16_logits_ours_vs_python"]),
            num(&n["bf16_vs_f32_logits_ours"]),
            num(&n["bf16_vs_f32_logits_python"]),
            pct(&n["bf16_vs_f32_greedy_agreement_ours_b1"]),
            pct(&n["bf16_vs_f32_greedy_agreement_ours_b8"]),
            num(&n["train_first_lm_loss_ours_vs_python_f32"]),
            num(&n["train_first_lm_loss_ours_vs_python_bf16"]),
            num(&n["reward_sum_ours_vs_python_f32"]),
        );
    }
    s
}

fn write_atomic(path: &Path, contents: String) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Batch-1 decode throughput bound by memory: bandwidth / bytes of weights per step.
fn decode_bound(row: &Row, bandwidth: f64) -> Option<f64> {
    (matches!(row.workload.task.as_str(), "generate" | "rollout") && row.workload.batch == 1 && row.decode_bytes > 0.0)
        .then(|| bandwidth * 1e9 / row.decode_bytes)
}

fn row_json(r: &Row, bandwidth: f64) -> Value {
    let w = &r.workload;
    json!({
        "model": w.model, "dtype": w.dtype, "task": w.task, "batch": w.batch, "len": w.len,
        "max_new_tokens": w.max_new, "workload": w.name(),
        "python_ms": r.python_ms, "ours_ms": r.ours_ms, "speedup": r.speedup(),
        "python_tokens_per_s": r.python_tokens_per_s(), "ours_tokens_per_s": r.ours_tokens_per_s(),
        "python_peak_rss_mb": r.python_rss_mb, "ours_peak_rss_mb": r.ours_rss_mb,
        "target_speedup": w.target(), "target_met": r.met(),
        "other_processes_max_cores": r.others_max, "samples_retaken": r.retaken,
        "token_agreement": r.token_agreement,
        "decode_bytes_per_step": r.decode_bytes,
        "decode_bound_tokens_per_s": decode_bound(r, bandwidth),
        "share_of_bound": decode_bound(r, bandwidth).map(|b| r.ours_tokens_per_s() / b),
    })
}

fn render_table(rows: &[Row], bandwidth: f64) -> String {
    let mut s = format!(
        "\nspeedup = Python ms / ours ms (higher is better); tok/s counts generated (or scored) tokens;\n\
         RSS = peak resident MB during the workload; bound = batch-1 decode limit from {bandwidth:.1} GB/s\n\
         memory bandwidth; others = most cores other processes used during a sample\n\n"
    );
    s += &format!(
        "{:<12} {:<4} {:<22} {:>10} {:>10} {:>7} {:>6} {:>9} {:>9} {:>7} {:>7} {:>11} {:>6} {:>6}\n",
        "model",
        "prec",
        "workload",
        "python ms",
        "ours ms",
        "speedup",
        "target",
        "py tok/s",
        "our tok/s",
        "py RSS",
        "our RSS",
        "bound share",
        "tokens",
        "others"
    );
    for r in rows {
        let w = &r.workload;
        let target = match (w.target(), r.met()) {
            (Some(t), Some(true)) => format!("{t:.1} ok"),
            (Some(t), _) => format!("{t:.1} NO"),
            _ => "-".into(),
        };
        let bound = decode_bound(r, bandwidth).map_or("-".into(), |b| {
            format!("{:.0}% of {b:.0}", 100.0 * r.ours_tokens_per_s() / b)
        });
        let agree = r.token_agreement.map_or("-".into(), |a| format!("{:.0}%", a * 100.0));
        s += &format!(
            "{:<12} {:<4} {:<22} {:>10.2} {:>10.2} {:>6.2}x {:>6} {:>9.0} {:>9.0} {:>7.0} {:>7.0} {:>11} {:>6} {:>6.2}\n",
            w.model,
            w.dtype,
            w.name(),
            r.python_ms,
            r.ours_ms,
            r.speedup(),
            target,
            r.python_tokens_per_s(),
            r.ours_tokens_per_s(),
            r.python_rss_mb,
            r.ours_rss_mb,
            bound,
            agree,
            r.others_max
        );
    }
    let rss_over: Vec<String> = rows
        .iter()
        .filter(|r| r.ours_rss_mb > r.python_rss_mb)
        .map(|r| format!("{} {} {}", r.workload.model, r.workload.dtype, r.workload.name()))
        .collect();
    // PPO rows: where each side's last sample spent its time (the workers report wall-clock
    // phases; Python's `values` is the value forward our single-pass rollout does not need).
    for r in rows.iter().filter(|r| r.workload.task == "ppo") {
        let phases = |check: &Value| -> String {
            check["phases_ms"].as_object().map_or("-".into(), |m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {:.0}", v.as_f64().unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        };
        s += &format!(
            "\nppo phases, {} (ms of one iteration): python: {}; ours: {}",
            r.workload.model,
            phases(&r.python_check),
            phases(&r.ours_check)
        );
    }
    let missed = rows.iter().filter(|r| r.met() == Some(false)).count();
    let with_target = rows.iter().filter(|r| r.met().is_some()).count();
    s += &format!(
        "\nspeed targets met: {}/{with_target}; peak RSS above Python's: {}\n",
        with_target - missed,
        if rss_over.is_empty() {
            "none".to_string()
        } else {
            rss_over.join(", ")
        }
    );
    s
}
