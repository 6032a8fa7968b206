//! Training without the Python reference: train mode's dropout statistics on every
//! architecture, typed errors for bad training input, and a short run that learns.

mod common;

use common::{write_tiny_gpt2, write_tiny_llama, write_tiny_t5};
use serde_json::json;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};
use valuehead::{AttnImplementation, CausalLmWithValueHead, LoadOptions, Seq2SeqLmWithValueHead};
use vh_core::tensor::TrainDropout;
use vh_core::{InitStrategy, ValueHead, ValueHeadConfig};
use vh_rl::RlError;
use vh_train::{lm_value_loss, AdamW, AdamWConfig, TrainError};

/// The number of standard deviations a binomial share may stray from `p` before a test fails:
/// a false alarm once in ~10^15 runs.
const SIGMAS: f64 = 8.0;

fn causal(dir: &Path, attn: AttnImplementation) -> CausalLmWithValueHead {
    let options = LoadOptions {
        attn_implementation: Some(attn),
        ..Default::default()
    };
    CausalLmWithValueHead::from_folder(dir, &options).unwrap()
}

#[test]
fn dropout_zeroes_a_share_p_and_scales_survivors_by_one_over_one_minus_p() {
    let n = 200_000;
    let x = Tensor::full([n], 3.0, (Kind::Float, Device::Cpu));
    for p in [0.1, 0.3, 0.5, 0.9] {
        tch::manual_seed(17);
        let y = x.train_dropout(p, true).unwrap();
        let zeros = y.eq(0.0).sum(Kind::Int64).int64_value(&[]) as f64 / n as f64;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((zeros - p).abs() < SIGMAS * sd, "p {p}: share of zeros {zeros}");
        // Every survivor is 3 / (1 - p), in f32 as PyTorch computes it.
        let survivors = y.masked_select(&y.ne(0.0));
        let expected = (3.0f32 / (1.0 - p) as f32) as f64;
        let spread = (&survivors - expected).abs().max().double_value(&[]);
        assert!(spread <= 1e-6 * expected, "p {p}: survivors off by {spread}");
        // The mean is preserved in expectation.
        assert!(
            (y.mean(Kind::Double).double_value(&[]) - 3.0).abs() < SIGMAS * 3.0 * (p / (1.0 - p) / n as f64).sqrt()
        );
        // Eval mode, or p = 0, is the identity.
        assert!(x.train_dropout(p, false).unwrap().equal(&x));
    }
    assert!(x.train_dropout(0.0, true).unwrap().equal(&x));
}

#[test]
fn value_head_dropout_statistics() {
    // A head reading only feature 0 (weight one-hot, bias b): in train mode each value is b
    // (feature 0 dropped, share p) or b + h0 / (1 - p).
    let vs = VarStore::new(Device::Cpu);
    let p = 0.25;
    let cfg = ValueHeadConfig {
        hidden_size: 4,
        dropout_prob: p,
        init: InitStrategy::Default,
        initializer_range: 0.2,
    };
    let head = ValueHead::new(vs.root(), &cfg).unwrap();
    tch::no_grad(|| {
        head.weight
            .shallow_clone()
            .copy_(&Tensor::from_slice2(&[[1.0f32, 0.0, 0.0, 0.0]]));
        head.bias.shallow_clone().copy_(&Tensor::from_slice(&[0.5f32]));
    });
    let (rows, seq) = (400, 250);
    let h = Tensor::full([rows, seq, 4], 2.0, (Kind::Float, Device::Cpu));
    tch::manual_seed(3);
    let v = head.forward(&h, true).unwrap();
    let dropped = v.eq(0.5).sum(Kind::Int64).int64_value(&[]) as f64 / (rows * seq) as f64;
    let kept_value = 0.5 + 2.0 / (1.0 - p);
    let kept = (&v - kept_value).abs().lt(1e-5).sum(Kind::Int64).int64_value(&[]) as f64 / (rows * seq) as f64;
    let sd = (p * (1.0 - p) / (rows * seq) as f64).sqrt();
    assert!((dropped - p).abs() < SIGMAS * sd, "share dropped {dropped}");
    assert!((dropped + kept - 1.0).abs() < 1e-12, "every value is b or b + h0/(1-p)");
    assert!(head
        .forward(&h, false)
        .unwrap()
        .equal(&head.forward(&h, false).unwrap()));
    assert!((head.forward(&h, false).unwrap() - 2.5).abs().max().double_value(&[]) < 1e-6);
}

