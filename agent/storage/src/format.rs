//! The on-disk encoding of segment files, records and index entries.
//!
//! Everything is little-endian. See `docs/storage.md` for the exact layout.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;

use crate::{io_err, Result, MAX_ENTRY_BYTES};

/// Magic bytes at the start of every `.log` segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"SHOALLOG";
/// The only segment format version this code reads and writes.
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Length of the segment file header: magic (8), version (u16), reserved (6 zero bytes).
pub(crate) const SEGMENT_HEADER_LEN: u64 = 16;
/// Length of a record header: crc (u32), data length (u32), index, term, timestamp_ms (u64 each).
pub(crate) const RECORD_HEADER_LEN: usize = 32;
/// Length of one sparse index entry: index delta (u32), byte position (u32).
pub(crate) const INDEX_ENTRY_LEN: usize = 8;
/// Chunk size used when scanning whole segments (recovery, time lookups).
pub(crate) const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// The segment file header as written by this version.
pub(crate) fn segment_header() -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// What a segment file header looks like.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderCheck {
    /// A valid header of the supported version.
    Ok,
    /// Shorter than a header, and every byte present is either a prefix of a valid
    /// header or zero: a segment whose creation was torn by a crash.
    Torn,
    /// Not a Shoal segment (or a destroyed header).
    BadMagic,
    /// A Shoal segment of another format version.
    Version(u16),
}

/// Classifies the first bytes of a segment file (`bytes` may be shorter than a header).
pub(crate) fn check_header(bytes: &[u8]) -> HeaderCheck {
    let valid = segment_header();
    if bytes.len() < valid.len() {
        let prefix = bytes.iter().zip(valid.iter()).all(|(a, b)| a == b);
        let zeros = bytes.iter().all(|&b| b == 0);
        return if prefix || zeros {
            HeaderCheck::Torn
        } else {
            HeaderCheck::BadMagic
        };
    }
    if bytes[..8] != SEGMENT_MAGIC {
        return HeaderCheck::BadMagic;
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return HeaderCheck::Version(version);
    }
    HeaderCheck::Ok
}

/// The fixed fields of one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub(crate) len: u32,
    pub(crate) index: u64,
    pub(crate) term: u64,
    pub(crate) timestamp_ms: u64,
}

/// Appends one encoded record to `buf`. `data.len()` must be <= MAX_ENTRY_BYTES.
pub(crate) fn encode_record(buf: &mut Vec<u8>, index: u64, term: u64, ts: u64, data: &[u8]) {
    let start = buf.len();
    // Callers check the length; MAX_ENTRY_BYTES fits in a u32.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(&term.to_le_bytes());
    buf.extend_from_slice(&ts.to_le_bytes());
    buf.extend_from_slice(data);
    let crc = crc32c::crc32c(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Result of parsing the bytes at a record boundary.
pub(crate) enum Parsed {
    /// A complete record with a valid checksum, and its total encoded length.
    Record(RecordHeader, usize),
    /// Not enough bytes: the record needs this many in total.
    NeedMore(usize),
    /// The bytes are not a valid record.
    Invalid(String),
}

/// Parses and verifies the record at the start of `buf`.
pub(crate) fn parse_record(buf: &[u8]) -> Parsed {
    if buf.len() < RECORD_HEADER_LEN {
        return Parsed::NeedMore(RECORD_HEADER_LEN);
    }
    let len = le_u32(buf, 4);
    if len as usize > MAX_ENTRY_BYTES {
        return Parsed::Invalid(format!(
            "record length {len} exceeds the maximum {MAX_ENTRY_BYTES}"
        ));
    }
    let total = RECORD_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Parsed::NeedMore(total);
    }
    let stored = le_u32(buf, 0);
    let actual = crc32c::crc32c(&buf[4..total]);
    if stored != actual {
        return Parsed::Invalid(format!(
            "record checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
        ));
    }
    Parsed::Record(
        RecordHeader {
            len,
            index: le_u64(buf, 8),
            term: le_u64(buf, 16),
            timestamp_ms: le_u64(buf, 24),
        },
        total,
    )
}

/// Encodes one sparse index entry.
pub(crate) fn encode_index_entry(buf: &mut Vec<u8>, delta: u32, pos: u32) {
    buf.extend_from_slice(&delta.to_le_bytes());
    buf.extend_from_slice(&pos.to_le_bytes());
}

/// Decodes one sparse index entry (`b` must hold INDEX_ENTRY_LEN bytes).
pub(crate) fn decode_index_entry(b: &[u8]) -> (u32, u32) {
    (le_u32(b, 0), le_u32(b, 4))
}

/// One step of a record scan.
pub(crate) enum Scan {
    /// A valid record, `total` bytes long.
    Record { header: RecordHeader, total: usize },
    /// `pos` is at (or past) the end of the scanned range.
    End,
    /// The bytes at `pos` are not a valid record.
    Invalid { pos: u64, reason: String },
}

/// Reads a file range `[.., end)` in chunks, handing out records as slices of one
/// shared `Bytes` per chunk.
pub(crate) struct Chunks<'a> {
    file: &'a File,
    path: &'a Path,
    end: u64,
    chunk: usize,
    buf: Bytes,
    start: u64,
}

