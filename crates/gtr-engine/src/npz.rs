//! Opening `.npz` files that users hand in (replays, evaluator references)
//! without trusting their headers: before any array is allocated, each
//! array's `.npy` header is read with a bounded buffer, parsed by the same
//! parser that reads the array later, and its shape checked against the
//! bytes its entry holds. A file that claims terabytes is refused with a
//! message instead of aborting the process on a failed allocation.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use ndarray_npy::NpzReader;
use ndarray_npy::npy::header::Header;

/// The longest `.npy` header read (numpy writes under 200 bytes).
const MAX_HEADER: usize = 64 * 1024;

/// Opens `path` as an `.npz` whose arrays `arrays` ((name, bytes per
/// element of the type the caller reads)) are each checked, where present,
/// as described in the module doc: the size of an element is the header's
/// own (`<f4`: 4), so that an array of another type is left to the reader
/// to name, as is a header whose type has no plain size. An array is looked up as [`NpzReader::by_name`] looks it up (the
/// name as given, then with `.npy`), so the entry checked is the entry
/// read. Errors name the array and say what is wrong, without the path
/// (the caller's error carries it).
pub fn open_checked(path: &Path, arrays: &[(&str, u64)]) -> Result<NpzReader<File>, String> {
    // Before opening: a pipe would block the open, and a zip is read with
    // seeks.
    let kind = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if kind.is_dir() {
        return Err("a folder, not an .npz file".into());
    }
    if !kind.is_file() {
        return Err(
            "a pipe, socket or device, not a file: an .npz is read with seeks; give a file".into(),
        );
    }
    let file = File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut zip = zip::ZipArchive::new(&file).map_err(|e| format!("not a readable .npz: {e}"))?;
    for &(name, item) in arrays {
        let entry_name = [name.to_string(), format!("{name}.npy")]
            .into_iter()
            .find(|n| zip.index_for_name(n).is_some());
        // Absent: the reader names what is missing.
        let Some(entry_name) = entry_name else {
            continue;
        };
        let mut entry = zip
            .by_name(&entry_name)
            .map_err(|e| format!("`{name}`: {e}"))?;
        let size = entry.size();
        // Deflate packs at most ~1032:1.
        if size > file_len.saturating_mul(1100) {
            return Err(format!(
                "`{name}` claims {size} bytes, more than a {file_len}-byte file can hold"
            ));
        }
        let (header, header_len) = read_header(&mut entry).map_err(|e| format!("`{name}`: {e}"))?;
        let item = element_size(&header).unwrap_or(item);
        let elements = header
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        match elements.and_then(|n| n.checked_mul(item)) {
            Some(bytes) if bytes <= size.saturating_sub(header_len) => {}
            _ => {
                return Err(format!(
                    "`{name}`'s header claims shape {:?}, larger than its {size} bytes of data",
                    header.shape
                ));
            }
        }
    }
    drop(zip);
    NpzReader::new(file).map_err(|e| e.to_string())
}

/// Bytes per element of a plain numeric `.npy` type (`<f8`, `|u1`, `<i4`).
fn element_size(header: &Header) -> Option<u64> {
    let descriptor = header.type_descriptor.to_string();
    let digits: String = descriptor
        .trim_matches(|c| c == '\'' || c == '"')
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .collect();
    digits.parse().ok().filter(|&n: &u64| n > 0)
}

/// The `.npy` header at the start of `entry`, and its length in bytes
/// (magic, version and length fields included).
fn read_header(entry: &mut impl Read) -> Result<(Header, u64), String> {
    let mut head = Vec::new();
    entry
        .take((MAX_HEADER + 12) as u64)
        .read_to_end(&mut head)
        .map_err(|e| e.to_string())?;
    if head.len() < 10 || !head.starts_with(b"\x93NUMPY") {
        return Err("not an .npy array (no `\\x93NUMPY` magic)".into());
    }
    let (len, start) = match head[6] {
        1 => (usize::from(u16::from_le_bytes([head[8], head[9]])), 10),
        2 | 3 if head.len() >= 12 => (
            u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize,
            12,
        ),
        v => return Err(format!("unknown .npy version {v}")),
    };
    if len > MAX_HEADER {
        return Err(format!(
            "its .npy header is {len} bytes long; at most {MAX_HEADER} are read"
        ));
    }
    let end = start + len;
    let bytes = head.get(..end).ok_or("its .npy header is cut short")?;
    let header = Header::from_reader(&mut &bytes[..]).map_err(|e| e.to_string())?;
    Ok((header, end as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str) -> Vec<u8> {
        let mut dict = header.as_bytes().to_vec();
        dict.push(b'\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((dict.len() as u16).to_le_bytes());
        out.extend(dict);
        out
    }

    #[test]
    fn headers_parse_as_the_reader_parses_them() {
        let (h, len) = read_header(
            &mut &npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4, 2), }")[..],
        )
        .unwrap();
        assert_eq!(h.shape, vec![3, 4, 2]);
        assert_eq!(len, 10 + 63);
        assert_eq!(element_size(&h), Some(4));
        // A repeated key is read as the reader reads it (the last one wins,
        // or the parser refuses it), never as a first match would.
        let twice = npy(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 1), 'shape': (2, 1000000000000), }",
        );
        let (h, _) = read_header(&mut &twice[..]).unwrap();
        assert_eq!(h.shape, vec![2, 1_000_000_000_000]);
        assert_eq!(element_size(&h), Some(8));
        assert!(read_header(&mut &b"short"[..]).is_err());
        let mut huge = b"\x93NUMPY\x02\x00".to_vec();
        huge.extend(u32::MAX.to_le_bytes());
        assert!(
            read_header(&mut &huge[..])
                .unwrap_err()
                .contains("bytes long")
        );
    }
}
