//! Regression tests for hostile inputs (issue 12): each builds the input an adversary would
//! give and checks that the library or `vh` answers with a typed error (or a documented, safe
//! behaviour), never a crash, a hang, silent garbage or a write where it must not write.

mod common;

use common::{write_tiny_gpt2, write_tiny_llama, write_tiny_t5};
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
use valuehead::{CausalLmWithValueHead, Error, GenerationConfig, LoadOptions, ValueHeadModel};

fn vh() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vh"));
    cmd.env("OMP_NUM_THREADS", "1").env("HF_HUB_OFFLINE", "1");
    cmd
}

/// Runs `cmd` with a deadline; a command still running then is killed and the test fails (a
/// hang is a defect too).
fn run_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting vh");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("waiting for vh").is_some() {
            return child.wait_with_output().expect("vh output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("vh output");
            panic!(
                "vh did not finish within {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A clean failure: exit code 1 with a message, no panic, no signal.
fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean error, got {:?}:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "expected `{needle}` in:\n{stderr}"
    );
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

fn write_inputs(path: &Path, tensors: &[(&str, Tensor)]) {
    let named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.shallow_clone()))
        .collect();
    vh_hub::write_safetensors(path, &named).unwrap();
}

/// Row 4: `--out` never replaces a device node, a FIFO or a folder, and never an input.
#[test]
fn outputs_never_replace_devices_fifos_or_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_gpt2(&model, json!({}));
    let inputs = dir.path().join("in.safetensors");
    write_inputs(&inputs, &[("input_ids", Tensor::from_slice2(&[[1i64, 2, 3]]))]);
    let weights = model.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (fifo.clone(), "FIFO"),
        (dir.path().to_path_buf(), "folder"),
        (weights.clone(), "is the input"),
        (dir.path().join("model/./model.safetensors"), "is the input"),
        (inputs.clone(), "is the input"),
    ];
    for (out, needle) in cases {
        let mut cmd = vh();
        cmd.args(["forward", "--model"])
            .arg(&model)
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(&out);
        assert_clean_error(&run_within(cmd, Duration::from_secs(60)), needle);
    }
    // A symlink to the weights counts as the weights.
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&weights, &link).unwrap();
    let mut cmd = vh();
    cmd.args(["generate", "--model"])
        .arg(&model)
        .arg("--inputs")
        .arg(&inputs)
        .args(["--max-new-tokens", "2", "--out"])
        .arg(&link);
    assert_clean_error(&run_within(cmd, Duration::from_secs(60)), "is the input");
    assert_eq!(std::fs::read(&weights).unwrap(), before, "the checkpoint is untouched");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo_like());
    // The library's writers refuse device nodes too (as root, renaming over /dev/null would
    // replace the device).
    let err = vh_hub::write_safetensors(Path::new("/dev/null"), &[]).unwrap_err();
    assert!(matches!(err, vh_hub::HubError::NotRegularFile { .. }), "{err}");
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

/// Row 14: a FIFO or a device as config.json, index, tokenizer or template is refused at once.
#[test]
fn fifos_and_devices_as_model_files_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "chat_template.jinja",
    ] {
        let model = dir.path().join(file.replace('.', "_"));
        write_tiny_gpt2(&model, json!({}));
        if file == "model.safetensors.index.json" {
            std::fs::remove_file(model.join("model.safetensors")).unwrap();
        }
        let target = model.join(file);
        let _ = std::fs::remove_file(&target);
        mkfifo(&target);
        let mut cmd = vh();
        cmd.args(["generate", "--model"])
            .arg(&model)
            .args(["--max-new-tokens", "2"]);
        if file == "chat_template.jinja" {
            common::write_word_tokenizer(&model, 50);
            cmd.args(["--chat", "--prompt", "w1 w2"]);
        } else if file == "tokenizer.json" {
            cmd.args(["--prompt", "w1 w2"]);
        } else {
            let inputs = dir.path().join("in.safetensors");
            write_inputs(&inputs, &[("input_ids", Tensor::from_slice2(&[[1i64, 2]]))]);
            cmd.arg("--inputs").arg(&inputs);
        }
        assert_clean_error(&run_within(cmd, Duration::from_secs(60)), "not a regular file");
        // /dev/zero never ends: refused the same way, never read.
        std::fs::remove_file(&target).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &target).unwrap();
        let err = vh_hub::files::read_capped(&target, 1 << 20).unwrap_err();
        assert!(matches!(err, vh_hub::HubError::NotRegularFile { .. }), "{err}");
    }
}

