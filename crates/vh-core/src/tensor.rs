//! Tensor checks and small computations shared by every model: input validation at the API
//! boundary, position ids from attention masks, and the causal-LM loss.

use crate::error::{invalid, Result};
use crate::ops::ScalarOps;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use tch::{Kind, Tensor};

/// The label value that the loss ignores, as in PyTorch and HF.
pub const IGNORE_INDEX: i64 = -100;

/// Whether `kind` holds integers (token ids, labels, masks).
pub fn is_integer_kind(kind: Kind) -> bool {
    matches!(kind, Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8)
}

/// Whether `kind` is a floating-point kind.
pub fn is_float_kind(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// The most negative finite value of a float kind: what HF fills masked attention scores with.
pub fn min_value(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// Checks that `t` has exactly `rank` dimensions.
pub fn expect_rank(t: &Tensor, name: &str, rank: usize) -> Result<()> {
    let size = t.size();
    if size.len() != rank {
        return Err(invalid(format!(
            "`{name}` must have {rank} dimensions, got shape {size:?}"
        )));
    }
    Ok(())
}

/// Checks that `t` has exactly the shape `expected`.
pub fn expect_shape(t: &Tensor, name: &str, expected: &[i64]) -> Result<()> {
    let size = t.size();
    if size != expected {
        return Err(invalid(format!("`{name}` must have shape {expected:?}, got {size:?}")));
    }
    Ok(())
}

/// Checks that `t` holds integers.
pub fn expect_integer(t: &Tensor, name: &str) -> Result<()> {
    if !is_integer_kind(t.kind()) {
        return Err(invalid(format!("`{name}` must hold integers, got {:?}", t.kind())));
    }
    Ok(())
}

/// The smallest and largest element of a non-empty integer tensor.
pub fn int_range(t: &Tensor) -> Result<(i64, i64)> {
    let lo = t.f_min()?.f_int64_value(&[])?;
    let hi = t.f_max()?.f_int64_value(&[])?;
    Ok((lo, hi))
}

/// Validates `input_ids`: integers of shape [batch, seq] with batch, seq > 0 and every id in
/// `0..vocab_size`. Returns (batch, seq).
pub fn check_input_ids(input_ids: &Tensor, vocab_size: i64) -> Result<(i64, i64)> {
    expect_rank(input_ids, "input_ids", 2)?;
    expect_integer(input_ids, "input_ids")?;
    let (batch, seq) = (input_ids.size()[0], input_ids.size()[1]);
    if batch == 0 || seq == 0 {
        return Err(invalid(format!("`input_ids` is empty (shape [{batch}, {seq}])")));
    }
    let (lo, hi) = int_range(input_ids)?;
    if lo < 0 || hi >= vocab_size {
        let bad = if lo < 0 { lo } else { hi };
        return Err(invalid(format!(
            "token id {bad} in `input_ids` is outside the vocabulary 0..{vocab_size}"
        )));
    }
    Ok((batch, seq))
}

/// Validates an attention mask of shape `expected` holding only 0 and 1 (any integer, bool or
/// float kind) and returns it as a bool tensor (true = attend).
pub fn attention_mask_to_bool(mask: &Tensor, name: &str, expected: &[i64]) -> Result<Tensor> {
    expect_shape(mask, name, expected)?;
    if mask.kind() == Kind::Bool {
        return Ok(mask.shallow_clone());
    }
    if !(is_integer_kind(mask.kind()) || is_float_kind(mask.kind())) {
        return Err(invalid(format!(
            "`{name}` must hold 0/1 values, got kind {:?}",
            mask.kind()
        )));
    }
    let ones = mask.s_eq(1)?;
    let valid = ones.f_logical_or(&mask.s_eq(0)?)?.f_all()?.f_int64_value(&[])? != 0;
    if !valid {
        return Err(invalid(format!("`{name}` may only hold 0 and 1")));
    }
    Ok(ones)
}

/// Position ids for the last `new_len` tokens of `attention_mask` [batch, past + new] (0/1 of
/// any integer, bool or float kind), as HF's `generate` computes them: each token's index among
/// its row's attended tokens, and 1 at padding. Pass them as `position_ids` to number a
/// left-padded row as its unpadded self; a forward without them numbers every row
/// `past..past + new`, as HF's forward (and TRL's) does.
pub fn position_ids_from_attention_mask(attention_mask: &Tensor, new_len: i64) -> Result<Tensor> {
    expect_rank(attention_mask, "attention_mask", 2)?;
    let size = attention_mask.size();
    if new_len < 1 || new_len > size[1] {
        return Err(invalid(format!("new_len must be in 1..={}, got {new_len}", size[1])));
    }
    let mask = attention_mask_to_bool(attention_mask, "attention_mask", &size)?;
    position_ids_from_mask(&mask, new_len)
}

/// Position ids for the last `new_len` tokens of a left- or right-padded batch, from its
/// attention mask over past and new tokens (bool [batch, past + new]): each token's index among
/// the row's attended tokens, and 1 at padding, as HF's `generate` computes them.
pub fn position_ids_from_mask(mask: &Tensor, new_len: i64) -> Result<Tensor> {
    let total = mask.size()[1];
    let positions = mask.f_cumsum(1, Kind::Int64)?.s_sub(1)?;
    let positions = positions.s_masked_fill(&mask.f_logical_not()?, 1)?;
    Ok(positions.f_narrow(1, total - new_len, new_len)?)
}

/// At most this many positions count as a decode step for [`lm_logits`].
const DECODE_ROWS: i64 = 16;

/// Whether [`graph_free_linear`] may use oneDNN (on by default; see [`set_onednn_linear`]).
static ONEDNN_LINEAR: AtomicBool = AtomicBool::new(true);

/// Turns oneDNN's kernel for f32 products on CPU outside autograd on or off, process-wide, and
/// returns the previous setting. Off, every product takes the call PyTorch's modules make (MKL).
pub fn set_onednn_linear(on: bool) -> bool {
    ONEDNN_LINEAR.swap(on, Ordering::Relaxed)
}

/// Whether [`graph_free_linear`] may use the small-rows kernel (on by default; see
/// [`set_small_rows_linear`]).
static SMALL_ROWS_LINEAR: AtomicBool = AtomicBool::new(true);

/// Turns the small-rows kernel (products of 1 to 8 rows, AVX2 + FMA) on or off, process-wide,
/// and returns the previous setting. Off, such products go to oneDNN as larger ones do; with
/// [`set_onednn_linear`] off neither runs.
pub fn set_small_rows_linear(on: bool) -> bool {
    SMALL_ROWS_LINEAR.swap(on, Ordering::Relaxed)
}

/// Whether a product of `rows` rows outside autograd takes the small-rows kernel: the switch is
/// on, this build carries the shim, the CPU has AVX2 and FMA, and 1 <= rows <= 8.
pub fn small_rows_linear_applies(rows: i64) -> bool {
    #[cfg(vh_linear_pointwise)]
    {
        use shim::{vh_small_rows_linear_available, vh_small_rows_linear_max_rows};
        static LIMIT: OnceLock<i64> = OnceLock::new();
        // SAFETY: neither takes arguments; they read the CPU's features and a constant.
        let limit = *LIMIT.get_or_init(|| unsafe {
            if vh_small_rows_linear_available() == 1 {
                i64::from(vh_small_rows_linear_max_rows())
            } else {
                0
            }
        });
        SMALL_ROWS_LINEAR.load(Ordering::Relaxed)
            && ONEDNN_LINEAR.load(Ordering::Relaxed)
            && (1..=limit).contains(&rows)
    }
    #[cfg(not(vh_linear_pointwise))]
    {
        let _ = rows;
        false
    }
}

/// Whether autograd records operations on this thread: PyTorch's `torch.is_grad_enabled()`.
pub fn is_grad_enabled() -> bool {
    // SAFETY: libtorch's C API sets the thread-local mode and returns the previous one, which is
    // put back at once; neither call takes a pointer or can fail.
    unsafe {
        let prev = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(prev);
        prev != 0
    }
}

/// Whether this libtorch has oneDNN (asked once).
fn has_onednn() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(tch::utils::has_mkldnn)
}

/// `x @ weight^T (+ bias)` through oneDNN where no graph is recorded, or `None` where that does
/// not apply and the caller makes its usual call. `x` [..., in], `weight` [out, in] contiguous,
/// all f32 on CPU, and grad mode off or nothing in the product requiring grad.
///
/// Why (2-core AMD EPYC, AVX2, torch 2.11, 2 threads): a decode step multiplies each weight by a
/// few rows, and MKL's sgemm packs the whole weight on every such call while oneDNN's kernel
/// does not. GPT-2-small's 48 block products take 25 ms at 8 rows against 50 (addmm, HF's
/// Conv1D) or 41 (linear), 12 against 23 at one row. With more rows oneDNN still leads: 5-12%
/// from 256 to 2048 rows, 13-24% on the LM head at 1024. The sums are the same up to rounding
/// order (about 1e-6 relative). Training keeps PyTorch's call (this operator has no backward),
/// and so do other kinds (oneDNN's bf16 kernel needs AVX-512 or AVX-NE-CONVERT).
///
/// Products of 1 to 8 rows go to our own kernel instead where the CPU has AVX2 and FMA
/// ([`small_rows_linear_applies`]): oneDNN streams the weight there at about a third of the
/// memory bandwidth (a 424 MB weight by 8 rows: 42 ms, this kernel 26; by one row 21 and 20).
pub fn graph_free_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !ONEDNN_LINEAR.load(Ordering::Relaxed)
        || x.device() != tch::Device::Cpu
        || weight.device() != tch::Device::Cpu
        || bias.is_some_and(|b| b.device() != tch::Device::Cpu)
        || x.kind() != Kind::Float
        || weight.kind() != Kind::Float
        || weight.dim() != 2
        || !weight.is_contiguous()
        || bias.is_some_and(|b| b.kind() != Kind::Float || b.dim() != 1)
    {
        return Ok(None);
    }
    let mut size = x.size();
    let in_dim = *size.last().unwrap_or(&0);
    let (out_dim, w_in) = (weight.size()[0], weight.size()[1]);
    if in_dim != w_in || in_dim == 0 || out_dim == 0 {
        return Ok(None);
    }
    let rows = x.numel() as i64 / in_dim;
    let small = small_rows_linear_applies(rows);
    if rows == 0 || !(small || has_onednn()) {
        return Ok(None);
    }
    let graph =
        is_grad_enabled() && (x.requires_grad() || weight.requires_grad() || bias.is_some_and(|b| b.requires_grad()));
    if graph {
        return Ok(None);
    }
    let flat = x.f_reshape([rows, in_dim])?;
    let out = if small {
        small_rows_linear(&flat, weight, bias)?
    } else {
        onednn_linear(&flat, weight, bias)?
    };
    *size.last_mut().expect("non-scalar input") = out_dim;
    Ok(Some(out.f_view(size.as_slice())?))
}

