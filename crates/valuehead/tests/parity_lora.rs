//! LoRA adapters against Python peft 0.18.0 under TRL 0.26.2: forward (logits, values, loss)
//! of peft-saved adapters on f32 and bf16 bases, gradients of the trainable tensors, what is
//! trainable, our saved adapters and merged folders loaded back by TRL/peft, `--adapter` on the
//! command line, the base with the adapter disabled, fresh adapters, and refused adapters.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Kind, Tensor};
use valuehead::{CausalLmWithValueHead, LoadOptions, LoraConfig, Seq2SeqLmWithValueHead};

fn reference() -> &'static (PathBuf, Vec<serde_json::Value>) {
    static DATA: OnceLock<(PathBuf, Vec<serde_json::Value>)> = OnceLock::new();
    DATA.get_or_init(|| {
        tch::set_num_threads(1);
        let dir = generate_reference("parity_lora.py", "lora");
        let cases = serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
        (dir, cases)
    })
}

fn options(dtype: &str) -> LoadOptions {
    LoadOptions {
        dtype: if dtype == "bfloat16" {
            Kind::BFloat16
        } else {
            Kind::Float
        },
        ..eager()
    }
}

fn outputs(
    model: &CausalLmWithValueHead,
    inputs: &std::collections::HashMap<String, Tensor>,
) -> (Tensor, Tensor, Tensor) {
    let ids = &inputs["input_ids"];
    let out = model
        .forward(ids, Some(&inputs["attention_mask"]), None, Some(ids))
        .unwrap();
    (out.logits, out.values, out.loss.unwrap())
}

/// Relative error of a gradient: max |a - b| over max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    max_abs_diff(a, b) / scale
}

#[test]
fn adapters_match_peft() {
    let (root, cases) = reference();
    let ours_dir = root.join("ours");
    std::fs::create_dir_all(&ours_dir).unwrap();
    let mut rows = Vec::new();
    for case in cases.iter().filter(|c| c["seq2seq"] != true) {
        let name = case["name"].as_str().unwrap();
        let dtype = case["dtype"].as_str().unwrap();
        let bf16 = dtype == "bfloat16";
        let dir = root.join(name);
        let (base, adapter) = (dir.join("base"), dir.join("adapter"));
        let inputs = read_tensors(&dir.join("inputs.safetensors"));
        let expected = read_tensors(&dir.join("expected.safetensors"));
        // What TRL users call: the adapter folder names its base.
        let model = CausalLmWithValueHead::from_adapter_folder(&adapter, &options(dtype)).unwrap();
        let explicit = CausalLmWithValueHead::from_folder_with_adapter(&base, &adapter, &options(dtype)).unwrap();
        let (logits, values, loss) = outputs(&model, &inputs);
        let mask = &inputs["attention_mask"];
        let errs = [
            masked_max_abs_diff(&logits, &expected["logits"], mask),
            masked_max_abs_diff(&values, &expected["values"], mask),
            max_abs_diff(&loss, &expected["loss"]),
        ];
        // Both with a graph: the same kernels (without one, few-row products may take oneDNN).
        let (l2, v2, _) = outputs(&explicit, &inputs);
        assert!(
            l2.equal(&logits.detach()) && v2.equal(&values.detach()),
            "{name}: both loads agree"
        );
        // bf16 bases: the two sides round the same bf16 operations in a different order.
        let tolerance = if bf16 { 5e-2 } else { TOLERANCE };
        for (what, e) in ["logits", "values", "loss"].iter().zip(errs) {
            assert!(e <= tolerance, "{name}: {what} differ by {e:e}");
        }

        // Trainable exactly where peft trains (plus the value head), everything else frozen.
        let trainable: BTreeSet<String> = model
            .var_store()
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, _)| n)
            .collect();
        let expected_trainable: BTreeSet<String> = case["trainable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        assert_eq!(trainable, expected_trainable, "{name}: trainable tensors");

        // Gradients of the loss (eval mode, no dropout), f32 bases.
        let mut grad_err = f64::NAN;
        if !bf16 {
            let grads = read_tensors(&dir.join("grads.safetensors"));
            loss.backward();
            grad_err = 0.0;
            for (n, t) in model.var_store().variables() {
                if t.requires_grad() {
                    let g = t.grad();
                    let g = if g.defined() { g } else { t.zeros_like() };
                    grad_err = grad_err.max(rel(&g, &grads[&n]));
                }
            }
            assert!(grad_err <= 1e-4, "{name}: gradients differ by {grad_err:e} (relative)");
        }

        // Our save, loaded by TRL (base from base_model_name_or_path, adapter through peft).
        let saved = ours_dir.join(format!("{name}-adapter"));
        model.save_pretrained(&saved, None).unwrap();
        let check = ours_dir.join(format!("{name}-check.safetensors"));
        run_reference(
            "parity_lora.py",
            &[Path::new("check"), &saved, &dir.join("inputs.safetensors"), &check],
        );
        let back = read_tensors(&check);
        let reload_err = masked_max_abs_diff(&back["logits"], &logits, mask).max(masked_max_abs_diff(
            &back["values"],
            &values,
            mask,
        ));
        assert!(
            reload_err <= tolerance,
            "{name}: TRL reloading our adapter differs by {reload_err:e}"
        );

        // Merged into a plain folder (f32: merging in bf16 rounds the weights).
        let mut merged_err = f64::NAN;
        if !bf16 {
            let merged = ours_dir.join(format!("{name}-merged"));
            model.save_merged(&merged, None).unwrap();
            let plain = ours_dir.join(format!("{name}-plain.safetensors"));
            run_reference(
                "parity_lora.py",
                &[Path::new("plain"), &merged, &dir.join("inputs.safetensors"), &plain],
            );
            let p = read_tensors(&plain);
            merged_err =
                masked_max_abs_diff(&p["logits"], &logits, mask).max(masked_max_abs_diff(&p["values"], &values, mask));
            assert!(
                merged_err <= TOLERANCE,
                "{name}: merged folder differs by {merged_err:e}"
            );
        }
        rows.push(vec![
            name.to_string(),
            dtype.to_string(),
            fmt_err(errs[0]),
            fmt_err(errs[1]),
            fmt_err(errs[2]),
            if bf16 { "-".into() } else { fmt_err(grad_err) },
            trainable.len().to_string(),
            fmt_err(reload_err),
            if bf16 { "-".into() } else { fmt_err(merged_err) },
        ]);
    }
    print_table(
        &[
            "case",
            "base",
            "logits",
            "values",
            "loss",
            "grads (rel)",
            "trainable",
            "TRL loads ours",
            "merged",
        ],
        &rows,
    );
}

