//! Killing `save_pretrained` at random points: a child process (this test binary re-invoked
//! with `VH_SAVE_KILL_CHILD` set) forks a saver that saves checkpoint A or B of a tiny GPT-2
//! into one folder in a loop, and SIGKILLs it after a random delay the parent draws (seeded). After every kill the folder must hold A or
//! B exactly (every file, byte for byte, and loadable), or, only before the first completed
//! save, not exist; the leftovers of a killed save must be gone once the next save completes.
//!
//! Half the runs use the atomic exchange (`renameat2(RENAME_EXCHANGE)`), half the two-rename
//! fallback, which must be recoverable. `VH_KILL_RUNS` (default 200) and `VH_KILL_SEED` set the
//! number of kills and the seed.

mod common;

use common::{write_tiny_gpt2, write_word_tokenizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use valuehead::{CausalLmWithValueHead, LoadOptions};

/// The environment variable that turns this test binary into the saving child.
const CHILD_ENV: &str = "VH_SAVE_KILL_CHILD";
/// The longest time a saver runs before its kill.
const MAX_WINDOW: Duration = Duration::from_millis(150);
/// Shard size of checkpoint B (A is one file): the folder's file set changes with each save.
const B_SHARD: u64 = 4096;

/// Every file of a folder, name -> bytes.
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// The hidden names beside the target `ckpt` in `root`.
fn hidden(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".ckpt."))
        .collect()
}

/// The source folders of A and B: the same tiny GPT-2 with other weights and configs; A has a
/// generation_config.json and is saved as one file, B has none and is saved in shards.
fn make_sources(root: &Path) -> (PathBuf, PathBuf) {
    let a = root.join("source-a");
    write_tiny_gpt2(&a, json!({"vh_kill_test": "A"}));
    std::fs::write(
        a.join("generation_config.json"),
        r#"{"eos_token_id": 3, "max_new_tokens": 4}"#,
    )
    .unwrap();
    let model = CausalLmWithValueHead::from_folder(&a, &LoadOptions::default()).unwrap();
    tch::no_grad(|| {
        for (_, mut v) in model.var_store().variables() {
            let _ = v.neg_();
        }
    });
    let b = root.join("source-b");
    model.save_pretrained(&b, None).unwrap();
    std::fs::remove_file(b.join("generation_config.json")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("config.json")).unwrap()).unwrap();
    config["vh_kill_test"] = json!("B");
    std::fs::write(b.join("config.json"), config.to_string()).unwrap();
    (a, b)
}

/// Saves `model` as checkpoint A (one file) or B (shards).
fn save(model: &CausalLmWithValueHead, is_a: bool, dir: &Path) {
    model
        .save_pretrained(dir, if is_a { None } else { Some(B_SHARD) })
        .unwrap();
}

/// The child: loads A and B once, says `@@ready`, then for each `run EXCHANGE A_FIRST DELAY_US`
/// line on stdin forks a saver that saves A and B alternately into the target until, after
/// `DELAY_US` microseconds, the child SIGKILLs it; then it says `@@killed SAVES STATUS`.
/// Forking a process per kill spares each run the second it takes to start a process that
/// loads libtorch; the child keeps a single thread (this binary has no test harness, whose
/// threads would run beside it) so that the fork is safe.
fn save_loop_child(spec: &str) {
    let spec: serde_json::Value = serde_json::from_str(spec).unwrap();
    let path = |key: &str| PathBuf::from(spec[key].as_str().unwrap());
    tch::set_num_threads(1);
    let a = CausalLmWithValueHead::from_folder(path("a"), &LoadOptions::default()).unwrap();
    let b = CausalLmWithValueHead::from_folder(path("b"), &LoadOptions::default()).unwrap();
    let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
    assert_eq!(threads, 1, "the child must be single-threaded to fork");
    println!("@@ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let [_run, exchange, a_first, delay_us] = words[..] else {
            return;
        };
        let (exchange, mut is_a) = (exchange == "1", a_first == "1");
        let delay = Duration::from_micros(delay_us.parse().unwrap());
        let mut pipe = [0; 2];
        // SAFETY: pipe2 fills the two descriptors of a fresh pipe.
        assert_eq!(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: this process has a single thread (checked above), so the forked saver holds
        // no lock another thread took; it never returns from this block.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // The saver: one byte on the pipe per completed save; any error exits with 3.
            let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: closing the read end, which the saver does not use.
                unsafe { libc::close(pipe[0]) };
                vh_hub::checkpoint::set_rename_exchange(exchange);
                // Widens the fallback's window between its renames (microseconds otherwise) so
                // that some kills land there and the restore is exercised.
                vh_hub::checkpoint::set_pause_between_renames(Duration::from_millis(3));
                let target = path("target");
                loop {
                    let model = if is_a { &a } else { &b };
                    if let Err(e) = model.save_pretrained(&target, if is_a { None } else { Some(B_SHARD) }) {
                        eprintln!("save failed: {e}");
                        return;
                    }
                    // SAFETY: writes one byte from a live buffer to the pipe's write end.
                    unsafe { libc::write(pipe[1], b"s".as_ptr().cast(), 1) };
                    is_a = !is_a;
                }
            }));
            let _ = saved;
            // SAFETY: leaves at once, running nothing of the parent's (no libtest exit path).
            unsafe { libc::_exit(3) };
        }
        // SAFETY: closing the write end, so reads see EOF once the saver is gone.
        unsafe { libc::close(pipe[1]) };
        std::thread::sleep(delay);
        let mut status = 0;
        // SAFETY: kill and waitpid on the saver this process forked.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
        let mut saves = 0usize;
        let mut buffer = [0u8; 4096];
        loop {
            // SAFETY: reads into a live buffer of the given length.
            let n = unsafe { libc::read(pipe[0], buffer.as_mut_ptr().cast(), buffer.len()) };
            if n <= 0 {
                break;
            }
            saves += n as usize;
        }
        // SAFETY: closing the read end this process owns.
        unsafe { libc::close(pipe[0]) };
        let killed = libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL;
        println!("@@killed {saves} {}", if killed { "killed" } else { "exited" });
    }
}

