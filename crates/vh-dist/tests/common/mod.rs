//! Multi-process test harness: a test re-runs its own binary as N ranks with torchrun's
//! variables, and the copy that sees `VH_DIST_TEST_CHILD` runs the rank's body.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Set in the children; its presence selects the rank's body over the spawning parent.
pub const CHILD: &str = "VH_DIST_TEST_CHILD";

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether this process is one of the spawned ranks.
pub fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Command that re-runs exactly `test` of this binary as rank `rank` of `world`.
pub fn rank_command(test: &str, rank: usize, world: usize, port: u16, timeout_s: u64) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("VH_DIST_TIMEOUT_S", timeout_s.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for every child, killing all of them past `deadline`; returns their outputs.
pub fn wait_all(children: Vec<Child>, deadline: Duration) -> Vec<Output> {
    let start = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    loop {
        let running = children
            .iter_mut()
            .flatten()
            .any(|c| c.try_wait().map(|s| s.is_none()).unwrap_or(false));
        if !running {
            break;
        }
        if start.elapsed() > deadline {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .iter_mut()
        .map(|c| c.take().unwrap().wait_with_output().unwrap())
        .collect()
}

/// Runs `test` as `world` ranks and fails unless each exits as `expect(rank)` says.
pub fn spawn_ranks_expect(test: &str, world: usize, timeout_s: u64, expect: impl Fn(usize) -> i32) -> Vec<Output> {
    let port = free_port();
    let children: Vec<Child> = (0..world)
        .map(|r| rank_command(test, r, world, port, timeout_s).spawn().unwrap())
        .collect();
    let outs = wait_all(children, Duration::from_secs(timeout_s * 4 + 60));
    let mut ok = true;
    for (r, o) in outs.iter().enumerate() {
        if o.status.code() != Some(expect(r)) {
            ok = false;
        }
    }
    if !ok {
        for (r, o) in outs.iter().enumerate() {
            eprintln!(
                "---- rank {r}: {}\nstdout:\n{}\nstderr:\n{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        panic!("{test}: ranks did not exit as expected");
    }
    outs
}

/// Runs `test` as `world` ranks that must all succeed.
pub fn spawn_ranks(test: &str, world: usize) -> Vec<Output> {
    spawn_ranks_expect(test, world, 60, |_| 0)
}
