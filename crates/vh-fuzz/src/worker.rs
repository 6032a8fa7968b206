//! Both ends of the worker protocol. The parent sends each input as a frame (u32 little-endian
//! length, then the bytes) on the worker's stdin; the worker answers with one frame: `F` and
//! the features, one per line, or `P` and a panic message. A worker that dies (abort, stack
//! overflow, out of memory, a signal) closes its stdout mid-input; one that stops answering
//! for the hang timeout is killed. Either way the parent knows the input it sent last.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;
use vh_fuzz::TargetKind;

/// Writes one frame.
fn write_frame(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

/// Reads one frame; `None` at a clean end of the stream.
fn read_frame(r: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let mut bytes = vec![0u8; u32::from_le_bytes(len) as usize];
    r.read_exact(&mut bytes)?;
    Ok(Some(bytes))
}

/// The message of the last panic in this worker, set by the panic hook.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// A size field of /proc/self/status (`VmSize`, `VmRSS`) in bytes.
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// This process's virtual memory size in bytes.
fn vm_size() -> Option<u64> {
    status_bytes("VmSize")
}

/// Caps the worker's address space at what it maps after loading plus `extra_mb`, so that an
/// input asking for gigabytes meets a failed allocation (which the library must turn into an
/// error) instead of the machine's memory. Measured after start-up because libtorch and its
/// dependencies map a few gigabytes of address space before any input is read. With
/// `soft_only`, the hard limit stays as it is, so that child processes can set their own.
pub fn limit_address_space(extra_mb: u64, soft_only: bool) -> Result<()> {
    let base = vm_size().context("reading VmSize from /proc/self/status")?;
    let limit = base + (extra_mb << 20);
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid rlimit value for this process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_AS, &mut rlim) != 0 {
            bail!("getrlimit(RLIMIT_AS): {}", std::io::Error::last_os_error());
        }
        rlim.rlim_cur = limit.min(rlim.rlim_max);
        if !soft_only {
            rlim.rlim_max = rlim.rlim_cur;
        }
        if libc::setrlimit(libc::RLIMIT_AS, &rlim) != 0 {
            bail!("setrlimit(RLIMIT_AS): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The first `crates/...:line` of a backtrace that is not the fuzzer's own code.
fn workspace_frame(backtrace: &str) -> Option<String> {
    backtrace.lines().map(str::trim).find_map(|line| {
        let at = line.strip_prefix("at ")?;
        let start = at.find("/crates/")? + 1;
        let file = &at[start..];
        (!file.starts_with("crates/vh-fuzz/")).then(|| file.to_string())
    })
}

/// The worker process: opens the target, caps its memory, then runs inputs until stdin ends.
pub fn worker_main(kind: TargetKind, fixtures: &Path, scratch: &Path, mem_mb: u64) -> Result<()> {
    // Frames go out on a private copy of stdout, and fd 1 becomes stderr, so that nothing the
    // code under test prints can corrupt the protocol.
    // SAFETY: dup and dup2 on the standard descriptors, which this process owns.
    let frames_fd = unsafe { libc::dup(1) };
    if frames_fd < 0 || unsafe { libc::dup2(2, 1) } < 0 {
        bail!("redirecting stdout: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `frames_fd` was just returned by dup and is owned by nothing else.
    let mut frames = std::io::BufWriter::new(unsafe { std::fs::File::from_raw_fd(frames_fd) });
    tch::set_num_threads(1);
    let mut target = kind.open(fixtures, scratch)?;
    if mem_mb > 0 {
        limit_address_space(mem_mb, false)?;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string panic payload)".to_string());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        // A panic inside a dependency (e.g. a tch method that unwraps a libtorch error) is
        // located by the first frame of this workspace's libraries that led to it.
        let caller = if location.starts_with("crates/") {
            None
        } else {
            workspace_frame(&std::backtrace::Backtrace::force_capture().to_string())
        };
        let at = match caller {
            Some(caller) => format!("{location} via {caller}"),
            None => location,
        };
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(format!("{message} at {at}"));
        }
    }));
    write_frame(&mut frames, b"R")?;
    let mut stdin = std::io::stdin().lock();
    while let Some(input) = read_frame(&mut stdin)? {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.execute(&input)));
        let reply = match result {
            Ok(features) => format!("F{}", features.join("\n")),
            Err(_) => {
                let message = LAST_PANIC.lock().ok().and_then(|mut l| l.take());
                format!("P{}", message.unwrap_or_else(|| "panic".to_string()))
            }
        };
        write_frame(&mut frames, reply.as_bytes())?;
    }
    Ok(())
}

