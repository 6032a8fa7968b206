//! Helpers shared by the cross-crate and Python-parity tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Kind, Tensor};

/// The absolute tolerance of every f32 parity comparison.
pub const TOLERANCE: f64 = 1e-4;

mod reference;
#[allow(unused_imports)] // not every test file runs a reference script
pub use reference::*;

/// One reference case: a model folder with inputs.safetensors and expected.safetensors.
pub struct Case {
    /// The case's name.
    pub name: String,
    /// The checkpoint has no value head, so values are not comparable.
    pub fresh_v_head: bool,
    /// Whether incremental decoding can be compared with the full pass (false where the model,
    /// like HF's, recomputes positions per sequence length).
    pub incremental: bool,
    /// The case's folder.
    pub dir: PathBuf,
    /// How far transformers' own sdpa attention is from its eager attention on this case
    /// (GPT-2 only; see docs/parity.md), when the reference recorded it.
    pub hf_sdpa_vs_eager: Option<f64>,
}

/// The cases listed in a reference folder's cases.json.
pub fn read_cases(root: &Path) -> Vec<Case> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("cases.json")).expect("cases.json")).unwrap();
    manifest
        .as_array()
        .expect("a list of cases")
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            Case {
                dir: root.join(&name),
                fresh_v_head: c["fresh_v_head"].as_bool().unwrap(),
                incremental: c
                    .get("incremental")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(true),
                hf_sdpa_vs_eager: c.get("hf_sdpa_vs_eager").and_then(serde_json::Value::as_f64),
                name,
            }
        })
        .collect()
}

/// Formats an error for the parity tables.
pub fn fmt_err(err: f64) -> String {
    format!("{err:.2e}")
}

/// Runs `vh forward` on a case's inputs and returns its outputs. One intra-op thread: with two
/// threads on a loaded 2-core machine, libtorch's CPU kernels were seen to split work
/// differently and drift by ~1e-4 from the reference; one thread is reproducible.
pub fn vh_forward(case: &Case, out_dir: &Path) -> HashMap<String, Tensor> {
    vh_forward_file(case, &case.dir.join("inputs.safetensors"), out_dir, "")
}

/// Runs `vh forward` on a case's model with the input file `inputs`, writing into `out_dir`
/// under the case's name plus `suffix`, and returns its outputs.
pub fn vh_forward_file(case: &Case, inputs: &Path, out_dir: &Path, suffix: &str) -> HashMap<String, Tensor> {
    let out = out_dir.join(format!("{}{suffix}.safetensors", case.name));
    let result = Command::new(env!("CARGO_BIN_EXE_vh"))
        .env("OMP_NUM_THREADS", "1")
        .args(["forward", "--model"])
        .arg(&case.dir)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("starting vh");
    assert!(
        result.status.success(),
        "{}: {}",
        case.name,
        String::from_utf8_lossy(&result.stderr)
    );
    read_tensors(&out)
}

/// Reads a safetensors file into a name -> tensor map.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    vh_hub::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// The largest |a - b| over the [batch, seq] positions where `mask` is 1 (trailing dimensions
/// compared whole).
pub fn masked_max_abs_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs();
    let mut keep = mask.ne(0);
    while keep.dim() < diff.dim() {
        keep = keep.unsqueeze(-1);
    }
    let diff = diff.masked_fill(&keep.logical_not(), 0.0);
    diff.max().double_value(&[])
}

/// The largest |a - b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Prints a table with a header row; columns padded to their widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!("{}", line(header.iter().map(|s| s.to_string()).collect()));
    println!(
        "{}",
        widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-|-")
    );
    for row in rows {
        println!("{}", line(row.clone()));
    }
}

