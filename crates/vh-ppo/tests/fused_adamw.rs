//! PPO's default optimiser against PyTorch: three steps of `StatefulAdamW` with `fused: true`
//! give bit for bit the parameters and moments of `torch.optim.AdamW(fused=True)` (TRL's
//! default on torch >= 2.8) over HF's two parameter groups and a decaying learning rate, and a
//! saved state resumes to the same result.

#[path = "../../valuehead/tests/common/reference.rs"]
#[allow(dead_code)]
mod reference;

use std::collections::HashMap;
use tch::{nn::VarStore, Device, Kind, Tensor};
use vh_ppo::{AdamWSettings, StatefulAdamW};

fn reference() -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = reference::generate_reference("parity_fused_adamw.py", "parity-fused-adamw");
    let tensors = Tensor::read_safetensors(dir.join("fused_adamw.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("fused_adamw.json")).unwrap()).unwrap();
    (tensors, meta)
}

/// A var store holding the reference's initial parameters under their names.
fn var_store(t: &HashMap<String, Tensor>, names: &[String]) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    for name in names {
        let mut path = vs.root();
        let parts: Vec<&str> = name.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            path = path.sub(*part);
        }
        let _ = path.var_copy(parts[parts.len() - 1], &t[&format!("init.{name}")]);
    }
    vs
}

/// Sets each parameter's gradient to exactly `grad<step>.<name>` (the gradient of sum(p * g)).
fn set_grads(vs: &VarStore, t: &HashMap<String, Tensor>, step: usize) {
    for (name, p) in vs.variables() {
        (p * &t[&format!("grad{step}.{name}")]).sum(Kind::Float).backward();
    }
}

#[test]
fn fused_adamw_is_bit_identical_to_torch_fused_and_resumes() {
    let (t, meta) = reference();
    let names: Vec<String> = serde_json::from_value(meta["names"].clone()).unwrap();
    let lrs: Vec<f64> = serde_json::from_value(meta["lrs"].clone()).unwrap();
    let betas: Vec<f64> = serde_json::from_value(meta["betas"].clone()).unwrap();
    let no_decay: Vec<String> = serde_json::from_value(meta["no_decay"].clone()).unwrap();
    for name in &names {
        assert_eq!(
            vh_train::hf_no_decay(name),
            no_decay.contains(name),
            "{name}: HF's decay groups"
        );
    }
    let settings = AdamWSettings {
        betas: (betas[0], betas[1]),
        eps: meta["eps"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
        fused: true,
    };

    // Straight through.
    let vs = var_store(&t, &names);
    let mut opt = StatefulAdamW::hf(&vs, settings).unwrap();
    for (step, &lr) in lrs.iter().enumerate() {
        set_grads(&vs, &t, step);
        opt.step(lr).unwrap();
        opt.zero_grad().unwrap();
    }
    let vars: HashMap<String, Tensor> = vs.variables().into_iter().collect();
    for name in &names {
        let ours = &vars[name];
        let theirs = &t[&format!("final.{name}")];
        let init = &t[&format!("init.{name}")];
        assert!(!theirs.equal(init), "{name}: the reference moved");
        assert!(
            ours.equal(theirs),
            "{name}: max difference {}",
            (ours - theirs).abs().max().double_value(&[])
        );
    }
    let state = std::env::temp_dir().join(format!("vh-fused-adamw-{}.safetensors", std::process::id()));
    let saved_step = opt.save(&state).unwrap();
    let saved: HashMap<String, Tensor> = Tensor::read_safetensors(&state).unwrap().into_iter().collect();
    for name in &names {
        for m in ["exp_avg", "exp_avg_sq"] {
            let key = format!("{m}.{name}");
            assert!(saved[&key].equal(&t[&key]), "{key}");
        }
    }

    // Interrupted after the first step and resumed from the saved state.
    let vs2 = var_store(&t, &names);
    let mut first = StatefulAdamW::hf(&vs2, settings).unwrap();
    set_grads(&vs2, &t, 0);
    first.step(lrs[0]).unwrap();
    first.zero_grad().unwrap();
    let partial = std::env::temp_dir().join(format!("vh-fused-adamw-1-{}.safetensors", std::process::id()));
    let step1 = first.save(&partial).unwrap();
    let mut resumed = StatefulAdamW::hf(&vs2, settings).unwrap();
    resumed.load(&partial, step1).unwrap();
    for (step, &lr) in lrs.iter().enumerate().skip(1) {
        set_grads(&vs2, &t, step);
        resumed.step(lr).unwrap();
        resumed.zero_grad().unwrap();
    }
    assert_eq!(resumed.steps(), saved_step);
    let vars2: HashMap<String, Tensor> = vs2.variables().into_iter().collect();
    for name in &names {
        assert!(vars2[name].equal(&t[&format!("final.{name}")]), "{name} after resuming");
    }
    let _ = std::fs::remove_file(state);
    let _ = std::fs::remove_file(partial);
}
