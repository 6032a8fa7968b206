//! Reading `pytorch_model.bin` files (the zip + pickle format `torch.save` writes) without
//! Python. Only plain state dicts are accepted: the pickle may name tensors, storages and
//! ordered dicts, nothing else, so loading a file never runs code from it.

use crate::error::{HubError, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

/// A value on the unpickler's stack (booleans and floats only occur as ignored arguments).
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A global the loader allows: "module.name".
    Global(String),
    /// A storage reference from a persistent id: (kind, key in the archive, number of elements).
    Storage(Kind, String, i64),
    /// A tensor view of a storage: (storage, offset, size, stride).
    Tensor(Box<Value>, i64, Vec<i64>, Vec<i64>),
    Mark,
}

const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
];

fn storage_kind(global: &str) -> Option<Kind> {
    Some(match global {
        "torch.FloatStorage" => Kind::Float,
        "torch.HalfStorage" => Kind::Half,
        "torch.BFloat16Storage" => Kind::BFloat16,
        "torch.DoubleStorage" => Kind::Double,
        "torch.LongStorage" => Kind::Int64,
        "torch.IntStorage" => Kind::Int,
        "torch.ShortStorage" => Kind::Int16,
        "torch.CharStorage" => Kind::Int8,
        "torch.ByteStorage" => Kind::Uint8,
        "torch.BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn ints(v: &Value) -> Option<Vec<i64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| if let Value::Int(n) = i { Some(*n) } else { None })
            .collect(),
        _ => None,
    }
}

/// A minimal pickle machine for state dicts (protocols 2 to 5).
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or("truncated pickle")?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("unterminated pickle line")?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    fn pop(&mut self) -> std::result::Result<Value, String> {
        self.stack.pop().ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("pickle MARK missing")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn str(&mut self, n: usize) -> std::result::Result<Value, String> {
        let bytes = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(bytes).map_err(|e| e.to_string())?.to_string(),
        ))
    }

    fn reduce(&self, callable: Value, args: Value) -> std::result::Result<Value, String> {
        let Value::Global(name) = callable else {
            return Err("REDUCE on a non-callable".into());
        };
        let Value::Tuple(args) = args else {
            return Err("REDUCE without argument tuple".into());
        };
        match name.as_str() {
            "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
            "torch._utils._rebuild_tensor_v2" => {
                let (storage, offset) = match (args.first(), args.get(1)) {
                    (Some(s @ Value::Storage(..)), Some(Value::Int(o))) => (s.clone(), *o),
                    _ => return Err("malformed _rebuild_tensor_v2 arguments".into()),
                };
                let size = args.get(2).and_then(ints).ok_or("malformed tensor size")?;
                let stride = args.get(3).and_then(ints).ok_or("malformed tensor stride")?;
                Ok(Value::Tensor(Box::new(storage), offset, size, stride))
            }
            "torch._utils._rebuild_parameter" => {
                args.into_iter().next().ok_or_else(|| "empty _rebuild_parameter".into())
            }
            other => Err(format!("`{other}` cannot be called")),
        }
    }

    fn run(mut self) -> std::result::Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool),
                0x89 => self.stack.push(Value::Bool),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
                    self.stack.push(Value::Int(v as i64))
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return Err("integer too large".into());
                    }
                    let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float)
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.str(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.str(n)?;
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_global(format!("{module}.{name}"))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push_global(format!("{m}.{n}"))?,
                        _ => return Err("STACK_GLOBAL without strings".into()),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memoize(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memoize(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memoize(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.push_memo(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.push_memo(i)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v)
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = match pid {
                        Value::Tuple(items) => match items.as_slice() {
                            [Value::Str(tag), Value::Global(ty), Value::Str(key), _, Value::Int(numel)]
                                if tag == "storage" =>
                            {
                                let kind = storage_kind(ty).ok_or_else(|| format!("unsupported storage {ty}"))?;
                                Value::Storage(kind, key.clone(), *numel)
                            }
                            _ => return Err("unsupported persistent id".into()),
                        },
                        _ => return Err("unsupported persistent id".into()),
                    };
                    self.stack.push(v)
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.dict_insert(vec![key, value])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.dict_insert(items)?
                }
                b'a' => {
                    let item = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Value::List(list)) => list.push(item),
                        _ => return Err("APPEND to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last_mut() {
                        Some(Value::List(list)) => list.extend(items),
                        _ => return Err("APPENDS to a non-list".into()),
                    }
                }
                // BUILD sets attributes (an OrderedDict's `_metadata`): not needed for the tensors.
                b'b' => {
                    self.pop()?;
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
            }
        }
    }

    fn push_global(&mut self, name: String) -> std::result::Result<(), String> {
        if !ALLOWED_GLOBALS.contains(&name.as_str()) {
            return Err(format!("refusing to load `{name}`: not part of a plain state dict"));
        }
        self.stack.push(Value::Global(name));
        Ok(())
    }

    fn memoize(&mut self, i: u32) -> std::result::Result<(), String> {
        let top = self.stack.last().ok_or("memoize on an empty stack")?.clone();
        self.memo.insert(i, top);
        Ok(())
    }

    fn push_memo(&mut self, i: u32) -> std::result::Result<(), String> {
        let v = self.memo.get(&i).ok_or("pickle memo miss")?.clone();
        self.stack.push(v);
        Ok(())
    }

    fn dict_insert(&mut self, items: Vec<Value>) -> std::result::Result<(), String> {
        match self.stack.last_mut() {
            Some(Value::Dict(entries)) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    entries.push((k, v));
                }
                Ok(())
            }
            _ => Err("SETITEM on a non-dict".into()),
        }
    }
}