/// Whether products outside autograd reach oneDNN without layout conversions: this build carries the
/// shim over `mkldnn::_linear_pointwise` (it needs libtorch's headers) and libtorch registers it.
pub fn dense_onednn_linear_available() -> bool {
    #[cfg(vh_linear_pointwise)]
    {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        // SAFETY: takes no arguments; looks the operator up once in libtorch's registry.
        *AVAILABLE.get_or_init(|| unsafe { shim::vh_linear_pointwise_available() } == 1)
    }
    #[cfg(not(vh_linear_pointwise))]
    {
        false
    }
}

/// The small-rows kernel's `x @ weight^T (+ bias)` (csrc/linear_pointwise.cpp) for `x`
/// [rows, in], checked by the caller and by [`small_rows_linear_applies`].
fn small_rows_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(vh_linear_pointwise)]
    {
        shim_linear(shim::vh_small_rows_linear, x, weight, bias)
    }
    #[cfg(not(vh_linear_pointwise))]
    {
        let _ = (x, weight, bias);
        unreachable!("small_rows_linear_applies is false without the shim")
    }
}

/// csrc/linear_pointwise.cpp's functions, declared once.
#[cfg(vh_linear_pointwise)]
mod shim {
    use std::ffi::{c_char, c_int, c_void};

