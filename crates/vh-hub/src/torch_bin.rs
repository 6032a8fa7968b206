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
    Tuple(Items),
    List(Items),
    /// Keys and values alternating.
    Dict(Items),
    /// A global the loader allows: "module.name".
    Global(String),
    /// A storage reference from a persistent id: (kind, key in the archive, number of elements).
    Storage(Kind, String, i64),
    /// A tensor view of a storage: (storage, offset, size, stride).
    Tensor(Box<Value>, i64, Vec<i64>, Vec<i64>),
    Mark,
}

/// A state dict nests a few levels (dict, tensor arguments, size tuples); anything deeper is
/// hostile. The bound also keeps every recursive walk and drop of a value shallow.
const MAX_DEPTH: u32 = 32;
/// Values copied out of the memo, in nodes: memo references let a small pickle describe an
/// exponentially large value ("billion laughs"), which copying would materialise.
const MAX_COPIED_NODES: u64 = 1 << 24;

/// The elements of a tuple, list or dict, with their nesting depth and node count kept up to
/// date so that neither is ever computed by walking the value.
#[derive(Debug, Clone, Default)]
struct Items {
    values: Vec<Value>,
    depth: u32,
    nodes: u64,
}

impl Items {
    fn from_values(values: Vec<Value>) -> std::result::Result<Self, String> {
        let mut items = Items::default();
        items.values.reserve(values.len());
        for v in values {
            items.push(v)?;
        }
        Ok(items)
    }

    fn push(&mut self, v: Value) -> std::result::Result<(), String> {
        let depth = v.depth() + 1;
        if depth > MAX_DEPTH {
            return Err(format!("pickle nests deeper than {MAX_DEPTH} levels: not a state dict"));
        }
        self.depth = self.depth.max(depth);
        self.nodes = self.nodes.saturating_add(v.nodes());
        self.values.push(v);
        Ok(())
    }
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(i) | Value::List(i) | Value::Dict(i) => i.depth,
            Value::Tensor(storage, ..) => storage.depth() + 1,
            _ => 0,
        }
    }

    fn nodes(&self) -> u64 {
        match self {
            Value::Tuple(i) | Value::List(i) | Value::Dict(i) => i.nodes.saturating_add(1),
            Value::Tensor(storage, ..) => storage.nodes().saturating_add(1),
            _ => 1,
        }
    }
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
            .values
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
    /// Nodes copied out of (or into) the memo so far.
    copied: u64,
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
        let Value::Tuple(Items { values: args, .. }) = args else {
            return Err("REDUCE without argument tuple".into());
        };
        match name.as_str() {
            "collections.OrderedDict" => Ok(Value::Dict(Items::default())),
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
                b'}' => self.stack.push(Value::Dict(Items::default())),
                b']' => self.stack.push(Value::List(Items::default())),
                b')' => self.stack.push(Value::Tuple(Items::default())),
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
                    self.stack.push(Value::Tuple(Items::from_values(items)?))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Items::from_values(items)?))
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
                        Value::Tuple(items) => match items.values.as_slice() {
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
                        Some(Value::List(list)) => list.push(item)?,
                        _ => return Err("APPEND to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last_mut() {
                        Some(Value::List(list)) => {
                            for item in items {
                                list.push(item)?;
                            }
                        }
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

    /// Counts `nodes` more copied nodes against [`MAX_COPIED_NODES`].
    fn charge_copy(&mut self, nodes: u64) -> std::result::Result<(), String> {
        self.copied = self.copied.saturating_add(nodes);
        if self.copied > MAX_COPIED_NODES {
            return Err("pickle memo references expand beyond any state dict's size".into());
        }
        Ok(())
    }

    fn memoize(&mut self, i: u32) -> std::result::Result<(), String> {
        let top = self.stack.last().ok_or("memoize on an empty stack")?;
        let nodes = top.nodes();
        self.charge_copy(nodes)?;
        let top = self.stack.last().ok_or("memoize on an empty stack")?.clone();
        self.memo.insert(i, top);
        Ok(())
    }

    fn push_memo(&mut self, i: u32) -> std::result::Result<(), String> {
        let nodes = self.memo.get(&i).ok_or("pickle memo miss")?.nodes();
        self.charge_copy(nodes)?;
        let v = self.memo.get(&i).ok_or("pickle memo miss")?.clone();
        self.stack.push(v);
        Ok(())
    }

    fn dict_insert(&mut self, items: Vec<Value>) -> std::result::Result<(), String> {
        match self.stack.last_mut() {
            Some(Value::Dict(entries)) => {
                if !items.len().is_multiple_of(2) {
                    return Err("SETITEMS with an odd number of items".into());
                }
                for item in items {
                    entries.push(item)?;
                }
                Ok(())
            }
            _ => Err("SETITEM on a non-dict".into()),
        }
    }
}

/// The number of entries the archive's central directory declares, from its end record (zip64
/// when the classic field overflows). The zip reader keys entries by name, so an archive that
/// repeats a name shows fewer entries there than declared: that is how duplicates are caught.
fn declared_entries(file: &mut std::fs::File) -> std::result::Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    // The end record is 22 bytes plus a comment of at most 65535 bytes.
    let tail_len = len.min(22 + 65535 + 20);
    file.seek(SeekFrom::Start(len - tail_len)).map_err(|e| e.to_string())?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail).map_err(|e| e.to_string())?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or("no end-of-central-directory record")?;
    let classic = u16::from_le_bytes([tail[eocd + 10], tail[eocd + 11]]);
    if classic != u16::MAX {
        return Ok(classic as u64);
    }
    // Zip64: the locator sits just before the classic record and points at the zip64 record.
    let locator = eocd.checked_sub(20).ok_or("truncated zip64 locator")?;
    if tail[locator..locator + 4] != [0x50, 0x4b, 0x06, 0x07] {
        return Err("missing zip64 locator".into());
    }
    let offset = u64::from_le_bytes(
        tail[locator + 8..locator + 16]
            .try_into()
            .map_err(|_| "zip64 locator")?,
    );
    let mut record = [0u8; 40];
    file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    file.read_exact(&mut record).map_err(|e| e.to_string())?;
    if record[..4] != [0x50, 0x4b, 0x06, 0x06] {
        return Err("bad zip64 end record".into());
    }
    Ok(u64::from_le_bytes(
        record[32..40].try_into().map_err(|_| "zip64 record")?,
    ))
}

