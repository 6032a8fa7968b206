//! Target `torch-bin`: bytes written to a file and read by `vh_hub::torch_bin::read_torch_bin`
//! (zip archive, then the restricted unpickler, then storages and views). Random bytes rarely
//! pass the zip layer, so most mutations open the archive, change its pickle at the opcode
//! level, its storages or its entry names, and write a fresh archive around them; some then
//! make one of the archive's size, offset or count fields lie.

use super::{describe_tensors, hub_feature, kind_features, Target};
use crate::mutate::{mutate_bytes, INTERESTING_U64};
use crate::pickle::{self, int_op, str_op, Op};
use crate::rng::Rng;
use crate::zipfmt::{self, Entry};
use std::path::{Path, PathBuf};

/// Strings of torch archives, for byte-level mutations.
pub const DICT: &[&str] = &[
    "data.pkl",
    "archive/",
    "data/0",
    "byteorder",
    "little",
    "big",
    "version",
    ".format_version",
    "PK\u{3}\u{4}",
    "PK\u{1}\u{2}",
    "PK\u{5}\u{6}",
    "PK\u{6}\u{6}",
    "PK\u{6}\u{7}",
];

/// The `torch-bin` target in a worker.
pub struct TorchBinTarget {
    scratch: PathBuf,
    path: PathBuf,
}

impl TorchBinTarget {
    /// The target writing its inputs to `scratch/pytorch_model.bin`.
    pub fn open(scratch: &Path) -> Self {
        Self {
            scratch: scratch.to_path_buf(),
            path: scratch.join("pytorch_model.bin"),
        }
    }
}

impl Target for TorchBinTarget {
    fn execute(&mut self, input: &[u8]) -> Vec<String> {
        if let Err(e) = std::fs::write(&self.path, input) {
            return vec![format!("write:err:{e}")];
        }
        let read = vh_hub::torch_bin::read_torch_bin(&self.path);
        let mut out = vec![hub_feature("read", &read, &[&self.scratch], |t| describe_tensors(t))];
        out.extend(kind_features("read", &read));
        out
    }
}

fn pickle_of(entries: &[Entry]) -> Option<usize> {
    entries.iter().position(|e| e.name.ends_with(b"data.pkl"))
}

/// A mutant archive.
pub fn mutate(input: &[u8], rng: &mut Rng, other: &[u8]) -> Vec<u8> {
    let Some(mut entries) = zipfmt::read_zip(input).filter(|e| !e.is_empty() && !rng.one_in(10)) else {
        return mutate_bytes(input, rng, other, DICT);
    };
    let other_entries = zipfmt::read_zip(other).unwrap_or_default();
    let k = rng.below(entries.len());
    match rng.below(10) {
        0..=4 => {
            // The pickle, at the opcode level (or its bytes).
            if let Some(p) = pickle_of(&entries) {
                let other_ops = pickle_of(&other_entries)
                    .map(|i| pickle::tokenize(&other_entries[i].data))
                    .unwrap_or_default();
                if rng.one_in(5) {
                    entries[p].data = mutate_bytes(&entries[p].data, rng, &[], &[]);
                } else {
                    let mut ops = pickle::tokenize(&entries[p].data);
                    for _ in 0..1 + rng.below(4) {
                        pickle::mutate_ops(&mut ops, rng, &other_ops);
                    }
                    ops.truncate(1 << 16);
                    entries[p].data = pickle::write(&ops);
                }
            }
        }
        5 => {
            // A storage (or another record) cut, grown, emptied or changed.
            let data = &mut entries[k].data;
            match rng.below(4) {
                0 => data.truncate(rng.below(data.len() + 1)),
                1 => data.extend(std::iter::repeat_n(0u8, rng.small_size(10))),
                2 => data.clear(),
                _ => *data = mutate_bytes(data, rng, &[], &[]),
            }
        }
        6 => {
            // Names: another folder, a path that leaves it, a repeated name, a record torch does
            // not write.
            let name = &mut entries[k].name;
            match rng.below(5) {
                0 => *name = b"other/data.pkl".to_vec(),
                1 => name.splice(0..0, b"../".iter().copied()).for_each(drop),
                2 => name.extend_from_slice(b"x"),
                3 => {
                    *name = rng
                        .pick(&[&b"archive/data/1"[..], b"archive/evil.py", b"data.pkl", b"a/b/data.pkl"])
                        .to_vec()
                }
                _ => {
                    let j = rng.below(entries.len());
                    let same = entries[j].name.clone();
                    entries[k].name = same;
                }
            }
        }
        7 => match rng.below(3) {
            0 => {
                entries.remove(k);
            }
            1 => {
                let copy = entries[k].clone();
                entries.insert(rng.below(entries.len() + 1), copy);
            }
            _ => {
                if !other_entries.is_empty() {
                    entries.push(rng.pick(&other_entries).clone());
                }
            }
        },
        _ => {}
    }
    let (mut bytes, fields) = zipfmt::write_zip(&entries);
    if rng.one_in(4) && !fields.is_empty() {
        // A header field that lies: sizes larger than the file, offsets past it, counts that
        // disagree with the central directory.
        let (at, width) = *rng.pick(&fields);
        let value = if rng.one_in(3) {
            let mut buf = [0u8; 8];
            buf[..width].copy_from_slice(&bytes[at..at + width]);
            u64::from_le_bytes(buf)
                .wrapping_add(rng.below(9) as u64)
                .wrapping_sub(4)
        } else {
            *rng.pick(INTERESTING_U64)
        };
        bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    }
    if rng.one_in(10) {
        bytes = mutate_bytes(&bytes, rng, other, DICT);
    }
    bytes
}

