//! `cargo xtask launch --nproc N -- <cmd...>`: a local stand-in for torchrun.
//!
//! It starts N copies of a command with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
//! LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port), prefixes each output line
//! with the rank, and when one rank fails it kills the others and reports that first failure.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const USAGE: &str = "\
usage: cargo xtask launch --nproc N [--master-port P] -- <command> [args...]

Starts N local processes of <command> with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT = P or a free port).
Output lines are prefixed with [rank i]. When a rank fails, the others are killed and the
launcher exits with the failed rank's status. Launch built binaries (target/...), not
`cargo run`: a killed cargo does not kill the program it started.
";

/// Parsed command line of the launcher.
#[derive(Debug, PartialEq)]
struct Args {
    nproc: usize,
    port: Option<u16>,
    cmd: Vec<String>,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut nproc = None;
    let mut port = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nproc" | "--nproc-per-node" | "--nproc_per_node" => {
                let v = it.next().context("--nproc needs a value")?;
                let n: usize = v.parse().with_context(|| format!("--nproc {v:?} is not a number"))?;
                if n == 0 {
                    bail!("--nproc must be at least 1");
                }
                nproc = Some(n);
            }
            "--master-port" => {
                let v = it.next().context("--master-port needs a value")?;
                let p: u16 = v
                    .parse()
                    .with_context(|| format!("--master-port {v:?} is not a port"))?;
                if p == 0 {
                    bail!("--master-port must be in 1..=65535");
                }
                port = Some(p);
            }
            "--" => {
                let cmd: Vec<String> = it.cloned().collect();
                if cmd.is_empty() {
                    bail!("no command after --\n\n{USAGE}");
                }
                let nproc = nproc.with_context(|| format!("--nproc is required\n\n{USAGE}"))?;
                return Ok(Args { nproc, port, cmd });
            }
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    bail!("missing `-- <command>`\n\n{USAGE}")
}

/// A port nobody listens on now (the OS picks it); rank 0's TCPStore binds it right after.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Copies `from` to our stdout or stderr line by line, each line prefixed with the rank.
fn forward(from: impl Read + Send + 'static, rank: usize, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            // One write per line so that lines of different ranks never interleave mid-line.
            let out = format!("[rank {rank}] {text}\n");
            if to_stderr {
                let _ = std::io::stderr().lock().write_all(out.as_bytes());
            } else {
                let _ = std::io::stdout().lock().write_all(out.as_bytes());
            }
            line.clear();
        }
    })
}

pub fn launch(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    let port = match a.port {
        Some(p) => p,
        None => free_port()?,
    };
    eprintln!(
        "launch: {} ranks, MASTER_ADDR=127.0.0.1 MASTER_PORT={port}: {}",
        a.nproc,
        a.cmd.join(" ")
    );
    let mut children: Vec<Option<Child>> = Vec::new();
    let mut pipes = Vec::new();
    for rank in 0..a.nproc {
        let spawned = Command::new(&a.cmd[0])
            .args(&a.cmd[1..])
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", a.nproc.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank}: {}", a.cmd[0]));
            }
        };
        if let Some(out) = child.stdout.take() {
            pipes.push(forward(out, rank, false));
        }
        if let Some(err) = child.stderr.take() {
            pipes.push(forward(err, rank, true));
        }
        children.push(Some(child));
    }
    // Poll rather than wait on one child: the first failure may come from any rank.
    let mut failure: Option<(usize, std::process::ExitStatus)> = None;
    while failure.is_none() && children.iter().any(Option::is_some) {
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait()? {
                *slot = None;
                if !status.success() {
                    failure = Some((rank, status));
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if failure.is_some() {
        kill_all(&mut children);
    }
    for p in pipes {
        let _ = p.join();
    }
    match failure {
        None => Ok(()),
        Some((rank, status)) => {
            eprintln!("launch: rank {rank} failed ({status}); the other ranks were stopped");
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

/// Kills and reaps the ranks still running with everything they started (a shell's or cargo's
/// program would otherwise live on and hold the output pipes open).
fn kill_all(children: &mut [Option<Child>]) {
    // Ranks stay in the launcher's process group so that Ctrl-C reaches them; their descendants
    // are found through /proc instead, before any kill re-parents them.
    let roots: Vec<u32> = children.iter().flatten().map(Child::id).collect();
    for pid in descendants(&roots) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    for child in children.iter_mut().flatten() {
        let _ = child.kill();
    }
    for slot in children.iter_mut() {
        if let Some(mut child) = slot.take() {
            let _ = child.wait();
        }
    }
}

/// Every live descendant of `roots` (Linux /proc; elsewhere none, and only the ranks are killed).
fn descendants(roots: &[u32]) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // The command name may hold spaces and parentheses: the ppid is the second field after
            // the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|v| v.parse::<u32>().ok()) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found: Vec<u32> = Vec::new();
    let mut frontier: Vec<u32> = roots.to_vec();
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parent_of {
            if ppid == p && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_and_refuses() {
        let a = parse(&s(&["--nproc", "3", "--", "prog", "--flag"])).unwrap();
        assert_eq!(
            a,
            Args {
                nproc: 3,
                port: None,
                cmd: s(&["prog", "--flag"])
            }
        );
        assert_eq!(
            parse(&s(&["--nproc", "2", "--master-port", "4000", "--", "x"]))
                .unwrap()
                .port,
            Some(4000)
        );
        for bad in [
            &["--nproc", "0", "--", "x"][..],
            &["--", "x"],
            &["--nproc", "2"],
            &["--nproc", "2", "--"],
            &["--bogus"],
        ] {
            assert!(parse(&s(bad)).is_err(), "{bad:?}");
        }
    }
}
