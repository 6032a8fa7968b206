//! Greedy decoding of decoder-only models over a static key/value cache ([`Decoding::StaticCache`]
//! and [`Decoding::CudaGraphs`]).
//!
//! Everything a decode step reads or writes lives in tensors allocated once, before the first
//! step, at fixed addresses ([`StaticState`]): the token fed in, its position, the cache slot it
//! is written to, the step counter, the rows still going, the cache buffers and the output
//! columns. A step (the forward of one token per row through every layer, the LM head at that
//! position, the value head, then the greedy choice, its log-probability and the bookkeeping)
//! updates them in place with device operations only, so it has the same shapes every time,
//! reads nothing back on the host, and can be captured once as a CUDA graph and replayed per
//! token. Run eagerly (on CPU, or where graphs are unavailable) the same function gives the same
//! numbers.
//!
//! [`Decoding::StaticCache`]: crate::generation::Decoding::StaticCache
//! [`Decoding::CudaGraphs`]: crate::generation::Decoding::CudaGraphs

use crate::error::{Error, Result};
use crate::generation::{host_read, stop_check_due, GenerateTimings, GenerationConfig, StepOutput};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use vh_core::ops::ScalarOps;
use vh_cuda_graph::CudaGraph;
use vh_models::inputs::{CausalInputs, StaticKeys};
use vh_models::Cache;

/// Everything a captured step bakes in: a graph is reused only by a call that matches it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SessionKey {
    pub(crate) batch: i64,
    pub(crate) prompt_len: i64,
    pub(crate) max_new: usize,
    pub(crate) min_new: usize,
    pub(crate) eos: Vec<i64>,
    pub(crate) pad: Option<i64>,
    pub(crate) padded: bool,
    pub(crate) device: Device,
}

/// The device-side state of a static-cache decode: every tensor a step touches, allocated once.
#[derive(Debug)]
pub(crate) struct StaticState {
    batch: i64,
    capacity: i64,
    /// The token each row feeds next, i64 [batch, 1].
    input_ids: Tensor,
    /// Its position id, i64 [batch or 1, 1].
    positions: Tensor,
    /// The cache index it is written at, i64 [1].
    slot: Tensor,
    /// The output column of the next chosen token, i64 [1].
    step: Tensor,
    /// Keys that are not padding, bool [batch, capacity], when the prompt is padded.
    key_mask: Option<Tensor>,
    cache: Cache,
    /// Rows that have not produced eos, bool [batch].
    unfinished: Tensor,
    tokens: Tensor,
    values: Tensor,
    logprobs: Tensor,
    /// The chosen token's log-probability under the processed scores (eos forbidden before
    /// `min_new_tokens`), as the eager loop's `sample_logprobs`.
    sample_logprobs: Tensor,
    generated_mask: Tensor,
    /// The eos ids that can end a row, and the token finished rows continue with.
    eos: Option<Tensor>,
    pad: Option<Tensor>,
    min_new: usize,
    /// 1 as a CPU scalar, for the in-place increments.
    one: Tensor,
}

/// A zero-dimensional CPU tensor: a number an operation reads on the host at launch (no copy
/// to the device, nothing to wait for; a captured graph keeps it as a constant).
fn cpu_scalar(v: i64) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&[v])?.f_reshape([] as [i64; 0])?)
}

/// A fresh copy of `t` (outputs must not alias buffers a later call overwrites).
fn fresh(t: &Tensor) -> Result<Tensor> {
    let mut copy = t.f_empty_like()?;
    copy.f_copy_(t)?;
    Ok(copy)
}

/// The static inputs of a new generation: the prompt's cache and mask, where the first new
/// token goes.
pub(crate) struct Start<'a> {
    /// The prompt pass's cache.
    pub(crate) prefix: &'a Cache,
    /// The prompt's keys to attend, bool [batch, prompt], when it is padded.
    pub(crate) prompt_mask: Option<&'a Tensor>,
    /// The position id of the first new token, i64 [batch or 1, 1].
    pub(crate) next_positions: &'a Tensor,
    pub(crate) prompt_len: i64,
    pub(crate) max_new: usize,
}