/// What became of one input.
#[derive(Debug)]
pub enum Outcome {
    /// The target returned these features.
    Features(Vec<String>),
    /// The target panicked (message with location).
    Panic(String),
    /// The worker died (how, and the end of its stderr).
    Died(String),
    /// The worker stopped answering.
    Hang,
}

/// How to start workers of one target.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The target.
    pub kind: TargetKind,
    /// The fixtures folder the parent prepared.
    pub fixtures: PathBuf,
    /// The worker's scratch folder.
    pub scratch: PathBuf,
    /// The address space a worker may add after start-up, in MiB (0: no cap).
    pub mem_mb: u64,
    /// Where the worker's stderr goes.
    pub stderr: PathBuf,
}

/// A running worker.
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<Option<Vec<u8>>>,
    stderr: PathBuf,
}

/// The start-up of a worker (loading libtorch and the fixtures) may take this long.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

impl Worker {
    /// Starts a worker and waits until it is ready.
    pub fn spawn(spec: &WorkerSpec) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the vh-fuzz executable")?;
        let stderr =
            std::fs::File::create(&spec.stderr).with_context(|| format!("creating {}", spec.stderr.display()))?;
        let mut child = Command::new(exe)
            .arg("--worker")
            .arg(spec.kind.name())
            .arg("--fixtures")
            .arg(&spec.fixtures)
            .arg("--scratch")
            .arg(&spec.scratch)
            .arg("--mem-mb")
            .arg(spec.mem_mb.to_string())
            .env("OMP_NUM_THREADS", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("starting a worker")?;
        let mut stdout = child.stdout.take().context("worker stdout")?;
        let (tx, replies) = std::sync::mpsc::channel();
        // A reader thread, so that the parent can wait for an answer with a timeout.
        std::thread::spawn(move || loop {
            match read_frame(&mut stdout) {
                Ok(Some(frame)) => {
                    if tx.send(Some(frame)).is_err() {
                        return;
                    }
                }
                _ => {
                    let _ = tx.send(None);
                    return;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut worker = Self {
            child,
            stdin,
            replies,
            stderr: spec.stderr.clone(),
        };
        match worker.replies.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Some(frame)) if frame == b"R" => Ok(worker),
            _ => {
                worker.kill();
                bail!(
                    "the {} worker did not start:\n{}",
                    spec.kind.name(),
                    worker.stderr_tail(40)
                )
            }
        }
    }

    /// The last `lines` lines of the worker's stderr.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let text = std::fs::read(&self.stderr).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs one input.
    pub fn run(&mut self, input: &[u8], hang: Duration) -> Outcome {
        let sent = match self.stdin.as_mut() {
            Some(stdin) => write_frame(stdin, input).is_ok(),
            None => false,
        };
        let reply = if sent {
            self.replies.recv_timeout(hang)
        } else {
            Err(RecvTimeoutError::Disconnected)
        };
        match reply {
            Ok(Some(frame)) => {
                let text = String::from_utf8_lossy(&frame[1.min(frame.len())..]).into_owned();
                match frame.first() {
                    Some(b'F') => Outcome::Features(text.lines().map(str::to_string).collect()),
                    _ => Outcome::Panic(text),
                }
            }
            Ok(None) | Err(RecvTimeoutError::Disconnected) => Outcome::Died(self.death()),
            Err(RecvTimeoutError::Timeout) => Outcome::Hang,
        }
    }

    /// How the worker died: its exit status or signal and the end of its stderr.
    fn death(&mut self) -> String {
        use std::os::unix::process::ExitStatusExt;
        self.stdin = None;
        // The process may still be closing down; give it a moment before killing it.
        let mut status = None;
        for _ in 0..50 {
            if let Ok(Some(s)) = self.child.try_wait() {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let how = match status {
            Some(s) => match s.signal() {
                Some(sig) => format!("signal {sig} ({})", signal_name(sig)),
                None => format!("exit status {}", s.code().unwrap_or(-1)),
            },
            None => {
                self.kill();
                "closed its output".to_string()
            }
        };
        format!("{how}\n{}", self.stderr_tail(20))
    }

    /// Kills the worker and reaps it.
    pub fn kill(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Ends the worker: closes its input so that it exits, then reaps it.
    pub fn finish(mut self) {
        self.stdin = None;
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL, e.g. the OOM killer",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}
