//! The safetensors layout (8-byte little-endian header length, JSON header, data), read
//! tolerantly and written freely, for structure-aware mutations of the `safetensors` and
//! `inputs` targets: tensor names, dtypes, shapes and values change while the file stays well
//! formed enough to reach the code behind the header parser.

use crate::mutate::{json_bytes, mutate_json_tree};
use crate::rng::Rng;
use serde_json::{Map, Value};

/// A tensor of a safetensors file, as the header describes it. `dtype` is any string and
/// `shape` any numbers, so that the writer can say what no valid file says.
#[derive(Debug, Clone, PartialEq)]
pub struct StTensor {
    /// The tensor's name.
    pub name: String,
    /// The dtype string (`F32`, `I64`, ...).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<u64>,
    /// The data bytes.
    pub data: Vec<u8>,
}

/// Every dtype name safetensors defines (some of which the reader refuses), and one it does not.
pub const DTYPES: &[&str] = &[
    "BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64", "F64", "F8_E4M3", "F8_E5M2",
    "F8_E8M0", "F4", "F6_E2M3", "C64", "X9",
];

/// The size in bytes of one element of `dtype` (1 for the sub-byte and unknown ones).
pub fn dtype_size(dtype: &str) -> usize {
    match dtype {
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" | "C64" => 8,
        _ => 1,
    }
}

/// The tensors (in data order) and the `__metadata__` of a safetensors file, if its header
/// parses and its offsets stay inside the data; never panics.
pub fn parse(bytes: &[u8]) -> Option<(Vec<StTensor>, Option<Value>)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    let header: Map<String, Value> = serde_json::from_slice(bytes.get(8..end)?).ok()?;
    let data = &bytes[end..];
    let mut metadata = None;
    let mut tensors = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            metadata = Some(info);
            continue;
        }
        let dtype = info.get("dtype")?.as_str()?.to_string();
        let shape = info
            .get("shape")?
            .as_array()?
            .iter()
            .map(Value::as_u64)
            .collect::<Option<Vec<u64>>>()?;
        let offsets = info.get("data_offsets")?.as_array()?;
        let (start, stop) = (
            usize::try_from(offsets.first()?.as_u64()?).ok()?,
            usize::try_from(offsets.get(1)?.as_u64()?).ok()?,
        );
        let slice = data.get(start..stop)?.to_vec();
        tensors.push((
            start,
            StTensor {
                name,
                dtype,
                shape,
                data: slice,
            },
        ));
    }
    tensors.sort_by_key(|(start, _)| *start);
    Some((tensors.into_iter().map(|(_, t)| t).collect(), metadata))
}

