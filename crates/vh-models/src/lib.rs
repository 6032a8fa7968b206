//! Transformer backbones with explicit KV caches, their parameters named as in HF state dicts.

pub mod activation;
pub mod attention;
pub mod cache;
pub mod gemma;
pub mod gemma2;
pub mod gpt2;
pub mod gpt_neox;
pub mod inputs;
pub mod layers;
pub mod llama;
pub mod mistral;
pub mod opt;
pub mod qwen3;
pub mod registry;
pub mod rotary;
pub mod t5;

pub use activation::Activation;
pub use attention::AttnImplementation;
pub use cache::{Cache, LayerCache, Seq2SeqCache};
pub use registry::{
    architecture, architecture_of, Architecture, BuildOptions, CausalLm, CausalLmOutput, EncoderOutput, Family,
    ParamPosition, Seq2SeqLm, Seq2SeqLmOutput, ARCHITECTURES,
};
pub use vh_core::{Error, Result};

#[cfg(test)]
pub(crate) mod test_util {
    use tch::{nn::VarStore, Kind, Tensor};

    /// Fills every variable of `vs` with seeded N(0, scale) noise.
    pub fn randomize(vs: &VarStore, seed: i64, scale: f64) {
        tch::manual_seed(seed);
        tch::no_grad(|| {
            let mut vars: Vec<_> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, mut v) in vars {
                let noise = Tensor::randn(v.size(), (Kind::Float, v.device())) * scale;
                v.copy_(&noise);
            }
        });
    }
}