/// What the parent saw after one kill.
#[derive(Default)]
struct Tally {
    window: Duration,
    kills: usize,
    saves: usize,
    found: BTreeMap<&'static str, usize>,
    left: BTreeMap<&'static str, usize>,
}

/// Which checkpoint `dir`'s files are, or a panic naming the difference.
fn which(dir: &Path, a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>, context: &str) -> &'static str {
    let files = files_of(dir);
    if &files == a {
        "A"
    } else if &files == b {
        "B"
    } else {
        let names: Vec<&String> = files.keys().collect();
        panic!("{context}: the folder is neither A nor B: {names:?}")
    }
}

/// The test's name, for `--list` and name filters.
const TEST_NAME: &str = "killing_save_pretrained_leaves_the_old_or_the_new_checkpoint";

/// Whether the command line (libtest's, as `cargo test` passes it on) selects the test: name
/// filters, `--exact` and `--skip` are honoured, other flags ignored.
fn selected(args: &[String]) -> bool {
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let exact = args.iter().any(|a| a == "--exact");
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--skip" => skips.extend(args.next()),
            "--test-threads" | "--format" | "--color" | "--logfile" | "--shuffle-seed" | "-Z" => {
                args.next();
            }
            flag if flag.starts_with('-') => {}
            filter => filters.push(filter),
        }
    }
    let matches = |f: &str| if exact { f == TEST_NAME } else { TEST_NAME.contains(f) };
    (filters.is_empty() || filters.iter().any(|f| matches(f))) && !skips.iter().any(|s| TEST_NAME.contains(s.as_str()))
}

/// Runs the test, or the child when this binary is re-invoked as one.
fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return save_loop_child(&spec);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{TEST_NAME}: test");
    } else if selected(&args) {
        killing_save_pretrained_leaves_the_old_or_the_new_checkpoint();
        println!("test {TEST_NAME} ... ok");
    } else {
        println!("running 0 tests (filtered out: {TEST_NAME})");
    }
}