impl<'a> Chunks<'a> {
    pub(crate) fn new(file: &'a File, path: &'a Path, end: u64, chunk: usize) -> Self {
        Chunks {
            file,
            path,
            end,
            chunk: chunk.max(RECORD_HEADER_LEN),
            buf: Bytes::new(),
            start: 0,
        }
    }

    /// Makes the buffer cover `[pos, pos + need)` (clamped to the end of the range).
    fn ensure(&mut self, pos: u64, need: usize) -> Result<()> {
        let have_end = self.start + self.buf.len() as u64;
        let want_end = pos.saturating_add(need as u64).min(self.end);
        if pos >= self.start && pos <= have_end && want_end <= have_end {
            return Ok(());
        }
        let n = (need.max(self.chunk) as u64).min(self.end.saturating_sub(pos)) as usize;
        let mut v = vec![0u8; n];
        self.file
            .read_exact_at(&mut v, pos)
            .map_err(|e| io_err(self.path, "read", e))?;
        self.buf = Bytes::from(v);
        self.start = pos;
        Ok(())
    }

    fn view(&self, pos: u64) -> &[u8] {
        &self.buf[(pos - self.start) as usize..]
    }

    /// The bytes `[pos, pos+len)`; only valid right after `next` returned a record covering them.
    pub(crate) fn slice(&self, pos: u64, len: usize) -> Bytes {
        let off = (pos - self.start) as usize;
        self.buf.slice(off..off + len)
    }

    /// Parses the record starting at `pos`.
    pub(crate) fn next(&mut self, pos: u64) -> Result<Scan> {
        if pos >= self.end {
            return Ok(Scan::End);
        }
        self.ensure(pos, RECORD_HEADER_LEN)?;
        let mut parsed = parse_record(self.view(pos));
        if let Parsed::NeedMore(total) = parsed {
            if pos + total as u64 > self.end {
                let reason = if total == RECORD_HEADER_LEN {
                    format!(
                        "partial record header ({} bytes) at the end of the segment",
                        self.end - pos
                    )
                } else {
                    format!(
                        "record of {total} bytes runs past the end of the segment ({} bytes left)",
                        self.end - pos
                    )
                };
                return Ok(Scan::Invalid { pos, reason });
            }
            self.ensure(pos, total)?;
            parsed = parse_record(self.view(pos));
        }
        Ok(match parsed {
            Parsed::Record(header, total) => Scan::Record { header, total },
            Parsed::Invalid(reason) => Scan::Invalid { pos, reason },
            Parsed::NeedMore(_) => Scan::Invalid {
                pos,
                reason: "record could not be read whole".to_string(),
            },
        })
    }
}
