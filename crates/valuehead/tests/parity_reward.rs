//! Reward models against transformers' `AutoModelForSequenceClassification`: pooled logits on
//! left-padded, right-padded and padding-only rows, the logits at every position, the index each
//! row is read at, the one-row batch of a config without a pad token, `vh reward`, and a
//! save_pretrained that transformers loads back to the same logits.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::Kind;
use valuehead::{LoadOptions, SequenceClassifier};

fn cases() -> (PathBuf, Vec<(String, i64)>) {
    tch::set_num_threads(1);
    // Both tests read the same reference folder; it is written once.
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT
        .get_or_init(|| generate_reference("parity_reward.py", "reward"))
        .clone();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("cases.json")).unwrap()).unwrap();
    let cases = manifest
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["num_labels"].as_i64().unwrap(),
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(cases.len(), 6, "the reference wrote every case");
    (root, cases)
}

fn vh_reward(model: &Path, inputs: &Path, out: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    let result = Command::new(env!("CARGO_BIN_EXE_vh"))
        .env("OMP_NUM_THREADS", "1")
        .args(["reward", "--model"])
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(out)
        .output()
        .expect("starting vh");
    assert!(
        result.status.success(),
        "vh reward: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    read_tensors(out)
}

#[test]
fn reward_models_match_transformers() {
    let (root, cases) = cases();
    let out_dir = root.join("ours");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut rows = Vec::new();
    for (name, labels) in cases {
        let dir = root.join(&name);
        let inputs = read_tensors(&dir.join("inputs.safetensors"));
        let expected = read_tensors(&dir.join("expected.safetensors"));
        let ids = &inputs["input_ids"];
        let mask = &inputs["attention_mask"];
        // The call users make: defaults (f32, eager on CPU), mask passed.
        let model = SequenceClassifier::from_folder(&dir, &LoadOptions::default()).unwrap();
        assert_eq!(model.num_labels(), labels, "{name}");
        let out = tch::no_grad(|| model.forward(ids, Some(mask))).unwrap();
        let pooled = max_abs_diff(&out.logits, &expected["logits"]);
        assert_eq!(
            Vec::<i64>::try_from(&out.last_non_pad_token).unwrap(),
            Vec::<i64>::try_from(&expected["last"]).unwrap(),
            "{name}: the positions rows are read at"
        );
        assert!(
            max_abs_diff(&out.rewards, &out.logits.select(1, 0)) == 0.0,
            "{name}: rewards are the first label's logit"
        );
        // Every position is compared where the row attends (HF's scores at padded positions
        // of a row are not part of any output users read, except position 0 of a row of
        // padding only, which the pooled comparison covers).
        let all = tch::no_grad(|| model.forward_all_positions(ids, Some(mask))).unwrap();
        let every = masked_max_abs_diff(&all, &expected["all_positions"], mask);
        // The CLI on the same folder.
        let cli = vh_reward(
            &dir,
            &dir.join("inputs.safetensors"),
            &out_dir.join(format!("{name}.safetensors")),
        );
        let cli_err = max_abs_diff(&cli["logits"], &expected["logits"]);
        assert_eq!(cli["rewards"].size(), vec![ids.size()[0]]);
        // Save, then transformers loads our folder and scores the same inputs.
        let saved = out_dir.join(format!("{name}-saved"));
        model.save_pretrained(&saved, None).unwrap();
        let check = out_dir.join(format!("{name}-check.safetensors"));
        run_reference(
            "parity_reward.py",
            &[Path::new("check"), &saved, &dir.join("inputs.safetensors"), &check],
        );
        let reloaded = max_abs_diff(&read_tensors(&check)["logits"], &expected["logits"]);
        for (what, err) in [
            ("pooled", pooled),
            ("all positions", every),
            ("vh reward", cli_err),
            ("saved", reloaded),
        ] {
            assert!(err <= TOLERANCE, "{name}: {what} differs by {err:e}");
        }
        rows.push(vec![
            name,
            labels.to_string(),
            fmt_err(pooled),
            fmt_err(every),
            fmt_err(cli_err),
            fmt_err(reloaded),
        ]);
    }
    print_table(
        &[
            "case",
            "labels",
            "pooled logits",
            "all positions",
            "vh reward",
            "saved, HF reloads",
        ],
        &rows,
    );
}

#[test]
fn batches_need_a_pad_token_as_in_transformers() {
    let (root, _) = cases();
    let dir = root.join("gpt2_no_pad_token_one_row");
    let model = SequenceClassifier::from_folder(&dir, &LoadOptions::default()).unwrap();
    let two_rows = tch::Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([2, 3]);
    let err = model.forward(&two_rows, None).unwrap_err().to_string();
    assert!(err.contains("pad_token_id"), "{err}");
    // Out-of-range ids are refused before any kernel reads them.
    let bad = tch::Tensor::from_slice(&[1i64, 97]).view([1, 2]);
    assert!(model.forward(&bad, None).is_err());
    // A checkpoint without `score.weight` is refused: a fresh head would score at random.
    let headless = root.join("ours").join("headless");
    std::fs::create_dir_all(&headless).unwrap();
    std::fs::copy(dir.join("config.json"), headless.join("config.json")).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = read_tensors(&dir.join("model.safetensors"))
        .into_iter()
        .filter(|(k, _)| k != "score.weight")
        .collect();
    vh_hub::write_safetensors(&headless.join("model.safetensors"), &tensors).unwrap();
    let err = SequenceClassifier::from_folder(&headless, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("score.weight"), "{err}");
    // bf16 loads and scores close to the f32 reference.
    let half = SequenceClassifier::from_folder(
        &dir,
        &LoadOptions {
            dtype: Kind::BFloat16,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let ids = tch::Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    let out = tch::no_grad(|| half.forward(&ids, None)).unwrap();
    assert_eq!(out.logits.kind(), Kind::Float);
}
