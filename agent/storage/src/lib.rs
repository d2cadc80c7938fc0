//! Shoal's durable per-partition log.
//!
//! A [`Log`] is a directory of segment files holding checksummed, contiguously
//! indexed entries with a Raft term and a timestamp each. It is shaped like a Raft
//! log (raft-rs style): entries are appended in memory and written in batches
//! ([`Log::write_buffered`]), made durable by a [`SyncHandle`] outside the caller's
//! lock, read by range, truncated after an index on conflict, and trimmed from the
//! front by retention. Opening a log verifies every record and recovers the longest
//! valid prefix; nothing that fails verification is deleted, it is moved into
//! `<dir>/quarantine/`.
//!
//! [`meta`] holds crash-safe helpers for small metadata files.
//!
//! The on-disk format is documented in `docs/storage.md`.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

mod format;
pub mod meta;
mod recovery;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use bytes::Bytes;

use format::{
    decode_index_entry, encode_index_entry, encode_record, segment_header, Chunks, Scan,
    INDEX_ENTRY_LEN, RECORD_HEADER_LEN, SCAN_CHUNK_BYTES, SEGMENT_HEADER_LEN,
};

/// Default size at which the active segment is sealed and a new one started: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Default distance in bytes between two entries of a segment's sparse offset index.
pub const DEFAULT_INDEX_INTERVAL_BYTES: u64 = 4096;
/// Largest accepted entry payload: 16 MiB.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024 * 1024;
/// Largest accepted `segment_bytes` (index positions are 32-bit): 1 GiB.
pub const MAX_SEGMENT_BYTES: u64 = 1024 * 1024 * 1024;

/// A `Result` whose error defaults to [`StorageError`].
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O operation on `path` failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What was being done ("read", "write", "fsync", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A record failed verification while reading (checksum, length, index).
    #[error("corrupt log data in {path} at byte {position}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the bad record in the file.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// A segment was written by an unknown (newer) format version; the log is refused
    /// rather than quarantined so that a downgrade never moves data aside.
    #[error("{path}: unsupported segment format version {version} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The segment file.
        path: PathBuf,
        /// The version found in the file.
        version: u16,
        /// The version this build supports.
        supported: u16,
    },
    /// The requested index was removed by retention (or lies before the first index).
    #[error("index compacted: the first retained index is {first_index}")]
    Compacted {
        /// The first index still in the log.
        first_index: u64,
    },
    /// `append_entry` got an index other than `last_index() + 1`.
    #[error("non-contiguous append: expected index {expected}, got {got}")]
    NonContiguous {
        /// The index the log expected.
        expected: u64,
        /// The index of the offered entry.
        got: u64,
    },
    /// An entry's term is lower than the term of the last entry.
    #[error("term {term} of index {index} is lower than the last term {last_term}")]
    TermRegression {
        /// The index the entry would have had.
        index: u64,
        /// The entry's term.
        term: u64,
        /// The log's last term.
        last_term: u64,
    },
    /// An entry's payload is larger than [`MAX_ENTRY_BYTES`].
    #[error("entry of {size} bytes exceeds the maximum of {max} bytes")]
    EntryTooLarge {
        /// The payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The log was opened with an unusable configuration or called with a bad argument.
    #[error("{path}: invalid argument: {reason}")]
    InvalidArgument {
        /// The log directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

pub(crate) fn io_err(path: &Path, op: &'static str, source: io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, starting at 1 for a new log, contiguous.
    pub index: u64,
    /// Raft term of the leader that created the entry; non-decreasing along the log.
    pub term: u64,
    /// Wall-clock time the entry was accepted (milliseconds since the Unix epoch).
    pub timestamp_ms: u64,
    /// The payload.
    pub data: Bytes,
}

/// Tunables of a [`Log`].
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Size at which the active segment is sealed (an entry never spans segments; an
    /// entry bigger than this gets a segment of its own). At most [`MAX_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// Distance in bytes between two entries of the sparse offset index. Changing it
    /// rebuilds the `.idx` files on the next open.
    pub index_interval_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            index_interval_bytes: DEFAULT_INDEX_INTERVAL_BYTES,
        }
    }
}

