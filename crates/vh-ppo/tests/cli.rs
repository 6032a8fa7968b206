//! `vh-ppo` (what `vh ppo` runs): JSON lines off a terminal, Ctrl-C saves a checkpoint that
//! `--resume` continues with exactly the steps an uninterrupted run takes, and bad input fails
//! with a clear message before the model is trained.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const EXE: &str = env!("CARGO_BIN_EXE_vh-ppo");

/// A tiny GPT-2 with a word-level tokenizer (`w0` .. `w49`) and a prompts file.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    common::write_tiny_gpt2(
        &model,
        serde_json::json!({"n_positions": 32, "n_embd": 32, "pad_token_id": 0, "eos_token_id": 1}),
    );
    common::write_word_tokenizer(&model, 50);
    let prompts = dir.join("prompts.txt");
    let lines: Vec<String> = (0..8).map(|i| format!("w{} w{} w{}", 2 + i, 10 + i, 20 + i)).collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    (model, prompts)
}

fn base_args(model: &Path, prompts: &Path, out: &Path) -> Vec<String> {
    [
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--reward-word",
        "w7",
        "--steps",
        "40",
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "4",
        "--num-mini-batches",
        "2",
        "--response-length",
        "8",
        "--learning-rate",
        "1e-3",
        "--threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The statistics of each JSON line without `eps` (a clock reading).
fn steps(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"));
            v.as_object_mut().unwrap().remove("eps");
            v
        })
        .collect()
}

fn run(args: &[String]) -> Output {
    Command::new(EXE).args(args).output().unwrap()
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes_to_the_same_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, prompts) = setup(tmp.path());
    let straight = run(&base_args(&model, &prompts, &tmp.path().join("straight")));
    assert!(
        straight.status.success(),
        "{}",
        String::from_utf8_lossy(&straight.stderr)
    );
    let straight = steps(&String::from_utf8(straight.stdout).unwrap());
    assert_eq!(straight.len(), 40);
    assert!(tmp.path().join("straight/model/config.json").exists());
    assert!(tmp.path().join("straight/model/tokenizer.json").exists());

    let out = tmp.path().join("interrupted");
    let mut child = Command::new(EXE)
        .args(base_args(&model, &prompts, &out))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    // SAFETY: signalling our own child by its pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "the run was not interrupted: {stderr}");
    assert!(stderr.contains("checkpoint saved"), "{stderr}");
    let before = steps(&(first + &rest));
    assert!(!before.is_empty() && before.len() < 40);
    assert_eq!(before, straight[..before.len()]);

    let mut args = base_args(&model, &prompts, &tmp.path().join("resumed"));
    args.extend([
        "--resume".to_string(),
        out.join("checkpoint").to_str().unwrap().to_string(),
    ]);
    let resumed = run(&args);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let after = steps(&String::from_utf8(resumed.stdout).unwrap());
    assert_eq!(before.len() + after.len(), 40);
    assert_eq!(
        after,
        straight[before.len()..],
        "the resumed steps differ from the uninterrupted run's"
    );
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, prompts) = setup(tmp.path());
    let out = tmp.path().join("out");
    let fails = |args: Vec<String>, needle: &str| {
        let o = run(&args);
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "succeeded: {args:?}");
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
        assert!(!out.join("model").exists(), "a model was written by a failed run");
    };
    let with_prompts = |file: &Path| {
        let mut a = base_args(&model, file, &out);
        a[3] = file.to_str().unwrap().to_string();
        a
    };
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    fails(with_prompts(&empty), "no prompts");
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"w1 w2\ncaf\xe9\n").unwrap();
    fails(with_prompts(&latin1), "not UTF-8 (line 2");
    let long = tmp.path().join("long.txt");
    std::fs::write(&long, vec!["w3 ".repeat(30); 8].join("\n")).unwrap();
    fails(with_prompts(&long), "exceeds the model's 32 positions");
    let mut odd = base_args(&model, &prompts, &out);
    let at = odd.iter().position(|a| a == "--num-mini-batches").unwrap() + 1;
    odd[at] = "3".into();
    fails(odd, "multiple of `num_mini_batches`");

    // A reward model whose tokenizer has another vocabulary.
    let rm = tmp.path().join("rm");
    common::write_tiny_gpt2(
        &rm,
        serde_json::json!({"n_embd": 32, "pad_token_id": 0, "architectures": ["GPT2ForSequenceClassification"]}),
    );
    common::write_word_tokenizer(&rm, 49);
    let mut args = base_args(&model, &prompts, &out);
    let i = args.iter().position(|a| a == "--reward-word").unwrap();
    args[i] = "--reward-model".into();
    args[i + 1] = rm.to_str().unwrap().into();
    fails(args, "another vocabulary");
}

