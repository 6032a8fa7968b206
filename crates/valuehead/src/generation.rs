//! Generation for both wrappers, HF-compatible decoding plus, from the same passes, each
//! generated token's value and log-probability (what PPO needs, without a second forward).

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tch::{Device, Kind, Tensor};
use vh_core::error::invalid;
use vh_core::ops::ScalarOps;

/// Decoding settings, as HF's `GenerationConfig`. Defaults come from the model folder's
/// generation_config.json and config.json ([`GenerationConfig::from_model`]); every field can be
/// overridden.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Tokens to generate at most (default: from `max_new_tokens`, else `max_length` minus the
    /// prompt, else HF's `max_length` of 20).
    pub max_new_tokens: Option<usize>,
    /// HF's `max_length`: prompt plus new tokens (decoder start plus new tokens for seq2seq);
    /// used when `max_new_tokens` is not set.
    pub max_length: Option<usize>,
    /// End-of-sequence tokens are forbidden until this many tokens are generated.
    pub min_new_tokens: usize,
    /// Sample instead of taking the most likely token.
    pub do_sample: bool,
    /// Sampling temperature (> 0).
    pub temperature: f64,
    /// Keep the k most likely tokens when sampling (0 = all); HF's default is 50.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` when sampling, in (0, 1].
    pub top_p: f64,
    /// HF's repetition penalty (> 0; 1 = none) on tokens already in the sequence.
    pub repetition_penalty: f64,
    /// Tokens that end a row.
    pub eos_token_id: Vec<i64>,
    /// The token that continues finished rows (default: the first eos token).
    pub pad_token_id: Option<i64>,
    /// The first decoder token of seq2seq models.
    pub decoder_start_token_id: Option<i64>,
    /// HF's `forced_bos_token_id`: the token generated first when the sequence so far is one
    /// token long (a seq2seq decoder start; Bart's configs set it for some checkpoints).
    pub forced_bos_token_id: Option<i64>,
    /// HF's `forced_eos_token_id`: the last new token (at `max_length - 1`) is one of these
    /// (Bart's configs set 2). Empty: none forced.
    pub forced_eos_token_id: Vec<i64>,
    /// Seeds the sampler; the same seed gives the same output. `None` draws a random seed.
    pub seed: Option<u64>,
    /// How often the loop reads back from the device whether every row has finished, once an
    /// eos token can end a row: after every token (1, the default, as HF), every k tokens (k),
    /// or never (0: the loop runs to `max_new_tokens`). The output is the same for every
    /// choice: columns after the one where the last row finished are cut off at the end (one
    /// read after the loop). On CUDA each read waits for the GPU, so a larger k lets the host
    /// run ahead. No read happens while `min_new_tokens` forbids eos, so `min_new_tokens ==
    /// max_new_tokens` never reads.
    pub stop_check_interval: usize,
    /// How the decode steps run (see [`Decoding`]); the tokens are the same for every choice.
    pub decoding: Decoding,
}

/// How a causal model's decode steps run. Every choice gives the same tokens; the static
/// cache's values and log-probabilities agree with the growing cache's up to rounding
/// (attention sums over the preallocated length in another order), and CUDA-graph replay gives
/// exactly the static cache's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decoding {
    /// The key/value cache grows by one position per step (written in place into a reserve);
    /// each step's shapes follow the sequence length. The default.
    #[default]
    Eager,
    /// A static key/value cache sized to prompt + `max_new_tokens` from the start, written at a
    /// device-side position, with attention over the whole length under a mask built on the
    /// device: every step has the same shapes and reads nothing back from the device.
    /// Greedy decoding (with eos, pad and `min_new_tokens`) of decoder-only models; sampling,
    /// the repetition penalty, seq2seq models and dynamic-NTK rotary scaling fall back to
    /// `Eager`, with a warning.
    StaticCache,
    /// `StaticCache` with the decode step (all layers, LM head at the last position, value
    /// head, the chosen token's log-probability, the greedy choice) captured once as a CUDA
    /// graph and replayed per token (captured once per batch size and length, reused by later
    /// calls with the same shapes). Where graphs are unavailable (CPU, a libtorch without CUDA,
    /// a capture that fails) the static cache runs eagerly with the same results, with a
    /// warning (on CPU, silently).
    CudaGraphs,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            max_length: None,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            eos_token_id: Vec::new(),
            pad_token_id: None,
            decoder_start_token_id: None,
            forced_bos_token_id: None,
            forced_eos_token_id: Vec::new(),
            seed: None,
            stop_check_interval: 1,
            decoding: Decoding::Eager,
        }
    }
}

