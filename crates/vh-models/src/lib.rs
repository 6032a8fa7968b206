//! Transformer backbones with explicit KV caches, their parameters named as in HF state dicts.

pub mod activation;
pub mod attention;
pub mod bart;
pub mod bloom;
pub mod cache;
pub mod cohere;
pub mod dbrx;
pub mod gemma;
pub mod gemma2;
pub mod gpt2;
pub mod gpt_neox;
pub mod inputs;
pub mod layers;
pub mod llama;
pub mod mistral;
pub mod opt;
pub mod phi3;
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
        // A hash of (seed, variable, element) rather than libtorch's global generator, which
        // tests running in parallel in the same process would advance between two calls.
        tch::no_grad(|| {
            let mut vars: Vec<_> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (i, (_, mut v)) in vars.into_iter().enumerate() {
                let n = v.numel() as i64;
                let x = Tensor::arange(n, (Kind::Double, v.device())) * 12.9898
                    + (seed as f64 * 78.233 + i as f64 * 37.719);
                let uniform = (x.sin() * 43758.5453).frac().abs();
                // Uniform on [-1, 1) scaled to the standard deviation `scale`.
                let noise = ((uniform * 2.0 - 1.0) * (scale * 3f64.sqrt()))
                    .to_kind(Kind::Float)
                    .view(v.size().as_slice());
                v.copy_(&noise);
            }
        });
    }
}