/// What recovery found when the log was opened.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Entries in the log after recovery.
    pub entries: u64,
    /// Bytes cut off the segment where the first invalid record was found (torn or
    /// corrupt tail). Whole later segment files are listed in `quarantined` instead.
    pub truncated_bytes: u64,
    /// Files moved aside into `<dir>/quarantine/` (never deleted): later segment files
    /// and the non-zero bytes cut from the end of a segment.
    pub quarantined: Vec<PathBuf>,
    /// `.idx` files rebuilt from the `.log` (missing, short or inconsistent).
    pub rebuilt_indexes: usize,
    /// Human-readable description of the first corruption found, if any.
    pub problem: Option<String>,
}

/// A handle to fsync what [`Log::write_buffered`] wrote, without holding the log's lock.
#[derive(Clone, Debug)]
pub struct SyncHandle {
    files: Vec<Arc<File>>,
}

impl SyncHandle {
    /// `fdatasync`s every segment file written by the `write_buffered` call that
    /// returned this handle. (Segments sealed during that call were already synced,
    /// together with the directory, when the next segment was created.)
    pub fn sync(&self) -> io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        Ok(())
    }
    /// Files this handle syncs.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Adds the files of `other` not already here, so one sync covers both.
    pub fn merge(&mut self, other: SyncHandle) {
        for f in other.files {
            if !self.files.iter().any(|g| Arc::ptr_eq(&f, g)) {
                self.files.push(f);
            }
        }
    }
}

/// One segment file pair (`.log` + `.idx`).
pub(crate) struct Segment {
    /// Index of the first entry (the file name).
    pub(crate) base: u64,
    /// Index of the last written entry (`base - 1` if empty).
    pub(crate) last: u64,
    /// Valid bytes in the `.log` file, header included.
    pub(crate) len: u64,
    /// Largest timestamp of the entries (an upper bound after `truncate_after`).
    pub(crate) max_ts: Option<u64>,
    /// Smallest nonzero timestamp of the entries (a lower bound after
    /// `truncate_after`); 0 marks an entry with no time of its own.
    pub(crate) min_ts: Option<u64>,
    pub(crate) log_path: PathBuf,
    pub(crate) idx_path: PathBuf,
    pub(crate) log: Arc<File>,
    pub(crate) idx: File,
    /// Valid bytes in the `.idx` file.
    pub(crate) idx_len: u64,
}

impl Segment {
    fn has_entries(&self) -> bool {
        self.last >= self.base
    }
}

/// Buffered (not yet written) entry: its timestamp and end offset in `Log::buf`.
#[derive(Clone, Copy)]
struct Pending {
    timestamp_ms: u64,
    end: usize,
}

/// One partition's log. Not internally synchronized: the agent wraps it in a Mutex.
pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    /// Never empty; the last one is the active segment.
    segments: Vec<Segment>,
    /// Sparse index of the active segment: (index delta, byte position).
    active_idx: Vec<(u32, u32)>,
    /// Term runs: (first index of the run, term), covering every entry incl. buffered.
    terms: Vec<(u64, u64)>,
    written_index: u64,
    last_term: u64,
    /// Encoded buffered records, back to back.
    buf: Vec<u8>,
    pending: Vec<Pending>,
    /// Reused scratch for index entries during `write_buffered`.
    idx_buf: Vec<u8>,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("first_index", &self.first_index())
            .field("written_index", &self.written_index)
            .field("last_index", &self.last_index())
            .field("last_term", &self.last_term)
            .field("segments", &self.segments.len())
            .finish()
    }
}

pub(crate) fn segment_paths(dir: &Path, base: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{base:020}.log")),
        dir.join(format!("{base:020}.idx")),
    )
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "fsync directory", e))
}

pub(crate) fn open_rw(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(create)
        .open(path)
        .map_err(|e| io_err(path, if create { "create" } else { "open" }, e))
}

pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "remove", e)),
    }
}

/// Creates an empty segment (header only) and its empty index. Does not fsync.
pub(crate) fn create_segment(dir: &Path, base: u64) -> Result<Segment> {
    let (log_path, idx_path) = segment_paths(dir, base);
    let log = open_rw(&log_path, true)?;
    log.write_all_at(&segment_header(), 0)
        .map_err(|e| io_err(&log_path, "write", e))?;
    let idx = open_rw(&idx_path, true)?;
    Ok(Segment {
        base,
        last: base - 1,
        len: SEGMENT_HEADER_LEN,
        max_ts: None,
        min_ts: None,
        log_path,
        idx_path,
        log: Arc::new(log),
        idx,
        idx_len: 0,
    })
}