/// The variance over seeds of the logits of a train-mode forward, averaged over positions.
fn dropout_noise(forward: impl Fn() -> Tensor, samples: i64) -> f64 {
    let outs: Vec<Tensor> = (0..samples)
        .map(|s| {
            tch::manual_seed(1000 + s);
            forward()
        })
        .collect();
    Tensor::stack(&outs, 0)
        .var_dim(0, true, false)
        .mean(Kind::Double)
        .double_value(&[])
}

#[test]
fn fused_attention_drops_out_like_eager_attention() {
    // Attention-probability dropout only, high p: the fused kernel (sdpa, the Llama family's
    // default) must add as much noise as HF's eager path, which the Python parity suite matches
    // mask for mask. A fused path that ignored dropout would give no noise at all.
    let samples = 48;
    for (arch, config) in [
        ("llama", json!({"attention_dropout": 0.4, "summary_dropout_prob": 0.0})),
        (
            "gpt2",
            json!({"attn_pdrop": 0.4, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "summary_dropout_prob": 0.0}),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        if arch == "llama" {
            write_tiny_llama(dir.path(), config);
        } else {
            write_tiny_gpt2(dir.path(), config);
        }
        let ids = Tensor::from_slice2(&[[3i64, 7, 1, 9, 4, 4, 8, 2, 5, 11, 6, 13]]);
        let mut noise = Vec::new();
        for attn in [AttnImplementation::Eager, AttnImplementation::Sdpa] {
            let mut model = causal(dir.path(), attn);
            let eval = tch::no_grad(|| model.forward(&ids, None, None, None)).unwrap().logits;
            assert!(eval.equal(&tch::no_grad(|| model.forward(&ids, None, None, None)).unwrap().logits));
            model.set_train(true);
            noise.push(dropout_noise(
                || tch::no_grad(|| model.forward(&ids, None, None, None)).unwrap().logits,
                samples,
            ));
        }
        let ratio = noise[1] / noise[0];
        // The variance estimate over 48 seeds has a relative spread of ~sqrt(2/47) = 0.2 per
        // element; averaged over positions and vocabulary it is far tighter.
        assert!(noise[0] > 1e-6, "{arch}: eager dropout adds no noise");
        assert!((0.7..1.4).contains(&ratio), "{arch}: sdpa/eager dropout noise {ratio}");
    }
}

#[test]
fn every_architecture_is_deterministic_in_eval_and_noisy_in_train() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_t5(dir.path(), json!({"dropout_rate": 0.2}));
    let mut t5 = Seq2SeqLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    let ids = Tensor::from_slice2(&[[3i64, 7, 1, 9, 4]]);
    let dec = Tensor::from_slice2(&[[0i64, 5, 6, 7]]);
    let run = |m: &Seq2SeqLmWithValueHead| {
        tch::no_grad(|| m.forward(Some(&ids), None, Some(&dec), None, None, None, None))
            .unwrap()
            .values
    };
    assert!(run(&t5).equal(&run(&t5)));
    t5.set_train(true);
    assert!(t5.is_train());
    assert!(!run(&t5).equal(&run(&t5)));
    for (arch, cfg) in [
        ("gpt2", json!({})),
        ("llama", json!({"attention_dropout": 0.2})),
        ("qwen2", json!({"model_type": "qwen2", "attention_dropout": 0.2})),
    ] {
        let dir = tempfile::tempdir().unwrap();
        if arch == "gpt2" {
            write_tiny_gpt2(dir.path(), cfg);
        } else {
            write_tiny_llama(dir.path(), cfg);
        }
        let mut m = CausalLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
        let values = |m: &CausalLmWithValueHead| tch::no_grad(|| m.forward(&ids, None, None, None)).unwrap().values;
        assert!(values(&m).equal(&values(&m)), "{arch}: eval");
        m.set_train(true);
        assert!(!values(&m).equal(&values(&m)), "{arch}: train");
        m.set_train(false);
        assert!(values(&m).equal(&values(&m)), "{arch}: back to eval");
    }
}