thread_local! {
    /// Device-to-host reads made by the decode loop of this thread's last `generate`.
    static DECODE_HOST_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times the decode loop of this thread's last `generate` call read data back from
/// the device (each read waits for every queued kernel on CUDA): the stop test and host-side
/// sampling, counted where the loop makes them. Validation at the API boundary, before the
/// loop, is not counted. Greedy decoding with `min_new_tokens == max_new_tokens` reads nothing;
/// otherwise at most one read per step (plus one after the loop when `stop_check_interval` is
/// not 1).
pub fn last_generate_host_syncs() -> usize {
    DECODE_HOST_READS.with(std::cell::Cell::get)
}

/// Starts counting the decode loop's device reads afresh.
pub(crate) fn reset_host_syncs() {
    DECODE_HOST_READS.with(|c| c.set(0));
}

/// Runs `read`, a read of device data on the host inside the decode loop, and counts it.
pub(crate) fn host_read<T>(read: impl FnOnce() -> T) -> T {
    DECODE_HOST_READS.with(|c| c.set(c.get() + 1));
    read()
}

/// Whether the loop checks for finished rows after choosing token `n` (0-based), given that an
/// eos can end a row by then.
pub(crate) fn stop_check_due(config: &GenerationConfig, n: usize) -> bool {
    match config.stop_check_interval {
        0 => false,
        k => (n + 1).is_multiple_of(k),
    }
}

/// The generated columns up to the one where the last row finished: what HF returns when it
/// stops as soon as every row has ended. Only needed (one device read) when the loop did not
/// check after every token.
pub(crate) fn trim_finished(
    config: &GenerationConfig,
    can_finish: bool,
    columns: usize,
    generated_mask: &Tensor,
) -> Result<i64> {
    if config.stop_check_interval == 1 || !can_finish {
        return Ok(columns as i64);
    }
    let kept = host_read(|| {
        generated_mask
            .f_any_dim(0, false)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])
    })?;
    // A column where no row generated follows every row's end; all columns before have one.
    Ok(kept.max(1))
}

fn token_ids(v: &Value, key: &str) -> Result<Option<Vec<i64>>> {
    let bad = || Error::InvalidOption(format!("`{key}` must be a token id or a list of them, got {v}"));
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(Some(vec![n.as_i64().ok_or_else(bad)?])),
        Value::Array(items) => Ok(Some(
            items
                .iter()
                .map(|i| i.as_i64().ok_or_else(bad))
                .collect::<Result<_>>()?,
        )),
        _ => Err(bad()),
    }
}