    extern "C" {
        pub fn vh_linear_pointwise_available() -> c_int;
        pub fn vh_linear_pointwise(
            x: *mut c_void,
            weight: *mut c_void,
            bias: *mut c_void,
            out: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn vh_small_rows_linear_available() -> c_int;
        pub fn vh_small_rows_linear_max_rows() -> c_int;
        pub fn vh_small_rows_linear(
            x: *mut c_void,
            weight: *mut c_void,
            bias: *mut c_void,
            out: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
    }
}

/// The signature both linear shims share: tensors in as tch's handles, a new handle out, errors
/// as text.
#[cfg(vh_linear_pointwise)]
type ShimLinear = unsafe extern "C" fn(
    *mut std::ffi::c_void,
    *mut std::ffi::c_void,
    *mut std::ffi::c_void,
    *mut *mut std::ffi::c_void,
    *mut std::ffi::c_char,
    usize,
) -> std::ffi::c_int;

/// Calls a linear shim on tch's handles and takes ownership of the tensor it returns.
#[cfg(vh_linear_pointwise)]
fn shim_linear(f: ShimLinear, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    use std::ffi::{c_char, c_void, CStr};
    let mut err = vec![0 as c_char; 512];
    let mut out: *mut c_void = std::ptr::null_mut();
    let bias_ptr = bias.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut c_void);
    // SAFETY: tch's handles are `torch::Tensor*`, alive for the call; the shim reads them,
    // writes a new handle to `out` on success and a NUL-terminated message within `err` on
    // failure.
    let rc = unsafe {
        f(
            x.as_ptr() as *mut c_void,
            weight.as_ptr() as *mut c_void,
            bias_ptr,
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 || out.is_null() {
        // SAFETY: see above.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        return Err(tch::TchError::Torch(msg).into());
    }
    // SAFETY: `out` is a heap-allocated `torch::Tensor` that nothing else owns.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}

/// oneDNN's `x @ weight^T (+ bias)` on dense f32 CPU tensors, checked by the caller.
///
/// With libtorch's headers at build time this is `mkldnn::_linear_pointwise` through a C++ shim
/// (csrc/linear_pointwise.cpp): dense in, dense out. Otherwise, or where this libtorch does not
/// register that operator, tch's `mkldnn_linear` with the input converted to oneDNN's layout and
/// the output back, which costs about 75 us per call (SmolLM2-135M's 210 products per decode
/// step at 8 rows: 48 ms instead of 40).
fn onednn_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(vh_linear_pointwise)]
    {
        if dense_onednn_linear_available() {
            return shim_linear(shim::vh_linear_pointwise, x, weight, bias);
        }
    }
    let out = x
        .f_to_mkldnn(None::<Kind>)?
        .f_mkldnn_linear(weight, bias)?
        .f_to_dense(None::<Kind>, false)?;
    Ok(out)
}

/// LM-head logits [B, K, vocab] of `hidden` [B, T, C] with `weight` [vocab, C], for the last
/// `logits_to_keep` positions (K; 0 keeps all T, as HF's argument of that name).
pub fn lm_logits(hidden: &Tensor, weight: &Tensor, logits_to_keep: i64) -> Result<Tensor> {
    let (b, t, c) = hidden.size3()?;
    let keep = if logits_to_keep <= 0 || logits_to_keep >= t {
        t
    } else {
        logits_to_keep
    };
    let hidden = if keep == t {
        hidden.shallow_clone()
    } else {
        hidden.f_narrow(1, t - keep, keep)?
    };
    let rows = b * keep;
    if hidden.device() != tch::Device::Cpu {
        return Ok(hidden.f_linear::<Tensor>(weight, None)?);
    }
    // A decode step multiplies the whole [vocab, C] matrix by a few vectors. On a 2-core AMD
    // EPYC (AVX2, torch 2.11, f32) oneDNN streams GPT-2's head in 5.9 ms at one row (MKL's
    // matrix-vector kernel 12.5) and 14 ms at 8 rows (`hidden @ weight^T` 26, `weight @
    // hidden^T` 21); at 2-4 rows `weight @ hidden^T` is the fastest (5.5-8 ms), and it is also
    // the fastest for bf16, which oneDNN cannot take there. At 1024 rows oneDNN takes 557 ms
    // against 733 for `hidden @ weight^T`. The sums are the same up to rounding order.
    // The small-rows kernel, where the CPU has it, beats all of these at 1 to 8 rows.
    if !(2..=4).contains(&rows) || small_rows_linear_applies(rows) {
        if let Some(logits) = graph_free_linear(&hidden, weight, None)? {
            return Ok(logits);
        }
    }
    if rows > DECODE_ROWS {
        return Ok(hidden.f_linear::<Tensor>(weight, None)?);
    }
    let flat = hidden.f_reshape([rows, c])?;
    let logits = if rows == 1 {
        weight.f_mv(&flat.f_squeeze_dim(0)?)?
    } else {
        weight.f_mm(&flat.f_tr()?)?.f_tr()?.f_contiguous()?
    };
    Ok(logits.f_reshape([b, keep, weight.size()[0]])?)
}

/// Dropout that is only applied while training.
pub trait TrainDropout {
    /// Dropout with probability `p` when `train`; otherwise the tensor itself, without a call
    /// into libtorch (an eval-mode dropout still costs a dispatch per call in the decode loop).
    fn train_dropout(&self, p: f64, train: bool) -> Result<Tensor>;
}

impl TrainDropout for Tensor {
    fn train_dropout(&self, p: f64, train: bool) -> Result<Tensor> {
        if train && p > 0.0 {
            Ok(self.f_dropout(p, true)?)
        } else {
            Ok(self.shallow_clone())
        }
    }
}

/// Validates labels for `logits` [batch, seq, vocab]: shape [batch, seq], integers, each either
/// [`IGNORE_INDEX`] or a token id in the vocabulary.
pub fn check_labels(labels: &Tensor, batch: i64, seq: i64, vocab_size: i64) -> Result<()> {
    expect_shape(labels, "labels", &[batch, seq])?;
    expect_integer(labels, "labels")?;
    let kept = labels.s_ne(IGNORE_INDEX)?;
    let out_of_range = labels
        .s_lt(0)?
        .f_logical_or(&labels.s_ge(vocab_size)?)?
        .f_logical_and(&kept)?;
    if out_of_range.f_any()?.f_int64_value(&[])? != 0 {
        return Err(invalid(format!(
            "`labels` must be {IGNORE_INDEX} or a token id in 0..{vocab_size}"
        )));
    }
    Ok(())
}

/// Mean cross-entropy in f32 of `logits` [N, vocab] against `labels` [N], skipping
/// [`IGNORE_INDEX`]. No kept label means no defined loss (PyTorch would return NaN): an error.
fn mean_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if labels.s_ne(IGNORE_INDEX)?.f_any()?.f_int64_value(&[])? == 0 {
        return Err(invalid(
            "every label that enters the loss is -100, so the loss is undefined",
        ));
    }
    Ok(logits.f_to_kind(Kind::Float)?.f_cross_entropy_loss::<Tensor>(
        labels,
        None,
        tch::Reduction::Mean,
        IGNORE_INDEX,
        0.0,
    )?)
}

fn logits_dims(logits: &Tensor) -> Result<(i64, i64, i64)> {
    match logits.size()[..] {
        [b, s, v] => Ok((b, s, v)),
        _ => Err(invalid("logits must be [batch, seq, vocab]")),
    }
}

/// The causal-LM loss as HF computes it: logits at position t predict the label at t + 1,
/// mean cross-entropy in f32 over labels that are not [`IGNORE_INDEX`].
///
/// Labels must have been validated with [`check_labels`]. A batch whose shifted labels are all
/// ignored has no defined loss (PyTorch would return NaN), so that is an error.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (batch, seq, vocab) = logits_dims(logits)?;
    if seq < 2 {
        return Err(invalid("the loss needs sequences of at least 2 tokens"));
    }
    let labels = labels.f_to_device(logits.device())?.f_to_kind(Kind::Int64)?;
    // As HF's ForCausalLMLoss: the labels move left by one and the last position gets
    // IGNORE_INDEX, so the loss reads the logits as they are, [batch * seq, vocab], instead of
    // copying all but the last position (and scattering the gradient back in backward): for
    // GPT-2 at 8 x 128 tokens that copy is 200 MB each way.
    let ignored = Tensor::f_full([batch, 1], IGNORE_INDEX, (Kind::Int64, labels.device()))?;
    let shifted_labels = Tensor::f_cat(&[labels.f_narrow(1, 1, seq - 1)?, ignored], 1)?.f_reshape([-1])?;
    let flat_logits = logits.f_reshape([batch * seq, vocab])?;
    mean_cross_entropy(&flat_logits, &shifted_labels)
}

