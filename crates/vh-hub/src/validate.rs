//! Checks on every string that comes from a user or a Hub and ends up in a URL or a cache path:
//! repo ids, revisions, file paths in a repo, commit ids and blob names. A string that passes
//! can be joined into a path or a URL without escaping the place it is meant for; everything
//! else is a typed error. These are pure functions: they never panic, whatever the input.

use crate::error::{HubError, Result};

/// The longest repo name (and, here, namespace) huggingface_hub accepts.
const MAX_REPO_ID_PART: usize = 96;
/// The longest revision accepted (git allows longer, but no Hub branch or tag needs it, and a
/// revision becomes a path under `refs/`, whose components Linux caps at 255 bytes).
const MAX_REVISION: usize = 255;
/// The longest file path in a repo, and the longest segment (a file system name limit).
const MAX_REPO_PATH: usize = 1024;
const MAX_PATH_SEGMENT: usize = 255;

fn bad_repo_id(repo_id: &str, reason: &str) -> HubError {
    HubError::InvalidRepoId {
        repo_id: printable(repo_id),
        reason: reason.to_string(),
    }
}

/// Checks a repo id as huggingface_hub's `validate_repo_id` does: `name` or `namespace/name`,
/// each part of `[A-Za-z0-9_.-]` starting and ending with a letter, digit or `_`, the name at
/// most 96 characters, no `--` or `..`, not ending in `.git`. Two deliberate differences, both
/// stricter: Python's `\w` also admits non-ASCII letters (the Hub itself never names repos
/// so), and the namespace is capped at 96 characters too (Python leaves it unbounded; the Hub
/// caps user and organisation names far below that). A valid id maps to exactly one cache
/// folder (`models--namespace--name`) and needs no escaping in a URL.
pub fn validate_repo_id(repo_id: &str) -> Result<()> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.len() > 2 {
        return Err(bad_repo_id(repo_id, "must be `name` or `namespace/name`"));
    }
    for part in &parts {
        let (Some(first), Some(last)) = (part.chars().next(), part.chars().last()) else {
            return Err(bad_repo_id(repo_id, "a part is empty"));
        };
        if !part.chars().all(|c| word(c) || c == '-' || c == '.') {
            return Err(bad_repo_id(
                repo_id,
                "only letters, digits, `-`, `_` and `.` are allowed",
            ));
        }
        if !word(first) || !word(last) {
            return Err(bad_repo_id(
                repo_id,
                "each part must start and end with a letter, digit or `_`",
            ));
        }
        if part.len() > MAX_REPO_ID_PART {
            return Err(bad_repo_id(repo_id, "a part is longer than 96 characters"));
        }
    }
    if repo_id.contains("--") || repo_id.contains("..") {
        return Err(bad_repo_id(repo_id, "`--` and `..` are not allowed"));
    }
    if repo_id.ends_with(".git") {
        return Err(bad_repo_id(repo_id, "cannot end with `.git`"));
    }
    Ok(())
}

fn bad_revision(revision: &str, reason: &str) -> HubError {
    HubError::InvalidRevision {
        revision: printable(revision),
        reason: reason.to_string(),
    }
}

/// Checks a revision (branch, tag or commit id, e.g. `main`, `v1.0`, `refs/pr/1`). It is
/// percent-encoded whole in URLs (so any string would be safe there), but it also names the
/// cache file `refs/{revision}`, so it must be a relative path that stays below `refs/`:
/// `/`-separated segments of `[A-Za-z0-9._+=@,-]`, none empty, `.` or `..`, at most 255 bytes.
/// That covers the Hub's branch, tag and pull-request names.
pub fn validate_revision(revision: &str) -> Result<()> {
    if revision.is_empty() {
        return Err(bad_revision(revision, "it is empty"));
    }
    if revision.len() > MAX_REVISION {
        return Err(bad_revision(revision, "it is longer than 255 bytes"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._+=@,-".contains(c);
    if let Some(c) = revision.chars().find(|&c| !allowed(c) && c != '/') {
        return Err(bad_revision(
            revision,
            &format!("the character {c:?} is not allowed (letters, digits, `._+=@,-` and `/` between segments)"),
        ));
    }
    for segment in revision.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(bad_revision(
                revision,
                "segments between `/` must not be empty, `.` or `..`",
            ));
        }
    }
    Ok(())
}

fn bad_path(path: &str, reason: &str) -> HubError {
    HubError::InvalidRepoPath {
        path: printable(path),
        reason: reason.to_string(),
    }
}

/// Checks a file path inside a repo (from a tree listing, or a name to upload): relative,
/// `/`-separated segments, none empty, `.` or `..`, no backslash, no control character (NUL
/// included), at most 1024 bytes and 255 per segment. Such a path joined below a snapshot
/// folder stays inside it. Other characters (spaces, non-ASCII letters) are allowed because
/// real repos hold such files; they cannot change where the path leads.
pub fn validate_repo_path(path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(bad_path(path, "it is empty"));
    }
    if path.len() > MAX_REPO_PATH {
        return Err(bad_path(path, "it is longer than 1024 bytes"));
    }
    if path.starts_with('/') {
        return Err(bad_path(path, "it is absolute"));
    }
    if path.contains('\\') {
        return Err(bad_path(path, "it contains a backslash"));
    }
    if path.chars().any(char::is_control) {
        return Err(bad_path(path, "it contains a control character"));
    }
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(bad_path(path, "segments between `/` must not be empty, `.` or `..`"));
        }
        if segment.len() > MAX_PATH_SEGMENT {
            return Err(bad_path(path, "a segment is longer than 255 bytes"));
        }
    }
    Ok(())
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `s` is a full commit id: 40 lowercase hex digits (a git SHA-1).
pub fn is_commit_id(s: &str) -> bool {
    is_lower_hex(s, 40)
}