impl GenerationConfig {
    /// Defaults from a model's generation_config.json (when it has one) over its config.json,
    /// as HF's `GenerationConfig.from_model_config`, over HF's own defaults.
    pub fn from_model(config: &Value, generation_config: Option<&Value>) -> Result<Self> {
        let mut out = Self::default();
        let sources: Vec<&Value> = [Some(config), generation_config].into_iter().flatten().collect();
        for source in sources {
            let get = |key: &str| source.get(key).filter(|v| !v.is_null());
            let as_usize = |key: &str| -> Result<Option<usize>> {
                get(key)
                    .map(|v| {
                        v.as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| Error::InvalidOption(format!("`{key}` must be a count, got {v}")))
                    })
                    .transpose()
            };
            let as_f64 = |key: &str| -> Result<Option<f64>> {
                get(key)
                    .map(|v| {
                        v.as_f64()
                            .ok_or_else(|| Error::InvalidOption(format!("`{key}` must be a number, got {v}")))
                    })
                    .transpose()
            };
            if let Some(v) = as_usize("max_new_tokens")? {
                out.max_new_tokens = Some(v);
            }
            if let Some(v) = as_usize("max_length")? {
                out.max_length = Some(v);
            }
            if let Some(v) = as_usize("min_new_tokens")? {
                out.min_new_tokens = v;
            }
            if let Some(v) = get("do_sample") {
                out.do_sample = v
                    .as_bool()
                    .ok_or_else(|| Error::InvalidOption(format!("`do_sample` must be a bool, got {v}")))?;
            }
            if let Some(v) = as_f64("temperature")? {
                out.temperature = v;
            }
            if let Some(v) = as_usize("top_k")? {
                out.top_k = v;
            }
            if let Some(v) = as_f64("top_p")? {
                out.top_p = v;
            }
            if let Some(v) = as_f64("repetition_penalty")? {
                out.repetition_penalty = v;
            }
            if let Some(ids) = get("eos_token_id")
                .map(|v| token_ids(v, "eos_token_id"))
                .transpose()?
                .flatten()
            {
                out.eos_token_id = ids;
            }
            if let Some(ids) = get("pad_token_id")
                .map(|v| token_ids(v, "pad_token_id"))
                .transpose()?
                .flatten()
            {
                out.pad_token_id = ids.first().copied();
            }
            if let Some(ids) = get("decoder_start_token_id")
                .map(|v| token_ids(v, "decoder_start_token_id"))
                .transpose()?
                .flatten()
            {
                out.decoder_start_token_id = ids.first().copied();
            }
            if let Some(ids) = get("forced_bos_token_id")
                .map(|v| token_ids(v, "forced_bos_token_id"))
                .transpose()?
                .flatten()
            {
                out.forced_bos_token_id = ids.first().copied();
            }
            if let Some(ids) = get("forced_eos_token_id")
                .map(|v| token_ids(v, "forced_eos_token_id"))
                .transpose()?
                .flatten()
            {
                out.forced_eos_token_id = ids;
            }
        }
        Ok(out)
    }

    /// Checks the settings against a vocabulary: temperature > 0 and top_p in (0, 1] when
    /// sampling, a positive repetition penalty, and the token ids that would be fed to the model
    /// inside the vocabulary: the decoder start, and the pad token when an eos token can end a
    /// row (finished rows continue with it). End-of-sequence ids outside the vocabulary are
    /// accepted, as HF does (`GPT2Config(vocab_size=1000)` keeps eos 50256): they can never be
    /// generated, so they never end a row.
    pub fn validate(&self, vocab_size: i64) -> Result<()> {
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidOption(format!(
                "temperature must be > 0 when sampling, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidOption(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::InvalidOption(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            )));
        }
        let in_vocab = |id: i64| (0..vocab_size).contains(&id);
        let can_finish = self.eos_token_id.iter().any(|&id| in_vocab(id));
        // Forced tokens index the scores (HF fails on ids outside them), and are fed back.
        let fed = self
            .decoder_start_token_id
            .iter()
            .map(|id| ("decoder_start_token_id", *id))
            .chain(self.forced_bos_token_id.iter().map(|id| ("forced_bos_token_id", *id)))
            .chain(self.forced_eos_token_id.iter().map(|id| ("forced_eos_token_id", *id)))
            .chain(self.pad().filter(|_| can_finish).map(|id| ("pad_token_id", id)));
        for (name, id) in fed {
            if !in_vocab(id) {
                return Err(Error::InvalidOption(format!(
                    "{name} {id} is outside the vocabulary 0..{vocab_size}"
                )));
            }
        }
        Ok(())
    }

    /// New tokens to generate for a prompt of `prompt_len` tokens (`start_len` = 1 for seq2seq,
    /// counting the decoder start token as HF's `max_length` does).
    pub fn new_tokens(&self, start_len: usize) -> Result<usize> {
        let n = match (self.max_new_tokens, self.max_length) {
            (Some(n), _) => n,
            (None, Some(max_length)) => max_length.saturating_sub(start_len),
            (None, None) => 20usize.saturating_sub(start_len),
        };
        if n == 0 {
            return Err(Error::InvalidOption(format!(
                "nothing to generate: max_new_tokens is 0 (max_new_tokens {:?}, max_length {:?}, prompt {start_len})",
                self.max_new_tokens, self.max_length
            )));
        }
        Ok(n)
    }

    /// The token that continues finished rows.
    pub fn pad(&self) -> Option<i64> {
        self.pad_token_id.or_else(|| self.eos_token_id.first().copied())
    }
}

/// The attention mask HF's `generate` infers for a prompt given without one
/// (`_prepare_attention_mask_for_generation`): false where the pad token occurs, when it occurs
/// and is no eos token; `None` (attend to everything) otherwise. `input_ids` must be checked.
pub(crate) fn inferred_attention_mask(input_ids: &Tensor, config: &GenerationConfig) -> Result<Option<Tensor>> {
    let Some(pad) = config.pad_token_id else {
        return Ok(None);
    };
    if config.eos_token_id.contains(&pad) {
        return Ok(None);
    }
    let mask = input_ids.s_ne(pad)?;
    if mask.f_all()?.f_int64_value(&[])? != 0 {
        return Ok(None);
    }
    Ok(Some(mask))
}