/// Deterministic noise, uniform in [-scale, scale), from a hash of the element index and `seed`:
/// unlike the global RNG, it gives the same checkpoint when tests run in parallel threads.
pub fn pseudo_random(size: &[i64], seed: f64, scale: f64) -> Tensor {
    let n: i64 = size.iter().product();
    let x = Tensor::arange(n, (Kind::Double, tch::Device::Cpu)) * 12.9898 + seed * 78.233;
    let uniform = (x.sin() * 43758.5453).frac().abs();
    ((uniform * 2.0 - 1.0) * scale).to_kind(Kind::Float).reshape(size)
}

/// Writes config.json and a model.safetensors holding random values for every variable of
/// `vs` plus a value head of width `hidden`.
fn write_random_checkpoint(dir: &Path, cfg: &serde_json::Value, vs: &tch::nn::VarStore, hidden: i64) {
    let mut names: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, v)| (n, v.size())).collect();
    names.sort();
    let mut tensors: Vec<(String, Tensor)> = names
        .into_iter()
        .enumerate()
        .map(|(i, (n, size))| (n, pseudo_random(&size, i as f64, 0.35)))
        .collect();
    tensors.push(("v_head.summary.weight".into(), pseudo_random(&[1, hidden], 1000.0, 1.7)));
    tensors.push((
        "v_head.summary.bias".into(),
        Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
    ));
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(cfg).unwrap()).unwrap();
    vh_hub::write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
}

/// Writes a small random checkpoint of `model_type` (config.json + model.safetensors with a
/// value head) into `dir`: the registry's tiny config with `overrides` on top, every parameter
/// the registry's builder creates filled with deterministic noise.
pub fn write_tiny(model_type: &str, dir: &Path, overrides: serde_json::Value) {
    let arch = vh_models::architecture(model_type).unwrap_or_else(|| panic!("no architecture {model_type}"));
    let mut cfg = (arch.tiny_config)();
    for (k, v) in overrides.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let model_type = cfg["model_type"].as_str().unwrap().to_string();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let options = vh_models::BuildOptions::default();
    let hidden = match vh_models::architecture(&model_type).unwrap().family {
        vh_models::Family::Causal(build) => build(vs.root(), &cfg, &options).unwrap().hidden_size(),
        vh_models::Family::Seq2Seq(build) => build(vs.root(), &cfg, &options).unwrap().hidden_size(),
    };
    write_random_checkpoint(dir, &cfg, &vs, hidden);
}

/// [`write_tiny`] for GPT-2.
pub fn write_tiny_gpt2(dir: &Path, config: serde_json::Value) {
    write_tiny("gpt2", dir, config);
}

/// [`write_tiny`] for the Llama family (a `model_type` override picks Qwen2).
pub fn write_tiny_llama(dir: &Path, config: serde_json::Value) {
    write_tiny("llama", dir, config);
}

/// [`write_tiny`] for T5.
pub fn write_tiny_t5(dir: &Path, config: serde_json::Value) {
    write_tiny("t5", dir, config);
}

