//! The fuzz targets: what each one feeds its input to, the fixtures it needs, its
//! structure-aware mutations and its generated seeds.
//!
//! A target's `execute` returns *features*: short strings naming what happened at each stage
//! (`gpt2:ok`, `load:err:invalid config: n_head must be positive, got #`, ...). Without coverage
//! instrumentation they are the fuzzer's proxy for a new path: an input that produces a feature
//! never seen before joins the corpus.

pub mod config;
pub mod fixtures;
pub mod hub;
pub mod index;
pub mod inputs;
pub mod safetensors;
pub mod selftest;
pub mod st_format;
pub mod torch_bin;

use crate::rng::Rng;
use std::fmt::Display;
use std::path::{Path, PathBuf};

/// An error preparing fixtures or opening a target (never an error of the code under test:
/// those are features).
#[derive(Debug, thiserror::Error)]
pub enum FuzzError {
    /// A fixture file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The library refused a fixture (a bug in the fixture, not a finding).
    #[error("fixture: {0}")]
    Library(String),
    /// A name that is not a target.
    #[error("unknown target `{0}` (targets: config, safetensors, torch-bin, index, inputs, hub, selftest)")]
    UnknownTarget(String),
}

impl FuzzError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Wraps an error of the library under test met while building fixtures.
    pub fn library(e: impl Display) -> Self {
        Self::Library(e.to_string())
    }
}

/// A `Result` with [`FuzzError`].
pub type Result<T> = std::result::Result<T, FuzzError>;

/// Writes `bytes` to `path`, creating its folder.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| FuzzError::io(parent, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| FuzzError::io(path, e))
}

/// A target, opened in a worker: runs one input and says what happened.
pub trait Target {
    /// Runs `input` through the code under test and returns its features. A panic here (or
    /// a death of the process) is a finding; every error of the code under test is a feature.
    fn execute(&mut self, input: &[u8]) -> Vec<String>;
}

/// The targets, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// config.json: the architectures' config parsers, the value-head and generation settings,
    /// and a full load beside a small valid checkpoint.
    Config,
    /// A safetensors file read by `vh_hub::read_safetensors`.
    Safetensors,
    /// A pytorch_model.bin (zip + pickle) read by `vh_hub::torch_bin::read_torch_bin`.
    TorchBin,
    /// A sharded checkpoint's index read through `vh_hub::ModelFolder::tensors`.
    Index,
    /// A `vh forward` input file run through tiny GPT-2, Llama and T5 models.
    Inputs,
    /// Hub answers (model info, tree listings) and the repo id / revision / path validators.
    Hub,
    /// Inputs that fail on purpose, to test the engine (not part of `--all`).
    SelfTest,
}

impl TargetKind {
    /// Every target, in the order `--all` runs them.
    pub const ALL: [Self; 6] = [
        Self::Config,
        Self::Safetensors,
        Self::TorchBin,
        Self::Index,
        Self::Inputs,
        Self::Hub,
    ];

    /// The target's name on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Safetensors => "safetensors",
            Self::TorchBin => "torch-bin",
            Self::Index => "index",
            Self::Inputs => "inputs",
            Self::Hub => "hub",
            Self::SelfTest => "selftest",
        }
    }

    /// The target with this name.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .chain([Self::SelfTest])
            .find(|k| k.name() == name)
            .ok_or_else(|| FuzzError::UnknownTarget(name.to_string()))
    }

    /// Writes the fixtures the target's workers share into `fixtures` (tiny models, shards),
    /// once per run.
    pub fn prepare(self, fixtures: &Path) -> Result<()> {
        match self {
            Self::Config | Self::Inputs => fixtures::write_tiny_models(fixtures),
            Self::Index => index::prepare(fixtures),
            Self::Safetensors | Self::TorchBin | Self::Hub | Self::SelfTest => Ok(()),
        }
    }

    /// Opens the target in a worker: loads what [`Self::prepare`] wrote; `scratch` is the
    /// worker's own folder for the files it writes.
    pub fn open(self, fixtures: &Path, scratch: &Path) -> Result<Box<dyn Target>> {
        std::fs::create_dir_all(scratch).map_err(|e| FuzzError::io(scratch, e))?;
        Ok(match self {
            Self::Config => Box::new(config::ConfigTarget::open(fixtures, scratch)?),
            Self::Safetensors => Box::new(safetensors::SafetensorsTarget::open(scratch)),
            Self::TorchBin => Box::new(torch_bin::TorchBinTarget::open(scratch)),
            Self::Index => Box::new(index::IndexTarget::open(fixtures, scratch)?),
            Self::Inputs => Box::new(inputs::InputsTarget::open(fixtures, scratch)?),
            Self::Hub => Box::new(hub::HubTarget),
            Self::SelfTest => Box::new(selftest::SelfTestTarget),
        })
    }

    /// A mutant of `input`; `other` is another corpus entry to splice from.
    pub fn mutate(self, input: &[u8], rng: &mut Rng, other: &[u8]) -> Vec<u8> {
        let mut out = match self {
            Self::Config => config::mutate(input, rng, other),
            Self::Safetensors => safetensors::mutate(input, rng, other),
            Self::TorchBin => torch_bin::mutate(input, rng, other),
            Self::Index => index::mutate(input, rng, other),
            Self::Inputs => inputs::mutate(input, rng, other),
            Self::Hub | Self::SelfTest => hub::mutate(input, rng, other),
        };
        out.truncate(crate::mutate::MAX_INPUT_LEN);
        out
    }

    /// The seeds this crate generates for the target: (file name, bytes). The `torch-bin`
    /// corpus also holds files made by `torch.save` (see `make_torch_seeds.py`).
    pub fn seeds(self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(match self {
            Self::Config => config::seeds(),
            Self::Safetensors => safetensors::seeds(),
            Self::TorchBin => torch_bin::seeds(),
            Self::Index => index::seeds(),
            Self::Inputs => inputs::seeds(),
            Self::Hub => hub::seeds(),
            Self::SelfTest => vec![("ok".to_string(), b"ok".to_vec())],
        })
    }
}