impl StaticState {
    /// Buffers for a generation of `start.max_new` tokens after the prompt, filled from it.
    pub(crate) fn new(
        start: &Start<'_>,
        batch: i64,
        eos: Option<Tensor>,
        pad: Option<Tensor>,
        min_new: usize,
    ) -> Result<Self> {
        let device = start.next_positions.device();
        let max_new =
            i64::try_from(start.max_new).map_err(|_| Error::InvalidOption("max_new_tokens is too large".into()))?;
        let capacity = start.prompt_len + max_new;
        let slot = Tensor::f_zeros([1], (Kind::Int64, device))?;
        let cache = start.prefix.to_static(capacity, &slot)?;
        let key_mask = start
            .prompt_mask
            .map(|_| Tensor::f_ones([batch, capacity], (Kind::Bool, device)))
            .transpose()?;
        let state = Self {
            batch,
            capacity,
            input_ids: Tensor::f_zeros([batch, 1], (Kind::Int64, device))?,
            positions: start.next_positions.f_empty_like()?,
            slot,
            step: Tensor::f_zeros([1], (Kind::Int64, device))?,
            key_mask,
            cache,
            unfinished: Tensor::f_ones([batch], (Kind::Bool, device))?,
            tokens: Tensor::f_zeros([batch, max_new], (Kind::Int64, device))?,
            values: Tensor::f_zeros([batch, max_new], (Kind::Float, device))?,
            logprobs: Tensor::f_zeros([batch, max_new], (Kind::Float, device))?,
            sample_logprobs: Tensor::f_zeros([batch, max_new], (Kind::Float, device))?,
            generated_mask: Tensor::f_zeros([batch, max_new], (Kind::Bool, device))?,
            eos,
            pad,
            min_new,
            one: cpu_scalar(1)?,
        };
        state.reset(start)?;
        Ok(state)
    }

    /// Refills the buffers in place (their addresses stay those a captured graph uses) for a
    /// new generation of the same shapes.
    pub(crate) fn reset(&self, start: &Start<'_>) -> Result<()> {
        let device = self.slot.device();
        self.cache.fill_static(start.prefix)?;
        self.slot
            .shallow_clone()
            .f_copy_(&Tensor::f_from_slice(&[start.prompt_len])?.f_to_device(device)?)?;
        let _ = self.step.shallow_clone().f_zero_()?;
        self.positions.shallow_clone().f_copy_(start.next_positions)?;
        self.unfinished
            .shallow_clone()
            .f_copy_(&Tensor::f_ones([self.batch], (Kind::Bool, device))?)?;
        if let (Some(buffer), Some(prompt)) = (&self.key_mask, start.prompt_mask) {
            let mut buffer = buffer.shallow_clone();
            buffer.f_copy_(&Tensor::f_ones_like(&buffer)?)?;
            buffer.f_narrow(1, 0, start.prompt_len)?.f_copy_(prompt)?;
        }
        Ok(())
    }

    /// Chooses the next token of every row from `out` (logits f32 [batch, vocab], values f32
    /// [batch]) and records it in the output columns at `step`, as the eager loop does: eos is
    /// forbidden before `min_new_tokens` (the device compares the step counter), the greedy
    /// choice, pad for finished rows, the chosen token's log-probability under the raw logits,
    /// and the value of the state it was generated from. Device operations only.
    pub(crate) fn choose(&self, out: &StepOutput) -> Result<()> {
        let logits = &out.logits;
        let mut scores = logits.shallow_clone();
        if let (Some(eos), true) = (&self.eos, self.min_new > 0) {
            let blocked = self.step.s_lt(self.min_new as i64)?.f_view([1, 1])?;
            let eos_scores = scores
                .f_index_select(1, eos)?
                .s_masked_fill(&blocked, f64::NEG_INFINITY)?;
            scores = scores.f_index_copy(1, eos, &eos_scores)?;
        }
        let mut next = scores.f_argmax(-1, false)?;
        if let (Some(pad), Some(_)) = (&self.pad, &self.eos) {
            next = next.f_where_self(&self.unfinished, pad)?;
        }
        let column = next.f_unsqueeze(1)?;
        let logprob = logits
            .f_gather(1, &column, false)?
            .f_squeeze_dim(1)?
            .f_sub(&logits.f_logsumexp(&[-1i64][..], false)?)?;
        let sample_logprob = scores
            .f_gather(1, &column, false)?
            .f_squeeze_dim(1)?
            .f_sub(&scores.f_logsumexp(&[-1i64][..], false)?)?;
        let _ = self
            .sample_logprobs
            .shallow_clone()
            .f_index_copy_(1, &self.step, &sample_logprob.f_unsqueeze(1)?)?;
        let _ = self.tokens.shallow_clone().f_index_copy_(1, &self.step, &column)?;
        let _ = self.values.shallow_clone().f_index_copy_(
            1,
            &self.step,
            &out.values.f_to_kind(Kind::Float)?.f_unsqueeze(1)?,
        )?;
        let _ = self
            .logprobs
            .shallow_clone()
            .f_index_copy_(1, &self.step, &logprob.f_unsqueeze(1)?)?;
        let _ = self
            .generated_mask
            .shallow_clone()
            .f_index_copy_(1, &self.step, &self.unfinished.f_unsqueeze(1)?)?;
        if let Some(eos) = &self.eos {
            // Before min_new_tokens no row can pick eos, so updating from the start is the eager
            // loop's update from min_new_tokens on.
            // `isin` spelled out: a comparison with every eos id, never a sorting path whose
            // output size the host would have to read.
            let ended = next
                .f_unsqueeze(1)?
                .f_eq_tensor(&eos.f_unsqueeze(0)?)?
                .f_any_dim(1, false)?;
            let _ = self
                .unfinished
                .shallow_clone()
                .f_logical_and_(&ended.f_logical_not()?)?;
        }
        self.input_ids.shallow_clone().f_copy_(&column)?;
        let _ = self.step.shallow_clone().f_add_(&self.one)?;
        Ok(())
    }

