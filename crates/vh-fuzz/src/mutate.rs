//! Mutations shared by every target: byte-level ones (bit flips, interesting integers at random
//! offsets, chunk insertion, deletion, duplication, splicing with another corpus entry, number
//! replacement in text, dictionary tokens) and JSON-aware ones (a random node of the document
//! replaced by an extreme number, a long string, a huge array, deep nesting, ...).

use crate::rng::Rng;
use serde_json::{Map, Number, Value};

/// Inputs are cut to this length: every parser under test caps or streams its input, and
/// larger inputs would only slow the run down.
pub const MAX_INPUT_LEN: usize = 1 << 20;

/// Integers that tend to sit on boundaries: signs, widths, powers of two, all-ones.
pub const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    31,
    32,
    63,
    64,
    100,
    127,
    128,
    255,
    256,
    1023,
    1024,
    4095,
    4096,
    32767,
    32768,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    1 << 53,
    1 << 61,
    1 << 62,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX - 1,
    u64::MAX,
    (-100i64) as u64,
    (-2i64) as u64,
];

/// Numbers (as JSON text) that config and header fields rarely expect.
pub const INTERESTING_DECIMALS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "3",
    "-100",
    "0.5",
    "-0.0",
    "1e-300",
    "5e-324",
    "1e308",
    "-1e308",
    "1.7976931348623157e308",
    "1e400",
    "255",
    "256",
    "65536",
    "2147483647",
    "2147483648",
    "4294967296",
    "9007199254740993",
    "2305843009213693952",
    "4611686018427387904",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "123456789012345678901234567890",
    "1.5",
    "0.0000001",
];

fn interesting_json_number(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 => Value::from(*rng.pick(INTERESTING_U64)),
        1 => Value::from(*rng.pick(INTERESTING_U64) as i64),
        2 => {
            let f = *rng.pick(&[
                0.0,
                -0.0,
                0.5,
                1.5,
                -1.0,
                1e-300,
                5e-324,
                1e308,
                -1e308,
                f64::MAX,
                f64::MIN_POSITIVE,
                9.223372036854776e18,
                1.8446744073709552e19,
                1e-7,
                3.0,
            ]);
            Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        _ => Value::from(rng.below(64) as i64 - 8),
    }
}

/// A random interesting JSON value: numbers, strings, null, booleans, small containers.
pub fn interesting_json_value(rng: &mut Rng, dict: &[&str]) -> Value {
    match rng.below(10) {
        0..=3 => interesting_json_number(rng),
        4 if !dict.is_empty() => Value::from(*rng.pick(dict)),
        5 => Value::from(*rng.pick(&["", "x", "-", "gated-", "gated-gated-relu", "../..", "/", "\u{0}", "é"])),
        6 => Value::Null,
        7 => Value::Bool(rng.one_in(2)),
        8 => Value::Array((0..rng.below(4)).map(|_| interesting_json_number(rng)).collect()),
        _ => Value::Object(Map::new()),
    }
}

fn chunk_range(rng: &mut Rng, len: usize) -> (usize, usize) {
    let start = rng.below(len + 1);
    let n = rng.small_size(12).min(len - start);
    (start, n)
}