/// The cache positions a generation needs, `start` positions plus `max_new` new ones, or an
/// error when that count does not fit an i64 (e.g. `max_new_tokens` = 2^63 - 1).
pub(crate) fn generation_capacity(start: i64, max_new: usize) -> Result<i64> {
    i64::try_from(max_new)
        .ok()
        .and_then(|n| n.checked_add(start))
        .ok_or_else(|| Error::InvalidOption(format!("max_new_tokens {max_new} is beyond any model's reach")))
}

/// This machine's memory in bytes (MemTotal), if it can be read.
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `cache` with room for `capacity` positions, written in place by later steps. A generation
/// whose cache alone would exceed this machine's memory is refused before it starts, instead of
/// running until an allocation fails (on CUDA, the allocation's own error reports it).
pub(crate) fn reserve_cache(cache: &vh_models::Cache, capacity: i64, device: Device) -> Result<vh_models::Cache> {
    let needed = (cache.bytes_per_position() as u64).saturating_mul(capacity as u64);
    if let (Device::Cpu, Some(total)) = (device, total_memory()) {
        if needed > total {
            return Err(Error::InvalidOption(format!(
                "generating up to {capacity} positions needs a {:.1} GiB key/value cache, more than this machine's {:.1} GiB of memory; lower max_new_tokens",
                needed as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            )));
        }
    }
    Ok(cache.with_capacity(capacity)?)
}

/// Where a `generate` call spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateTimings {
    /// The first pass, over the whole prompt (decoder-only) or the decoder prompt (seq2seq).
    pub prompt: std::time::Duration,
    /// The passes that each feed one new token through the cache.
    pub decode: std::time::Duration,
    /// How many such passes ran (one fewer than the tokens generated).
    pub decode_steps: usize,
}

impl GenerateTimings {
    /// Tokens per second of the decode steps alone (0 when there were none).
    pub fn decode_tokens_per_second(&self, batch: usize) -> f64 {
        let seconds = self.decode.as_secs_f64();
        if self.decode_steps == 0 || seconds == 0.0 {
            return 0.0;
        }
        (self.decode_steps * batch) as f64 / seconds
    }
}

/// What `generate` returns.
#[derive(Debug)]
pub struct GenerateOutput {
    /// Token ids as transformers returns them: causal = prompt + new tokens; seq2seq = decoder
    /// start + new tokens. i64 [batch, len].
    pub sequences: Tensor,
    /// The new tokens alone, i64 [batch, new].
    pub new_tokens: Tensor,
    /// For each new token, the value of the state it was generated from (the value at the
    /// position before it, as TRL's PPO aligns values with log-probs), f32 [batch, new].
    pub values: Tensor,
    /// For each new token, its log-probability under the model's own distribution (raw logits,
    /// before repetition penalty, temperature, top-k and top-p), f32 [batch, new].
    pub logprobs: Tensor,
    /// For each new token, its log-probability under the processed scores it was chosen from
    /// (after repetition penalty, temperature, top-k and top-p): what TRL's PPO reads from
    /// `generate`'s `scores` as the rollout's log-probabilities, f32 [batch, new].
    pub sample_logprobs: Tensor,
    /// True for tokens generated before the row finished (its eos included); false for the
    /// padding that continues finished rows. bool [batch, new].
    pub generated_mask: Tensor,
    /// Time spent in the prompt pass and in the decode steps (wall clock; on CUDA the kernels
    /// may still run after a step returns, so only the total is exact there).
    pub timings: GenerateTimings,
}

/// One decoding step's raw outputs at the last position: logits f32 [B, V] and values f32 [B].
pub(crate) struct StepOutput {
    pub(crate) logits: Tensor,
    pub(crate) values: Tensor,
}

/// HF's repetition penalty: scores of tokens present in `seen` [B, L] are divided by the penalty
/// when positive and multiplied when negative.
pub(crate) fn apply_repetition_penalty(scores: &Tensor, seen: &Tensor, penalty: f64) -> Result<Tensor> {
    let score = scores.f_gather(1, seen, false)?;
    let penalised = score
        .s_mul(penalty)?
        .f_where_self(&score.s_lt(0.0)?, &score.s_div(penalty)?)?;
    Ok(scores.f_scatter(1, seen, &penalised)?)
}