/// The header of `tensors` laid out back to back, as a JSON object.
fn header(tensors: &[StTensor], metadata: Option<&Value>) -> Value {
    let mut map = Map::new();
    if let Some(m) = metadata {
        map.insert("__metadata__".into(), m.clone());
    }
    let mut offset = 0usize;
    for t in tensors {
        let end = offset + t.data.len();
        map.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    Value::Object(map)
}

/// Writes a safetensors file with the given header object and data.
pub fn assemble(header: &Value, data: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut text = json_bytes(header, rng);
    // The format pads the header with spaces to a multiple of 8; some files do, some do not.
    if rng.one_in(2) {
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

/// Writes `tensors` (and `metadata`) as a safetensors file, data back to back in order.
pub fn write(tensors: &[StTensor], metadata: Option<&Value>, rng: &mut Rng) -> Vec<u8> {
    let data: Vec<u8> = tensors.iter().flat_map(|t| t.data.iter().copied()).collect();
    assemble(&header(tensors, metadata), &data, rng)
}

/// A JSON-aware mutation of the header alone (offsets, shapes and dtypes that lie about the
/// data), with the length prefix rewritten to match; `None` when the header does not parse.
pub fn mutate_header(bytes: &[u8], rng: &mut Rng, dict: &[&str]) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    let mut doc: Value = serde_json::from_slice(bytes.get(8..end)?).ok()?;
    for _ in 0..1 + rng.below(3) {
        mutate_json_tree(&mut doc, rng, None, dict);
    }
    let mut out = assemble(&doc, &bytes[end..], rng);
    if rng.one_in(8) {
        // A length prefix that disagrees with the header.
        let lie = *rng.pick(crate::mutate::INTERESTING_U64);
        out[..8].copy_from_slice(&lie.to_le_bytes());
    }
    Some(out)
}

/// Values of one element of `dtype`, little-endian, from an integer.
pub fn element(dtype: &str, v: i64) -> Vec<u8> {
    match dtype {
        "F32" => (v as f32).to_le_bytes().to_vec(),
        "F64" => (v as f64).to_le_bytes().to_vec(),
        "F16" | "BF16" => {
            let bits = (v as f32).to_bits();
            if dtype == "BF16" {
                ((bits >> 16) as u16).to_le_bytes().to_vec()
            } else {
                // Small integers only: enough for masks and ids in half precision.
                let h: u16 = match v {
                    0 => 0,
                    1 => 0x3c00,
                    -1 => 0xbc00,
                    2 => 0x4000,
                    _ => 0x7c00,
                };
                h.to_le_bytes().to_vec()
            }
        }
        _ => v.to_le_bytes()[..dtype_size(dtype)].to_vec(),
    }
}

/// The number of elements of `shape`, if it does not overflow.
pub fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, d| n.checked_mul(*d))
}

/// A tensor of `dtype` and `shape` whose elements come from `value(i)`. A shape of more than
/// [`MAX_NUMEL`] elements gets no data (the file then lies about its size).
pub fn tensor(name: &str, dtype: &str, shape: &[u64], mut value: impl FnMut(usize) -> i64) -> StTensor {
    let numel = numel(shape).filter(|n| *n <= MAX_NUMEL).unwrap_or(0);
    let data = (0..numel as usize).flat_map(|i| element(dtype, value(i))).collect();
    StTensor {
        name: name.to_string(),
        dtype: dtype.to_string(),
        shape: shape.to_vec(),
        data,
    }
}

/// Dimensions shapes are drawn from: empty, small, the tiny models' limits and past them, and
/// (rarely, with data that cannot match) astronomically large.
const DIMS: &[u64] = &[0, 1, 1, 2, 2, 3, 4, 5, 8, 15, 16, 17, 63, 64, 65, 200];
const HUGE_DIMS: &[u64] = &[1 << 31, 1 << 32, 1 << 62, 1 << 63, u64::MAX];

/// The largest tensor the mutator builds (elements): the targets are tiny models, and bigger
/// inputs only make executions slower.
pub const MAX_NUMEL: u64 = 4096;

fn random_shape(rng: &mut Rng) -> Vec<u64> {
    let rank = *rng.pick(&[0usize, 1, 2, 2, 2, 3, 4]);
    loop {
        let shape: Vec<u64> = (0..rank).map(|_| *rng.pick(DIMS)).collect();
        if numel(&shape).is_some_and(|n| n <= MAX_NUMEL) {
            return shape;
        }
    }
}