/// Whether `rest` (an entry name after the archive's folder prefix) is a record `torch.save`
/// writes: the pickle, storages under `data/`, and small metadata records.
fn is_torch_record(rest: &str) -> bool {
    match rest {
        "data.pkl"
        | "version"
        | "byteorder"
        | ".format_version"
        | ".storage_alignment"
        | ".data/version"
        | ".data/serialization_id" => true,
        _ => rest
            .strip_prefix("data/")
            .is_some_and(|key| !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')),
    }
}

/// Checks the archive's layout before anything in it is read, so that this reader and
/// `torch.load` cannot disagree on what the file holds: no repeated names, every entry under one
/// folder, only records `torch.save` writes, exactly one pickle, little-endian storages.
/// Returns the folder prefix (e.g. `archive/`).
fn check_archive(archive: &mut zip::ZipArchive<std::fs::File>, declared: u64) -> std::result::Result<String, String> {
    if declared != archive.len() as u64 {
        return Err(format!(
            "the central directory declares {declared} entries but {} distinct names: repeated entry names",
            archive.len()
        ));
    }
    let names: Vec<String> = (0..archive.len())
        .map(|i| archive.name_for_index(i).map(str::to_string).ok_or("unnamed entry"))
        .collect::<std::result::Result<_, _>>()?;
    let pickle = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") || n.as_str() == "data.pkl")
        .ok_or("no data.pkl in the archive")?;
    let prefix = pickle.trim_end_matches("data.pkl").to_string();
    if prefix.matches('/').count() > 1 {
        return Err(format!("data.pkl lies too deep: `{pickle}`"));
    }
    for name in &names {
        let rest = name
            .strip_prefix(prefix.as_str())
            .ok_or_else(|| format!("entry `{name}` lies outside the archive's folder `{prefix}`"))?;
        if !is_torch_record(rest) {
            return Err(format!("unexpected entry `{name}`: not a record torch.save writes"));
        }
    }
    let byteorder = format!("{prefix}byteorder");
    if names.contains(&byteorder) {
        let mut order = String::new();
        archive
            .by_name(&byteorder)
            .map_err(|e| e.to_string())?
            .take(16)
            .read_to_string(&mut order)
            .map_err(|e| e.to_string())?;
        if order.trim() != "little" {
            return Err(format!("unsupported byte order `{}`", order.trim()));
        }
    }
    Ok(prefix)
}

/// Checks that a view (offset, size, stride) stays inside a storage of `numel` elements, with
/// arithmetic that cannot overflow.
fn view_fits(offset: i64, size: &[i64], stride: &[i64], numel: i64) -> bool {
    if size.len() != stride.len() || offset < 0 || size.iter().chain(stride).any(|v| *v < 0) {
        return false;
    }
    if size.contains(&0) {
        return offset <= numel;
    }
    let mut last = Some(offset);
    for (s, st) in size.iter().zip(stride) {
        last = last.and_then(|l| (s - 1).checked_mul(*st).and_then(|d| l.checked_add(d)));
    }
    last.is_some_and(|l| l < numel)
}

/// Reads every tensor of a `pytorch_model.bin` file onto the CPU, in file order. A file that
/// is not a torch zip archive (or holds entries `torch.save` does not write, or repeats one), is
/// truncated, or pickles anything but tensors in (ordered) dicts is an error naming the file.
pub fn read_torch_bin(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bad = |message: String| HubError::safetensors(path, message);
    let mut file = crate::files::open_regular(path)?;
    let declared = declared_entries(&mut file).map_err(|e| bad(format!("not a torch zip archive: {e}")))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a torch zip archive: {e}")))?;
    let prefix = check_archive(&mut archive, declared).map_err(bad)?;
    let pickle_name = format!("{prefix}data.pkl");
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
        copied: 0,
    }
    .run()
    .map_err(bad)?;
    let Value::Dict(entries) = root else {
        return Err(bad("the pickle is not a state dict".into()));
    };
    // How many tensors view each storage: a tensor that is its storage's only, whole view takes
    // the storage itself; the others get copies, so that no two loaded tensors share memory.
    let mut views: HashMap<&str, usize> = HashMap::new();
    for value in entries.values.iter().skip(1).step_by(2) {
        if let Value::Tensor(storage, ..) = value {
            if let Value::Storage(_, key, _) = storage.as_ref() {
                *views.entry(key.as_str()).or_default() += 1;
            }
        }
    }
    let views: HashMap<String, usize> = views.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut tensors = Vec::with_capacity(entries.values.len() / 2);
    let mut entries = entries.values.into_iter();
    while let (Some(key), Some(value)) = (entries.next(), entries.next()) {
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
            let expected = usize::try_from(numel)
                .ok()
                .and_then(|n| n.checked_mul(kind.elt_size_in_bytes()))
                .ok_or_else(|| bad(format!("storage {storage_key} has an impossible size {numel}")))?;
            let mut entry = archive
                .by_name(&format!("{prefix}data/{storage_key}"))
                .map_err(|e| bad(format!("reading storage {storage_key}: {e}")))?;
            if entry.size() < expected as u64 {
                return Err(bad(format!(
                    "storage {storage_key} holds {} bytes, {expected} expected",
                    entry.size()
                )));
            }
            let mut bytes = Vec::with_capacity(expected);
            (&mut entry)
                .take(expected as u64)
                .read_to_end(&mut bytes)
                .map_err(|e| bad(format!("reading storage {storage_key}: {e}")))?;
            if bytes.len() < expected {
                return Err(bad(format!("storage {storage_key} is truncated")));
            }
            drop(entry);
            storages.insert(storage_key.clone(), Tensor::f_from_data_size(&bytes, &[numel], kind)?);
        }
        let flat = &storages[&storage_key];
        if !view_fits(offset, &size, &stride, numel) {
            return Err(bad(format!("`{name}` reaches outside its storage")));
        }
        let view = flat.f_as_strided(size.as_slice(), stride.as_slice(), offset)?;
        let whole = offset == 0 && view.numel() as i64 == numel && view.is_contiguous();
        let tensor = if whole && views.get(&storage_key) == Some(&1) {
            view
        } else {
            let mut copy = Tensor::f_empty(size.as_slice(), (kind, tch::Device::Cpu))?;
            copy.f_copy_(&view)?;
            copy
        };
        tensors.push((name, tensor));
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

    fn archive_with_entries(path: &Path, entries: &[(&str, &[u8])]) {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in entries {
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    /// A pickle of an empty OrderedDict-free state dict `{}`.
    const EMPTY_DICT: &[u8] = b"\x80\x02}q\x00.";

    #[test]
    fn repeated_and_unexpected_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        archive_with_entries(&path, &[("archive/data.pkl", EMPTY_DICT), ("archive/version", b"3\n")]);
        assert!(read_torch_bin(&path).unwrap().is_empty());
        // The zip writer refuses duplicate names, so the second entry is renamed in the bytes.
        archive_with_entries(
            &path,
            &[
                ("archive/data.pkl", EMPTY_DICT),
                ("archive/data.pkX", b"\x80\x02]q\x00."),
            ],
        );
        let mut bytes = std::fs::read(&path).unwrap();
        let renamed: Vec<usize> = bytes
            .windows(16)
            .enumerate()
            .filter(|(_, w)| *w == b"archive/data.pkX")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(renamed.len(), 2, "local header and central directory");
        for i in renamed {
            bytes[i + 15] = b'l';
        }
        std::fs::write(&path, &bytes).unwrap();
        let err = read_torch_bin(&path).unwrap_err().to_string();
        assert!(err.contains("repeated entry names"), "{err}");
        for entries in [
            vec![("archive/data.pkl", EMPTY_DICT), ("archive/evil.py", b"x".as_slice())],
            vec![("archive/data.pkl", EMPTY_DICT), ("other/data/0", b"x".as_slice())],
            vec![
                ("archive/data.pkl", EMPTY_DICT),
                ("archive/byteorder", b"big".as_slice()),
            ],
            vec![("a/b/data.pkl", EMPTY_DICT)],
        ] {
            archive_with_entries(&path, &entries);
            assert!(read_torch_bin(&path).is_err(), "{entries:?}");
        }
    }

    #[test]
    fn deep_and_exponential_pickles_are_refused_without_crashing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deep.bin");
        // 150,000 nested lists: EMPTY_LIST x n, then APPEND x (n - 1).
        let n = 150_000;
        let mut pickle = b"\x80\x02".to_vec();
        pickle.extend(std::iter::repeat_n(b']', n));
        pickle.extend(std::iter::repeat_n(b'a', n - 1));
        pickle.push(b'.');
        archive_with_pickle(&path, &pickle);
        let err = read_torch_bin(&path).unwrap_err().to_string();
        assert!(err.contains("nests deeper"), "{err}");
        // Each level a list of eight copies of the one before, through the memo.
        let mut pickle = b"\x80\x02]q\x00K\x01a".to_vec();
        for level in 1..12u8 {
            pickle.extend(b"](");
            for _ in 0..8 {
                pickle.extend([b'h', level - 1]);
            }
            pickle.extend([b'e', b'q', level]);
        }
        pickle.push(b'.');
        archive_with_pickle(&path, &pickle);
        let err = read_torch_bin(&path).unwrap_err().to_string();
        assert!(err.contains("expand beyond"), "{err}");
    }

    #[test]
    fn views_are_checked_without_overflow() {
        assert!(view_fits(0, &[2, 3], &[3, 1], 6));
        assert!(!view_fits(0, &[2, 3], &[3, 1], 5));
        assert!(view_fits(6, &[0], &[1], 6));
        assert!(!view_fits(-1, &[1], &[1], 6));
        assert!(!view_fits(0, &[-2], &[1], 6));
        assert!(!view_fits(0, &[i64::MAX], &[i64::MAX], 6));
        assert!(!view_fits(i64::MAX, &[2], &[1], i64::MAX));
        assert!(!view_fits(0, &[2], &[1, 1], 6));
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