/// One byte-level mutation of `data`, in place. `other` is another corpus entry to splice from.
pub fn mutate_bytes_once(data: &mut Vec<u8>, rng: &mut Rng, other: &[u8], dict: &[&str]) {
    let len = data.len();
    match rng.below(16) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        2 if len > 0 => {
            let i = rng.below(len);
            data[i] = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xff, b'0', b'9', b'-', b'"', b'{', b'[', b'\n']);
        }
        3 | 4 if len > 0 => {
            // An interesting integer over 1, 2, 4 or 8 bytes at a random offset (length fields).
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let value = *rng.pick(INTERESTING_U64);
            let bytes = if rng.one_in(4) {
                value.to_be_bytes()[8 - width..].to_vec()
            } else {
                value.to_le_bytes()[..width].to_vec()
            };
            let i = rng.below(len);
            for (k, b) in bytes.into_iter().enumerate() {
                if let Some(slot) = data.get_mut(i + k) {
                    *slot = b;
                }
            }
        }
        5 if len >= 8 => {
            // A small delta added to an integer field.
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let i = rng.below(len - width + 1);
            let mut buf = [0u8; 8];
            buf[..width].copy_from_slice(&data[i..i + width]);
            let delta = rng.below(33) as i64 - 16;
            let v = u64::from_le_bytes(buf).wrapping_add(delta as u64);
            data[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
        }
        6 => {
            let n = rng.small_size(6);
            let at = rng.below(len + 1);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(at..at, bytes);
        }
        7 => {
            // A long run of one byte: huge strings and numbers, padding.
            let n = rng.small_size(16);
            let at = rng.below(len + 1);
            let b = *rng.pick(&[0u8, b'0', b'9', b'a', b' ', b'[', b'{', 0xff]);
            data.splice(at..at, std::iter::repeat_n(b, n));
        }
        8 if len > 0 => {
            let (start, n) = chunk_range(rng, len);
            data.drain(start..start + n);
        }
        9 if len > 0 => {
            let (start, n) = chunk_range(rng, len);
            let chunk = data[start..start + n].to_vec();
            let at = rng.below(len + 1);
            let times = if rng.one_in(4) { rng.small_size(8) } else { 1 };
            let repeated = chunk.repeat(times);
            data.splice(at..at, repeated);
        }
        10 if len > 1 => {
            let (start, n) = chunk_range(rng, len);
            let chunk = data[start..start + n].to_vec();
            let at = rng.below(len);
            for (k, b) in chunk.into_iter().enumerate() {
                if let Some(slot) = data.get_mut(at + k) {
                    *slot = b;
                }
            }
        }
        11 if !other.is_empty() => {
            // Splice: a prefix of this input and a suffix of the other.
            let cut = rng.below(len + 1);
            let from = rng.below(other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        12 if !other.is_empty() => {
            let (start, n) = chunk_range(rng, other.len());
            let at = rng.below(len + 1);
            data.splice(at..at, other[start..start + n].iter().copied());
        }
        13 if len > 0 => {
            data.truncate(rng.below(len));
        }
        14 => replace_number(data, rng),
        _ if !dict.is_empty() => {
            let token = rng.pick(dict).as_bytes().to_vec();
            let at = rng.below(len + 1);
            if rng.one_in(2) && at + token.len() <= len {
                data[at..at + token.len()].copy_from_slice(&token);
            } else {
                data.splice(at..at, token);
            }
        }
        _ => {
            let at = rng.below(len + 1);
            data.insert(at, rng.next_u64() as u8);
        }
    }
}

/// Replaces a run of ASCII digits (with its sign, fraction and exponent) by an interesting
/// decimal, or inserts one when the data holds no digit.
fn replace_number(data: &mut Vec<u8>, rng: &mut Rng) {
    let replacement = rng.pick(INTERESTING_DECIMALS).as_bytes().to_vec();
    let digits: Vec<usize> = data
        .iter()
        .enumerate()
        .filter(|(_, b)| b.is_ascii_digit())
        .map(|(i, _)| i)
        .collect();
    if digits.is_empty() {
        let at = rng.below(data.len() + 1);
        data.splice(at..at, replacement);
        return;
    }
    let mid = *rng.pick(&digits);
    let is_num = |b: u8| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-');
    let mut start = mid;
    while start > 0 && is_num(data[start - 1]) {
        start -= 1;
    }
    let mut end = mid;
    while end < data.len() && is_num(data[end]) {
        end += 1;
    }
    data.splice(start..end, replacement);
}

/// 1 to 8 stacked byte-level mutations of `input`.
pub fn mutate_bytes(input: &[u8], rng: &mut Rng, other: &[u8], dict: &[&str]) -> Vec<u8> {
    let mut data = input.to_vec();
    let most = if rng.one_in(3) { 8 } else { 2 };
    let rounds = 1 + rng.below(most);
    for _ in 0..rounds {
        mutate_bytes_once(&mut data, rng, other, dict);
    }
    data.truncate(MAX_INPUT_LEN);
    data
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(items) => items.iter().map(count_nodes).sum(),
        Value::Object(map) => map.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// The `k`-th node of `v` in pre-order (counting down `k`).
fn nth_node_mut<'a>(v: &'a mut Value, k: &mut usize) -> Option<&'a mut Value> {
    if *k == 0 {
        return Some(v);
    }
    *k -= 1;
    match v {
        Value::Array(items) => items.iter_mut().find_map(|item| nth_node_mut(item, k)),
        Value::Object(map) => map.values_mut().find_map(|item| nth_node_mut(item, k)),
        _ => None,
    }
}