/// Reads every tensor of a `pytorch_model.bin` file onto the CPU, in file order. A file that
/// is not a torch zip archive, is truncated, or pickles anything but tensors in (ordered)
/// dicts is an error naming the file.
pub fn read_torch_bin(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bad = |message: String| HubError::safetensors(path, message);
    let file = std::fs::File::open(path).map_err(|e| HubError::io(path, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a torch zip archive: {e}")))?;
    let pickle_name = (0..archive.len())
        .filter_map(|i| archive.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| bad("no data.pkl in the archive".into()))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut pickle = Vec::new();
    archive
        .by_name(&pickle_name)
        .and_then(|mut f| f.read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| bad(format!("reading data.pkl: {e}")))?;
    let root = Unpickler {
        data: &pickle,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
    .map_err(bad)?;
    let Value::Dict(entries) = root else {
        return Err(bad("the pickle is not a state dict".into()));
    };
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let Value::Str(name) = key else {
            return Err(bad("a state-dict key is not a string".into()));
        };
        let Value::Tensor(storage, offset, size, stride) = value else {
            return Err(bad(format!("`{name}` is not a tensor")));
        };
        let Value::Storage(kind, storage_key, numel) = *storage else {
            return Err(bad("malformed storage".into()));
        };
        if !storages.contains_key(&storage_key) {
            let mut bytes = Vec::new();
            archive
                .by_name(&format!("{prefix}data/{storage_key}"))
                .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Into::into))
                .map_err(|e| bad(format!("reading storage {storage_key}: {e}")))?;
            let expected = numel as usize * kind.elt_size_in_bytes();
            if bytes.len() < expected {
                return Err(bad(format!(
                    "storage {storage_key} holds {} bytes, {expected} expected",
                    bytes.len()
                )));
            }
            storages.insert(
                storage_key.clone(),
                Tensor::f_from_data_size(&bytes[..expected], &[numel], kind)?,
            );
        }
        let flat = &storages[&storage_key];
        let reach: i64 = offset + size.iter().zip(&stride).map(|(s, st)| (s - 1).max(0) * st).sum::<i64>();
        if size.len() != stride.len() || offset < 0 || (size.iter().all(|s| *s > 0) && reach >= numel) {
            return Err(bad(format!("`{name}` reaches outside its storage")));
        }
        tensors.push((
            name,
            flat.f_as_strided(size.as_slice(), stride.as_slice(), offset)?
                .f_contiguous()?,
        ));
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn archive_with_pickle(path: &Path, pickle: &[u8]) {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", options).unwrap();
        zip.write_all(pickle).unwrap();
        zip.finish().unwrap();
    }

    #[test]
    fn pickles_that_call_anything_else_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evil.bin");
        // PROTO 2, GLOBAL 'os system', SHORT_BINUNICODE 'true', TUPLE1, REDUCE, STOP.
        archive_with_pickle(&path, b"\x80\x02cos\nsystem\n\x8c\x04true\x85R.");
        let err = read_torch_bin(&path).unwrap_err().to_string();
        assert!(err.contains("refusing to load `os.system`"), "{err}");
    }

    #[test]
    fn truncated_and_non_dict_pickles_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.bin");
        archive_with_pickle(&path, b"\x80\x02}q\x00(X\x01\x00");
        assert!(read_torch_bin(&path).is_err());
        archive_with_pickle(&path, b"\x80\x02]q\x00.");
        assert!(read_torch_bin(&path)
            .unwrap_err()
            .to_string()
            .contains("not a state dict"));
        std::fs::write(&path, b"PK\x03\x04 truncated").unwrap();
        assert!(read_torch_bin(&path).is_err());
    }
}