    /// One decode step: feeds `input_ids` through `forward` at the slot, moves the position and
    /// the slot on, and chooses the next token. What a CUDA graph captures.
    pub(crate) fn step(&self, forward: &dyn Fn(&CausalInputs<'_>) -> Result<StepOutput>) -> Result<()> {
        let inputs = CausalInputs {
            input_ids: self.input_ids.shallow_clone(),
            batch: self.batch,
            new_len: 1,
            past_len: self.capacity - 1,
            past: Some(&self.cache),
            key_mask: None,
            position_ids: self.positions.shallow_clone(),
            // Only dynamic and LongRoPE rotary scaling read it, and such models do not decode here.
            max_position: self.capacity - 1,
            explicit_positions: true,
            static_keys: Some(StaticKeys {
                slot: self.slot.shallow_clone(),
                key_mask: self.key_mask.as_ref().map(Tensor::shallow_clone),
                capacity: self.capacity,
            }),
        };
        let out = forward(&inputs)?;
        drop(inputs);
        let _ = self.positions.shallow_clone().f_add_(&self.one)?;
        let _ = self.slot.shallow_clone().f_add_(&self.one)?;
        self.choose(&out)
    }

    /// Whether any row is still going: the loop's one device read per checked step.
    fn any_unfinished(&self) -> Result<bool> {
        Ok(host_read(|| self.unfinished.f_any()?.f_int64_value(&[]))? != 0)
    }

    /// Fresh copies of the first `kept` output columns: tokens, values, log-probs, mask.
    pub(crate) fn outputs(&self, kept: i64) -> Result<[Tensor; 5]> {
        let take = |t: &Tensor| fresh(&t.f_narrow(1, 0, kept)?);
        Ok([
            take(&self.tokens)?,
            take(&self.values)?,
            take(&self.logprobs)?,
            take(&self.sample_logprobs)?,
            take(&self.generated_mask)?,
        ])
    }

    /// The generated-mask columns, for trimming after the loop.
    pub(crate) fn generated_mask(&self) -> &Tensor {
        &self.generated_mask
    }
}

/// The state of a session's graph.
#[derive(Debug)]
pub(crate) enum GraphSlot {
    /// Steps run eagerly (no graphs asked for, or they are unavailable here).
    Off,
    /// Graphs asked for: the next step runs eagerly as a warm-up, the one after is captured.
    Pending,
    /// Captured: every step replays it.
    Ready(CudaGraph),
    /// Capture failed once for this session: eager from here on.
    Failed,
}

/// A static-cache decode kept by the model between calls, so that a call with the same shapes
/// replays the graph an earlier call captured.
#[derive(Debug)]
pub(crate) struct GraphSession {
    pub(crate) key: SessionKey,
    pub(crate) state: StaticState,
    pub(crate) graph: GraphSlot,
}

/// Runs the decode from the prompt pass's output `first`: token 0 from it, then one step per
/// token (eager, or the captured graph replayed) until `max_new` tokens or, checked every
/// `stop_check_interval` tokens once eos may end a row, until every row has ended. Returns the
/// tokens produced (columns filled) and updates `timings`.
pub(crate) fn run(
    session: &mut GraphSession,
    first: &StepOutput,
    forward: &dyn Fn(&CausalInputs<'_>) -> Result<StepOutput>,
    config: &GenerationConfig,
    max_new: usize,
    timings: &mut GenerateTimings,
) -> Result<usize> {
    let state = &session.state;
    state.choose(first)?;
    let can_finish = state.eos.is_some() && config.min_new_tokens < max_new;
    let mut produced = 1;
    let started = Instant::now();
    for n in 1..max_new {
        let checked = n - 1;
        if can_finish
            && checked >= config.min_new_tokens
            && stop_check_due(config, checked)
            && !state.any_unfinished()?
        {
            break;
        }
        match &session.graph {
            GraphSlot::Ready(graph) => graph.replay()?,
            GraphSlot::Pending if n > 1 => {
                let device = match state.slot.device() {
                    Device::Cuda(i) => i,
                    _ => 0,
                };
                // Nothing runs during capture: the step is replayed right after, or, when capture
                // fails (the step itself or the graph), run eagerly from the unchanged state.
                let failure = match CudaGraph::capture(device, || state.step(forward)) {
                    Ok(Ok((graph, ()))) => {
                        graph.replay()?;
                        session.graph = GraphSlot::Ready(graph);
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = failure {
                    log::warn!("capturing the decode step as a CUDA graph failed ({e}); decoding eagerly");
                    session.graph = GraphSlot::Failed;
                    state.step(forward)?;
                }
            }
            GraphSlot::Pending | GraphSlot::Off | GraphSlot::Failed => state.step(forward)?,
        }
        produced += 1;
        timings.decode_steps += 1;
    }
    timings.decode += started.elapsed();
    Ok(produced)
}