/// Writes a word-level tokenizer.json into `dir` whose vocabulary is `w0`, `w1`, ... (`size`
/// words, `w0` doubling as the unknown token).
pub fn write_word_tokenizer(dir: &Path, size: u32) {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab: HashMap<String, u32> = (0..size).map(|i| (format!("w{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("w0".into())
        .build()
        .unwrap();
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
}

/// Tokens fed in the first pass of the incremental checks; the rest go one at a time.
pub const PROMPT_LEN: i64 = 6;

/// Loads each causal case with `CausalLmWithValueHead` and compares logits and values (at
/// attended positions) and the loss with TRL's, for the full pass and, where the case allows,
/// for incremental decoding through the cache; prints the table and fails on any error above
/// [`TOLERANCE`].
/// Load options with HF's eager attention: the Python references are computed with it, so the
/// comparison is like for like (the default, fused attention is checked alongside).
pub fn eager() -> valuehead::LoadOptions {
    valuehead::LoadOptions {
        attn_implementation: Some(valuehead::AttnImplementation::Eager),
        ..Default::default()
    }
}

/// Loads each causal case with `CausalLmWithValueHead` and compares with TRL: the call users
/// make (`forward(ids, mask, None, labels)`, no position ids) against TRL's default call at every
/// position, padding included (the loss reads the logits at the last left pad); the same call
/// through the cache, one token at a time; the explicit call with HF generate's mask-derived
/// position ids against TRL's with the same ids; and the fused attention (sdpa) on the default
/// call. Prints the table and fails on any error above [`TOLERANCE`].
pub fn check_causal_cases(title: &str, cases: Vec<Case>) {
    use valuehead::{CausalLmInput, CausalLmWithValueHead, LoadOptions};
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let mut zero = 0;
    let count = cases.len();
    for case in cases {
        let model =
            CausalLmWithValueHead::from_folder(&case.dir, &eager()).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let sdpa = LoadOptions {
            attn_implementation: Some(valuehead::AttnImplementation::Sdpa),
            ..Default::default()
        };
        let fused =
            CausalLmWithValueHead::from_folder(&case.dir, &sdpa).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let inputs = read_tensors(&case.dir.join("inputs.safetensors"));
        let positions = read_tensors(&case.dir.join("position_ids.safetensors"));
        let expected = read_tensors(&case.dir.join("expected.safetensors"));
        let (ids, mask, labels) = (&inputs["input_ids"], &inputs["attention_mask"], &inputs["labels"]);
        // Outputs against a reference at every position: (logits, values unless the head is fresh, loss).
        let compare = |out: &valuehead::CausalLmOutput, suffix: &str| -> f64 {
            let mut err = max_abs_diff(&out.logits, &expected[&format!("logits{suffix}")]).max(max_abs_diff(
                out.loss.as_ref().unwrap(),
                &expected[&format!("loss{suffix}")],
            ));
            if !case.fresh_v_head {
                err = err.max(max_abs_diff(&out.values, &expected[&format!("values{suffix}")]));
            }
            err
        };
        // The default call, exactly as a TRL user writes it.
        let out = tch::no_grad(|| model.forward(ids, Some(mask), None, Some(labels))).unwrap();
        let default_err = compare(&out, "");
        // Explicit (mask-derived) position ids, both sides.
        let explicit = CausalLmInput::new(ids)
            .attention_mask(mask)
            .position_ids(&positions["position_ids"])
            .labels(labels);
        let out_explicit = tch::no_grad(|| model.forward_with(&explicit)).unwrap();
        let explicit_err = compare(&out_explicit, "_explicit");
        // The fused attention (sdpa) on the default call, against the same eager reference.
        let fused_out = tch::no_grad(|| fused.forward(ids, Some(mask), None, Some(labels))).unwrap();
        let sdpa_err = compare(&fused_out, "");

        // Incremental decoding with the default call: the prompt, then one token at a time,
        // compared at attended positions. A padding query whose keys are all padding attends
        // uniformly to every key its pass can see: with Llama's mask (the minimum, not -inf, on
        // future keys) that includes the future keys of a full pass, which an incremental pass
        // does not have, so HF's own full and incremental passes differ there too.
        let step_err = case.incremental.then(|| {
            let seq = ids.size()[1];
            let prompt_mask = mask.narrow(1, 0, PROMPT_LEN);
            let first =
                tch::no_grad(|| model.forward(&ids.narrow(1, 0, PROMPT_LEN), Some(&prompt_mask), None, None)).unwrap();
            let mut err = masked_max_abs_diff(
                &first.logits,
                &expected["logits"].narrow(1, 0, PROMPT_LEN),
                &prompt_mask,
            );
            let mut past = first.past;
            for t in PROMPT_LEN..seq {
                let step_mask = mask.narrow(1, 0, t + 1);
                let step =
                    tch::no_grad(|| model.forward(&ids.narrow(1, t, 1), Some(&step_mask), Some(&past), None)).unwrap();
                let query = mask.narrow(1, t, 1);
                err = err.max(masked_max_abs_diff(
                    &step.logits,
                    &expected["logits"].narrow(1, t, 1),
                    &query,
                ));
                if !case.fresh_v_head {
                    err = err.max(masked_max_abs_diff(
                        &step.values,
                        &expected["values"].narrow(1, t, 1),
                        &query,
                    ));
                }
                past = step.past;
            }
            assert_eq!(past.seq_len(), seq);
            err
        });

        let worst = [default_err, explicit_err, step_err.unwrap_or(0.0), sdpa_err]
            .into_iter()
            .fold(0.0, f64::max);
        if default_err == 0.0 {
            zero += 1;
        }
        let ok = worst <= TOLERANCE;
        if !ok {
            failures.push(case.name.clone());
        }
        rows.push(vec![
            case.name.clone(),
            fmt_err(default_err),
            step_err.map_or("n/a (see docs)".to_string(), fmt_err),
            fmt_err(explicit_err),
            fmt_err(sdpa_err),
            case.hf_sdpa_vs_eager.map_or("-".to_string(), fmt_err),
            if case.fresh_v_head {
                "logits, loss"
            } else {
                "logits, values, loss"
            }
            .to_string(),
            if ok { "ok" } else { "FAIL" }.to_string(),
        ]);
    }
    println!("\n{title} (max abs error at every position, padding included; tolerance {TOLERANCE:e}):");
    print_table(
        &[
            "case",
            "default call",
            "default, incremental (attended)",
            "explicit position ids",
            "our sdpa, default call",
            "HF sdpa vs HF eager",
            "compared",
            "result",
        ],
        &rows,
    );
    println!("default call bit-identical to TRL in {zero} of {count} cases");
    assert!(failures.is_empty(), "parity failed for {failures:?}");
}

/// Runs `vh forward` on each case and compares its outputs with TRL's default call at every
/// (decoder) position; for causal cases (`with_positions`) also with explicit position ids in the
/// input file against TRL's call with the same ids.
pub fn check_cli(title: &str, cases: Vec<Case>, with_positions: bool) {
    let out_dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for case in cases {
        let expected = read_tensors(&case.dir.join("expected.safetensors"));
        let mut runs = vec![("", case.dir.join("inputs.safetensors"))];
        if with_positions {
            let mut inputs: Vec<(String, Tensor)> =
                read_tensors(&case.dir.join("inputs.safetensors")).into_iter().collect();
            inputs.push((
                "position_ids".into(),
                read_tensors(&case.dir.join("position_ids.safetensors"))["position_ids"].shallow_clone(),
            ));
            let file = out_dir.path().join(format!("{}-with-positions.safetensors", case.name));
            vh_hub::write_safetensors(&file, &inputs).unwrap();
            runs.push(("_explicit", file));
        }
        let mut cells = vec![case.name.clone()];
        for (suffix, inputs) in runs {
            let got = vh_forward_file(&case, &inputs, out_dir.path(), suffix);
            assert_eq!(got["logits"].kind(), Kind::Float);
            let logits_err = max_abs_diff(&got["logits"], &expected[&format!("logits{suffix}")]);
            let loss_err = max_abs_diff(&got["loss"], &expected[&format!("loss{suffix}")]);
            let values_err = if case.fresh_v_head {
                0.0
            } else {
                max_abs_diff(&got["values"], &expected[&format!("values{suffix}")])
            };
            let worst = logits_err.max(loss_err).max(values_err);
            assert!(
                worst <= TOLERANCE,
                "{}{suffix}: vh forward differs from TRL: logits {logits_err:e}, loss {loss_err:e}, values {values_err:e}",
                case.name
            );
            cells.push(fmt_err(worst));
        }
        rows.push(cells);
    }
    println!("\n{title} (max abs error over logits, values, loss at every position):");
    if with_positions {
        print_table(&["case", "default call", "explicit position ids"], &rows);
    } else {
        print_table(&["case", "max error"], &rows);
    }
}