/// Row 14: a chat template that loops 10^10 times ends with an error.
#[test]
fn endless_chat_templates_run_out_of_fuel() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    )
    .unwrap();
    let start = Instant::now();
    let err = valuehead::apply_chat_template(dir.path(), &[valuehead::Message::user("hi")], true).unwrap_err();
    assert!(err.to_string().contains("fuel"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
    // A real template renders well within the fuel.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    )
    .unwrap();
    let messages: Vec<_> = (0..1000).map(|i| valuehead::Message::user(format!("m{i}"))).collect();
    let text = valuehead::apply_chat_template(dir.path(), &messages, true).unwrap();
    assert!(text.ends_with("<user>m999<assistant>"));
}

/// Row 11: config sizes far beyond the weights are refused before anything of their size is
/// allocated, with a typed error naming the tensor, not libtorch's text.
#[test]
fn config_sizes_beyond_the_checkpoint_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_tiny_llama(&model, json!({}));
    // Llama's defaults: a 7-billion-parameter model beside a few-KB checkpoint.
    std::fs::write(model.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let rss_before = rss_kib();
    let err = CausalLmWithValueHead::from_folder(&model, &LoadOptions::default()).unwrap_err();
    // Refused either by the placeholder cap (32 layers cannot come from a 2-layer checkpoint)
    // or by the first shape compared: both before anything of the config's size exists.
    let refused = |e: &Error| {
        matches!(
            e,
            Error::Model(vh_core::Error::TensorShape { .. }) | Error::Model(vh_core::Error::Config(_))
        )
    };
    assert!(refused(&err), "{err}");
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 512 * 1024, "loading grew the process by {grown} KiB");
    // n_embd = 10^9 for GPT-2: the same, and no 4 GB value head either.
    let gpt2 = dir.path().join("g");
    write_tiny_gpt2(&gpt2, json!({}));
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gpt2.join("config.json")).unwrap()).unwrap();
    config["n_embd"] = json!(1_000_000_000i64);
    config["n_head"] = json!(1);
    std::fs::write(gpt2.join("config.json"), config.to_string()).unwrap();
    let err = CausalLmWithValueHead::from_folder(&gpt2, &LoadOptions::default()).unwrap_err();
    assert!(refused(&err), "{err}");
    // A value-head width that no backbone tensor has (word_embed_proj_dim).
    write_tiny_gpt2(&gpt2, json!({"word_embed_proj_dim": 1_000_000_000i64}));
    let contents = vh_hub::ModelFolder::open(&gpt2).unwrap();
    let tensors: Vec<_> = contents
        .tensors()
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("v_head."))
        .collect();
    let err =
        CausalLmWithValueHead::from_parts(contents.config().unwrap(), tensors, &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("value head's width"), "{err}");
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 512 * 1024, "loading grew the process by {grown} KiB");
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Row 12: integer or boolean tensors where float weights belong are refused, as torch does.
#[test]
fn integer_and_bool_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_tiny_gpt2(&model, json!({}));
    let weights = model.join("model.safetensors");
    let tensors = vh_hub::read_safetensors(&weights).unwrap();
    for kind in [Kind::Int64, Kind::Bool, Kind::Int] {
        let changed: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| {
                let t = if n == "transformer.wte.weight" {
                    t.to_kind(kind)
                } else {
                    t.shallow_clone()
                };
                (n.clone(), t)
            })
            .collect();
        vh_hub::write_safetensors(&weights, &changed).unwrap();
        let err = CausalLmWithValueHead::from_folder(&model, &LoadOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Model(vh_core::Error::TensorKind { name, .. }) if name == "transformer.wte.weight"),
            "{kind:?}: {err}"
        );
    }
}

/// Row 13: negative (or infinite) epsilons are config errors, not NaN outputs.
#[test]
fn negative_epsilons_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (write, key) in [
        (write_tiny_gpt2 as fn(&Path, serde_json::Value), "layer_norm_epsilon"),
        (write_tiny_llama, "rms_norm_eps"),
        (write_tiny_t5, "layer_norm_epsilon"),
    ] {
        let model = dir.path().join(key);
        write(&model, json!({}));
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
        config[key] = json!(-1e-5);
        std::fs::write(model.join("config.json"), config.to_string()).unwrap();
        let err = ValueHeadModel::from_folder(&model, &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Model(vh_core::Error::Config(_))), "{key}: {err}");
        assert!(err.to_string().contains(key), "{err}");
    }
}

/// Row 10: `max_new_tokens` of 2^63 - 1 is refused at once on every architecture (GPT-2 by its
/// position limit, Llama and T5 by the memory their cache would need).
#[test]
fn absurd_generation_lengths_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for (name, write) in [
        ("gpt2", write_tiny_gpt2 as fn(&Path, serde_json::Value)),
        ("llama", write_tiny_llama),
        ("t5", write_tiny_t5),
    ] {
        let model_dir = dir.path().join(name);
        write(&model_dir, json!({}));
        let model = ValueHeadModel::from_folder(&model_dir, &LoadOptions::default()).unwrap();
        let ids = Tensor::from_slice2(&[[1i64, 2, 3]]);
        for max_new in [usize::MAX, i64::MAX as usize, 1usize << 50] {
            let config = GenerationConfig {
                max_new_tokens: Some(max_new),
                ..Default::default()
            };
            let start = Instant::now();
            let err = tch::no_grad(|| model.generate(&ids, None, &config)).unwrap_err();
            assert!(
                matches!(err, Error::InvalidOption(_) | Error::Model(_)),
                "{name}: {err}"
            );
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name} {max_new}: {:?}",
                start.elapsed()
            );
        }
        let mut cmd = vh();
        let inputs = dir.path().join("in.safetensors");
        write_inputs(&inputs, &[("input_ids", Tensor::from_slice2(&[[1i64, 2, 3]]))]);
        cmd.args(["generate", "--model"])
            .arg(&model_dir)
            .arg("--inputs")
            .arg(&inputs)
            .args(["--max-new-tokens", "9223372036854775807"]);
        let out = run_within(cmd, Duration::from_secs(60));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Row 15: uint8 ids are accepted like any integer ids; T5's generate refuses decoder ids it