/// HF's top-k warper: scores below the k-th largest become -inf (ties with it are kept).
pub(crate) fn top_k_filter(scores: &Tensor, k: usize) -> Result<Tensor> {
    let vocab = scores.size()[1];
    let k = (k as i64).min(vocab);
    let (top, _) = scores.f_topk(k, -1, true, true)?;
    let kth = top.f_narrow(1, k - 1, 1)?;
    Ok(scores.s_masked_fill(&scores.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?)
}

/// HF's top-p warper: the least likely tokens whose cumulative probability stays within
/// 1 - top_p become -inf; the most likely token is always kept.
pub(crate) fn top_p_filter(scores: &Tensor, top_p: f64) -> Result<Tensor> {
    let (sorted, indices) = scores.f_sort(-1, false)?;
    let cumulative = sorted.f_softmax(-1, Kind::Float)?.f_cumsum(-1, Kind::Float)?;
    let vocab = scores.size()[1];
    let remove = cumulative.s_le(1.0 - top_p)?;
    let mut most_likely = remove.f_narrow(1, vocab - 1, 1)?;
    most_likely.s_fill_(0)?;
    let remove = remove.f_scatter(1, &indices, &remove)?;
    Ok(scores.s_masked_fill(&remove, f64::NEG_INFINITY)?)
}

/// The tokens HF's `ForcedBOSTokenLogitsProcessor` and `ForcedEOSTokenLogitsProcessor` force
/// at a step, if any: the BOS id when the sequence so far (`cur_len`, prompt or decoder start
/// included) is one token long, the forced eos ids when this is the last new token
/// (`cur_len == max_length - 1`). HF runs the BOS processor first, so eos wins when both apply.
pub(crate) fn forced_tokens(config: &GenerationConfig, cur_len: usize, last: bool) -> Option<Vec<i64>> {
    if last && !config.forced_eos_token_id.is_empty() {
        return Some(config.forced_eos_token_id.clone());
    }
    match config.forced_bos_token_id {
        Some(bos) if cur_len == 1 => Some(vec![bos]),
        _ => None,
    }
}

/// The processed scores from which the next token is chosen: repetition penalty, min-new-tokens
/// eos suppression (`eos` [n] on the scores' device), forced tokens (every other score -inf,
/// see [`forced_tokens`]), then (sampling only) temperature, top-k and top-p, in HF's order.
pub(crate) fn process_scores(
    logits: &Tensor,
    seen: &Tensor,
    generated: usize,
    config: &GenerationConfig,
    eos: Option<&Tensor>,
    forced: Option<&[i64]>,
) -> Result<Tensor> {
    let mut scores = logits.shallow_clone();
    if config.repetition_penalty != 1.0 {
        scores = apply_repetition_penalty(&scores, seen, config.repetition_penalty)?;
    }
    if let Some(eos) = eos.filter(|_| generated < config.min_new_tokens) {
        scores = scores.s_index_fill(1, eos, f64::NEG_INFINITY)?;
    }
    if let Some(ids) = forced {
        let ids = Tensor::f_from_slice(ids)?.f_to_device(scores.device())?;
        scores = scores.f_full_like(f64::NEG_INFINITY)?.s_index_fill(1, &ids, 0.0)?;
    }
    if config.do_sample {
        if config.temperature != 1.0 {
            scores = scores.s_div(config.temperature)?;
        }
        if config.top_k != 0 {
            scores = top_k_filter(&scores, config.top_k)?;
        }
        if config.top_p < 1.0 {
            scores = top_p_filter(&scores, config.top_p)?;
        }
    }
    Ok(scores)
}

/// Draws one token per row from softmax(scores) with `rng`.
pub(crate) fn sample(scores: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let probs = scores.f_softmax(-1, Kind::Double)?;
    let (batch, vocab) = (probs.size()[0], probs.size()[1]);
    // The one device read of a sampled step (the draw runs on the host, seeded).
    let flat: Vec<f64> =
        host_read(|| Vec::<f64>::try_from(probs.f_to_device(Device::Cpu)?.f_reshape([-1])?)).map_err(Error::from)?;
    let mut picks = Vec::with_capacity(batch as usize);
    for row in flat.chunks(vocab as usize) {
        let u: f64 = rng.gen::<f64>() * row.iter().sum::<f64>();
        let mut acc = 0.0;
        let mut pick = None;
        for (i, p) in row.iter().enumerate() {
            if *p > 0.0 {
                acc += p;
                pick = Some(i as i64);
                if u < acc {
                    break;
                }
            }
        }
        picks.push(pick.ok_or_else(|| invalid("every token has probability 0 after filtering"))?);
    }
    Ok(Tensor::f_from_slice(&picks)?.f_to_device(scores.device())?)
}

/// The token finished rows continue with, [batch] on `device` (built once, not per step);
/// an error when eos tokens are set without a pad token.
pub(crate) fn pad_column(config: &GenerationConfig, batch: i64, device: Device) -> Result<Option<Tensor>> {
    let pad = config.pad();
    if pad.is_none() && !config.eos_token_id.is_empty() {
        return Err(Error::InvalidOption(
            "pad_token_id is needed to continue finished rows".into(),
        ));
    }
    Ok(pad
        .map(|id| Tensor::f_full([batch], id, (Kind::Int64, device)))
        .transpose()?)
}

/// The eos ids that can end a row, on `device`: those inside the vocabulary. Ids outside it can
/// never be generated (HF keeps them in the config, e.g. GPT-2's 50256 on a smaller
/// vocabulary); they are dropped with a warning.
pub(crate) fn eos_tensor(config: &GenerationConfig, vocab: i64, device: Device) -> Result<Option<Tensor>> {
    let eos_ids = eos_in_vocab(config, vocab);
    if eos_ids.len() < config.eos_token_id.len() {
        log::warn!(
            "eos_token_id {:?} lies outside the vocabulary 0..{vocab}: those ids are never generated",
            config.eos_token_id
        );
    }
    Ok((!eos_ids.is_empty())
        .then(|| Tensor::f_from_slice(&eos_ids).and_then(|t| t.f_to_device(device)))
        .transpose()?)
}

/// The eos ids inside the vocabulary `0..vocab`.
pub(crate) fn eos_in_vocab(config: &GenerationConfig, vocab: i64) -> Vec<i64> {
    config
        .eos_token_id
        .iter()
        .copied()
        .filter(|id| (0..vocab).contains(id))
        .collect()
}

/// The decoding loop shared by both wrappers. `step(None)` runs the model on the prompt (causal)
/// or the decoder start (seq2seq); `step(Some(next))` feeds one new token per row [B, 1] through
/// the caches. `seen` is what the repetition penalty looks at before any token is generated
/// (HF's `input_ids`).
pub(crate) fn decode_loop(
    seen: &Tensor,
    max_new: usize,
    config: &GenerationConfig,
    mut step: impl FnMut(Option<&Tensor>) -> Result<StepOutput>,
) -> Result<GenerateOutput> {
    let batch = seen.size()[0];
    let device = seen.device();
    let pad = pad_column(config, batch, device)?;
    let mut timings = GenerateTimings::default();
    reset_host_syncs();
    let started = std::time::Instant::now();
    let mut out = step(None)?;
    timings.prompt = started.elapsed();
    let eos = eos_tensor(config, out.logits.size()[1], device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed.unwrap_or_else(rand::random));
    // The repetition penalty looks at the growing sequence at every step; otherwise the
    // sequences are assembled once at the end.
    let penalised = config.repetition_penalty != 1.0;
    let prompt = seen.shallow_clone();
    let mut seen = seen.shallow_clone();
    let mut unfinished = Tensor::f_ones([batch], (Kind::Bool, device))?;
    let (mut tokens, mut values, mut logprobs, mut generated_mask) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sample_logprobs = Vec::new();
    let start_len = prompt.size()[1] as usize;
    for n in 0..max_new {
        let forced = forced_tokens(config, start_len + n, n + 1 == max_new);
        let scores = process_scores(&out.logits, &seen, n, config, eos.as_ref(), forced.as_deref())?;
        let mut next = if config.do_sample {
            sample(&scores, &mut rng)?
        } else {
            scores.f_argmax(-1, false)?
        };
        // Before min_new_tokens no row can have produced eos, so every row is still going.
        let may_finish = eos.is_some() && n >= config.min_new_tokens;
        if let (Some(pad), true) = (&pad, may_finish) {
            next = next.f_where_self(&unfinished, pad)?;
        }
        let column = next.f_unsqueeze(1)?;
        // log_softmax at the chosen token: logit - logsumexp, without writing the whole row.
        let logprob = out
            .logits
            .f_gather(1, &column, false)?
            .f_squeeze_dim(1)?
            .f_sub(&out.logits.f_logsumexp(&[-1i64][..], false)?)?;
        // The same at the processed scores: with a temperature this is the sampling
        // distribution's log-probability, which PPO's ratio is measured against.
        let sample_logprob = scores
            .f_gather(1, &column, false)?
            .f_squeeze_dim(1)?
            .f_sub(&scores.f_logsumexp(&[-1i64][..], false)?)?;
        tokens.push(next.shallow_clone());
        values.push(out.values.shallow_clone());
        logprobs.push(logprob);
        sample_logprobs.push(sample_logprob);
        generated_mask.push(unfinished.shallow_clone());
        if penalised {
            seen = Tensor::f_cat(&[&seen, &column], 1)?;
        }
        if let (Some(eos), true) = (&eos, may_finish) {
            unfinished = unfinished.f_logical_and(&Tensor::f_isin(&next, eos, false, false)?.f_logical_not()?)?;
            // The stop test: the loop's one device read per step (none before min_new_tokens).
            if n + 1 < max_new
                && stop_check_due(config, n)
                && host_read(|| unfinished.f_any()?.f_int64_value(&[]))? == 0
            {
                break;
            }
        }
        if n + 1 < max_new {
            let started = std::time::Instant::now();
            out = step(Some(&column))?;
            timings.decode += started.elapsed();
            timings.decode_steps += 1;
        }
    }
    let generated_mask = Tensor::f_stack(&generated_mask, 1)?;
    let can_finish = eos.is_some() && config.min_new_tokens < max_new;
    let kept = trim_finished(config, can_finish, tokens.len(), &generated_mask)?;
    finish_output(
        &prompt,
        &Tensor::f_stack(&tokens, 1)?,
        &Tensor::f_stack(&values, 1)?,
        &Tensor::f_stack(&logprobs, 1)?,
        &Tensor::f_stack(&sample_logprobs, 1)?,
        &generated_mask,
        kept,
        timings,
    )
}

/// The output from the generated columns [batch, n >= kept], keeping the first `kept`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_output(
    prompt: &Tensor,
    tokens: &Tensor,
    values: &Tensor,
    logprobs: &Tensor,
    sample_logprobs: &Tensor,
    generated_mask: &Tensor,
    kept: i64,
    timings: GenerateTimings,
) -> Result<GenerateOutput> {
    let keep = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.size()[1] == kept {
            t.shallow_clone()
        } else {
            t.f_narrow(1, 0, kept)?.f_contiguous()?
        })
    };
    let new_tokens = keep(tokens)?;
    Ok(GenerateOutput {
        sequences: Tensor::f_cat(&[prompt, &new_tokens], 1)?,
        new_tokens,
        values: keep(values)?,
        logprobs: keep(logprobs)?,
        sample_logprobs: keep(sample_logprobs)?,
        generated_mask: keep(generated_mask)?,
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_defaults_come_from_generation_config_over_config() {
        let config = json!({"eos_token_id": 5, "pad_token_id": null, "decoder_start_token_id": 0, "max_length": 30});
        let generation = json!({"eos_token_id": [5, 6], "max_new_tokens": 7, "do_sample": true, "top_k": 0});
        let cfg = GenerationConfig::from_model(&config, Some(&generation)).unwrap();
        assert_eq!(cfg.eos_token_id, vec![5, 6]);
        assert_eq!(cfg.pad(), Some(5));
        assert_eq!(
            (cfg.max_new_tokens, cfg.max_length, cfg.do_sample, cfg.top_k),
            (Some(7), Some(30), true, 0)
        );
        assert_eq!(cfg.decoder_start_token_id, Some(0));
        assert_eq!(cfg.new_tokens(3).unwrap(), 7);
        let plain = GenerationConfig::from_model(&json!({"max_length": 12}), None).unwrap();
        assert_eq!(plain.new_tokens(4).unwrap(), 8);
        assert_eq!(GenerationConfig::default().new_tokens(1).unwrap(), 19);
        assert!(GenerationConfig {
            max_new_tokens: Some(0),
            ..Default::default()
        }
        .new_tokens(3)
        .is_err());
        assert!(GenerationConfig::from_model(&json!({"eos_token_id": "x"}), None).is_err());
    }

    #[test]
    fn validation_rejects_bad_settings() {
        let ok = GenerationConfig {
            do_sample: true,
            ..Default::default()
        };
        assert!(ok.validate(10).is_ok());
        assert!(GenerationConfig {
            temperature: 0.0,
            ..ok.clone()
        }
        .validate(10)
        .is_err());
        assert!(GenerationConfig {
            temperature: -1.0,
            ..ok.clone()
        }
        .validate(10)
        .is_err());
        assert!(GenerationConfig {
            top_p: 0.0,
            ..ok.clone()
        }
        .validate(10)
        .is_err());
        assert!(GenerationConfig {
            top_p: 1.5,
            ..ok.clone()
        }
        .validate(10)
        .is_err());
        assert!(GenerationConfig {
            repetition_penalty: 0.0,
            ..ok.clone()
        }
        .validate(10)
        .is_err());
        // An eos outside the vocabulary is never generated: accepted, as HF does.
        assert!(GenerationConfig {
            eos_token_id: vec![10],
            ..ok.clone()
        }
        .validate(10)
        .is_ok());
        // A pad token that a finished row would be fed is checked.
        assert!(GenerationConfig {
            eos_token_id: vec![3],
            pad_token_id: Some(10),
            ..ok.clone()
        }
        .validate(10)
        .is_err());
        assert!(GenerationConfig {
            decoder_start_token_id: Some(-1),
            ..ok.clone()
        }
        .validate(10)
        .is_err());
        // Temperature only matters when sampling, as in HF.
        assert!(GenerationConfig {
            temperature: 0.0,
            ..Default::default()
        }
        .validate(10)
        .is_ok());
    }

    #[test]
    fn forced_tokens_follow_hf_processors() {
        let config = GenerationConfig::from_model(
            &json!({"forced_bos_token_id": 0, "forced_eos_token_id": 2}),
            Some(&json!({"forced_eos_token_id": [2, 3]})),
        )
        .unwrap();
        assert_eq!(
            (config.forced_bos_token_id, config.forced_eos_token_id.clone()),
            (Some(0), vec![2, 3])
        );
        // BOS only when the sequence so far is one token; eos only at the last new token, and
        // eos wins when both apply (HF runs the BOS processor first).
        assert_eq!(forced_tokens(&config, 1, false), Some(vec![0]));
        assert_eq!(forced_tokens(&config, 2, false), None);
        assert_eq!(forced_tokens(&config, 5, true), Some(vec![2, 3]));
        assert_eq!(forced_tokens(&config, 1, true), Some(vec![2, 3]));
        let logits = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 0.5, -1.0]).unsqueeze(0);
        let seen = Tensor::from_slice2(&[[1i64]]);
        let forced = process_scores(&logits, &seen, 0, &config, None, Some(&[2, 3])).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(forced.reshape([-1])).unwrap(),
            vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, 0.0, f32::NEG_INFINITY]
        );
        assert!(GenerationConfig {
            forced_eos_token_id: vec![5],
            ..Default::default()
        }
        .validate(5)
        .is_err());
        assert!(GenerationConfig {
            forced_bos_token_id: Some(-1),
            ..Default::default()
        }
        .validate(5)
        .is_err());
    }

    #[test]
    fn warpers_follow_hf() {
        let scores = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 2.0, -1.0]).unsqueeze(0);
        let k = top_k_filter(&scores, 2).unwrap();
        // 3.0 and both 2.0s survive (ties with the k-th are kept).
        assert_eq!(
            Vec::<f32>::try_from(k.isfinite().to_kind(Kind::Float).reshape([-1])).unwrap(),
            vec![0.0, 1.0, 1.0, 1.0, 0.0]
        );
        // Probabilities: 0.07, 0.53, 0.19, 0.19, 0.01.
        let kept = |top_p: f64| {
            let p = top_p_filter(&scores, top_p).unwrap();
            Vec::<f32>::try_from(p.isfinite().to_kind(Kind::Float).reshape([-1])).unwrap()
        };
        assert_eq!(kept(0.5), vec![0.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(kept(0.8), vec![0.0, 1.0, 1.0, 1.0, 0.0]);
        assert_eq!(kept(1.0), vec![1.0; 5]);
        let penalised = apply_repetition_penalty(&scores, &Tensor::from_slice2(&[[1i64, 4, 4]]), 2.0).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(penalised.reshape([-1])).unwrap(),
            vec![1.0, 1.5, 2.0, 2.0, -2.0]
        );
    }
}
