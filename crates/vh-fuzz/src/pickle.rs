//! Pickle at the opcode level, for the `torch-bin` target: a tolerant tokenizer, a writer, and
//! mutations that keep the stream a sequence of well-formed opcodes (so that mutants get past
//! the first byte) while changing what it builds: integers (sizes, strides, offsets, element
//! counts), strings (storage keys, dtypes), globals, memo indices and the order of operations.

use crate::rng::Rng;

/// One pickle operation: its opcode and the bytes of its argument, as they appear in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The opcode byte.
    pub code: u8,
    /// The argument bytes that follow it (length prefixes included).
    pub arg: Vec<u8>,
}

/// How many argument bytes follow `code` in `rest` (the stream after the opcode), or `None`
/// for an unknown opcode or a truncated argument.
fn arg_len(code: u8, rest: &[u8]) -> Option<usize> {
    let prefixed = |width: usize| -> Option<usize> {
        let mut buf = [0u8; 8];
        buf[..width].copy_from_slice(rest.get(..width)?);
        let n = usize::try_from(u64::from_le_bytes(buf)).ok()?;
        let total = width.checked_add(n)?;
        (total <= rest.len()).then_some(total)
    };
    let line = |lines: usize| -> Option<usize> {
        let mut end = 0;
        for _ in 0..lines {
            end += rest[end..].iter().position(|b| *b == b'\n')? + 1;
        }
        Some(end)
    };
    let fixed = |n: usize| (n <= rest.len()).then_some(n);
    match code {
        b'.'
        | b'('
        | b'}'
        | b']'
        | b')'
        | b'N'
        | 0x88
        | 0x89
        | b't'
        | 0x85..=0x87
        | b'R'
        | b'Q'
        | b's'
        | b'u'
        | b'a'
        | b'e'
        | b'b'
        | 0x94
        | 0x93
        | b'0'
        | b'1'
        | b'2'
        | 0x8f
        | 0x90
        | 0x91
        | 0x81
        | 0x92
        | b'o'
        | 0x97
        | 0x98
        | b'l'
        | b'd' => Some(0),
        0x80 | b'K' | b'q' | b'h' | 0x82 => fixed(1),
        b'M' | 0x83 => fixed(2),
        b'J' | b'r' | b'j' | 0x84 => fixed(4),
        b'G' | 0x95 => fixed(8),
        0x8a | 0x8c | b'C' | b'U' => prefixed(1),
        0x8b | b'X' | b'B' | b'T' => prefixed(4),
        0x8d | 0x8e | 0x96 => prefixed(8),
        b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'p' | b'g' => line(1),
        b'c' | b'i' => line(2),
        _ => None,
    }
}

/// Splits a pickle into operations. Whatever cannot be parsed (an unknown opcode, a truncated
/// argument) becomes one last operation holding the rest, so writing the ops back gives the
/// same bytes.
pub fn tokenize(data: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let code = data[pos];
        let rest = &data[pos + 1..];
        match arg_len(code, rest) {
            Some(n) => {
                ops.push(Op {
                    code,
                    arg: rest[..n].to_vec(),
                });
                pos += 1 + n;
            }
            None => {
                ops.push(Op {
                    code,
                    arg: rest.to_vec(),
                });
                break;
            }
        }
    }
    ops
}

/// Writes operations back into a pickle stream.
pub fn write(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        out.push(op.code);
        out.extend_from_slice(&op.arg);
    }
    out
}

/// An operation pushing the integer `v`, in the smallest or a random encoding.
pub fn int_op(v: i64, rng: &mut Rng) -> Op {
    match rng.below(4) {
        0 if (0..=255).contains(&v) => Op {
            code: b'K',
            arg: vec![v as u8],
        },
        1 if (0..=65535).contains(&v) => Op {
            code: b'M',
            arg: (v as u16).to_le_bytes().to_vec(),
        },
        2 if i32::try_from(v).is_ok() => Op {
            code: b'J',
            arg: (v as i32).to_le_bytes().to_vec(),
        },
        _ => {
            let mut arg = vec![8];
            arg.extend_from_slice(&v.to_le_bytes());
            Op { code: 0x8a, arg }
        }
    }
}

