//! Opening a log: verify every record, keep the longest valid prefix, quarantine the rest.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::format::{
    check_header, encode_index_entry, segment_header, Chunks, HeaderCheck, Scan, FORMAT_VERSION,
    SCAN_CHUNK_BYTES, SEGMENT_HEADER_LEN,
};
use crate::{
    create_segment, io_err, open_rw, segment_paths, sync_dir, Log, LogConfig, Recovery, Result,
    Segment, StorageError, MAX_SEGMENT_BYTES,
};

/// Name of the directory (inside the log directory) that receives quarantined files.
pub(crate) const QUARANTINE_DIR: &str = "quarantine";

/// Where the valid prefix of the log ends.
enum Cut {
    /// Segment `k` (position in the sorted list) and all later ones are invalid as a whole.
    Whole(usize),
    /// Segment `k` is valid up to byte `pos` of its `len` bytes; later segments are invalid.
    At { k: usize, pos: u64, len: u64 },
}

/// Result of scanning one segment.
struct SegScan {
    last: u64,
    valid_end: u64,
    max_ts: Option<u64>,
    min_ts: Option<u64>,
    last_term: u64,
    idx_bytes: Vec<u8>,
    idx_entries: Vec<(u32, u32)>,
    invalid: Option<(u64, String)>,
}

fn parse_name(name: &str) -> Option<(u64, bool)> {
    let (stem, is_log) = if let Some(s) = name.strip_suffix(".log") {
        (s, true)
    } else if let Some(s) = name.strip_suffix(".idx") {
        (s, false)
    } else {
        return None;
    };
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok().map(|base| (base, is_log))
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn quarantine_target(qdir: &Path, name: &str) -> PathBuf {
    let ms = now_ms();
    let mut p = qdir.join(format!("{ms}-{name}"));
    let mut n = 1;
    while p.exists() {
        p = qdir.join(format!("{ms}-{n}-{name}"));
        n += 1;
    }
    p
}

fn ensure_quarantine_dir(dir: &Path) -> Result<PathBuf> {
    let qdir = dir.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&qdir).map_err(|e| io_err(&qdir, "create directory", e))?;
    Ok(qdir)
}

/// Moves a whole file into the quarantine directory.
fn quarantine_file(dir: &Path, path: &Path, rec: &mut Recovery) -> Result<()> {
    let qdir = ensure_quarantine_dir(dir)?;
    let name = path
        .file_name()
        .map_or_else(|| "segment".into(), |n| n.to_string_lossy().into_owned());
    let target = quarantine_target(&qdir, &name);
    std::fs::rename(path, &target).map_err(|e| io_err(path, "move to quarantine", e))?;
    tracing::warn!(from = %path.display(), to = %target.display(), "quarantined log segment");
    rec.quarantined.push(target);
    Ok(())
}

/// Copies bytes `[pos, len)` of `file` into a quarantine file unless they are all zero.
fn quarantine_tail(
    dir: &Path,
    file: &File,
    path: &Path,
    pos: u64,
    len: u64,
    rec: &mut Recovery,
) -> Result<()> {
    let mut out: Option<(File, PathBuf)> = None;
    let mut buf = vec![0u8; (len - pos).min(SCAN_CHUNK_BYTES as u64) as usize];
    let mut off = pos;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], off)
            .map_err(|e| io_err(path, "read", e))?;
        if out.is_none() && buf[..n].iter().any(|&b| b != 0) {
            let qdir = ensure_quarantine_dir(dir)?;
            let name = path
                .file_name()
                .map_or_else(|| "segment".into(), |n| n.to_string_lossy().into_owned());
            let target = quarantine_target(&qdir, &format!("{name}.tail-at-{pos}"));
            let f = open_rw(&target, true)?;
            out = Some((f, target));
        }
        if let Some((f, p)) = &out {
            f.write_all_at(&buf[..n], off - pos)
                .map_err(|e| io_err(p, "write", e))?;
        }
        off += n as u64;
    }
    if let Some((f, p)) = out {
        f.set_len(len - pos)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_err(&p, "fsync", e))?;
        tracing::warn!(from = %path.display(), to = %p.display(), "quarantined log tail");
        rec.quarantined.push(p);
    }
    Ok(())
}