fn nth_node(v: &Value, k: &mut usize) -> Option<Value> {
    if *k == 0 {
        return Some(v.clone());
    }
    *k -= 1;
    match v {
        Value::Array(items) => items.iter().find_map(|item| nth_node(item, k)),
        Value::Object(map) => map.values().find_map(|item| nth_node(item, k)),
        _ => None,
    }
}

fn random_node(v: &Value, rng: &mut Rng) -> Value {
    let mut k = rng.below(count_nodes(v));
    nth_node(v, &mut k).unwrap_or(Value::Null)
}

/// One mutation of a random node of `doc`. `other` is another JSON document to take subtrees
/// from; `dict` holds the keys and values the target's parsers know.
pub fn mutate_json_tree(doc: &mut Value, rng: &mut Rng, other: Option<&Value>, dict: &[&str]) {
    let donor = other
        .map(|o| random_node(o, rng))
        .unwrap_or_else(|| random_node(doc, rng));
    let mut k = rng.below(count_nodes(doc));
    let Some(node) = nth_node_mut(doc, &mut k) else {
        return;
    };
    match rng.below(13) {
        0..=2 => *node = interesting_json_number(rng),
        3 => *node = interesting_json_value(rng, dict),
        4 => {
            // A long string.
            let n = rng.small_size(16);
            let c = *rng.pick(&['a', '0', ' ', '\u{e9}', '/', '.']);
            *node = Value::String(std::iter::repeat_n(c, n).collect());
        }
        5 => {
            // A huge array of small numbers, or of copies of the node, kept within the input
            // size cap (copies of a node holding a long string would otherwise take gigabytes).
            let item = if rng.one_in(2) { Value::from(1) } else { node.clone() };
            let item_len = serde_json::to_vec(&item).map_or(usize::MAX, |v| v.len() + 1);
            let n = rng.small_size(16).min(MAX_INPUT_LEN / item_len);
            if n > 0 {
                *node = Value::Array(vec![item; n]);
            }
        }
        6 => {
            // Deep nesting, around serde_json's recursion limit of 128.
            let depth = *rng.pick(&[2usize, 8, 100, 126, 127, 128, 129, 200]);
            let mut v = node.clone();
            let in_object = rng.one_in(2);
            for _ in 0..depth {
                v = if in_object {
                    Value::Object(Map::from_iter([("k".to_string(), v)]))
                } else {
                    Value::Array(vec![v])
                };
            }
            *node = v;
        }
        7 => *node = donor,
        8 => match node {
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(rng.below(map.len())).cloned().unwrap_or_default();
                map.remove(&key);
            }
            Value::Array(items) if !items.is_empty() => {
                items.remove(rng.below(items.len()));
            }
            _ => *node = Value::Null,
        },
        9 | 10 => match node {
            Value::Object(map) => {
                let key = if dict.is_empty() || rng.one_in(4) {
                    format!("k{}", rng.below(4))
                } else {
                    rng.pick(dict).to_string()
                };
                let value = if rng.one_in(2) {
                    interesting_json_value(rng, dict)
                } else {
                    donor
                };
                map.insert(key, value);
            }
            Value::Array(items) => {
                let at = rng.below(items.len() + 1);
                let value = if rng.one_in(2) && !items.is_empty() {
                    items[rng.below(items.len())].clone()
                } else {
                    interesting_json_value(rng, dict)
                };
                items.insert(at, value);
            }
            _ => *node = interesting_json_value(rng, dict),
        },
        11 => match node {
            Value::Object(map) if !map.is_empty() && !dict.is_empty() => {
                // Rename a key to another known key.
                let key = map.keys().nth(rng.below(map.len())).cloned().unwrap_or_default();
                if let Some(v) = map.remove(&key) {
                    map.insert(rng.pick(dict).to_string(), v);
                }
            }
            Value::String(s) if !dict.is_empty() => *s = rng.pick(dict).to_string(),
            _ => *node = Value::Array(Vec::new()),
        },
        _ => {
            // A different kind of the same content.
            *node = match std::mem::take(node) {
                Value::Number(n) => Value::String(n.to_string()),
                Value::String(s) => s
                    .parse::<f64>()
                    .ok()
                    .and_then(Number::from_f64)
                    .map_or(Value::Null, Value::Number),
                Value::Array(items) => {
                    Value::Object(items.into_iter().enumerate().map(|(i, v)| (i.to_string(), v)).collect())
                }
                Value::Object(map) => Value::Array(map.into_iter().map(|(_, v)| v).collect()),
                Value::Bool(b) => Value::from(b as i64),
                Value::Null => Value::from(0),
            };
        }
    }
}

