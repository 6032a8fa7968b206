//! Target `hub`: bytes as a Hub answer, parsed by `vh_hub::parse_model_info` and
//! `vh_hub::parse_tree_listing`; and as text, whole and line by line, checked by
//! `vh_hub::validate_repo_id`, `validate_revision` and `validate_repo_path`.

use super::{normalize, Target};
use crate::mutate::mutate_json_or_bytes;
use crate::rng::Rng;
use serde_json::json;
use vh_hub::HubError;

/// Keys of Hub answers and pieces of ids and paths, for the mutator.
pub const DICT: &[&str] = &[
    "sha",
    "type",
    "file",
    "directory",
    "path",
    "size",
    "oid",
    "lfs",
    "pointerSize",
    "siblings",
    "rfilename",
    "0123456789abcdef0123456789abcdef01234567",
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "/",
    "..",
    "../",
    "refs/pr/",
    ".git",
    "--",
    "\\",
    "%2e%2e",
    "\u{0}",
];

/// The `hub` target: pure functions, nothing to open.
pub struct HubTarget;

/// The part of a Hub error that says what is wrong, without the offending string itself:
/// the strings are the fuzzed input and may hold anything (backticks included), so quoting
/// rules cannot cut them out reliably; the typed error's `reason` can.
fn hub_reason(e: &HubError) -> String {
    match e {
        HubError::InvalidRepoId { reason, .. }
        | HubError::InvalidRevision { reason, .. }
        | HubError::InvalidRepoPath { reason, .. } => {
            if reason.starts_with("the character") {
                "a character is not allowed".to_string()
            } else {
                normalize(reason, &[])
            }
        }
        HubError::InvalidAnswer { what, reason } => {
            // Reasons about one file start with its path in backticks: keep what follows it.
            let reason = match reason.strip_prefix('`') {
                Some(rest) => rest.rsplit_once("`: ").map_or(rest, |(_, r)| r),
                None => reason,
            };
            // A trailing quoted value (": `...`") is input too.
            let reason = reason.split(": `").next().unwrap_or(reason);
            format!("{what}: {}", normalize(reason, &[]))
        }
        other => normalize(&other.to_string(), &[]),
    }
}

/// The feature of a Hub parser or validator.
fn hub_feature<T>(stage: &str, result: &std::result::Result<T, HubError>, ok: impl FnOnce(&T) -> String) -> String {
    match result {
        Ok(v) => format!("{stage}:ok:{}", ok(v)),
        Err(e) => format!("{stage}:err:{}", hub_reason(e)),
    }
}

impl Target for HubTarget {
    fn execute(&mut self, input: &[u8]) -> Vec<String> {
        let mut out = vec![
            hub_feature("model_info", &vh_hub::parse_model_info(input), |_| String::new()),
            hub_feature("tree", &vh_hub::parse_tree_listing(input), |files| {
                // Touch every accessor the downloader uses.
                let lfs = files.iter().filter(|f| f.blob_name().len() == 64).count();
                format!("n={} lfs={}", files.len().min(4), lfs.min(2))
            }),
        ];
        let text = String::from_utf8_lossy(input);
        for s in std::iter::once(text.as_ref()).chain(text.lines().take(32)) {
            out.push(hub_feature("repo_id", &vh_hub::validate_repo_id(s), |_| String::new()));
            out.push(hub_feature("revision", &vh_hub::validate_revision(s), |_| {
                String::new()
            }));
            out.push(hub_feature("repo_path", &vh_hub::validate_repo_path(s), |_| {
                String::new()
            }));
        }
        out.sort();
        out.dedup();
        out
    }
}

/// A mutant answer or list of names: JSON-aware mostly, byte-level sometimes.
pub fn mutate(input: &[u8], rng: &mut Rng, other: &[u8]) -> Vec<u8> {
    mutate_json_or_bytes(input, rng, other, DICT)
}

/// A model info answer, a tree listing with an LFS file and a folder, and a list of ids,
/// revisions and paths, valid and not.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let sha1 = "0123456789abcdef0123456789abcdef01234567";
    let sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let info = json!({"_id": "x", "id": "owner/name", "sha": sha1, "siblings": [{"rfilename": "config.json"}]});
    let tree = json!([
        {"type": "file", "path": "config.json", "size": 10, "oid": sha1},
        {"type": "directory", "path": "sub", "size": 0, "oid": sha1},
        {"type": "file", "path": "model.safetensors", "size": 100, "oid": sha1,
         "lfs": {"oid": sha256, "size": 100, "pointerSize": 134}},
        {"type": "file", "path": "sub/tokenizer.json", "size": 3, "oid": sha1}
    ]);
    let names = "gpt2\nowner/name\nopenai-community/gpt2\nmain\nrefs/pr/1\nv1.0\nconfig.json\nsub/dir/file.bin\n\
                 ../etc/passwd\na--b\nname.git\n/abs\nsp ace/x\n";
    vec![
        (
            "model-info.json".to_string(),
            serde_json::to_vec_pretty(&info).unwrap_or_default(),
        ),
        (
            "tree.json".to_string(),
            serde_json::to_vec_pretty(&tree).unwrap_or_default(),
        ),
        ("names.txt".to_string(), names.as_bytes().to_vec()),
    ]
}