/// would ignore.
#[test]
fn uint8_ids_work_and_ignored_inputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("g");
    write_tiny_gpt2(&model_dir, json!({}));
    let model = CausalLmWithValueHead::from_folder(&model_dir, &LoadOptions::default()).unwrap();
    let ids = Tensor::from_slice2(&[[1i64, 7, 3]]);
    let a = tch::no_grad(|| model.forward(&ids, None, None, None)).unwrap();
    let b = tch::no_grad(|| model.forward(&ids.to_kind(Kind::Uint8), None, None, None)).unwrap();
    assert!(a.logits.equal(&b.logits) && a.values.equal(&b.values));
    let config = GenerationConfig {
        max_new_tokens: Some(3),
        repetition_penalty: 1.3,
        ..Default::default()
    };
    let g1 = tch::no_grad(|| model.generate(&ids, None, &config)).unwrap();
    let g2 = tch::no_grad(|| model.generate(&ids.to_kind(Kind::Uint8), None, &config)).unwrap();
    assert!(g1.sequences.equal(&g2.sequences));

    // T5's generate continues decoder_input_ids as HF's does (it used to ignore them); a
    // decoder-only model refuses them instead of ignoring them.
    let t5 = dir.path().join("t5");
    write_tiny_t5(&t5, json!({}));
    let inputs = dir.path().join("in.safetensors");
    write_inputs(
        &inputs,
        &[
            ("input_ids", Tensor::from_slice2(&[[1i64, 2, 3]])),
            ("decoder_input_ids", Tensor::from_slice2(&[[0i64, 5]])),
        ],
    );
    let out = dir.path().join("out.safetensors");
    let mut cmd = vh();
    cmd.args(["generate", "--model"])
        .arg(&t5)
        .arg("--inputs")
        .arg(&inputs)
        .args(["--max-new-tokens", "2", "--out"])
        .arg(&out);
    let result = run_within(cmd, Duration::from_secs(60));
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let written = vh_hub::read_safetensors(&out).unwrap();
    let sequences = &written.iter().find(|(n, _)| n == "sequences").unwrap().1;
    assert_eq!(
        Vec::<i64>::try_from(sequences.narrow(1, 0, 2).reshape([-1])).unwrap(),
        vec![0, 5]
    );
    assert_eq!(sequences.size(), vec![1, 4]);
    let mut cmd = vh();
    cmd.args(["generate", "--model"])
        .arg(&model_dir)
        .arg("--inputs")
        .arg(&inputs)
        .args(["--max-new-tokens", "2"]);
    assert_clean_error(&run_within(cmd, Duration::from_secs(60)), "decoder-only");
}

/// Row 8: an allocation that fails inside a forward (T5 over 5,000 encoder tokens under a memory
/// limit) is an error and a clean exit, not a panic or a hang.
#[test]
fn allocation_failures_in_a_forward_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("t5");
    write_tiny_t5(&model, json!({"num_heads": 8}));
    let inputs = dir.path().join("in.safetensors");
    let ids = Tensor::randint(30, [1, 5000], (Kind::Int64, tch::Device::Cpu));
    write_inputs(
        &inputs,
        &[
            ("input_ids", ids),
            ("decoder_input_ids", Tensor::from_slice2(&[[0i64, 5]])),
        ],
    );
    let out_file = dir.path().join("out.safetensors");
    let mut cmd = vh();
    cmd.args(["forward", "--model"])
        .arg(&model)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--out")
        .arg(&out_file);
    // Each [8, 5000, 5000] f32 score tensor is 800 MB; the data segment may grow by 256 MB
    // beyond what starting vh needs.
    let limit: u64 = 256 << 20;
    // SAFETY: only async-signal-safe calls (getrlimit/setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut current = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_DATA, &mut current);
            let cap = libc::rlimit {
                rlim_cur: data_segment_baseline() + limit,
                rlim_max: current.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &cap) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run_within(cmd, Duration::from_secs(120));
    assert_clean_error(&out, "allocate");
    assert!(!out_file.exists());
}

/// The data segment a `vh` process needs before it runs a model (its libraries' writable
/// mappings and libtorch's start-up allocations): seen at about 0.75 GiB with a debug build.
fn data_segment_baseline() -> u64 {
    1 << 30
}