/// The longest feature kept: error messages are cut here.
const MAX_FEATURE: usize = 160;

/// Names the library's messages quote that are not fuzzed input: config keys, header keys,
/// tensor and storage names the targets know.
fn is_known_name(name: &str) -> bool {
    let lists: [&[&str]; 6] = [
        config::DICT,
        safetensors::DICT,
        index::DICT,
        torch_bin::DICT,
        &valuehead::cli_io::FORWARD_INPUT_NAMES,
        hub::DICT,
    ];
    // Parameter paths the model code builds (`model.layers.#.mlp.up_proj.weight`) are
    // bounded too.
    let parameter_path = name.contains('.')
        && name.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_#".contains(c))
        });
    parameter_path || lists.iter().any(|list| list.contains(&name))
}

/// Quoted parts of an error message that are known names ([`is_known_name`]) stay; other
/// quoted text (in backticks, or in double quotes, where serde_json echoes values) is mostly
/// the fuzzed input echoed back and becomes `…`, so that it does not make every input a new
/// feature.
fn collapse_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest[open..].chars().next().unwrap_or('`');
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        match after.find(quote) {
            Some(close) => {
                let inner = &after[..close];
                out.push_str(if quote == '`' && is_known_name(inner) {
                    inner
                } else {
                    "…"
                });
                out.push(quote);
                rest = &after[close + 1..];
            }
            None => {
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Replaces each path below one of `dirs` by `<dir>/…`: the file names there are often the
/// fuzzed input (shard names of an index), and the message says what is wrong with the file.
fn collapse_paths(text: &str, dirs: &[&Path]) -> String {
    let mut text = text.to_string();
    for dir in dirs {
        let dir = dir.to_string_lossy();
        if dir.is_empty() {
            continue;
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(at) = rest.find(dir.as_ref()) {
            out.push_str(&rest[..at]);
            out.push_str("<dir>/…");
            let after = &rest[at + dir.len()..];
            let end = after.find([' ', ':', '`', '"', '\'', ',']).unwrap_or(after.len());
            rest = &after[end..];
        }
        out.push_str(rest);
        text = out;
    }
    // "NAME not found: PATH": the name is the one the input asked for.
    if let Some((what, path)) = text.split_once(" not found: ") {
        if !is_known_name(what) && !what.contains(' ') {
            text = format!("… not found: {path}");
        }
    }
    text
}

/// Replaces bracketed groups that look like echoed JSON (nested, or holding strings, or long)
/// by `[…]` / `{…}`; short flat ones such as shapes (`[#, #]`) stay.
fn collapse_brackets(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c != '[' && c != '{' {
            out.push(c);
            i += 1;
            continue;
        }
        // Find the matching close bracket, counting both kinds.
        let mut depth = 0usize;
        let mut end = None;
        for (j, &d) in chars.iter().enumerate().skip(i) {
            match d {
                '[' | '{' => depth += 1,
                ']' | '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(j);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            // Unbalanced (cut off): everything after it is echoed input.
            out.push(c);
            out.push('…');
            break;
        };
        let inner = &chars[i + 1..end];
        let json_like = inner.len() > 24 || inner.iter().any(|d| "[{\"".contains(*d));
        if json_like {
            out.push(c);
            out.push('…');
            out.push(chars[end]);
        } else {
            out.extend(&chars[i..=end]);
        }
        i = end + 1;
    }
    out
}

/// The feature text of a checkpoint-file error: its kind and message without the path (the
/// path names the file the input chose, e.g. a shard name of an index).
pub fn hub_error_text(e: &vh_hub::HubError, dirs: &[&Path]) -> String {
    use vh_hub::HubError;
    match e {
        HubError::NotFound { .. } => "not found".to_string(),
        HubError::Io { source, .. } => format!("io: {}", normalize(&source.to_string(), dirs)),
        HubError::Json { message, .. } => format!("json: {}", normalize(message, dirs)),
        HubError::Safetensors { message, .. } => format!("safetensors: {}", normalize(message, dirs)),
        HubError::NotRegularFile { what, .. } => format!("not a regular file: {what}"),
        HubError::TooLarge { limit, .. } => format!("too large: {limit}"),
        other => normalize(&other.to_string(), dirs),
    }
}

/// An error message made into a feature: paths in the worker's folders collapsed
/// ([`collapse_paths`]), echoed input collapsed ([`collapse_quoted`]), every run of digits
/// (and hex digits after `0x`) made `#` (so that `got 7` and `got 8` are one feature, not two),
/// cut at 160 characters.
pub fn normalize(message: &str, dirs: &[&Path]) -> String {
    let text = collapse_brackets(&collapse_quoted(&collapse_paths(message, dirs)));
    let mut out = String::with_capacity(text.len().min(MAX_FEATURE));
    let mut in_digits = false;
    let mut hex = false;
    let mut prev = ' ';
    for c in text.chars() {
        let was = std::mem::replace(&mut prev, c);
        if c.is_ascii_digit() || (hex && c.is_ascii_hexdigit()) {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
            continue;
        }
        // `0x` starts a hex number: its letters are digits too.
        if c == 'x' && was == '0' && in_digits {
            hex = true;
            continue;
        }
        hex = false;
        in_digits = false;
        out.push(if c.is_control() { ' ' } else { c });
        if out.len() >= MAX_FEATURE {
            break;
        }
    }
    out
}

/// The feature of one stage: `stage:ok` plus `detail`, or `stage:err:` plus the normalized
/// message.
pub fn feature<T, E: Display>(
    stage: &str,
    result: &std::result::Result<T, E>,
    dirs: &[&Path],
    detail: impl FnOnce(&T) -> String,
) -> String {
    match result {
        Ok(v) => {
            let d = detail(v);
            if d.is_empty() {
                format!("{stage}:ok")
            } else {
                format!("{stage}:ok:{d}")
            }
        }
        Err(e) => format!("{stage}:err:{}", normalize(&e.to_string(), dirs)),
    }
}

/// The feature of a stage that reads checkpoint files: as [`feature`], with the error as
/// [`hub_error_text`] gives it.
pub fn hub_feature<T>(
    stage: &str,
    result: &std::result::Result<T, vh_hub::HubError>,
    dirs: &[&Path],
    detail: impl FnOnce(&T) -> String,
) -> String {
    match result {
        Ok(v) => format!("{stage}:ok:{}", detail(v)),
        Err(e) => format!("{stage}:err:{}", hub_error_text(e, dirs)),
    }
}

/// A short description of loaded tensors for features: how many (capped at 4) and their
/// largest rank.
pub fn describe_tensors(tensors: &[(String, tch::Tensor)]) -> String {
    let rank = tensors.iter().map(|(_, t)| t.dim()).max().unwrap_or(0);
    format!("n={} rank={rank}", tensors.len().min(4))
}

/// One feature per kind of the loaded tensors (`stage:kind:Float`), when they loaded: each
/// kind takes its own path through the readers, while their combinations say nothing new.
pub fn kind_features<E>(stage: &str, result: &std::result::Result<Vec<(String, tch::Tensor)>, E>) -> Vec<String> {
    let mut kinds: Vec<String> = match result {
        Ok(tensors) => tensors
            .iter()
            .map(|(_, t)| format!("{stage}:kind:{:?}", t.kind()))
            .collect(),
        Err(_) => Vec::new(),
    };
    kinds.sort();
    kinds.dedup();
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_merge_numbers_and_hide_folders() {
        let dir = Path::new("/dev/shm/vh-fuzz-12/w3");
        assert_eq!(
            normalize("/dev/shm/vh-fuzz-12/w3/in.safetensors: got 1234, want 5\nmore", &[dir]),
            "<dir>/…: got #, want # more"
        );
        assert_eq!(
            normalize("shard-1.bin not found: /dev/shm/vh-fuzz-12/w3/st/shard-1.bin", &[dir]),
            "… not found: <dir>/…"
        );
        assert_eq!(
            normalize(
                "opcode 0xff, key `vocab_size`, param `model.layers.3.mlp.weight`, name `xq_ids`, value \"x\", `unclosed",
                &[]
            ),
            "opcode #, key `vocab_size`, param `model.layers.#.mlp.weight`, name `…`, value \"…\", `unclosed"
        );
        assert_eq!(
            normalize("shape [2, 3], got [[1, [2]], {\"a\": 1}] and [[[", &[]),
            "shape [#, #], got […] and […"
        );
        assert!(normalize(&"x".repeat(1000), &[]).len() <= MAX_FEATURE);
        let ok: std::result::Result<u8, String> = Ok(3);
        assert_eq!(feature("st", &ok, &[], |v| format!("{v}")), "st:ok:3");
        let err: std::result::Result<u8, String> = Err("bad 42".into());
        assert_eq!(feature("st", &err, &[], |_| String::new()), "st:err:bad #");
        for kind in TargetKind::ALL {
            assert_eq!(TargetKind::from_name(kind.name()).unwrap(), kind);
        }
        assert!(TargetKind::from_name("nope").is_err());
    }
}