/// The sequence-to-sequence loss as HF's T5 computes it: logits at position t against the label
/// at t (the decoder inputs are the labels shifted right), mean over labels that are not
/// [`IGNORE_INDEX`]. Labels must have been validated with [`check_labels`].
pub fn seq2seq_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (batch, seq, vocab) = logits_dims(logits)?;
    let labels = labels
        .f_to_device(logits.device())?
        .f_to_kind(Kind::Int64)?
        .f_reshape([-1])?;
    mean_cross_entropy(&logits.f_reshape([batch * seq, vocab])?, &labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises the tests that flip the process-wide oneDNN switch.
    static ONEDNN_SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn the_dense_onednn_shim_is_built_and_registered() {
        assert!(
            dense_onednn_linear_available(),
            "built with LIBTORCH's headers (.cargo/config.toml), the shim finds mkldnn::_linear_pointwise"
        );
        // The fallback (layout conversions around tch's mkldnn_linear) gives the same numbers.
        tch::manual_seed(9);
        let w = Tensor::randn([24, 16], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::randn([24], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::randn([5, 16], (Kind::Float, tch::Device::Cpu));
        let dense = onednn_linear(&x, &w, Some(&b)).unwrap();
        let converted = x.to_mkldnn().mkldnn_linear(&w, Some(&b)).to_dense(None::<Kind>, false);
        assert!(!dense.is_mkldnn() && dense.size() == vec![5, 24]);
        assert!((dense - converted).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn grad_mode_is_read_without_changing_it() {
        assert!(is_grad_enabled());
        tch::no_grad(|| {
            assert!(!is_grad_enabled());
            assert!(!is_grad_enabled(), "reading it twice leaves it off");
        });
        assert!(is_grad_enabled());
    }

    #[test]
    fn products_take_onednn_only_where_no_graph_is_recorded() {
        let _switch = ONEDNN_SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(7);
        let w = Tensor::randn([24, 16], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::randn([24], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::randn([2, 3, 16], (Kind::Float, tch::Device::Cpu));
        let expected = x.linear(&w, Some(&b));
        let out = graph_free_linear(&x, &w, Some(&b)).unwrap().expect("6 f32 rows on CPU");
        assert_eq!(out.size(), vec![2, 3, 24]);
        let err = (&out - &expected).abs().max().double_value(&[]);
        assert!(err < 1e-5, "oneDNN vs linear: {err}");
        let no_bias = graph_free_linear(&x, &w, None).unwrap().unwrap();
        assert!((no_bias - x.linear::<Tensor>(&w, None)).abs().max().double_value(&[]) < 1e-5);
        // A weight that takes part in a graph: the caller's own call, so autograd sees it.
        let trained = w.copy().set_requires_grad(true);
        assert!(graph_free_linear(&x, &trained, Some(&b)).unwrap().is_none());
        assert!(tch::no_grad(|| graph_free_linear(&x, &trained, Some(&b)))
            .unwrap()
            .is_some());
        // Many rows take it too.
        let many = Tensor::randn([300, 16], (Kind::Float, tch::Device::Cpu));
        let out = graph_free_linear(&many, &w, Some(&b))
            .unwrap()
            .expect("300 f32 rows on CPU");
        assert!((out - many.linear(&w, Some(&b))).abs().max().double_value(&[]) < 1e-5);
        // Another kind, a non-contiguous weight, mismatched widths.
        let half = x.to_kind(Kind::BFloat16);
        assert!(graph_free_linear(&half, &w.to_kind(Kind::BFloat16), None)
            .unwrap()
            .is_none());
        let strided = Tensor::randn([16, 24], (Kind::Float, tch::Device::Cpu)).tr();
        assert!(graph_free_linear(&x, &strided, Some(&b)).unwrap().is_none());
        assert!(graph_free_linear(&x.narrow(2, 0, 8), &w, Some(&b)).unwrap().is_none());
        // Switched off: every product takes the caller's call.
        let before = set_onednn_linear(false);
        let off = graph_free_linear(&x, &w, Some(&b)).unwrap();
        set_onednn_linear(before);
        assert!(before && off.is_none());
    }

    #[test]
    fn the_small_rows_kernel_matches_linear_on_every_shape_it_takes() {
        let _switch = ONEDNN_SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            small_rows_linear_applies(1) && small_rows_linear_applies(8),
            "built with the shim on an AVX2 + FMA CPU"
        );
        assert!(!small_rows_linear_applies(0) && !small_rows_linear_applies(9));
        tch::manual_seed(10);
        // Widths with and without a tail of fewer than 8, outputs with and without a tail of
        // fewer than 3 (the kernel's block), one that splits across threads.
        for (inp, out) in [(16, 1), (13, 2), (8, 3), (21, 7), (576, 100), (64, 4099)] {
            let w = Tensor::randn([out, inp], (Kind::Float, tch::Device::Cpu));
            let b = Tensor::randn([out], (Kind::Float, tch::Device::Cpu));
            for rows in 1..=8 {
                let x = Tensor::randn([rows, inp], (Kind::Float, tch::Device::Cpu));
                let scale = x.abs().max().double_value(&[]) * w.abs().max().double_value(&[]) * inp as f64;
                for bias in [None, Some(&b)] {
                    let got = small_rows_linear(&x, &w, bias).unwrap();
                    let err = (&got - x.linear(&w, bias)).abs().max().double_value(&[]);
                    assert!(
                        err <= 1e-6 * scale,
                        "{rows}x{inp} by {out}, bias {}: {err}",
                        bias.is_some()
                    );
                }
            }
        }
        // Through graph_free_linear: [B, T, in] input, a non-contiguous one, and the switch.
        let w = Tensor::randn([40, 24], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::randn([2, 3, 24], (Kind::Float, tch::Device::Cpu));
        let strided = Tensor::randn([24, 6], (Kind::Float, tch::Device::Cpu)).tr();
        for input in [&x, &strided] {
            let got = graph_free_linear(input, &w, None).unwrap().expect("6 f32 rows");
            let err = (&got - input.linear::<Tensor>(&w, None)).abs().max().double_value(&[]);
            assert!(err < 1e-5, "{err}");
        }
        let before = set_small_rows_linear(false);
        assert!(!small_rows_linear_applies(4));
        let onednn = graph_free_linear(&x, &w, None).unwrap().expect("oneDNN takes it");
        set_small_rows_linear(before);
        assert!((onednn - x.linear::<Tensor>(&w, None)).abs().max().double_value(&[]) < 1e-5);
        // More than 8 rows, or 0: refused by the kernel itself too.
        let nine = Tensor::randn([9, 24], (Kind::Float, tch::Device::Cpu));
        assert!(small_rows_linear(&nine, &w, None).is_err());
    }

    #[test]
    fn lm_logits_agree_across_row_counts() {
        let _switch = ONEDNN_SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(8);
        let w = Tensor::randn([50, 16], (Kind::Float, tch::Device::Cpu));
        for (b, t) in [(1, 1), (2, 1), (4, 1), (8, 1), (3, 7), (9, 9)] {
            let h = Tensor::randn([b, t, 16], (Kind::Float, tch::Device::Cpu));
            let expected = h.linear::<Tensor>(&w, None);
            for on in [true, false] {
                let before = set_onednn_linear(on);
                let logits = lm_logits(&h, &w, 0).unwrap();
                set_onednn_linear(before);
                let err = (&logits - &expected).abs().max().double_value(&[]);
                assert!(err < 1e-5, "{b}x{t} rows, oneDNN {on}: {err}");
            }
        }
    }

    #[test]
    fn position_ids_follow_left_padding() {
        let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1], [1, 1, 1, 1]]).f_eq(1).unwrap();
        let pos = position_ids_from_mask(&mask, 4).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(pos.reshape([-1])).unwrap(),
            vec![1, 1, 0, 1, 0, 1, 2, 3]
        );
        let last = position_ids_from_mask(&mask, 1).unwrap();
        assert_eq!(Vec::<i64>::try_from(last.reshape([-1])).unwrap(), vec![1, 3]);
    }

    #[test]
    fn input_ids_are_checked() {
        let ok = Tensor::from_slice2(&[[1i64, 2, 3]]);
        assert_eq!(check_input_ids(&ok, 4).unwrap(), (1, 3));
        assert!(check_input_ids(&ok, 3).is_err());
        assert!(check_input_ids(&Tensor::from_slice(&[1i64, 2]), 10).is_err());
        assert!(check_input_ids(&Tensor::from_slice2(&[[-1i64, 2]]), 10).is_err());
        assert!(check_input_ids(&Tensor::from_slice2(&[[1.0f32, 2.0]]), 10).is_err());
    }

    #[test]
    fn masks_must_be_binary() {
        let m = Tensor::from_slice2(&[[1i64, 0, 2]]);
        assert!(attention_mask_to_bool(&m, "attention_mask", &[1, 3]).is_err());
        let m = Tensor::from_slice2(&[[1.0f32, 0.0, 1.0]]);
        let b = attention_mask_to_bool(&m, "attention_mask", &[1, 3]).unwrap();
        assert_eq!(b.kind(), Kind::Bool);
        assert!(attention_mask_to_bool(&m, "attention_mask", &[1, 4]).is_err());
    }

    #[test]
    fn loss_ignores_minus_100_and_matches_manual_value() {
        let logits = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0]).reshape([1, 3, 3]);
        let labels = Tensor::from_slice2(&[[0i64, 2, -100]]);
        check_labels(&labels, 1, 3, 3).unwrap();
        let loss = causal_lm_loss(&logits, &labels).unwrap().double_value(&[]);
        // Only position 0 predicts a kept label (2): -log softmax([0,1,2])[2].
        let expected = -(2.0f64.exp() / (1.0 + 1.0f64.exp() + 2.0f64.exp())).ln();
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        let all_ignored = Tensor::from_slice2(&[[0i64, -100, -100]]);
        assert!(causal_lm_loss(&logits, &all_ignored).is_err());
        // Unshifted: position t against label t; only position 1 (label 0) is kept.
        let s2s = seq2seq_lm_loss(&logits, &Tensor::from_slice2(&[[-100i64, 0, -100]]))
            .unwrap()
            .double_value(&[]);
        let expected = -(1.0f64.exp() / (1.0f64.exp() + 2.0)).ln();
        assert!((s2s - expected).abs() < 1e-6, "{s2s} vs {expected}");
        assert!(seq2seq_lm_loss(&logits, &Tensor::from_slice2(&[[-100i64, -100, -100]])).is_err());
        assert!(check_labels(&Tensor::from_slice2(&[[0i64, 3, -100]]), 1, 3, 3).is_err());
        assert!(check_labels(&Tensor::from_slice2(&[[0i64, 1]]), 1, 3, 3).is_err());
    }
}