/// A `SHORT_BINUNICODE` or `BINUNICODE` operation pushing `s`.
pub fn str_op(s: &[u8], rng: &mut Rng) -> Op {
    if s.len() < 256 && rng.one_in(2) {
        let mut arg = vec![s.len() as u8];
        arg.extend_from_slice(s);
        Op { code: 0x8c, arg }
    } else {
        let mut arg = (s.len() as u32).to_le_bytes().to_vec();
        arg.extend_from_slice(s);
        Op { code: b'X', arg }
    }
}

/// The integer an operation pushes, if it pushes one.
fn int_value(op: &Op) -> Option<i64> {
    let a = &op.arg;
    Some(match op.code {
        b'K' => *a.first()? as i64,
        b'M' => u16::from_le_bytes(a.get(..2)?.try_into().ok()?) as i64,
        b'J' => i32::from_le_bytes(a.get(..4)?.try_into().ok()?) as i64,
        0x8a => {
            let n = *a.first()? as usize;
            let bytes = a.get(1..1 + n.min(8))?;
            let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                [0xff; 8]
            } else {
                [0; 8]
            };
            buf[..bytes.len()].copy_from_slice(bytes);
            i64::from_le_bytes(buf)
        }
        _ => return None,
    })
}

const INTERESTING_I64: &[i64] = &[
    0,
    1,
    -1,
    2,
    3,
    4,
    16,
    255,
    256,
    65535,
    65536,
    i32::MAX as i64,
    i32::MIN as i64,
    (1 << 30) - 1,
    1 << 30,
    1 << 31,
    u32::MAX as i64,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX,
    i64::MAX - 1,
    i64::MIN,
    i64::MIN + 1,
    -100,
];

const STRINGS: &[&[u8]] = &[
    b"storage",
    b"0",
    b"1",
    b"2",
    b"cpu",
    b"cuda",
    b"",
    b"../0",
    b"0/../0",
    b"w",
    b"weight",
    b"_metadata",
    b"torch",
    b"FloatStorage",
    b"LongStorage",
    b"collections",
    b"OrderedDict",
    b"torch._utils",
    b"_rebuild_tensor_v2",
    b"os",
    b"system",
];

const GLOBALS: &[&[u8]] = &[
    b"torch\nFloatStorage\n",
    b"torch\nHalfStorage\n",
    b"torch\nBFloat16Storage\n",
    b"torch\nDoubleStorage\n",
    b"torch\nLongStorage\n",
    b"torch\nIntStorage\n",
    b"torch\nShortStorage\n",
    b"torch\nCharStorage\n",
    b"torch\nByteStorage\n",
    b"torch\nBoolStorage\n",
    b"torch\nUntypedStorage\n",
    b"torch._utils\n_rebuild_tensor_v2\n",
    b"torch._utils\n_rebuild_parameter\n",
    b"torch._utils\n_rebuild_tensor\n",
    b"collections\nOrderedDict\n",
    b"builtins\neval\n",
    b"os\nsystem\n",
];

/// Operations worth inserting anywhere: containers, marks, reducers, memo access, STOP.
fn random_op(rng: &mut Rng) -> Op {
    let plain = |code: u8| Op { code, arg: Vec::new() };
    match rng.below(12) {
        0 => plain(*rng.pick(b"(}])tRQsuaeb.N0212")),
        1 => plain(*rng.pick(&[0x85u8, 0x86, 0x87, 0x88, 0x89, 0x94, 0x93, 0x8f, 0x90, 0x91, 0x81])),
        2 => Op {
            code: *rng.pick(b"hq"),
            arg: vec![rng.below(24) as u8],
        },
        3 => Op {
            code: *rng.pick(b"jr"),
            arg: (*rng.pick(&[0u32, 1, 5, 255, 256, u32::MAX])).to_le_bytes().to_vec(),
        },
        4 | 5 => int_op(*rng.pick(INTERESTING_I64), rng),
        6 | 7 => {
            let s = rng.pick(STRINGS);
            str_op(s, rng)
        }
        8 => Op {
            code: b'c',
            arg: rng.pick(GLOBALS).to_vec(),
        },
        9 => Op {
            code: b'G',
            arg: 1.5f64.to_be_bytes().to_vec(),
        },
        10 => Op {
            code: 0x95,
            arg: (rng.below(1 << 16) as u64).to_le_bytes().to_vec(),
        },
        _ => Op {
            code: rng.next_u64() as u8,
            arg: Vec::new(),
        },
    }
}

