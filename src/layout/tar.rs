//! Just enough tar for OCI archives: ustar headers to write, and a scan that finds every
//! regular file's data offset without reading the data (ustar, PAX `path`/`size` records and
//! GNU long names, as Go's archive/tar and GNU tar write them).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

/// Tar's block size.
pub const BLOCK: u64 = 512;

/// Bytes of padding after `size` bytes of data.
pub fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// Typeflag of a regular file.
pub const FILE: u8 = b'0';
/// Typeflag of a directory.
pub const DIR: u8 = b'5';

/// A ustar header for `name` (at most 100 bytes; the layout's names are 77 at most).
pub fn header(name: &str, size: u64, typeflag: u8) -> [u8; BLOCK as usize] {
    let mut h = [0u8; BLOCK as usize];
    let n = name.as_bytes();
    let n = &n[..n.len().min(100)];
    h[..n.len()].copy_from_slice(n);
    let mode: &[u8] = if typeflag == DIR {
        b"0000755\0"
    } else {
        b"0000644\0"
    };
    h[100..108].copy_from_slice(mode);
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size < 0o77777777777 {
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        // GNU base-256 for sizes of 8 GiB and more.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// A regular file found by [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Where its header starts.
    pub header: u64,
    /// Where its data starts.
    pub data: u64,
    /// Its size.
    pub size: u64,
}

/// What [`scan`] found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Regular files by name (`./` stripped); a later entry of the same name wins, as when
    /// the archive is extracted.
    pub files: HashMap<String, Entry>,
    /// The name of the last complete entry, when it is a regular file.
    pub last: Option<String>,
    /// Where the last complete entry ends: new entries go here.
    pub end: u64,
    /// The archive ends inside an entry (a writer was killed): `end` is before it.
    pub truncated: bool,
}

fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256: big-endian in the remaining bytes.
        let mut v: u64 = 0;
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Data of special entries (PAX records, long names) read into memory is capped.
const MAX_META: u64 = 1024 * 1024;

/// PAX records `len key=value\n`: the `path` and `size` overrides.
fn pax(data: &[u8]) -> (Option<String>, Option<u64>) {
    let (mut path, mut size) = (None, None);
    let text = String::from_utf8_lossy(data);
    for record in text.split('\n') {
        let Some((_, kv)) = record.split_once(' ') else {
            continue;
        };
        match kv.split_once('=') {
            Some(("path", v)) => path = Some(v.to_string()),
            Some(("size", v)) => size = v.parse().ok(),
            _ => {}
        }
    }
    (path, size)
}

/// Reads the headers of a tar file, seeking over the data. `what` names it for errors.
pub fn scan<R: Read + Seek>(mut r: R, len: u64) -> Result<Scan, String> {
    let mut out = Scan::default();
    let mut pos = 0u64;
    let (mut next_path, mut next_size): (Option<String>, Option<u64>) = (None, None);
    let mut block = [0u8; BLOCK as usize];
    loop {
        if pos + BLOCK > len {
            out.truncated = pos < len;
            return Ok(out);
        }
        r.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
        r.read_exact(&mut block).map_err(|e| e.to_string())?;
        if block.iter().all(|b| *b == 0) {
            return Ok(out);
        }
        let stored = octal(&block[148..156]).ok_or("a header's checksum is not a number")?;
        let sum: u64 = block
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(*b)
                }
            })
            .sum();
        if sum != stored {
            return Err(format!("the header at byte {pos} is not a tar header"));
        }
        let typeflag = block[156];
        let size = match next_size.take() {
            Some(s) => s,
            None => octal(&block[124..136]).ok_or("a header's size is not a number")?,
        };
        let data = pos + BLOCK;
        let end = data
            .checked_add(size)
            .and_then(|e| e.checked_add(padding(size)))
            .ok_or("an entry's size overflows")?;
        if data + size > len {
            out.truncated = true;
            return Ok(out);
        }
        let mut name = match next_path.take() {
            Some(p) => p,
            None => {
                let name = cstr(&block[..100]);
                let prefix = cstr(&block[345..500]);
                if &block[257..262] == b"ustar" && !prefix.is_empty() {
                    format!("{prefix}/{name}")
                } else {
                    name
                }
            }
        };
        let meta = |r: &mut R| -> Result<Vec<u8>, String> {
            if size > MAX_META {
                return Err(format!("a {size} byte extended header"));
            }
            let mut buf = vec![0u8; size as usize];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            Ok(buf)
        };
        match typeflag {
            b'x' => (next_path, next_size) = pax(&meta(&mut r)?),
            b'L' => next_path = Some(cstr(&meta(&mut r)?)),
            FILE | 0 | b'7' => {
                while let Some(rest) = name.strip_prefix("./") {
                    name = rest.to_string();
                }
                out.files.insert(
                    name.clone(),
                    Entry {
                        header: pos,
                        data,
                        size,
                    },
                );
                out.last = Some(name);
            }
            _ => out.last = None,
        }
        pos = end;
        if !matches!(typeflag, b'x' | b'L' | b'g') {
            out.end = pos;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in entries {
            out.extend_from_slice(&header(name, data.len() as u64, FILE));
            out.extend_from_slice(data);
            out.extend(std::iter::repeat_n(0, padding(data.len() as u64) as usize));
        }
        out
    }

    #[test]
    fn finds_files_and_the_last_one_wins() {
        let mut a = archive(&[
            ("oci-layout", b"{}"),
            ("index.json", b"[1]"),
            ("./index.json", b"[22]"),
        ]);
        let end = a.len() as u64;
        a.extend_from_slice(&[0u8; 1024]);
        let s = scan(Cursor::new(&a), a.len() as u64).unwrap();
        assert!(!s.truncated);
        assert_eq!(s.end, end);
        assert_eq!(s.last.as_deref(), Some("index.json"));
        let e = s.files["index.json"];
        assert_eq!(&a[e.data as usize..(e.data + e.size) as usize], b"[22]");
        assert_eq!(s.files["oci-layout"].size, 2);
    }

    #[test]
    fn a_cut_archive_ends_before_the_cut_entry() {
        let a = archive(&[("a", b"x"), ("b", &[7u8; 2000])]);
        let cut = &a[..a.len() - 600];
        let s = scan(Cursor::new(cut), cut.len() as u64).unwrap();
        assert!(s.truncated);
        assert_eq!(s.end, 1024);
        assert!(s.files.contains_key("a") && !s.files.contains_key("b"));
    }

    #[test]
    fn pax_paths_and_garbage() {
        let long = format!("blobs/sha256/{}", "b".repeat(120));
        let rec = format!("{} path={long}\n", long.len() + 10);
        let mut a = Vec::new();
        a.extend_from_slice(&header("PaxHeaders/x", rec.len() as u64, b'x'));
        a.extend_from_slice(rec.as_bytes());
        a.extend(std::iter::repeat_n(0, padding(rec.len() as u64) as usize));
        a.extend(archive(&[("short", b"data")]));
        let s = scan(Cursor::new(&a), a.len() as u64).unwrap();
        assert_eq!(s.files[&long].size, 4);
        let junk = vec![1u8; 1024];
        assert!(scan(Cursor::new(&junk), 1024).is_err());
        let big = header("big", 9 << 30, FILE);
        assert_eq!(octal(&big[124..136]), Some(9 << 30));
    }
}