fn tiny_gpt2() -> (tempfile::TempDir, CausalLmWithValueHead) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gpt2(
        dir.path(),
        json!({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    );
    let model = CausalLmWithValueHead::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    (dir, model)
}

#[test]
fn mismatched_shapes_are_typed_errors() {
    let (_dir, model) = tiny_gpt2();
    let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4], [5, 6, 7, 8]]);
    let out = model.forward(&ids, None, None, Some(&ids)).unwrap();
    let loss = out.loss.unwrap();
    let targets = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    let mask = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    let err = lm_value_loss(&loss, &out.values, &targets, &mask, 0.5).unwrap_err();
    assert!(
        matches!(&err, TrainError::Shape { left, right, .. } if left == "values" && right == "targets"),
        "{err}"
    );
    let err = lm_value_loss(&loss, &out.values, &out.values.zeros_like(), &mask.narrow(1, 0, 2), 0.5).unwrap_err();
    assert!(
        matches!(&err, TrainError::Shape { right, .. } if right == "mask"),
        "{err}"
    );
    assert!(matches!(
        lm_value_loss(&loss, &out.values, &out.values.zeros_like(), &mask.zeros_like(), 0.5),
        Err(TrainError::EmptyMask(_))
    ));
    // Masks and indices against logits, in the RL math.
    let logits = out.logits.detach();
    let short = Tensor::from_slice2(&[[1i64, 2, 3]]);
    assert!(matches!(
        vh_rl::selective_log_softmax(&logits, &short),
        Err(RlError::Shape { .. })
    ));
    let lp = vh_rl::selective_log_softmax(&logits, &ids).unwrap();
    let bad_mask = Tensor::ones([2, 3], (Kind::Bool, Device::Cpu));
    assert!(matches!(
        vh_rl::masked_mean(&lp, &bad_mask, None),
        Err(RlError::Shape { .. })
    ));
    let pm = Tensor::zeros([2, 4], (Kind::Bool, Device::Cpu));
    let batch = vh_rl::PpoBatch {
        new_logprobs: &lp,
        vpred: &out.values,
        old_logprobs: &lp,
        old_values: &out.values,
        returns: &out.values,
        advantages: &lp,
        padding_mask: &bad_mask,
        padding_mask_p1: &pm,
    };
    assert!(matches!(
        vh_rl::ppo_loss(&batch, &vh_rl::PpoConfig::default()),
        Err(RlError::Shape { .. })
    ));
    // Every position masked in both masks: TRL's masks never do that; refused.
    let all = Tensor::ones([2, 4], (Kind::Bool, Device::Cpu));
    let batch = vh_rl::PpoBatch {
        padding_mask: &all,
        padding_mask_p1: &all,
        ..batch
    };
    assert!(matches!(
        vh_rl::ppo_loss(&batch, &vh_rl::PpoConfig::default()),
        Err(RlError::EmptyMask { .. })
    ));
}