fn killing_save_pretrained_leaves_the_old_or_the_new_checkpoint() {
    let runs: usize = std::env::var("VH_KILL_RUNS").map_or(200, |v| v.parse().unwrap());
    let seed: u64 = std::env::var("VH_KILL_SEED").map_or(12, |v| v.parse().unwrap());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let work = tempfile::tempdir().unwrap();
    let (source_a, source_b) = make_sources(work.path());

    // The expected folders, saved by this process with the same code.
    let reference = |source: &Path, is_a: bool| {
        let model = CausalLmWithValueHead::from_folder(source, &LoadOptions::default()).unwrap();
        let dir = work.path().join(if is_a { "ref-a" } else { "ref-b" });
        save(&model, is_a, &dir);
        files_of(&dir)
    };
    let (files_a, files_b) = (reference(&source_a, true), reference(&source_b, false));
    assert_ne!(files_a["config.json"], files_b["config.json"]);
    assert!(files_b.contains_key("model.safetensors.index.json") && !files_b.contains_key("model.safetensors"));

    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(
            CHILD_ENV,
            json!({"a": source_a, "b": source_b, "target": work.path().join("target").join("ckpt")}).to_string(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut commands = child.stdin.take().unwrap();
    let mut replies = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(|l| l.ok())
        .filter(|l| l.starts_with("@@"));
    assert_eq!(replies.next().as_deref(), Some("@@ready"), "the child did not start");
    // Runs the saver for `delay` and returns how many saves it completed before the kill.
    let mut kill_after = |exchange: bool, a_first: bool, delay: Duration| -> usize {
        writeln!(
            commands,
            "run {} {} {}",
            exchange as u8,
            a_first as u8,
            delay.as_micros()
        )
        .unwrap();
        let reply = replies.next().expect("the child ended");
        let words: Vec<&str> = reply.split_whitespace().collect();
        assert_eq!(
            words.get(2),
            Some(&"killed"),
            "the saver was not killed but ended: {reply}"
        );
        words[1].parse().unwrap()
    };

    let start = Instant::now();
    let mut tallies = [Tally::default(), Tally::default()];
    for (mode, exchange) in [(0, true), (1, false)] {
        let root = work.path().join("target");
        if root.exists() {
            std::fs::remove_dir_all(&root).unwrap();
        }
        std::fs::create_dir(&root).unwrap();
        let target = root.join("ckpt");
        let tally = &mut tallies[mode];
        let mut ever_saved = false;
        // The kills spread over about three saves: the time of one is measured here first.
        let probe = Duration::from_millis(300);
        let saves = kill_after(exchange, true, probe).max(1);
        let mut window = (probe / saves as u32 * 3).clamp(Duration::from_millis(2), MAX_WINDOW);
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::create_dir(&root).unwrap();
        for run in 0..runs / 2 {
            let context = format!(
                "{} run {run} (seed {seed})",
                if exchange { "exchange" } else { "fallback" }
            );
            let dead_leftovers = hidden(&root);
            let saves = kill_after(exchange, rng.gen_bool(0.5), window.mul_f64(rng.gen_range(0.0..1.0)));
            tally.kills += 1;
            tally.saves += saves;
            // A save's time varies with the machine's load: the window follows it, so that kills
            // keep landing in the first few saves of each saver.
            // (At most 150 ms, which bounds the test's time on a slow disk.)
            if saves == 0 {
                window = window.mul_f64(1.15).min(MAX_WINDOW);
            } else if saves >= 2 {
                window = window.mul_f64(0.85);
            }
            tally.window = window;

            let left = hidden(&root);
            for (kind, tag) in [("staging", ".saving-"), ("aside", ".old-"), ("trash", ".trash-")] {
                if left.iter().any(|n| n.contains(tag) && !dead_leftovers.contains(n)) {
                    *tally.left.entry(kind).or_default() += 1;
                }
            }
            if saves > 0 {
                let stale: Vec<&String> = dead_leftovers.intersection(&left).collect();
                assert!(
                    stale.is_empty(),
                    "{context}: a completed save left earlier leftovers: {stale:?}"
                );
            }
            ever_saved |= saves > 0;

            // The target: on odd runs of the fallback a missing target is checked through its
            // aside copy and left for the next save to restore; otherwise the load restores it.
            let aside: Vec<&String> = left.iter().filter(|n| n.contains(".old-")).collect();
            if !exchange && run % 2 == 1 && !target.exists() && !aside.is_empty() {
                assert_eq!(aside.len(), 1, "{context}: {aside:?}");
                which(&root.join(aside[0]), &files_a, &files_b, &context);
                *tally.found.entry("missing, aside kept for the next save").or_default() += 1;
                continue;
            }
            let was_missing = !target.exists();
            match vh_hub::ModelFolder::open(&target) {
                Err(vh_hub::HubError::NotFound { .. }) => {
                    assert!(!ever_saved, "{context}: the folder is gone after a completed save");
                    *tally.found.entry("absent (before the first save)").or_default() += 1;
                    continue;
                }
                Err(e) => panic!("{context}: {e}"),
                Ok(folder) => {
                    folder.tensors().unwrap_or_else(|e| panic!("{context}: {e}"));
                }
            }
            let found = which(&target, &files_a, &files_b, &context);
            CausalLmWithValueHead::from_folder(&target, &LoadOptions::default())
                .unwrap_or_else(|e| panic!("{context}: {e}"));
            let key = match (found, was_missing) {
                ("A", false) => "A",
                ("B", false) => "B",
                _ => "missing, restored by the load",
            };
            *tally.found.entry(key).or_default() += 1;
        }

        // One more save that completes: every leftover of the killed ones is gone.
        let keep = target.join("tokenizer.json");
        if target.exists() {
            write_word_tokenizer(&target, 50);
        }
        vh_hub::checkpoint::set_rename_exchange(exchange);
        let model = CausalLmWithValueHead::from_folder(&source_a, &LoadOptions::default()).unwrap();
        save(&model, true, &target);
        vh_hub::checkpoint::set_rename_exchange(true);
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["ckpt"], "leftovers after the final save");
        let mut expected = files_a.clone();
        if keep.exists() {
            expected.insert("tokenizer.json".into(), std::fs::read(&keep).unwrap());
        }
        assert_eq!(files_of(&target), expected);
    }

    for (tally, mode) in tallies.iter().zip(["exchange", "fallback"]) {
        println!(
            "{mode}: {} kills at random points of a window ending at {:.1} ms, {} saves completed ({:.1} per child); \
             folder after the kill: {:?}; kills that left (before tidy-up): {:?}",
            tally.kills,
            tally.window.as_secs_f64() * 1e3,
            tally.saves,
            tally.saves as f64 / tally.kills as f64,
            tally.found,
            tally.left
        );
        // The kills must land inside saves, in both checkpoints' states, or the test proves
        // little.
        assert!(tally.found.get("A").is_some_and(|&n| n > 0) && tally.found.get("B").is_some_and(|&n| n > 0));
        assert!(tally.left.get("staging").is_some_and(|&n| n > 0), "no kill hit a save");
    }
    drop(commands);
    assert!(child.wait().unwrap().success());
    println!("{runs} kills in {:.1} s", start.elapsed().as_secs_f64());
}