impl Log {
    /// Opens (creating the directory if missing) and recovers the log in `dir`.
    ///
    /// Every record of every segment is verified; the log keeps the longest valid
    /// contiguous prefix and moves everything after the first invalid record into
    /// `<dir>/quarantine/`. See [`Recovery`].
    pub fn open(dir: &Path, config: LogConfig) -> Result<(Log, Recovery)> {
        recovery::open(dir, config)
    }

    pub(crate) fn from_parts(
        dir: PathBuf,
        config: LogConfig,
        segments: Vec<Segment>,
        active_idx: Vec<(u32, u32)>,
        terms: Vec<(u64, u64)>,
    ) -> Log {
        let last = segments.last().map_or(0, |s| s.last);
        let last_term = terms.last().map_or(0, |t| t.1);
        Log {
            dir,
            config,
            segments,
            active_idx,
            terms,
            written_index: last,
            last_term,
            buf: Vec::new(),
            pending: Vec::new(),
            idx_buf: Vec::new(),
        }
    }

    /// Drops every entry (on disk and buffered); the next append gets `next_index`.
    ///
    /// Not atomic across a crash: a crash in the middle leaves either a prefix of the
    /// old log or the new empty log (or, if every old segment was already removed, an
    /// empty log starting at 1). Callers installing a snapshot persist the snapshot
    /// first and redo the reset if the log does not match it after a restart.
    pub fn reset(&mut self, next_index: u64) -> Result<()> {
        if next_index == 0 {
            return Err(StorageError::InvalidArgument {
                path: self.dir.clone(),
                reason: "reset to index 0 (indices start at 1)".to_string(),
            });
        }
        self.buf.clear();
        self.pending.clear();
        while let Some(seg) = self.segments.pop() {
            remove_file(&seg.idx_path)?;
            remove_file(&seg.log_path)?;
        }
        sync_dir(&self.dir)?;
        let seg = create_segment(&self.dir, next_index)?;
        seg.log
            .sync_data()
            .map_err(|e| io_err(&seg.log_path, "fsync", e))?;
        self.segments.push(seg);
        sync_dir(&self.dir)?;
        self.active_idx.clear();
        self.terms.clear();
        self.written_index = next_index - 1;
        self.last_term = 0;
        Ok(())
    }

    /// First retained index; an empty new log has `first_index() == 1`, `last_index() == 0`.
    pub fn first_index(&self) -> u64 {
        self.segments.first().map_or(1, |s| s.base)
    }

    /// Last appended index, including entries still buffered in memory.
    pub fn last_index(&self) -> u64 {
        self.written_index + self.pending.len() as u64
    }

    /// Term of `last_index()`, 0 if the log is empty.
    pub fn last_term(&self) -> u64 {
        if self.last_index() < self.first_index() {
            0
        } else {
            self.last_term
        }
    }

    /// Last index handed to the OS by `write_buffered` (what a process crash cannot lose).
    pub fn written_index(&self) -> u64 {
        self.written_index
    }

    /// Term of the entry at `index`; `None` if outside `[first_index, last_index]`.
    /// Answered from memory (the log keeps the list of term changes).
    pub fn term_at(&self, index: u64) -> Result<Option<u64>> {
        if index < self.first_index() || index > self.last_index() {
            return Ok(None);
        }
        let i = self.terms.partition_point(|&(start, _)| start <= index);
        Ok(i.checked_sub(1).map(|i| self.terms[i].1))
    }

    /// Buffers an entry in memory (no syscall) and returns its index (`last_index() + 1`).
    /// Errors if `data` is larger than [`MAX_ENTRY_BYTES`] or `term < last_term()`.
    pub fn append(&mut self, term: u64, timestamp_ms: u64, data: &[u8]) -> Result<u64> {
        let index = self.last_index() + 1;
        self.push(index, term, timestamp_ms, data)?;
        Ok(index)
    }