/// One opcode-level mutation of `ops`, in place; `other` supplies operations to splice in.
pub fn mutate_ops(ops: &mut Vec<Op>, rng: &mut Rng, other: &[Op]) {
    if ops.is_empty() {
        ops.push(random_op(rng));
        return;
    }
    let i = rng.below(ops.len());
    match rng.below(12) {
        0..=2 => {
            // An integer: a boundary value or a small step from the current one.
            let ints: Vec<usize> = (0..ops.len()).filter(|&k| int_value(&ops[k]).is_some()).collect();
            let k = if ints.is_empty() { i } else { *rng.pick(&ints) };
            let v = match int_value(&ops[k]) {
                Some(v) if rng.one_in(2) => v.wrapping_add(rng.below(9) as i64 - 4),
                _ => *rng.pick(INTERESTING_I64),
            };
            ops[k] = int_op(v, rng);
        }
        3 => {
            let strs: Vec<usize> = (0..ops.len()).filter(|&k| matches!(ops[k].code, 0x8c | b'X')).collect();
            let k = if strs.is_empty() { i } else { *rng.pick(&strs) };
            ops[k] = if rng.one_in(6) {
                // A length prefix that lies.
                let mut op = ops[k].clone();
                if let Some(b) = op.arg.first_mut() {
                    *b = b.wrapping_add(1 + rng.below(200) as u8);
                }
                op
            } else {
                let s = rng.pick(STRINGS);
                str_op(s, rng)
            };
        }
        4 => {
            let globals: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].code == b'c').collect();
            let k = if globals.is_empty() { i } else { *rng.pick(&globals) };
            ops[k] = Op {
                code: b'c',
                arg: rng.pick(GLOBALS).to_vec(),
            };
        }
        5 => {
            ops.remove(i);
        }
        6 => {
            let op = ops[i].clone();
            ops.insert(rng.below(ops.len() + 1), op);
        }
        7 => {
            let j = rng.below(ops.len());
            ops.swap(i, j);
        }
        8 | 9 => ops.insert(i, random_op(rng)),
        10 => {
            // A run of operations repeated: deep nesting, memo expansion, long dicts.
            let n = 1 + rng.below(8.min(ops.len() - i));
            let run: Vec<Op> = ops[i..i + n].to_vec();
            // Within the input size cap: a run holding a long string, repeated thousands of
            // times, would otherwise take gigabytes.
            let run_len: usize = run.iter().map(|op| 1 + op.arg.len()).sum();
            let times = rng.small_size(12).min(crate::mutate::MAX_INPUT_LEN / run_len.max(1));
            let at = i + n;
            ops.splice(at..at, std::iter::repeat_n(run, times).flatten());
        }
        _ if !other.is_empty() => {
            let start = rng.below(other.len());
            let n = 1 + rng.below(16.min(other.len() - start));
            ops.splice(i..i, other[start..start + n].iter().cloned());
        }
        _ => {
            if let Some(op) = ops.get_mut(i) {
                if let Some(b) = op.arg.first_mut() {
                    *b = rng.next_u64() as u8;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizing_and_writing_round_trips_any_bytes() {
        let pickle = b"\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02K\x05\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80u.";
        let ops = tokenize(pickle);
        assert_eq!(write(&ops), pickle);
        assert_eq!(
            ops[0],
            Op {
                code: 0x80,
                arg: vec![2]
            }
        );
        assert!(ops.iter().any(|op| op.code == b'c'));
        assert_eq!(int_value(&ops[ops.len() - 4]), Some(5));
        assert_eq!(int_value(&ops[ops.len() - 3]), Some(i64::MIN));
        for junk in [&b"\xff\x00"[..], b"X\xff\xff\xff\xff", b"c no newline", b""] {
            assert_eq!(write(&tokenize(junk)), junk);
        }
        let mut rng = Rng::new(3);
        let mut ops = tokenize(pickle);
        for _ in 0..500 {
            mutate_ops(&mut ops, &mut rng, &tokenize(pickle));
            ops.truncate(10_000);
        }
        for v in [0, 300, -5, i64::MAX, i64::MIN] {
            assert_eq!(int_value(&int_op(v, &mut rng)), Some(v));
        }
    }
}
