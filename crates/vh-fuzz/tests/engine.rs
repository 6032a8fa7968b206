//! The engine itself: through the `selftest` target, a panic, an abort, a stack overflow, an
//! allocation past the worker's memory cap and a hang must each be reported as a failure and
//! their inputs saved, and the worker must be restarted so that the next input still runs.

use std::process::Command;

#[test]
fn panics_deaths_and_hangs_are_caught_and_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let crashes = tmp.path().join("crashes");
    let names = ["ok", "panic", "abort", "stack", "oom", "hang", "after"];
    let files: Vec<_> = names
        .iter()
        .map(|name| {
            let path = tmp.path().join(name);
            std::fs::write(&path, name.as_bytes()).unwrap();
            path
        })
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vh-fuzz"));
    cmd.args(["selftest", "--hang-seconds", "3", "--mem-mb", "1024", "--crash-dir"])
        .arg(&crashes)
        .arg("--corpus-dir")
        .arg(tmp.path().join("no-corpus"));
    for f in &files {
        cmd.arg("--replay").arg(f);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "failures must fail the command:\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("5 of 7 inputs failed"), "{stderr}");
    let line = |name: &str| {
        let prefix = format!("{}: ", tmp.path().join(name).display());
        stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line for {name}:\n{stdout}"))
            .to_string()
    };
    assert!(line("ok").ends_with(": ok"), "{stdout}");
    assert!(
        line("after").ends_with(": ok"),
        "the worker restarts after a hang:\n{stdout}"
    );
    assert!(line("panic").contains("PANIC selftest panic at"), "{stdout}");
    assert!(line("abort").contains("DIED signal 6 (SIGABRT)"), "{stdout}");
    assert!(line("stack").contains("DIED"), "{stdout}");
    assert!(stdout.contains("overflowed its stack"), "{stdout}");
    assert!(line("oom").contains("DIED"), "{stdout}");
    assert!(stdout.contains("memory allocation of"), "{stdout}");
    assert!(line("hang").contains("HANG"), "{stdout}");
    let saved: Vec<String> = std::fs::read_dir(&crashes)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".txt"))
        .collect();
    assert_eq!(saved.len(), 5, "{saved:?}");
    for name in ["panic", "abort", "stack", "oom", "hang"] {
        let file = format!("selftest-{:016x}", fnv64(name.as_bytes()));
        assert!(saved.contains(&file), "{name}: {saved:?}");
        assert_eq!(std::fs::read(crashes.join(&file)).unwrap(), name.as_bytes());
    }
}

/// The engine's file-name hash (FNV-1a, 64 bits).
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