#[test]
fn a_micro_batch_of_empty_responses_trains_only_its_values() {
    // Every response empty (each row's first token ended it): no policy term, and the value
    // term alone trains, where TRL's masked mean is NaN and its step would be too.
    let lp = Tensor::from_slice2(&[[-1.0f32, -2.0, -0.5, -3.0], [-0.2, -1.0, -2.0, -0.7]]).set_requires_grad(true);
    let values = Tensor::from_slice2(&[[0.1f32, 0.2, 0.3, 0.4], [-0.1, 0.0, 0.5, 1.0]]);
    let vpred = values.copy().set_requires_grad(true);
    let targets = &values + 0.5;
    let all = Tensor::ones([2, 4], (Kind::Bool, Device::Cpu));
    let first_kept = Tensor::from_slice2(&[[false, true, true, true], [false, true, true, true]]);
    let advantages = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    let batch = vh_rl::PpoBatch {
        new_logprobs: &lp,
        vpred: &vpred,
        old_logprobs: &lp.detach(),
        old_values: &values,
        returns: &targets,
        advantages: &advantages,
        padding_mask: &all,
        padding_mask_p1: &first_kept,
    };
    let cfg = vh_rl::PpoConfig::default();
    let loss = vh_rl::ppo_loss(&batch, &cfg).unwrap();
    assert!(loss.pg_clipfrac.is_none());
    assert_eq!(loss.pg_loss.double_value(&[]), 0.0);
    let vf = loss.vf_loss.double_value(&[]);
    // vpred equals old_values, so clipping changes nothing: both squared errors are 0.5^2.
    assert!((vf - 0.5 * 0.25).abs() < 1e-6, "vf_loss {vf}");
    assert!((loss.loss.double_value(&[]) - cfg.vf_coef * vf).abs() < 1e-9);
    vh_train::backward(&loss.loss).unwrap();
    let grad = vpred.grad();
    assert_eq!(grad.isfinite().all().int64_value(&[]), 1);
    // Only each row's first value position gets a gradient, and the policy none.
    assert_eq!(grad.ne(0.0).sum(Kind::Int64).int64_value(&[]), 2);
    assert!(!lp.grad().defined() || lp.grad().eq(0.0).all().int64_value(&[]) == 1);
    let mut stats = vh_rl::UpdateStats::default();
    stats
        .record(&loss, &Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)))
        .unwrap();
    assert!(stats.pg_loss.is_empty() && stats.pg_clipfrac.is_empty());
    assert_eq!(stats.vf_loss.len(), 1);
}

#[test]
fn an_optimiser_needs_parameters() {
    let (_dir, model) = tiny_gpt2();
    assert!(matches!(
        AdamW::new(vec![], AdamWConfig::default(), vh_train::hf_no_decay),
        Err(TrainError::NoParameters)
    ));
    let empty = VarStore::new(Device::Cpu);
    assert!(matches!(
        AdamW::hf(&empty, AdamWConfig::default()),
        Err(TrainError::NoParameters)
    ));
    // A frozen model has no trainable parameter left.
    let mut frozen = VarStore::new(Device::Cpu);
    let _ = frozen.root().var("w", &[2], tch::nn::Init::Const(1.0));
    frozen.freeze();
    assert!(matches!(
        AdamW::hf(&frozen, AdamWConfig::default()),
        Err(TrainError::NoParameters)
    ));
    let opt = AdamW::hf(model.var_store(), AdamWConfig::default()).unwrap();
    assert_eq!(opt.parameters().len(), model.var_store().variables().len());
}

#[test]
fn backward_without_a_graph_is_a_typed_error() {
    let (_dir, model) = tiny_gpt2();
    let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
    let out = tch::no_grad(|| model.forward(&ids, None, None, Some(&ids))).unwrap();
    let loss = out.loss.unwrap();
    assert!(matches!(vh_train::backward(&loss), Err(TrainError::NoGraph(_))));
    let mut acc = vh_train::GradAccumulator::new(2).unwrap();
    assert!(matches!(acc.backward(&loss), Err(TrainError::NoGraph(_))));
    assert_eq!(acc.pending(), 0, "a refused micro-batch does not count");
    // With a graph it works, once.
    let loss = model.forward(&ids, None, None, Some(&ids)).unwrap().loss.unwrap();
    vh_train::backward(&loss).unwrap();
    assert!(matches!(vh_train::backward(&loss), Err(TrainError::Torch(_))));
}