fn scan_segment(
    file: &File,
    path: &Path,
    len: u64,
    base: u64,
    mut prev_term: u64,
    interval: u64,
    terms: &mut Vec<(u64, u64)>,
) -> Result<SegScan> {
    let mut chunks = Chunks::new(file, path, len, SCAN_CHUNK_BYTES);
    let mut pos = SEGMENT_HEADER_LEN;
    let mut expected = base;
    let mut max_ts: Option<u64> = None;
    let mut min_ts: Option<u64> = None;
    let mut idx_bytes = Vec::new();
    let mut idx_entries: Vec<(u32, u32)> = Vec::new();
    let mut invalid = None;
    loop {
        match chunks.next(pos)? {
            Scan::End => break,
            Scan::Invalid { pos, reason } => {
                invalid = Some((pos, reason));
                break;
            }
            Scan::Record { header, total, .. } => {
                let end = pos + total as u64;
                if header.index != expected {
                    invalid = Some((
                        pos,
                        format!("record has index {}, expected {expected}", header.index),
                    ));
                    break;
                }
                if header.term < prev_term {
                    invalid = Some((
                        pos,
                        format!(
                            "term decreases from {prev_term} to {} at index {expected}",
                            header.term
                        ),
                    ));
                    break;
                }
                let (Ok(delta), Ok(pos32), Ok(_)) = (
                    u32::try_from(expected - base),
                    u32::try_from(pos),
                    u32::try_from(end),
                ) else {
                    invalid = Some((pos, "segment larger than supported".to_string()));
                    break;
                };
                let need_idx = match idx_entries.last() {
                    None => true,
                    Some(&(_, p)) => pos - u64::from(p) >= interval,
                };
                if need_idx {
                    idx_entries.push((delta, pos32));
                    encode_index_entry(&mut idx_bytes, delta, pos32);
                }
                if terms.last().is_none_or(|&(_, t)| t != header.term) {
                    terms.push((expected, header.term));
                }
                prev_term = header.term;
                max_ts = Some(max_ts.map_or(header.timestamp_ms, |m| m.max(header.timestamp_ms)));
                if header.timestamp_ms > 0 {
                    min_ts =
                        Some(min_ts.map_or(header.timestamp_ms, |m| m.min(header.timestamp_ms)));
                }
                pos = end;
                expected += 1;
            }
        }
    }
    Ok(SegScan {
        last: expected - 1,
        valid_end: pos,
        max_ts,
        min_ts,
        last_term: prev_term,
        idx_bytes,
        idx_entries,
        invalid,
    })
}

/// Makes sure the `.idx` file holds exactly `expected`; returns (file, rebuilt?).
fn check_index(path: &Path, expected: &[u8]) -> Result<(File, bool)> {
    let current = match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(path, "read", e)),
    };
    if current.as_deref() == Some(expected) {
        return Ok((open_rw(path, false)?, false));
    }
    let f = open_rw(path, true)?;
    f.write_all_at(expected, 0)
        .map_err(|e| io_err(path, "write", e))?;
    Ok((f, true))
}