/// Serialises a JSON document compactly or pretty-printed.
pub fn json_bytes(doc: &Value, rng: &mut Rng) -> Vec<u8> {
    let text = if rng.one_in(2) {
        serde_json::to_vec(doc)
    } else {
        serde_json::to_vec_pretty(doc)
    };
    text.unwrap_or_default()
}

/// 1 to 4 stacked tree mutations of a JSON input; `None` when the input is not JSON.
pub fn mutate_json(input: &[u8], rng: &mut Rng, other: &[u8], dict: &[&str]) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(input).ok()?;
    let other: Option<Value> = serde_json::from_slice(other).ok();
    for _ in 0..1 + rng.below(4) {
        mutate_json_tree(&mut doc, rng, other.as_ref(), dict);
    }
    let mut out = json_bytes(&doc, rng);
    out.truncate(MAX_INPUT_LEN);
    Some(out)
}

/// A JSON-aware mutation when the input parses, else (or sometimes anyway) byte-level ones.
pub fn mutate_json_or_bytes(input: &[u8], rng: &mut Rng, other: &[u8], dict: &[&str]) -> Vec<u8> {
    if !rng.one_in(3) {
        if let Some(out) = mutate_json(input, rng, other, dict) {
            return out;
        }
    }
    mutate_bytes(input, rng, other, dict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_change_inputs_and_stay_bounded() {
        let mut rng = Rng::new(1);
        let seed = br#"{"a": 1, "b": [1, 2, {"c": "x"}]}"#.to_vec();
        let mut changed = 0;
        let mut still_json = 0;
        for _ in 0..2000 {
            let out = mutate_json_or_bytes(&seed, &mut rng, b"[3]", &["vocab_size"]);
            assert!(out.len() <= MAX_INPUT_LEN);
            changed += usize::from(out != seed);
            still_json += usize::from(serde_json::from_slice::<Value>(&out).is_ok());
        }
        assert!(changed > 1900, "{changed}");
        // Most JSON-aware mutations keep the document parseable (nesting past the limit does not).
        assert!(still_json > 1000, "{still_json}");
        for _ in 0..2000 {
            let out = mutate_bytes(&[], &mut rng, b"", &[]);
            assert!(out.len() <= MAX_INPUT_LEN);
        }
    }
}