#[test]
fn lora_flags_train_an_adapter_and_save_it_in_peft_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, prompts) = setup(tmp.path());
    let out = tmp.path().join("lora");
    let mut args = base_args(&model, &prompts, &out);
    let at = args.iter().position(|a| a == "40").unwrap();
    args[at] = "3".into();
    args.extend(
        [
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lora-target-modules",
            "c_attn,c_fc",
        ]
        .map(String::from),
    );
    let output = run(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(steps(&String::from_utf8_lossy(&output.stdout)).len(), 3);
    // The saved policy is a peft adapter folder (with TRL's value head beside it) naming its base.
    let saved = out.join("model");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 4);
    let files: Vec<String> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.contains(&"adapter_model.safetensors".to_string()), "{files:?}");
    let loaded =
        valuehead::CausalLmWithValueHead::from_adapter_folder(&saved, &valuehead::LoadOptions::default()).unwrap();
    let mut adapted = loaded.adapted_modules();
    adapted.sort();
    assert!(
        adapted.iter().all(|m| m.ends_with("c_attn") || m.ends_with("c_fc")),
        "{adapted:?}"
    );
    assert!(!out.join("checkpoint/reference").exists());

    // An existing adapter folder trains further with --adapter; rank 0 is refused clearly.
    let mut again = base_args(&model, &prompts, &tmp.path().join("again"));
    let at = again.iter().position(|a| a == "40").unwrap();
    again[at] = "1".into();
    again.extend(["--adapter".to_string(), saved.to_str().unwrap().to_string()]);
    let output = run(&again);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut zero = base_args(&model, &prompts, &tmp.path().join("zero"));
    zero.extend(["--lora-r", "0"].map(String::from));
    let output = run(&zero);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`r` must be positive"), "{stderr}");
}

#[test]
fn two_ranks_under_torchrun_variables_train_one_model_and_rank_0_reports_and_saves() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, prompts) = setup(tmp.path());
    let out = tmp.path().join("dp");
    let mut args = base_args(&model, &prompts, &out);
    let at = args.iter().position(|a| a == "40").unwrap();
    args[at] = "3".into();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ranks: Vec<std::process::Child> = (0..2)
        .map(|rank| {
            Command::new(EXE)
                .args(&args)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("VH_DIST_TIMEOUT_S", "60")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (rank, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {rank}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Rank 0 reports each iteration; the episodes count both ranks' 4 rollouts.
    let lines = steps(&String::from_utf8_lossy(&outputs[0].stdout));
    assert_eq!(lines.len(), 3);
    let episodes: Vec<f64> = lines.iter().map(|l| l["episode"].as_f64().unwrap()).collect();
    assert_eq!(episodes, [8.0, 16.0, 24.0]);
    assert!(
        outputs[1].stdout.is_empty(),
        "rank 1 printed: {}",
        String::from_utf8_lossy(&outputs[1].stdout)
    );
    assert!(out.join("model/config.json").exists());
    assert!(out.join("checkpoint/trainer_state.json").exists());
}