/// Whether `s` names a blob in the cache: a git blob SHA-1 (40 lowercase hex digits) or an
/// LFS SHA-256 (64).
pub fn is_blob_name(s: &str) -> bool {
    is_lower_hex(s, 40) || is_lower_hex(s, 64)
}

/// Whether `s` is a SHA-256 in lowercase hex.
pub fn is_sha256(s: &str) -> bool {
    is_lower_hex(s, 64)
}

/// Percent-encodes `s` as one URL path segment, as Python's `urllib.parse.quote(s, safe="")`
/// (every byte but `A-Za-z0-9_.-~` is escaped, `/` included).
pub fn encode_segment(s: &str) -> String {
    encode(s, false)
}

/// Percent-encodes a repo file path for a URL, as Python's `quote(path)`: like
/// [`encode_segment`] but `/` stays a separator.
pub fn encode_path(s: &str) -> String {
    encode(s, true)
}

fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `s` made safe to print in an error: control characters (which could drive a terminal) are
/// escaped, and it is cut at 200 characters. Used for every string a server or user chose.
pub fn printable(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 200 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_huggingface_hub() {
        for ok in [
            "gpt2",
            "user/tiny",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "Foo-BAR_foo.bar123",
            "123",
            "_a/_b_",
            "a.b/c-d",
        ] {
            assert!(validate_repo_id(ok).is_ok(), "{ok}");
        }
        let long_name = format!("a/{}", "b".repeat(97));
        for bad in [
            "",
            "/",
            "a/",
            "/a",
            "../../evil",
            "a/b?x=1#f",
            "a/b/c",
            "datasets/foo/bar",
            ".repo",
            "repo.",
            "-a/b",
            "a/b-",
            "foo--bar",
            "a/other..repo",
            "foo.git",
            "a/b c",
            "a\\b",
            "a/b%2F",
            "é/b",
            "a/b\0",
            long_name.as_str(),
        ] {
            assert!(
                matches!(validate_repo_id(bad), Err(HubError::InvalidRepoId { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn revisions_stay_below_refs() {
        for ok in ["main", "v1.0", "refs/pr/1", "feature/x", "step_100", "a+b=c@d,e"] {
            assert!(validate_revision(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../../x",
            "..",
            ".",
            "a/../b",
            "/abs",
            "a/",
            "a//b",
            "a\\b",
            "a b",
            "a\0b",
            "a?b",
            "a#b",
            "a%2Fb",
            &"x".repeat(256),
        ] {
            assert!(
                matches!(validate_revision(bad), Err(HubError::InvalidRevision { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn repo_paths_stay_inside_the_snapshot() {
        for ok in [
            "config.json",
            "sub/model.safetensors",
            "a b/c (1).txt",
            "données.json",
            ".gitattributes",
        ] {
            assert!(validate_repo_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "/etc/x",
            "a/../../b",
            "a/./b",
            "./a",
            "a/",
            "a//b",
            "..",
            "a\\..\\b",
            "config.json\0",
            "a\nb",
            "\u{1b}[31m",
            &"x".repeat(256),
            &"a/".repeat(600),
        ] {
            assert!(
                matches!(validate_repo_path(bad), Err(HubError::InvalidRepoPath { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn hashes_are_lowercase_hex_of_the_right_length() {
        let sha1 = "0123456789abcdef0123456789abcdef01234567";
        assert!(is_commit_id(sha1) && is_blob_name(sha1));
        let sha256 = format!("{sha1}0123456789abcdef01234567");
        assert!(is_blob_name(&sha256) && is_sha256(&sha256) && !is_commit_id(&sha256));
        for bad in [
            "",
            "../../x",
            &sha1.to_uppercase(),
            &sha1[..39],
            &format!("{sha1}0"),
            "g".repeat(40).as_str(),
        ] {
            assert!(!is_commit_id(bad) && !is_blob_name(bad), "{bad}");
        }
    }

    #[test]
    fn encoding_matches_python_quote() {
        // urllib.parse.quote("refs/pr/1", safe="") == "refs%2Fpr%2F1"
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_segment("a b?#%"), "a%20b%3F%23%25");
        assert_eq!(encode_path("sub dir/é.json"), "sub%20dir/%C3%A9.json");
        assert_eq!(encode_segment("A-z_0.9~"), "A-z_0.9~");
    }

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(printable("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
        assert_eq!(printable(&"x".repeat(300)).chars().count(), 201);
    }
}