/// One tensor of a hand-built state dict: name, storage type, storage key, storage elements,
/// offset, size, stride.
struct TensorRecord<'a> {
    name: &'a str,
    storage: &'a str,
    key: &'a str,
    numel: i64,
    offset: i64,
    size: &'a [i64],
    stride: &'a [i64],
}

fn tuple_ops(values: &[i64], rng: &mut Rng) -> Vec<Op> {
    let plain = |code: u8| Op { code, arg: Vec::new() };
    let mut ops = vec![plain(b'(')];
    ops.extend(values.iter().map(|v| int_op(*v, rng)));
    ops.push(plain(b't'));
    ops
}

/// A state-dict pickle as `torch.save` writes one (protocol 2, `_rebuild_tensor_v2` over
/// persistent storage ids), optionally with `_rebuild_parameter` around each tensor.
fn state_dict_pickle(records: &[TensorRecord<'_>], parameters: bool) -> Vec<u8> {
    let mut rng = Rng::new(0);
    let plain = |code: u8| Op { code, arg: Vec::new() };
    let global = |s: &str| Op {
        code: b'c',
        arg: s.as_bytes().to_vec(),
    };
    let mut ops = vec![
        Op {
            code: 0x80,
            arg: vec![2],
        },
        plain(b'}'),
        plain(b'('),
    ];
    for r in records {
        ops.push(str_op(r.name.as_bytes(), &mut rng));
        if parameters {
            ops.push(global("torch._utils\n_rebuild_parameter\n"));
            ops.push(plain(b'('));
        }
        ops.push(global("torch._utils\n_rebuild_tensor_v2\n"));
        ops.push(plain(b'('));
        ops.push(plain(b'('));
        ops.push(str_op(b"storage", &mut rng));
        ops.push(global(&format!("torch\n{}\n", r.storage)));
        ops.push(str_op(r.key.as_bytes(), &mut rng));
        ops.push(str_op(b"cpu", &mut rng));
        ops.push(int_op(r.numel, &mut rng));
        ops.push(plain(b't'));
        ops.push(plain(b'Q'));
        ops.push(int_op(r.offset, &mut rng));
        ops.extend(tuple_ops(r.size, &mut rng));
        ops.extend(tuple_ops(r.stride, &mut rng));
        ops.push(plain(0x89));
        ops.push(global("collections\nOrderedDict\n"));
        ops.push(plain(b')'));
        ops.push(plain(b'R'));
        ops.push(plain(b't'));
        ops.push(plain(b'R'));
        if parameters {
            ops.push(plain(0x88));
            ops.push(global("collections\nOrderedDict\n"));
            ops.push(plain(b')'));
            ops.push(plain(b'R'));
            ops.push(plain(b't'));
            ops.push(plain(b'R'));
        }
    }
    ops.push(plain(b'u'));
    ops.push(plain(b'.'));
    pickle::write(&ops)
}

/// A torch zip archive: `prefix/data.pkl`, the storages under `prefix/data/`, version and
/// byte order records.
pub fn torch_archive(prefix: &str, pickle: Vec<u8>, storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries = vec![Entry {
        name: format!("{prefix}/data.pkl").into_bytes(),
        data: pickle,
    }];
    entries.push(Entry {
        name: format!("{prefix}/byteorder").into_bytes(),
        data: b"little".to_vec(),
    });
    for (key, data) in storages {
        entries.push(Entry {
            name: format!("{prefix}/data/{key}").into_bytes(),
            data: data.clone(),
        });
    }
    entries.push(Entry {
        name: format!("{prefix}/version").into_bytes(),
        data: b"3\n".to_vec(),
    });
    zipfmt::write_zip(&entries).0
}

/// A valid archive of one f32 tensor per `(name, values)`, each with its own storage, as the
/// shards of the `index` target use.
pub fn f32_archive(tensors: &[(&str, Vec<f32>)]) -> Vec<u8> {
    let keys: Vec<String> = (0..tensors.len()).map(|i| i.to_string()).collect();
    let sizes: Vec<[i64; 1]> = tensors.iter().map(|(_, v)| [v.len() as i64]).collect();
    let records: Vec<TensorRecord<'_>> = tensors
        .iter()
        .zip(&keys)
        .zip(&sizes)
        .map(|(((name, values), key), size)| TensorRecord {
            name,
            storage: "FloatStorage",
            key,
            numel: values.len() as i64,
            offset: 0,
            size,
            stride: &[1],
        })
        .collect();
    let storages: Vec<(&str, Vec<u8>)> = tensors
        .iter()
        .zip(&keys)
        .map(|((_, values), key)| (key.as_str(), values.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    torch_archive("archive", state_dict_pickle(&records, false), &storages)
}

/// Hand-built archives: plain, shared storage with offset and strided views, parameters, empty
/// dict, integer storage. (`make_torch_seeds.py` adds archives made by `torch.save` itself.)
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let f32s = |n: usize| -> Vec<u8> { (0..n).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect() };
    let plain = f32_archive(&[("w", vec![1.0, 2.0, 3.0, 4.0]), ("b", vec![0.5])]);
    let shared = torch_archive(
        "model",
        state_dict_pickle(
            &[
                TensorRecord {
                    name: "whole",
                    storage: "FloatStorage",
                    key: "0",
                    numel: 12,
                    offset: 0,
                    size: &[3, 4],
                    stride: &[4, 1],
                },
                TensorRecord {
                    name: "row",
                    storage: "FloatStorage",
                    key: "0",
                    numel: 12,
                    offset: 4,
                    size: &[4],
                    stride: &[1],
                },
                TensorRecord {
                    name: "transposed",
                    storage: "FloatStorage",
                    key: "0",
                    numel: 12,
                    offset: 0,
                    size: &[4, 3],
                    stride: &[1, 4],
                },
            ],
            false,
        ),
        &[("0", f32s(12))],
    );
    let params = torch_archive(
        "archive",
        state_dict_pickle(
            &[TensorRecord {
                name: "p",
                storage: "HalfStorage",
                key: "0",
                numel: 2,
                offset: 0,
                size: &[2],
                stride: &[1],
            }],
            true,
        ),
        &[("0", vec![0, 0x3c, 0, 0x40])],
    );
    let ints = torch_archive(
        "archive",
        state_dict_pickle(
            &[TensorRecord {
                name: "ids",
                storage: "LongStorage",
                key: "k",
                numel: 3,
                offset: 0,
                size: &[3],
                stride: &[1],
            }],
            false,
        ),
        &[("k", (0..3i64).flat_map(|v| v.to_le_bytes()).collect())],
    );
    let empty = torch_archive("archive", b"\x80\x02}q\x00.".to_vec(), &[]);
    vec![
        ("hand-plain.bin".to_string(), plain),
        ("hand-shared.bin".to_string(), shared),
        ("hand-parameter.bin".to_string(), params),
        ("hand-long.bin".to_string(), ints),
        ("hand-empty.bin".to_string(), empty),
    ]
}
