//! A minimal zip writer and a tolerant zip reader for the `torch-bin` target's structure-aware
//! mutations. Our own, not the `zip` crate's: the mutator must be able to write what no correct
//! writer would (repeated names, sizes that lie, offsets past the end) and must read any
//! mutated corpus entry without ever panicking in the fuzzer's own process.

/// A file in an archive: its name and its stored (uncompressed) bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's name, e.g. `archive/data.pkl`.
    pub name: Vec<u8>,
    /// The entry's bytes.
    pub data: Vec<u8>,
}

/// Where a header field sits in a written archive: (byte offset, width in bytes).
pub type Field = (usize, usize);

/// The CRC-32 (IEEE, reflected, as zip uses it) of `data`, computed bitwise: archives here are
/// a few kilobytes, so no table is needed.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

fn put16(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u16).to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

/// Writes a stored (uncompressed) zip archive of `entries`, in order, and returns it with the
/// places of its size, offset, count and CRC fields (for mutations that make them lie).
pub fn write_zip(entries: &[Entry]) -> (Vec<u8>, Vec<Field>) {
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let mut offsets = Vec::new();
    for e in entries {
        offsets.push(out.len());
        let crc = crc32(&e.data);
        put32(&mut out, 0x0403_4b50);
        put16(&mut out, 20); // version needed
        put16(&mut out, 0); // flags
        put16(&mut out, 0); // stored
        put32(&mut out, 0); // time and date
        fields.push((out.len(), 4));
        put32(&mut out, crc as usize);
        fields.push((out.len(), 4));
        put32(&mut out, e.data.len());
        fields.push((out.len(), 4));
        put32(&mut out, e.data.len());
        fields.push((out.len(), 2));
        put16(&mut out, e.name.len());
        fields.push((out.len(), 2));
        put16(&mut out, 0); // extra length
        out.extend_from_slice(&e.name);
        out.extend_from_slice(&e.data);
    }
    let cd_start = out.len();
    for (e, offset) in entries.iter().zip(&offsets) {
        put32(&mut out, 0x0201_4b50);
        put16(&mut out, 20); // version made by
        put16(&mut out, 20); // version needed
        put16(&mut out, 0);
        put16(&mut out, 0);
        put32(&mut out, 0);
        fields.push((out.len(), 4));
        put32(&mut out, crc32(&e.data) as usize);
        fields.push((out.len(), 4));
        put32(&mut out, e.data.len());
        fields.push((out.len(), 4));
        put32(&mut out, e.data.len());
        fields.push((out.len(), 2));
        put16(&mut out, e.name.len());
        fields.push((out.len(), 2));
        put16(&mut out, 0); // extra
        fields.push((out.len(), 2));
        put16(&mut out, 0); // comment
        put16(&mut out, 0); // disk
        put16(&mut out, 0); // internal attributes
        put32(&mut out, 0); // external attributes
        fields.push((out.len(), 4));
        put32(&mut out, *offset);
        out.extend_from_slice(&e.name);
    }
    let cd_len = out.len() - cd_start;
    put32(&mut out, 0x0605_4b50);
    put16(&mut out, 0);
    put16(&mut out, 0);
    fields.push((out.len(), 2));
    put16(&mut out, entries.len());
    fields.push((out.len(), 2));
    put16(&mut out, entries.len());
    fields.push((out.len(), 4));
    put32(&mut out, cd_len);
    fields.push((out.len(), 4));
    put32(&mut out, cd_start);
    fields.push((out.len(), 2));
    put16(&mut out, 0); // comment length
    (out, fields)
}

fn get16(data: &[u8], at: usize) -> Option<usize> {
    let b = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]) as usize)
}

fn get32(data: &[u8], at: usize) -> Option<usize> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// The stored entries of an archive, read through its central directory (as `torch.save`'s
/// archives need: their local headers defer the sizes to data descriptors). `None` for
/// anything that is not a well-formed stored zip; never panics.
pub fn read_zip(data: &[u8]) -> Option<Vec<Entry>> {
    let eocd = (0..data.len().saturating_sub(21))
        .rev()
        .take(1 << 16)
        .find(|&i| data[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])?;
    let count = get16(data, eocd + 10)?;
    let mut at = get32(data, eocd + 16)?;
    let mut entries = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        if get32(data, at)? != 0x0201_4b50 || get16(data, at + 10)? != 0 {
            return None;
        }
        let size = get32(data, at + 20)?;
        let (name_len, extra_len, comment_len) = (get16(data, at + 28)?, get16(data, at + 30)?, get16(data, at + 32)?);
        let local = get32(data, at + 42)?;
        let name = data.get(at + 46..at + 46 + name_len)?.to_vec();
        at = at + 46 + name_len + extra_len + comment_len;
        if get32(data, local)? != 0x0403_4b50 {
            return None;
        }
        let start = local + 30 + get16(data, local + 26)? + get16(data, local + 28)?;
        let bytes = data.get(start..start.checked_add(size)?)?.to_vec();
        entries.push(Entry { name, data: bytes });
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_round_trip_and_crc_matches_the_standard() {
        // The check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let entries = vec![
            Entry {
                name: b"a/data.pkl".to_vec(),
                data: b"\x80\x02}.".to_vec(),
            },
            Entry {
                name: b"a/data/0".to_vec(),
                data: vec![7; 12],
            },
        ];
        let (bytes, fields) = write_zip(&entries);
        assert_eq!(read_zip(&bytes).unwrap(), entries);
        assert_eq!(fields.len(), 2 * 5 + 2 * 7 + 5);
        assert!(fields.iter().all(|(at, w)| at + w <= bytes.len()));
        assert!(read_zip(&bytes[..bytes.len() - 30]).is_none());
        assert!(read_zip(b"PK\x05\x06").is_none());
    }
}