/// One tensor-level mutation: a name from `names`, another dtype, shape or values (values from
/// `value(name, rng, index)`), a tensor added, removed or duplicated, metadata, data that
/// disagrees with the shape.
pub fn mutate_tensors(
    tensors: &mut Vec<StTensor>,
    metadata: &mut Option<Value>,
    rng: &mut Rng,
    names: &[&str],
    value: fn(&str, &mut Rng, usize) -> i64,
) {
    let regenerate = |t: &mut StTensor, rng: &mut Rng| {
        let name = t.name.clone();
        *t = tensor(&name, &t.dtype.clone(), &t.shape.clone(), |i| value(&name, rng, i));
    };
    if tensors.is_empty() || rng.one_in(12) {
        let name = rng.pick(names).to_string();
        let shape = tensors
            .first()
            .map(|t| t.shape.clone())
            .unwrap_or_else(|| random_shape(rng));
        let shape = if numel(&shape).is_some_and(|n| n <= MAX_NUMEL) {
            shape
        } else {
            vec![1, 1]
        };
        tensors.push(tensor(&name, "I64", &shape, |i| value(&name, rng, i)));
        return;
    }
    let k = rng.below(tensors.len());
    match rng.below(12) {
        0 => tensors[k].name = rng.pick(names).to_string(),
        1 => {
            tensors[k].dtype = rng.pick(DTYPES).to_string();
            regenerate(&mut tensors[k], rng);
        }
        2 | 3 => {
            tensors[k].shape = random_shape(rng);
            regenerate(&mut tensors[k], rng);
        }
        4 | 5 => {
            // One element set to a boundary value.
            let t = &mut tensors[k];
            let size = dtype_size(&t.dtype);
            let n = t.data.len() / size;
            if n > 0 {
                let v = *rng.pick(&[
                    -1i64,
                    0,
                    1,
                    2,
                    -100,
                    39,
                    40,
                    49,
                    50,
                    51,
                    255,
                    1 << 31,
                    i64::MAX,
                    i64::MIN,
                ]);
                let at = rng.below(n) * size;
                let bytes = element(&t.dtype, v);
                t.data[at..at + size].copy_from_slice(&bytes[..size]);
            }
        }
        6 => {
            // Every element one value: all-padding masks, all-ignored labels.
            let t = &mut tensors[k];
            let v = *rng.pick(&[0i64, 1, -100, 2]);
            let name = t.name.clone();
            let (dtype, shape) = (t.dtype.clone(), t.shape.clone());
            *t = tensor(&name, &dtype, &shape, |_| v);
        }
        7 => {
            tensors.remove(k);
        }
        8 => {
            let mut copy = tensors[k].clone();
            copy.name = rng.pick(names).to_string();
            tensors.push(copy);
        }
        9 => {
            // Data that disagrees with the shape.
            let t = &mut tensors[k];
            if rng.one_in(2) && !t.data.is_empty() {
                let keep = rng.below(t.data.len());
                t.data.truncate(keep);
            } else {
                t.data.extend(std::iter::repeat_n(0u8, 1 + rng.below(16)));
            }
        }
        10 => {
            let t = &mut tensors[k];
            let rank = t.shape.len().max(1);
            t.shape = (0..rank).map(|_| *rng.pick(HUGE_DIMS)).collect();
            if rng.one_in(2) {
                t.shape.push(0);
            }
        }
        _ => {
            *metadata = match rng.below(3) {
                0 => None,
                1 => Some(serde_json::json!({"format": "pt"})),
                _ => Some(crate::mutate::interesting_json_value(rng, names)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn written_files_read_back_here_and_in_the_library() {
        let mut rng = Rng::new(5);
        let tensors = vec![
            tensor("input_ids", "I64", &[2, 3], |i| i as i64),
            tensor("mask", "F16", &[2], |_| 1),
            tensor("x", "BF16", &[1], |_| 2),
        ];
        let bytes = write(&tensors, Some(&serde_json::json!({"format": "pt"})), &mut rng);
        let (back, metadata) = parse(&bytes).unwrap();
        assert_eq!(back, tensors);
        assert_eq!(metadata.unwrap()["format"], "pt");
        let dir = std::env::temp_dir().join(format!("vh-fuzz-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let read: HashMap<String, tch::Tensor> = vh_hub::read_safetensors(&path).unwrap().into_iter().collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            Vec::<i64>::try_from(read["input_ids"].flatten(0, -1)).unwrap(),
            vec![0, 1, 2, 3, 4, 5]
        );
        assert_eq!(read["mask"].double_value(&[1]), 1.0);
        assert_eq!(read["x"].double_value(&[0]), 2.0);
        assert!(parse(b"\xff\xff\xff\xff\xff\xff\xff\xff{}").is_none());
        assert!(parse(b"").is_none());
    }
}
