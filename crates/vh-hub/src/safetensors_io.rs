//! Reading and writing `.safetensors` files as named tch tensors.

use crate::error::{HubError, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file onto the CPU, in file order. A missing, truncated or
/// malformed file, or an unsupported dtype, is an error naming the file.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = crate::files::open_regular(path)?;
    // SAFETY: the map is only read while `file` is open; checkpoint files are not expected to be
    // modified while loading (the same assumption safetensors and HF make).
    let buffer = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| HubError::io(path, e))?;
    let st = SafeTensors::deserialize(&buffer).map_err(|e| HubError::safetensors(path, e.to_string()))?;
    let mut order: Vec<(usize, String, Tensor)> = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            HubError::safetensors(
                path,
                format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let data = view.data();
        let offset = data.as_ptr() as usize - buffer.as_ptr() as usize;
        let tensor = Tensor::f_from_data_size(data, &shape, kind)?;
        order.push((offset, name, tensor));
    }
    order.sort_by_key(|(offset, _, _)| *offset);
    Ok(order.into_iter().map(|(_, n, t)| (n, t)).collect())
}

/// Writes named tensors (any device, contiguous or not) to a safetensors file atomically, with
/// `{"format": "pt"}` metadata as transformers writes it.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let dtype = dtype_of(tensor.kind()).ok_or_else(|| {
            HubError::safetensors(
                path,
                format!("tensor `{name}` has unsupported kind {:?}", tensor.kind()),
            )
        })?;
        let cpu = tensor.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
        let numel = cpu.numel();
        let mut bytes = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        cpu.f_copy_data_u8(&mut bytes, numel)?;
        let shape = cpu.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype, shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| HubError::safetensors(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| HubError::safetensors(path, e.to_string()))?;
    crate::atomic_write(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn round_trips_kinds_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::from_slice(&[1i64, -2, 3]);
        let c = Tensor::randn([2, 2], (Kind::BFloat16, Device::Cpu)).tr();
        write_safetensors(
            &path,
            &[
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
                ("c".into(), c.shallow_clone()),
            ],
        )
        .unwrap();
        let back: HashMap<String, Tensor> = read_safetensors(&path).unwrap().into_iter().collect();
        assert!(back["a"].equal(&a));
        assert!(back["b"].equal(&b));
        assert!(back["c"].equal(&c));
        assert_eq!(back["c"].kind(), Kind::BFloat16);
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_safetensors(&path, &[("a".into(), Tensor::ones([64], (Kind::Float, Device::Cpu)))]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        assert!(matches!(read_safetensors(&path), Err(HubError::Safetensors { .. })));
        std::fs::write(&path, b"not a safetensors file at all").unwrap();
        assert!(matches!(read_safetensors(&path), Err(HubError::Safetensors { .. })));
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(read_safetensors(&path), Err(HubError::Safetensors { .. })));
        assert!(matches!(
            read_safetensors(&dir.path().join("missing.safetensors")),
            Err(HubError::NotFound { .. })
        ));
    }
}