#[test]
fn nan_losses_name_the_term_and_never_step() {
    let (_dir, model) = tiny_gpt2();
    let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
    let mask = ids.ones_like();
    let targets = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let snapshot = |m: &CausalLmWithValueHead| -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = m
            .var_store()
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let poison = |t: &Tensor| {
        let _ = tch::no_grad(|| t.shallow_clone().narrow(-1, 0, 1).fill_(f64::NAN));
    };

    // A NaN in the value head: the LM loss is fine, the value loss is not.
    let before = snapshot(&model);
    poison(&model.v_head().weight);
    let out = model.forward(&ids, None, None, Some(&ids)).unwrap();
    let err = lm_value_loss(out.loss.as_ref().unwrap(), &out.values, &targets, &mask, 0.5).unwrap_err();
    assert!(
        matches!(&err, TrainError::NonFinite { term, .. } if term == "value_loss"),
        "{err}"
    );

    // A NaN in the backbone: the LM loss goes first.
    let (_dir2, model2) = tiny_gpt2();
    let wte = model2.var_store().variables()["transformer.wte.weight"].shallow_clone();
    poison(&wte);
    let out = model2.forward(&ids, None, None, Some(&ids)).unwrap();
    let err = lm_value_loss(out.loss.as_ref().unwrap(), &out.values, &targets, &mask, 0.5).unwrap_err();
    assert!(
        matches!(&err, TrainError::NonFinite { term, .. } if term == "lm_loss"),
        "{err}"
    );

    // A NaN that only shows in the gradients never reaches the weights either.
    let (_dir3, model3) = tiny_gpt2();
    let mut opt = AdamW::hf(model3.var_store(), AdamWConfig::default()).unwrap();
    let before3 = snapshot(&model3);
    let out = model3.forward(&ids, None, None, Some(&ids)).unwrap();
    let loss = out.loss.unwrap()
        + (model3.v_head().bias.shallow_clone() - model3.v_head().bias.detach())
            .sqrt()
            .sum(Kind::Float);
    vh_train::backward(&loss).unwrap();
    let err = vh_train::optimizer_step(&mut opt, None, Some(1.0)).unwrap_err();
    assert!(
        matches!(&err, TrainError::NonFinite { term, .. } if term == "gradient norm"),
        "{err}"
    );
    for ((name, a), (_, b)) in snapshot(&model3).iter().zip(&before3) {
        assert!(a.equal(b), "{name} changed after a refused step");
    }
    drop(before);
}

#[test]
fn a_short_run_learns_the_batch() {
    // 60 AdamW steps on one batch: the LM loss and the value loss both fall below half.
    let (_dir, mut model) = tiny_gpt2();
    model.set_train(true);
    let ids = Tensor::from_slice2(&[[1i64, 5, 9, 13, 17, 21, 25, 29], [2, 4, 8, 16, 32, 3, 6, 12]]);
    let mask = Tensor::from_slice2(&[[1i64, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]]);
    let labels = ids.masked_fill(&mask.eq(0), -100);
    let targets = Tensor::linspace(-1.0, 1.0, 16, (Kind::Float, Device::Cpu)).reshape([2, 8]);
    let mut opt = AdamW::hf(
        model.var_store(),
        AdamWConfig {
            lr: 2e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut sched = vh_train::get_linear_schedule_with_warmup(&mut opt, 5, 60).unwrap();
    let mut first = None;
    let mut last = (0.0, 0.0);
    for _ in 0..60 {
        let out = model.forward(&ids, Some(&mask), None, Some(&labels)).unwrap();
        let terms = lm_value_loss(out.loss.as_ref().unwrap(), &out.values, &targets, &mask, 0.5).unwrap();
        let pair = (terms.lm_loss.double_value(&[]), terms.value_loss.double_value(&[]));
        first.get_or_insert(pair);
        last = pair;
        vh_train::backward(&terms.total).unwrap();
        vh_train::optimizer_step(&mut opt, Some(&mut sched), Some(1.0)).unwrap();
    }
    let first = first.unwrap();
    assert!(last.0 < 0.5 * first.0, "LM loss {first:?} -> {last:?}");
    assert!(last.1 < 0.5 * first.1, "value loss {first:?} -> {last:?}");
    assert_eq!(sched.steps(), 60);
}