    /// Buffers an entry with a given index (a Raft follower's append). The index must be
    /// `last_index() + 1`, else [`StorageError::NonContiguous`].
    pub fn append_entry(&mut self, entry: &Entry) -> Result<()> {
        let expected = self.last_index() + 1;
        if entry.index != expected {
            return Err(StorageError::NonContiguous {
                expected,
                got: entry.index,
            });
        }
        self.push(entry.index, entry.term, entry.timestamp_ms, &entry.data)
    }

    fn push(&mut self, index: u64, term: u64, timestamp_ms: u64, data: &[u8]) -> Result<()> {
        if data.len() > MAX_ENTRY_BYTES {
            return Err(StorageError::EntryTooLarge {
                size: data.len(),
                max: MAX_ENTRY_BYTES,
            });
        }
        let last_term = self.last_term();
        if term < last_term {
            return Err(StorageError::TermRegression {
                index,
                term,
                last_term,
            });
        }
        encode_record(&mut self.buf, index, term, timestamp_ms, data);
        self.pending.push(Pending {
            timestamp_ms,
            end: self.buf.len(),
        });
        if self.terms.last().is_none_or(|&(_, t)| t != term) {
            self.terms.push((index, term));
        }
        self.last_term = term;
        Ok(())
    }

    /// Writes every buffered entry to the segment files with one `write` per segment
    /// touched (plus one for its index file when it gained index entries), rolling to a
    /// new segment when the active one would exceed `segment_bytes`. Returns a
    /// [`SyncHandle`] for the files written (`None` if nothing was buffered).
    /// Afterwards `written_index() == last_index()`.
    ///
    /// On error, the entries not written stay buffered and the files are cut back to
    /// their last consistent length.
    pub fn write_buffered(&mut self) -> Result<Option<SyncHandle>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let mut files: Vec<Arc<File>> = Vec::new();
        let mut done = 0usize;
        let result = self.write_pending(&mut files, &mut done);
        if done > 0 {
            let done_bytes = self.pending[done - 1].end;
            if done == self.pending.len() {
                self.buf.clear();
                self.pending.clear();
            } else {
                self.buf.drain(..done_bytes);
                self.pending.drain(..done);
                for p in &mut self.pending {
                    p.end -= done_bytes;
                }
            }
        }
        result.map(|()| Some(SyncHandle { files }))
    }

    fn write_pending(&mut self, files: &mut Vec<Arc<File>>, done: &mut usize) -> Result<()> {
        let interval = self.config.index_interval_bytes;
        let seg_limit = self.config.segment_bytes;
        while *done < self.pending.len() {
            let i = *done;
            let first_index = self.written_index + 1;
            let Some(seg) = self.segments.last_mut() else {
                break;
            };
            let start_off = if i == 0 { 0 } else { self.pending[i - 1].end };
            let old_idx_entries = self.active_idx.len();
            self.idx_buf.clear();
            let mut size = seg.len;
            let mut max_ts = seg.max_ts;
            let mut min_ts = seg.min_ts;
            let mut j = i;
            while j < self.pending.len() {
                let rec_start = if j == 0 { 0 } else { self.pending[j - 1].end };
                let rec_len = (self.pending[j].end - rec_start) as u64;
                if size > SEGMENT_HEADER_LEN && size + rec_len > seg_limit {
                    break;
                }
                let index = first_index + (j - i) as u64;
                let need_idx = match self.active_idx.last() {
                    None => true,
                    Some(&(_, p)) => size - u64::from(p) >= interval,
                };
                if need_idx {
                    // Both fit in u32: segments are capped at MAX_SEGMENT_BYTES (+ one entry).
                    let delta = (index - seg.base) as u32;
                    let pos = size as u32;
                    self.active_idx.push((delta, pos));
                    encode_index_entry(&mut self.idx_buf, delta, pos);
                }
                let ts = self.pending[j].timestamp_ms;
                max_ts = Some(max_ts.map_or(ts, |m| m.max(ts)));
                if ts > 0 {
                    min_ts = Some(min_ts.map_or(ts, |m| m.min(ts)));
                }
                size += rec_len;
                j += 1;
            }
            if j > i {
                let bytes = &self.buf[start_off..self.pending[j - 1].end];
                let res = seg
                    .log
                    .write_all_at(bytes, seg.len)
                    .map_err(|e| io_err(&seg.log_path, "write", e))
                    .and_then(|()| {
                        seg.idx
                            .write_all_at(&self.idx_buf, seg.idx_len)
                            .map_err(|e| io_err(&seg.idx_path, "write", e))
                    });
                if let Err(e) = res {
                    // Cut back to the last consistent state; the entries stay buffered.
                    let _ = seg.log.set_len(seg.len);
                    let _ = seg.idx.set_len(seg.idx_len);
                    self.active_idx.truncate(old_idx_entries);
                    return Err(e);
                }
                seg.len = size;
                seg.idx_len += self.idx_buf.len() as u64;
                seg.last = first_index + (j - i) as u64 - 1;
                seg.max_ts = max_ts;
                seg.min_ts = min_ts;
                if !files.last().is_some_and(|f| Arc::ptr_eq(f, &seg.log)) {
                    files.push(Arc::clone(&seg.log));
                }
                self.written_index = seg.last;
                *done = j;
            }
            if *done < self.pending.len() {
                self.roll(files)?;
            }
        }
        Ok(())
    }

    /// Seals the active segment (fdatasync) and creates the next one (fsyncing the dir).
    fn roll(&mut self, files: &mut Vec<Arc<File>>) -> Result<()> {
        if let Some(seg) = self.segments.last() {
            seg.log
                .sync_data()
                .map_err(|e| io_err(&seg.log_path, "fsync", e))?;
            files.retain(|f| !Arc::ptr_eq(f, &seg.log));
        }
        let seg = create_segment(&self.dir, self.written_index + 1)?;
        sync_dir(&self.dir)?;
        self.segments.push(seg);
        self.active_idx.clear();
        Ok(())
    }

    fn segment_for(&self, index: u64) -> usize {
        self.segments
            .partition_point(|s| s.base <= index)
            .saturating_sub(1)
    }

    /// Largest sparse-index entry at or before `index` in segment `si`: (index, position).
    fn idx_floor(&self, si: usize, index: u64) -> Result<(u64, u64)> {
        let seg = &self.segments[si];
        let start = (seg.base, SEGMENT_HEADER_LEN);
        let Ok(target) = u32::try_from(index - seg.base) else {
            return Ok(start);
        };
        let found = if si + 1 == self.segments.len() {
            let n = self.active_idx.partition_point(|&(d, _)| d <= target);
            n.checked_sub(1).map(|k| self.active_idx[k])
        } else {
            let count = seg.idx_len / INDEX_ENTRY_LEN as u64;
            let (mut lo, mut hi) = (0u64, count);
            let mut best = None;
            let mut e = [0u8; INDEX_ENTRY_LEN];
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                seg.idx
                    .read_exact_at(&mut e, mid * INDEX_ENTRY_LEN as u64)
                    .map_err(|err| io_err(&seg.idx_path, "read", err))?;
                let (d, p) = decode_index_entry(&e);
                if d <= target {
                    best = Some((d, p));
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            best
        };
        Ok(match found {
            Some((d, p)) if u64::from(p) >= SEGMENT_HEADER_LEN && u64::from(p) < seg.len => {
                (seg.base + u64::from(d), u64::from(p))
            }
            _ => start,
        })
    }

    /// Reads entries from `from` (inclusive), at most `max_entries` and about `max_bytes`
    /// of payload (always at least one entry if one exists), only up to `written_index()`.
    /// Every record's checksum is verified: a mismatch returns [`StorageError::Corrupt`],
    /// never bad data. `from < first_index()` => [`StorageError::Compacted`];
    /// `from > written_index()` => empty.
    pub fn read(&self, from: u64, max_entries: usize, max_bytes: usize) -> Result<Vec<Entry>> {
        let first_index = self.first_index();
        if from < first_index {
            return Err(StorageError::Compacted { first_index });
        }
        if max_entries == 0 || from > self.written_index {
            return Ok(Vec::new());
        }
        let avail = (self.written_index - from + 1).min(1024) as usize;
        let mut out = Vec::with_capacity(max_entries.min(avail));
        let mut bytes = 0usize;
        let mut next = from;
        let mut si = self.segment_for(from);
        while si < self.segments.len() && next <= self.written_index {
            let seg = &self.segments[si];
            si += 1;
            if seg.last < next {
                continue;
            }
            let (mut expected, mut pos) = self.idx_floor(si - 1, next)?;
            let mut from_index = pos != SEGMENT_HEADER_LEN;
            let records = seg.last - seg.base + 1;
            let avg = (seg.len - SEGMENT_HEADER_LEN) / records;
            let want = (max_entries as u64)
                .saturating_mul(avg)
                .min(max_bytes as u64)
                .saturating_add(self.config.index_interval_bytes + 2 * RECORD_HEADER_LEN as u64)
                .clamp(4096, SCAN_CHUNK_BYTES as u64) as usize;
            let mut chunks = Chunks::new(&seg.log, &seg.log_path, seg.len, want);
            while expected <= seg.last {
                let (header, total) = match chunks.next(pos)? {
                    Scan::Record { header, total, .. } => (header, total),
                    Scan::End => {
                        return Err(StorageError::Corrupt {
                            path: seg.log_path.clone(),
                            position: pos,
                            reason: format!("segment ends before index {expected}"),
                        })
                    }
                    Scan::Invalid { pos, reason } => {
                        return Err(StorageError::Corrupt {
                            path: seg.log_path.clone(),
                            position: pos,
                            reason,
                        })
                    }
                };
                if header.index != expected {
                    if from_index {
                        // The index file disagrees with the log: fall back to a scan.
                        tracing::warn!(path = %seg.idx_path.display(), "index entry points at the wrong record; scanning");
                        from_index = false;
                        expected = seg.base;
                        pos = SEGMENT_HEADER_LEN;
                        continue;
                    }
                    return Err(StorageError::Corrupt {
                        path: seg.log_path.clone(),
                        position: pos,
                        reason: format!("record has index {}, expected {expected}", header.index),
                    });
                }
                from_index = false;
                if expected >= next {
                    let len = header.len as usize;
                    if !out.is_empty() && bytes.saturating_add(len) > max_bytes {
                        return Ok(out);
                    }
                    out.push(Entry {
                        index: header.index,
                        term: header.term,
                        timestamp_ms: header.timestamp_ms,
                        data: chunks.slice(pos + RECORD_HEADER_LEN as u64, len),
                    });
                    bytes = bytes.saturating_add(len);
                    next += 1;
                    if out.len() >= max_entries || bytes >= max_bytes {
                        return Ok(out);
                    }
                }
                pos += total as u64;
                expected += 1;
            }
        }
        Ok(out)
    }

    /// Whether an entry with a time of its own (nonzero) is older than
    /// `timestamp_ms`: only then may [`Log::index_at_time`] find something
    /// for retention by age. Reads nothing from disk, so it can be asked of
    /// many logs often. Entries already dropped by a caller's own first
    /// index may still count while their segment is kept.
    pub fn has_entries_older_than(&self, timestamp_ms: u64) -> bool {
        self.segments
            .iter()
            .any(|seg| seg.has_entries() && seg.min_ts.is_some_and(|m| m < timestamp_ms))
    }

    /// The first index whose `timestamp_ms >= timestamp_ms`, or `written_index() + 1` if
    /// none. Exact even if timestamps are not monotonic: it picks the first segment
    /// whose newest timestamp is late enough and scans it.
    pub fn index_at_time(&self, timestamp_ms: u64) -> Result<u64> {
        for seg in &self.segments {
            if !seg.has_entries() || seg.max_ts.is_none_or(|m| m < timestamp_ms) {
                continue;
            }
            let mut chunks = Chunks::new(&seg.log, &seg.log_path, seg.len, SCAN_CHUNK_BYTES);
            let mut pos = SEGMENT_HEADER_LEN;
            loop {
                match chunks.next(pos)? {
                    Scan::Record { header, total, .. } => {
                        if header.timestamp_ms >= timestamp_ms {
                            return Ok(header.index);
                        }
                        pos += total as u64;
                    }
                    Scan::End => break,
                    Scan::Invalid { pos, reason } => {
                        return Err(StorageError::Corrupt {
                            path: seg.log_path.clone(),
                            position: pos,
                            reason,
                        })
                    }
                }
            }
        }
        Ok(self.written_index + 1)
    }

    /// Deletes every entry after `index` (Raft conflict), buffered ones included.
    /// Removes whole later segments (newest first), truncates the one containing
    /// `index` (log and idx), fsyncs it and the directory. `index` may be
    /// `first_index() - 1` (empties the log); lower => [`StorageError::Compacted`].
    pub fn truncate_after(&mut self, index: u64) -> Result<()> {
        let first_index = self.first_index();
        if index >= self.last_index() {
            return Ok(());
        }
        if index + 1 < first_index {
            return Err(StorageError::Compacted { first_index });
        }
        if index >= self.written_index {
            let keep = (index - self.written_index) as usize;
            let end = if keep == 0 {
                0
            } else {
                self.pending[keep - 1].end
            };
            self.buf.truncate(end);
            self.pending.truncate(keep);
        } else {
            self.buf.clear();
            self.pending.clear();
            self.truncate_written(index)?;
        }
        while self.terms.last().is_some_and(|&(s, _)| s > index) {
            self.terms.pop();
        }
        self.last_term = self.terms.last().map_or(0, |t| t.1);
        Ok(())
    }

    fn truncate_written(&mut self, index: u64) -> Result<()> {
        let mut popped = false;
        while self.segments.len() > 1 && self.segments.last().is_some_and(|s| s.base > index) {
            if let Some(seg) = self.segments.pop() {
                popped = true;
                remove_file(&seg.idx_path)?;
                remove_file(&seg.log_path)?;
            }
        }
        let si = self.segments.len() - 1;
        if popped {
            // A sealed segment becomes the active one: load its sparse index.
            let seg = &self.segments[si];
            self.active_idx = self.load_index(si, seg.len, seg.last)?;
        }
        let cut = if index < self.segments[si].base {
            SEGMENT_HEADER_LEN
        } else {
            self.position_after(si, index)?
        };
        // Sparse index entries before the cut stay valid.
        let base = self.segments[si].base;
        let mut entries = std::mem::take(&mut self.active_idx);
        entries.retain(|&(d, p)| u64::from(p) < cut && base + u64::from(d) <= index);
        let seg = &mut self.segments[si];
        seg.log
            .set_len(cut)
            .and_then(|()| seg.log.sync_data())
            .map_err(|e| io_err(&seg.log_path, "truncate", e))?;
        seg.idx_len = (entries.len() * INDEX_ENTRY_LEN) as u64;
        seg.idx
            .set_len(seg.idx_len)
            .map_err(|e| io_err(&seg.idx_path, "truncate", e))?;
        seg.len = cut;
        seg.last = index.max(seg.base - 1);
        if !seg.has_entries() {
            seg.max_ts = None;
            seg.min_ts = None;
        }
        self.active_idx = entries;
        self.written_index = self.segments[si].last;
        sync_dir(&self.dir)
    }

    /// Byte position right after the record of `index` in segment `si`.
    fn position_after(&self, si: usize, index: u64) -> Result<u64> {
        let seg = &self.segments[si];
        let (mut at, mut pos) = self.idx_floor(si, index)?;
        let mut chunks = Chunks::new(&seg.log, &seg.log_path, seg.len, SCAN_CHUNK_BYTES);
        let mut from_index = pos != SEGMENT_HEADER_LEN;
        loop {
            match chunks.next(pos)? {
                Scan::Record { header, total, .. } if header.index == at => {
                    if at == index {
                        return Ok(pos + total as u64);
                    }
                    at += 1;
                    pos += total as u64;
                    from_index = false;
                }
                Scan::Record { .. } if from_index => {
                    from_index = false;
                    at = seg.base;
                    pos = SEGMENT_HEADER_LEN;
                }
                Scan::Record { header, .. } => {
                    return Err(StorageError::Corrupt {
                        path: seg.log_path.clone(),
                        position: pos,
                        reason: format!("record has index {}, expected {at}", header.index),
                    })
                }
                Scan::End => {
                    return Err(StorageError::Corrupt {
                        path: seg.log_path.clone(),
                        position: pos,
                        reason: format!("segment ends before index {index}"),
                    })
                }
                Scan::Invalid { pos, reason } => {
                    return Err(StorageError::Corrupt {
                        path: seg.log_path.clone(),
                        position: pos,
                        reason,
                    })
                }
            }
        }
    }

    /// The valid sparse index entries of segment `si` below byte `cut` and index `last`,
    /// read from its `.idx` file (stopping at the first inconsistent entry).
    fn load_index(&self, si: usize, cut: u64, last: u64) -> Result<Vec<(u32, u32)>> {
        let seg = &self.segments[si];
        let mut entries: Vec<(u32, u32)> = Vec::new();
        let mut raw = vec![0u8; seg.idx_len as usize];
        seg.idx
            .read_exact_at(&mut raw, 0)
            .map_err(|e| io_err(&seg.idx_path, "read", e))?;
        let mut prev: Option<(u32, u32)> = None;
        for e in raw.chunks_exact(INDEX_ENTRY_LEN) {
            let (d, p) = decode_index_entry(e);
            let ok = u64::from(p) >= SEGMENT_HEADER_LEN
                && seg.base + u64::from(d) <= last
                && prev.is_none_or(|(pd, pp)| d > pd && p > pp);
            if !ok || u64::from(p) >= cut {
                break;
            }
            entries.push((d, p));
            prev = Some((d, p));
        }
        Ok(entries)
    }

    /// Retention: deletes whole sealed segments (never the active one) from the oldest
    /// while (a) the segment's newest timestamp is older than `now_ms - max_age_ms`, or
    /// (b) the total size exceeds `max_bytes`. Each deletion is made durable (directory
    /// fsync) before the next, so a crash leaves a valid log. Moves `first_index()`
    /// forward and returns the number of segments deleted.
    pub fn enforce_retention(
        &mut self,
        now_ms: u64,
        max_age_ms: Option<u64>,
        max_bytes: Option<u64>,
    ) -> Result<usize> {
        let mut deleted = 0;
        while self.segments.len() > 1 {
            let seg = &self.segments[0];
            let too_old = max_age_ms.is_some_and(|age| match seg.max_ts {
                Some(ts) => now_ms >= age && ts < now_ms - age,
                None => true,
            });
            let too_big = max_bytes.is_some_and(|m| self.size_bytes() > m);
            if !too_old && !too_big {
                break;
            }
            self.remove_oldest_segment()?;
            deleted += 1;
        }
        self.trim_terms();
        Ok(deleted)
    }

    /// The first index retention by size keeps: dropping the whole sealed
    /// segments before it (never the active one) brings the log to at most
    /// `max_bytes`, as [`Log::enforce_retention`] would. `first_index()`
    /// when the log fits already. Reads nothing from disk. (A replicated
    /// partition passes it to its Raft log's compaction, so every replica
    /// keeps a valid snapshot point.)
    pub fn index_to_fit(&self, max_bytes: u64) -> u64 {
        let mut size = self.size_bytes();
        let mut keep = self.first_index();
        for pair in self.segments.windows(2) {
            if size <= max_bytes {
                break;
            }
            size -= pair[0].len;
            keep = pair[1].base;
        }
        keep
    }

    /// Deletes whole sealed segments (never the active one) whose entries all
    /// lie before `index`, each deletion durable before the next, as
    /// retention does. `first_index()` moves forward to at most `index`;
    /// returns the number of segments deleted. (A replicated partition
    /// compacts its Raft log this way.)
    pub fn drop_before(&mut self, index: u64) -> Result<usize> {
        let mut deleted = 0;
        while self.segments.len() > 1 && self.segments[0].last < index {
            self.remove_oldest_segment()?;
            deleted += 1;
        }
        self.trim_terms();
        Ok(deleted)
    }

    fn remove_oldest_segment(&mut self) -> Result<()> {
        let seg = self.segments.remove(0);
        remove_file(&seg.idx_path)?;
        remove_file(&seg.log_path)?;
        sync_dir(&self.dir)
    }

    fn trim_terms(&mut self) {
        let first = self.first_index();
        while self.terms.len() >= 2 && self.terms[1].0 <= first {
            self.terms.remove(0);
        }
    }

    /// Bytes on disk in the segment files plus bytes buffered in memory.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum::<u64>() + self.buf.len() as u64
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