pub(crate) fn open(dir: &Path, config: LogConfig) -> Result<(Log, Recovery)> {
    if config.segment_bytes == 0 || config.segment_bytes > MAX_SEGMENT_BYTES {
        return Err(StorageError::InvalidArgument {
            path: dir.to_path_buf(),
            reason: format!(
                "segment_bytes {} must be in 1..={MAX_SEGMENT_BYTES}",
                config.segment_bytes
            ),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, "create directory", e))?;
    let mut logs = BTreeSet::new();
    let mut idxs = BTreeSet::new();
    let listing = std::fs::read_dir(dir).map_err(|e| io_err(dir, "list", e))?;
    for entry in listing {
        let entry = entry.map_err(|e| io_err(dir, "list", e))?;
        let name = entry.file_name();
        let Some((base, is_log)) = name.to_str().and_then(parse_name) else {
            continue;
        };
        if base == 0 {
            tracing::warn!(file = ?name, "ignoring segment file with index 0");
            continue;
        }
        if is_log {
            logs.insert(base);
        } else {
            idxs.insert(base);
        }
    }

    let mut rec = Recovery::default();
    let mut segments: Vec<Segment> = Vec::new();
    let mut terms: Vec<(u64, u64)> = Vec::new();
    let mut active_idx = Vec::new();
    let mut changed_dir = false;
    let bases: Vec<u64> = logs.iter().copied().collect();

    let mut cut = None;
    let mut prev: Option<(u64, u64)> = None; // (last index, last term)
    for (k, &base) in bases.iter().enumerate() {
        let (log_path, idx_path) = segment_paths(dir, base);
        if let Some((last, _)) = prev {
            if base != last + 1 {
                rec.problem = Some(format!(
                    "{}: segment starts at index {base} but the previous one ends at {last}",
                    log_path.display()
                ));
                cut = Some(Cut::Whole(k));
                break;
            }
        }
        let file = open_rw(&log_path, false)?;
        let len = file
            .metadata()
            .map_err(|e| io_err(&log_path, "stat", e))?
            .len();
        let mut head = vec![0u8; len.min(SEGMENT_HEADER_LEN) as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| io_err(&log_path, "read", e))?;
        let mut len = len;
        match check_header(&head) {
            HeaderCheck::Ok => {}
            HeaderCheck::Version(version) => {
                return Err(StorageError::UnsupportedVersion {
                    path: log_path,
                    version,
                    supported: FORMAT_VERSION,
                })
            }
            HeaderCheck::Torn if k + 1 == bases.len() => {
                // A segment whose creation was interrupted: nothing was in it yet.
                file.write_all_at(&segment_header(), 0)
                    .and_then(|()| file.set_len(SEGMENT_HEADER_LEN))
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io_err(&log_path, "rewrite header", e))?;
                tracing::warn!(path = %log_path.display(), "rewrote torn segment header");
                len = SEGMENT_HEADER_LEN;
            }
            HeaderCheck::Torn | HeaderCheck::BadMagic => {
                rec.problem = Some(format!(
                    "{}: bad segment header (not a Shoal log segment of format version {FORMAT_VERSION})",
                    log_path.display()
                ));
                cut = Some(Cut::Whole(k));
                break;
            }
        }
        let prev_term = prev.map_or(0, |p| p.1);
        let scan = scan_segment(
            &file,
            &log_path,
            len,
            base,
            prev_term,
            config.index_interval_bytes,
            &mut terms,
        )?;
        let (idx, rebuilt) = check_index(&idx_path, &scan.idx_bytes)?;
        if rebuilt {
            tracing::info!(path = %idx_path.display(), "rebuilt segment index");
            rec.rebuilt_indexes += 1;
        }
        prev = Some((scan.last, scan.last_term));
        segments.push(Segment {
            base,
            last: scan.last,
            len: scan.valid_end,
            max_ts: scan.max_ts,
            min_ts: scan.min_ts,
            log_path: log_path.clone(),
            idx_path,
            log: Arc::new(file),
            idx,
            idx_len: scan.idx_bytes.len() as u64,
        });
        active_idx = scan.idx_entries;
        if let Some((pos, reason)) = scan.invalid {
            rec.problem = Some(format!(
                "{}: invalid record at byte {pos}: {reason}",
                log_path.display()
            ));
            cut = Some(Cut::At { k, pos, len });
            break;
        }
    }

    if let Some(cut) = cut {
        changed_dir = true;
        let first_bad = match cut {
            Cut::Whole(k) => k,
            Cut::At { k, .. } => k + 1,
        };
        // Newest first, so that a crash in the middle leaves no gap.
        for &base in bases[first_bad..].iter().rev() {
            let (log_path, idx_path) = segment_paths(dir, base);
            quarantine_file(dir, &log_path, &mut rec)?;
            if idxs.remove(&base) {
                crate::remove_file(&idx_path)?;
            }
        }
        rec.quarantined.reverse();
        if let Cut::At { k, pos, len } = cut {
            let seg = &segments[k];
            quarantine_tail(dir, &seg.log, &seg.log_path, pos, len, &mut rec)?;
            seg.log
                .set_len(pos)
                .and_then(|()| seg.log.sync_data())
                .map_err(|e| io_err(&seg.log_path, "truncate", e))?;
            rec.truncated_bytes = len - pos;
        }
        if !rec.quarantined.is_empty() {
            sync_dir(&dir.join(QUARANTINE_DIR))?;
        }
        if let Some(p) = &rec.problem {
            tracing::warn!(problem = %p, "log recovery cut the log");
        }
    }

    if segments.is_empty() {
        let base = bases.first().copied().unwrap_or(1);
        let seg = create_segment(dir, base)?;
        seg.log
            .sync_data()
            .map_err(|e| io_err(&seg.log_path, "fsync", e))?;
        segments.push(seg);
        active_idx.clear();
        changed_dir = true;
    }
    // Index files without a segment are stale caches.
    for &base in &idxs {
        if !segments.iter().any(|s| s.base == base) {
            crate::remove_file(&segment_paths(dir, base).1)?;
            changed_dir = true;
        }
    }
    if changed_dir || rec.rebuilt_indexes > 0 {
        sync_dir(dir)?;
    }
    if let (Some(first), Some(last)) = (segments.first(), segments.last()) {
        rec.entries = (last.last + 1).saturating_sub(first.base);
    }
    let log = Log::from_parts(dir.to_path_buf(), config, segments, active_idx, terms);
    Ok((log, rec))
}