/// The trainable tensors of a var store.
fn trainable_names(vs: &tch::nn::VarStore) -> BTreeSet<String> {
    vs.variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn t5_adapters_match_peft() {
    let (root, cases) = reference();
    let ours_dir = root.join("ours");
    std::fs::create_dir_all(&ours_dir).unwrap();
    let mut rows = Vec::new();
    for case in cases.iter().filter(|c| c["seq2seq"] == true) {
        let name = case["name"].as_str().unwrap();
        let dir = root.join(name);
        let (base, adapter) = (dir.join("base"), dir.join("adapter"));
        let inputs = read_tensors(&dir.join("inputs.safetensors"));
        let expected = read_tensors(&dir.join("expected.safetensors"));
        let run = |m: &Seq2SeqLmWithValueHead| {
            m.forward(
                Some(&inputs["input_ids"]),
                Some(&inputs["attention_mask"]),
                None,
                None,
                None,
                None,
                Some(&inputs["labels"]),
            )
            .unwrap()
        };
        let options = LoadOptions::default();
        let model = Seq2SeqLmWithValueHead::from_adapter_folder(&adapter, &options).unwrap();
        let explicit = Seq2SeqLmWithValueHead::from_folder_with_adapter(&base, &adapter, &options).unwrap();
        let out = run(&model);
        let loss = out.loss.unwrap();
        let errs = [
            max_abs_diff(&out.logits, &expected["logits"]),
            max_abs_diff(&out.values, &expected["values"]),
            max_abs_diff(&loss, &expected["loss"]),
        ];
        for (what, e) in ["logits", "values", "loss"].iter().zip(errs) {
            assert!(e <= TOLERANCE, "{name}: {what} differ by {e:e}");
        }
        // Both with a graph: the same kernels (without one, few-row products may take oneDNN).
        let again = run(&explicit);
        assert!(
            again.logits.detach().equal(&out.logits.detach()),
            "{name}: both loads agree"
        );
        let trainable = trainable_names(model.var_store());
        let expected_trainable: BTreeSet<String> = case["trainable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        assert_eq!(trainable, expected_trainable, "{name}: trainable tensors");

        let grads = read_tensors(&dir.join("grads.safetensors"));
        loss.backward();
        let mut grad_err: f64 = 0.0;
        for (n, t) in model.var_store().variables() {
            if t.requires_grad() {
                let g = t.grad();
                let g = if g.defined() { g } else { t.zeros_like() };
                grad_err = grad_err.max(rel(&g, &grads[&n]));
            }
        }
        assert!(grad_err <= 1e-4, "{name}: gradients differ by {grad_err:e} (relative)");

        // Our adapter save and our merged folder, loaded by TRL's seq2seq wrapper.
        let mut reload = [0.0f64; 2];
        let (logits, values) = (out.logits.detach(), out.values.detach());
        for (k, (mode, folder)) in [
            ("check_seq2seq", ours_dir.join(format!("{name}-adapter"))),
            ("plain_seq2seq", ours_dir.join(format!("{name}-merged"))),
        ]
        .into_iter()
        .enumerate()
        {
            if k == 0 {
                model.save_pretrained(&folder, None).unwrap();
            } else {
                model.save_merged(&folder, None).unwrap();
            }
            let back = ours_dir.join(format!("{name}-{mode}.safetensors"));
            run_reference(
                "parity_lora.py",
                &[Path::new(mode), &folder, &dir.join("inputs.safetensors"), &back],
            );
            let back = read_tensors(&back);
            reload[k] = max_abs_diff(&back["logits"], &logits).max(max_abs_diff(&back["values"], &values));
            assert!(
                reload[k] <= TOLERANCE,
                "{name}: TRL loading our {mode} folder differs by {:e}",
                reload[k]
            );
        }
        // Off, the adapter leaves T5 itself.
        model.set_adapter_enabled(false).unwrap();
        let off = tch::no_grad(|| run(&model)).logits;
        let plain = Seq2SeqLmWithValueHead::from_folder(&base, &options).unwrap();
        assert!(
            off.equal(&tch::no_grad(|| run(&plain)).logits),
            "{name}: adapter off is not the base"
        );
        rows.push(vec![
            name.to_string(),
            fmt_err(errs[0]),
            fmt_err(errs[1]),
            fmt_err(errs[2]),
            fmt_err(grad_err),
            trainable.len().to_string(),
            fmt_err(reload[0]),
            fmt_err(reload[1]),
        ]);
    }
    assert_eq!(rows.len(), 2, "the reference has two T5 cases");
    print_table(
        &[
            "case",
            "logits",
            "values",
            "loss",
            "grads (rel)",
            "trainable",
            "TRL loads ours",
            "merged",
        ],
        &rows,
    );
}

#[test]
fn adapter_on_the_command_line() {
    let (root, _) = reference();
    let dir = root.join("llama_all_linear_rslora");
    let out = root.join("ours-cli.safetensors");
    let result = Command::new(env!("CARGO_BIN_EXE_vh"))
        .env("OMP_NUM_THREADS", "1")
        .args(["forward", "--model"])
        .arg(dir.join("base"))
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .arg("--inputs")
        .arg(dir.join("inputs.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let ours = read_tensors(&out);
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let mask = &read_tensors(&dir.join("inputs.safetensors"))["attention_mask"];
    assert!(masked_max_abs_diff(&ours["logits"], &expected["logits"], mask) <= TOLERANCE);
    assert!(masked_max_abs_diff(&ours["values"], &expected["values"], mask) <= TOLERANCE);
}

#[test]
fn disabled_and_fresh_adapters_give_the_base_model() {
    let (root, _) = reference();
    let dir = root.join("gpt2_conv1d_bias_all");
    let ids = Tensor::from_slice(&[5i64, 9, 13, 2, 7]).view([1, 5]);
    let base = CausalLmWithValueHead::from_folder(dir.join("base"), &eager()).unwrap();
    let adapted =
        CausalLmWithValueHead::from_folder_with_adapter(dir.join("base"), dir.join("adapter"), &eager()).unwrap();
    let logits = |m: &CausalLmWithValueHead| tch::no_grad(|| m.forward(&ids, None, None, None).unwrap().logits);
    assert!(
        max_abs_diff(&logits(&adapted), &logits(&base)) > 1e-3,
        "the adapter changes the outputs"
    );
    adapted.set_adapter_enabled(false).unwrap();
    assert!(
        logits(&adapted).equal(&logits(&base)),
        "disabled: the base model, bit for bit"
    );
    adapted.set_adapter_enabled(true).unwrap();
    // A fresh adapter (lora_B zero) leaves the outputs unchanged, then trains.
    let config = LoraConfig::from_json(&serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": true
    }))
    .unwrap();
    let fresh = CausalLmWithValueHead::with_new_adapter(dir.join("base"), &config, &eager()).unwrap();
    assert!(logits(&fresh).equal(&logits(&base)));
    assert_eq!(
        fresh.adapted_modules(),
        vec!["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    );
    let mut opt = vh_train::AdamW::hf(
        fresh.var_store(),
        vh_train::AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        opt.parameters().len(),
        4 + 2,
        "only the adapter and the value head are optimised"
    );
    let wte_before = fresh.var_store().variables()["transformer.wte.weight"].copy();
    let out = fresh.forward(&ids, None, None, Some(&ids)).unwrap();
    out.loss.unwrap().backward();
    opt.step().unwrap();
    assert!(
        fresh.var_store().variables()["transformer.wte.weight"].equal(&wte_before),
        "the base stays frozen"
    );
    assert!(
        max_abs_diff(&logits(&fresh), &logits(&base)) > 0.0,
        "the adapter learned"
    );
}

#[test]
fn bad_adapters_are_typed_errors() {
    let (root, _) = reference();
    let dir = root.join("llama_all_linear_rslora");
    let bad = root.join("ours-bad");
    let write = |config: serde_json::Value, drop_tensor: Option<&str>| -> PathBuf {
        let _ = std::fs::remove_dir_all(&bad);
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("adapter_config.json"), config.to_string()).unwrap();
        let tensors: Vec<(String, Tensor)> = read_tensors(&dir.join("adapter/adapter_model.safetensors"))
            .into_iter()
            .filter(|(k, _)| Some(k.as_str()) != drop_tensor)
            .collect();
        vh_hub::write_safetensors(&bad.join("adapter_model.safetensors"), &tensors).unwrap();
        bad.clone()
    };
    let good: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter/adapter_config.json")).unwrap()).unwrap();
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let load = |p: &Path| CausalLmWithValueHead::from_folder_with_adapter(dir.join("base"), p, &eager());
    for (config, dropped, needle) in [
        (
            with("target_modules", serde_json::json!(["no_such_proj"])),
            None,
            "match no linear layer",
        ),
        (with("r", serde_json::json!(0)), None, "`r` must be positive"),
        (with("r", serde_json::json!(4)), None, "shape"),
        (with("use_dora", serde_json::json!(true)), None, "use_dora"),
        (
            good.clone(),
            Some("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"),
            "up_proj.lora_B",
        ),
    ] {
        let err = load(&write(config, dropped)).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // An adapter made for GPT-2 on a Llama base: its targets exist nowhere.
    let gpt2 = root.join("gpt2_conv1d_bias_all/adapter");
    let err = load(&gpt2).unwrap_err().to_string();
    assert!(err.contains("match no linear layer"), "{err}");
}

/// TRL's reward adapter: `from_pretrained(policy_adapter, reward_adapter=DIR)` and
/// `compute_reward_score` against TRL's, the policy's outputs unchanged around it.
#[test]
fn reward_adapter_scores_match_trl() {
    let (root, _) = reference();
    let dir = root.join("reward_adapter");
    let inputs = read_tensors(&dir.join("inputs.safetensors"));
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
    let model = CausalLmWithValueHead::from_folder_with_reward_adapter(
        dir.join("base"),
        valuehead::PolicyAdapter::Folder(&dir.join("policy")),
        dir.join("rm"),
        &eager(),
    )
    .unwrap();
    let policy = || tch::no_grad(|| model.forward(ids, Some(mask), None, None).unwrap());
    let before = policy();
    let scores = model.compute_reward_score(ids, Some(mask)).unwrap();
    let after = policy();
    let score_err = masked_max_abs_diff(&scores, &expected["scores"], mask);
    let logits_err = masked_max_abs_diff(&before.logits, &expected["logits"], mask);
    let values_err = masked_max_abs_diff(&before.values, &expected["values"], mask);
    println!("reward adapter: scores {score_err:.2e}, policy logits {logits_err:.2e}, values {values_err:.2e}");
    assert!(score_err <= TOLERANCE && logits_err <= TOLERANCE && values_err <= TOLERANCE);
    assert!(
        before.logits.equal(&after.logits),
        "scoring leaves the policy as it was"
    );
    assert_eq!(scores.size(), vec![3, 10, 1]);
    // The reward adapter is frozen; the policy adapter and value head train.
    let vars = model.var_store().variables();
    assert!(vars
        .iter()
        .filter(|(n, _)| n.contains(".reward_adapter."))
        .all(|(_, t)| !t.requires_grad()));
    assert!(vars.keys().any(|n| n.contains(".reward_adapter.")));
    assert!(vars["model.layers.0.self_attn.q_proj.lora_A.weight"].requires_grad());
    // Saving writes the policy adapter only, as TRL.
    let saved = root.join("ours-reward-policy");
    model.save_pretrained(&saved, None).unwrap();
    let keys: Vec<String> = read_tensors(&saved.join("adapter_model.safetensors"))
        .into_keys()
        .collect();
    assert!(
        !keys.is_empty() && keys.iter().all(|k| !k.contains("reward")),
        "{keys:?}"
    );
    // Without a reward adapter, scoring is a typed error.
    let plain =
        CausalLmWithValueHead::from_folder_with_adapter(dir.join("base"), dir.join("policy"), &eager()).unwrap();
    assert!(plain.compute_reward_score(ids, Some(mask)).is_err());
}
