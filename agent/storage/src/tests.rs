#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on errors.

use super::*;
use std::fs;

fn small() -> LogConfig {
    LogConfig {
        segment_bytes: 1024,
        index_interval_bytes: 128,
    }
}

fn payload(i: u64) -> Vec<u8> {
    let len = 10 + (i * 37 % 90) as usize;
    (0..len).map(|k| (i as usize * 31 + k) as u8 | 1).collect()
}

fn open(dir: &Path, config: LogConfig) -> (Log, Recovery) {
    Log::open(dir, config).unwrap()
}

/// Appends `n` entries (term 1, timestamp 1000+index) in batches and syncs them.
fn fill(log: &mut Log, n: u64, batch: u64) {
    let start = log.last_index() + 1;
    let term = log.last_term().max(1);
    for i in start..start + n {
        assert_eq!(log.append(term, 1000 + i, &payload(i)).unwrap(), i);
        if (i - start + 1).is_multiple_of(batch) {
            log.write_buffered().unwrap().unwrap().sync().unwrap();
        }
    }
    if let Some(h) = log.write_buffered().unwrap() {
        h.sync().unwrap();
    }
}

fn check_entries(log: &Log, from: u64, to: u64) {
    let got = log
        .read(from, (to + 1 - from) as usize, usize::MAX)
        .unwrap();
    assert_eq!(got.len() as u64, to + 1 - from, "entries {from}..={to}");
    assert!(log.read(to + 1, 1, 0).unwrap().len() <= 1);
    for (e, i) in got.iter().zip(from..) {
        assert_eq!(e.index, i);
        assert_eq!(e.timestamp_ms, 1000 + i);
        assert_eq!(&e.data[..], &payload(i)[..], "data of {i}");
    }
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    v
}

fn quarantine_files(dir: &Path) -> Vec<PathBuf> {
    match fs::read_dir(dir.join("quarantine")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn total_len(paths: &[PathBuf]) -> u64 {
    paths.iter().map(|p| fs::metadata(p).unwrap().len()).sum()
}

fn flip(path: &Path, at: u64) {
    let mut b = fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    fs::write(path, b).unwrap();
}

#[test]
fn empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let (log, rec) = open(dir.path(), LogConfig::default());
    assert_eq!(
        (log.first_index(), log.last_index(), log.last_term()),
        (1, 0, 0)
    );
    assert_eq!(log.written_index(), 0);
    assert_eq!(rec.entries, 0);
    assert!(rec.problem.is_none());
    assert_eq!(log.term_at(0).unwrap(), None);
    assert_eq!(log.term_at(1).unwrap(), None);
    assert!(log.read(1, 10, 1000).unwrap().is_empty());
    assert_eq!(log.index_at_time(0).unwrap(), 1);
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.dir(), dir.path());
    let (log2, rec2) = open(dir.path(), LogConfig::default());
    assert_eq!((log2.first_index(), log2.last_index()), (1, 0));
    assert!(rec2.problem.is_none() && rec2.rebuilt_indexes == 0);
}

#[test]
fn round_trip_across_many_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    assert!(log.write_buffered().unwrap().is_none());
    fill(&mut log, 300, 17);
    assert_eq!(log.last_index(), 300);
    assert_eq!(log.written_index(), 300);
    assert!(log.segment_count() > 10, "{} segments", log.segment_count());
    assert_eq!(log_files(dir.path()).len(), log.segment_count());
    for f in log_files(dir.path()) {
        assert!(fs::metadata(&f).unwrap().len() <= 1024);
    }
    check_entries(&log, 1, 300);
    for i in 1..=300 {
        let e = log.read(i, 1, 0).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].index, i);
        assert_eq!(&e[0].data[..], &payload(i)[..]);
        check_entries(&log, i, (i + 7).min(300));
    }
    assert_eq!(log.term_at(150).unwrap(), Some(1));
    let disk: u64 = total_len(&log_files(dir.path()));
    assert_eq!(log.size_bytes(), disk);
}

#[test]
fn read_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 50, 50);
    assert_eq!(log.read(5, 3, usize::MAX).unwrap().len(), 3);
    assert!(log.read(5, 0, usize::MAX).unwrap().is_empty());
    // max_bytes counts payload bytes; at least one entry is always returned.
    assert_eq!(log.read(5, 100, 0).unwrap().len(), 1);
    assert_eq!(log.read(5, 100, 1).unwrap().len(), 1);
    let two = payload(5).len() + payload(6).len();
    let got = log.read(5, 100, two).unwrap();
    assert_eq!(got.len(), 2);
    let got = log.read(5, 100, two + 1).unwrap();
    assert_eq!(got.len(), 2);
    assert!(log.read(51, 10, 1000).unwrap().is_empty());
    // Buffered entries are not readable until written.
    log.append(1, 2000, b"buffered").unwrap();
    assert_eq!(log.last_index(), 51);
    assert_eq!(log.written_index(), 50);
    assert!(log.read(51, 10, 1000).unwrap().is_empty());
    assert_eq!(log.read(50, 10, 10000).unwrap().len(), 1);
    assert_eq!(log.term_at(51).unwrap(), Some(1));
    log.write_buffered().unwrap();
    assert_eq!(&log.read(51, 10, 1000).unwrap()[0].data[..], b"buffered");
}

#[test]
fn reopen_keeps_everything_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = open(dir.path(), small());
        fill(&mut log, 120, 9);
        log.append(2, 1121, &payload(121)).unwrap();
        log.append(3, 1122, &payload(122)).unwrap();
        log.write_buffered().unwrap();
        // Only buffered: lost on a crash (and on drop).
        log.append(3, 1123, &payload(123)).unwrap();
    }
    let (mut log, rec) = open(dir.path(), small());
    assert_eq!(rec.entries, 122);
    assert_eq!(rec.truncated_bytes, 0);
    assert!(rec.quarantined.is_empty());
    assert_eq!(rec.rebuilt_indexes, 0);
    assert!(rec.problem.is_none(), "{:?}", rec.problem);
    assert_eq!(
        (log.first_index(), log.last_index(), log.last_term()),
        (1, 122, 3)
    );
    assert_eq!(log.term_at(120).unwrap(), Some(1));
    assert_eq!(log.term_at(121).unwrap(), Some(2));
    assert_eq!(log.term_at(122).unwrap(), Some(3));
    check_entries(&log, 1, 122);
    assert_eq!(log.append(3, 1123, &payload(123)).unwrap(), 123);
    fill(&mut log, 10, 3);
    check_entries(&log, 1, 133);
    assert!(!dir.path().join("quarantine").exists());
}

#[test]
fn append_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    log.append(5, 1, b"a").unwrap();
    assert!(matches!(
        log.append(4, 1, b"b"),
        Err(StorageError::TermRegression { .. })
    ));
    let e = Entry {
        index: 3,
        term: 5,
        timestamp_ms: 1,
        data: Bytes::from_static(b"x"),
    };
    assert!(matches!(
        log.append_entry(&e),
        Err(StorageError::NonContiguous {
            expected: 2,
            got: 3
        })
    ));
    let e = Entry { index: 2, ..e };
    log.append_entry(&e).unwrap();
    let big = vec![0u8; MAX_ENTRY_BYTES + 1];
    assert!(matches!(
        log.append(5, 1, &big),
        Err(StorageError::EntryTooLarge { .. })
    ));
    assert_eq!(log.last_index(), 2);
    log.write_buffered().unwrap();
    assert_eq!(log.read(2, 1, 1).unwrap()[0], e);
    let bad = LogConfig {
        segment_bytes: 0,
        index_interval_bytes: 1,
    };
    assert!(matches!(
        Log::open(&dir.path().join("x"), bad),
        Err(StorageError::InvalidArgument { .. })
    ));
}

#[test]
fn big_entries_get_their_own_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    log.append(1, 1, b"small").unwrap();
    let big: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    log.append(1, 2, &big).unwrap();
    log.append(1, 3, &big).unwrap();
    log.append(1, 4, b"small again").unwrap();
    log.write_buffered().unwrap().unwrap().sync().unwrap();
    assert_eq!(log.segment_count(), 4);
    let got = log.read(1, 10, usize::MAX).unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(&got[1].data[..], &big[..]);
    assert_eq!(&got[2].data[..], &big[..]);
    assert_eq!(&got[3].data[..], b"small again");
    assert_eq!(log.read(2, 10, 10).unwrap().len(), 1);
    drop(log);
    let (log, rec) = open(dir.path(), small());
    assert!(rec.problem.is_none());
    assert_eq!(log.read(3, 1, 0).unwrap()[0].data, Bytes::from(big));
}

#[test]
fn truncate_after_then_append() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 200, 13);
    let segs = log.segment_count();
    // Truncate in the middle of an older segment.
    log.truncate_after(57).unwrap();
    assert_eq!((log.last_index(), log.written_index()), (57, 57));
    assert!(log.segment_count() < segs);
    assert_eq!(log_files(dir.path()).len(), log.segment_count());
    assert!(log.read(58, 10, 1000).unwrap().is_empty());
    check_entries(&log, 1, 57);
    // New entries with a higher term continue at 58.
    assert_eq!(log.append(2, 1058, &payload(58)).unwrap(), 58);
    fill(&mut log, 40, 7);
    check_entries(&log, 1, 98);
    assert_eq!(log.term_at(57).unwrap(), Some(1));
    assert_eq!(log.term_at(58).unwrap(), Some(2));
    drop(log);
    let (mut log, rec) = open(dir.path(), small());
    assert!(rec.problem.is_none(), "{:?}", rec.problem);
    assert_eq!(rec.rebuilt_indexes, 0);
    assert_eq!(log.last_index(), 98);
    check_entries(&log, 1, 98);
    // Truncating only buffered entries.
    log.append(2, 1099, &payload(99)).unwrap();
    log.append(2, 1100, &payload(100)).unwrap();
    log.truncate_after(99).unwrap();
    assert_eq!((log.last_index(), log.written_index()), (99, 98));
    log.write_buffered().unwrap();
    check_entries(&log, 1, 99);
    // Truncating at a segment boundary and to an empty log.
    let b = log.segments[3].base;
    log.truncate_after(b - 1).unwrap();
    assert_eq!(log.last_index(), b - 1);
    assert_eq!(log.segment_count(), 3);
    check_entries(&log, 1, b - 1);
    log.truncate_after(0).unwrap();
    assert_eq!(
        (log.first_index(), log.last_index(), log.last_term()),
        (1, 0, 0)
    );
    assert_eq!(log.segment_count(), 1);
    fill(&mut log, 5, 2);
    check_entries(&log, 1, 5);
}

#[test]
fn retention_by_age_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 200, 10); // timestamps 1001..=1200
    let segs = log.segment_count();
    assert!(segs > 5);
    // Nothing is old enough.
    assert_eq!(log.enforce_retention(1500, Some(1000), None).unwrap(), 0);
    // Everything older than 1100: segments whose newest entry is < 1100.
    let n = log.enforce_retention(2100, Some(1000), None).unwrap();
    assert!(n > 0);
    let first = log.first_index();
    assert!(first > 1 && first <= 100, "first {first}");
    assert!(log.term_at(first).unwrap().is_some());
    assert_eq!(log.term_at(first - 1).unwrap(), None);
    assert!(matches!(
        log.read(first - 1, 1, 1),
        Err(StorageError::Compacted { first_index }) if first_index == first
    ));
    check_entries(&log, first, 200);
    // By size: keep at most ~3 KiB.
    let n = log.enforce_retention(0, None, Some(3000)).unwrap();
    assert!(n > 0);
    assert!(log.size_bytes() <= 3000);
    assert_eq!(log_files(dir.path()).len(), log.segment_count());
    let first = log.first_index();
    check_entries(&log, first, 200);
    // Never the active segment.
    log.enforce_retention(u64::MAX, Some(0), Some(0)).unwrap();
    assert_eq!(log.segment_count(), 1);
    let first = log.first_index();
    assert!(first <= 200);
    check_entries(&log, first, 200);
    assert_eq!(log.index_at_time(0).unwrap(), first);
    drop(log);
    let (mut log, rec) = open(dir.path(), small());
    assert!(rec.problem.is_none());
    assert_eq!(log.first_index(), first);
    assert_eq!(log.last_index(), 200);
    fill(&mut log, 3, 3);
    check_entries(&log, first, 203);
}

#[test]
fn drop_before_removes_whole_segments_below_an_index_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 200, 10);
    assert_eq!(log.drop_before(1).unwrap(), 0);
    assert!(log.drop_before(120).unwrap() > 0);
    let first = log.first_index();
    assert!(first > 1 && first <= 120, "first {first}");
    check_entries(&log, first, 200);
    // Never the active segment, even past the end.
    log.drop_before(u64::MAX).unwrap();
    assert_eq!(log.segment_count(), 1);
    let first = log.first_index();
    check_entries(&log, first, 200);
    drop(log);
    let (log, rec) = open(dir.path(), small());
    assert!(rec.problem.is_none());
    assert_eq!(log.first_index(), first);
    assert_eq!(log.term_at(first).unwrap(), Some(1));
}

#[test]
fn index_to_fit_is_where_retention_by_size_cuts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 200, 10);
    assert!(log.segment_count() > 5);
    assert_eq!(log.index_to_fit(u64::MAX), 1);
    assert_eq!(log.index_to_fit(log.size_bytes()), 1);
    for max in [log.size_bytes() - 1, 5000, 3000, 1] {
        let keep = log.index_to_fit(max);
        let dir2 = tempfile::tempdir().unwrap();
        let (mut copy, _) = open(dir2.path(), small());
        fill(&mut copy, 200, 10);
        copy.enforce_retention(0, None, Some(max)).unwrap();
        assert_eq!(keep, copy.first_index(), "max {max}");
        assert!(keep > 1, "max {max}");
    }
    // Never past the active segment, and the same cut through `drop_before`.
    let keep = log.index_to_fit(0);
    assert!(keep <= 200);
    log.drop_before(keep).unwrap();
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.first_index(), keep);
    check_entries(&log, keep, 200);
}

#[test]
fn partially_applied_retention_opens() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 100, 10);
    drop(log);
    // A crash after deleting the oldest .log but before its .idx.
    let files = log_files(dir.path());
    fs::remove_file(&files[0]).unwrap();
    let (log, rec) = open(dir.path(), small());
    assert!(rec.problem.is_none());
    assert!(!files[0].with_extension("idx").exists());
    let first = log.first_index();
    assert!(first > 1);
    check_entries(&log, first, 100);
}

#[test]
fn entries_older_than_a_time_are_known_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    assert!(!log.has_entries_older_than(u64::MAX), "an empty log");
    // An entry with no time of its own (a Raft no-op) never counts.
    log.append(1, 0, b"noop").unwrap();
    log.write_buffered().unwrap();
    assert!(!log.has_entries_older_than(u64::MAX));
    fill(&mut log, 150, 11); // timestamp = 1000 + index, several segments
    assert!(log_files(dir.path()).len() > 2);
    for t in [0, 1000, 1002] {
        assert!(!log.has_entries_older_than(t), "nothing is older than {t}");
        // Only the no-op (index 1) lies before: nothing a message loses.
        assert!(log.index_at_time(t).unwrap() <= 2);
    }
    for t in [1003, 1100, 5000] {
        assert!(log.has_entries_older_than(t));
        assert!(log.index_at_time(t).unwrap() > 2);
    }
    // Kept across a reopen (recovery scans the timestamps).
    drop(log);
    let (log, _) = open(dir.path(), small());
    assert!(!log.has_entries_older_than(1002));
    assert!(log.has_entries_older_than(1003));
    // The active segment counts too: a quiet partition's old messages expire.
    let dir = tempfile::tempdir().unwrap();
    let (mut one, _) = open(dir.path(), LogConfig::default());
    fill(&mut one, 10, 11);
    assert_eq!(log_files(dir.path()).len(), 1);
    assert!(one.has_entries_older_than(1005));
}

#[test]
fn index_at_time() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 150, 11); // timestamp = 1000 + index
    assert_eq!(log.index_at_time(0).unwrap(), 1);
    assert_eq!(log.index_at_time(1001).unwrap(), 1);
    assert_eq!(log.index_at_time(1077).unwrap(), 77);
    assert_eq!(log.index_at_time(1150).unwrap(), 150);
    assert_eq!(log.index_at_time(1151).unwrap(), 151);
    // Buffered entries are not considered.
    log.append(1, 5000, b"x").unwrap();
    assert_eq!(log.index_at_time(4000).unwrap(), 151);
    // Non-monotonic timestamps: still the first matching index.
    log.write_buffered().unwrap();
    log.append(1, 10, b"y").unwrap();
    log.write_buffered().unwrap();
    assert_eq!(log.index_at_time(4000).unwrap(), 151);
    assert_eq!(log.index_at_time(5001).unwrap(), 153);
}

#[test]
fn torn_tail_recovers_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 60, 60);
    drop(log);
    let last = log_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&last).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(len - 5).unwrap();
    drop(f);
    let (mut log, rec) = open(dir.path(), small());
    assert_eq!(log.last_index(), 59);
    assert_eq!(rec.entries, 59);
    let rec_len = (RECORD_HEADER_LEN + payload(60).len()) as u64;
    assert_eq!(rec.truncated_bytes, rec_len - 5);
    assert!(rec.problem.as_deref().unwrap().contains("past the end"));
    check_entries(&log, 1, 59);
    assert_eq!(log.append(1, 1060, &payload(60)).unwrap(), 60);
    log.write_buffered().unwrap();
    check_entries(&log, 1, 60);
    // A torn header (fewer than 32 bytes left).
    drop(log);
    let len = fs::metadata(&last).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - rec_len + 10)
        .unwrap();
    let (log, rec) = open(dir.path(), small());
    assert_eq!(log.last_index(), 59);
    assert_eq!(rec.truncated_bytes, 10);
}

#[test]
fn garbage_or_zeros_appended() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 30, 30);
    drop(log);
    let last = log_files(dir.path()).pop().unwrap();
    let orig = fs::read(&last).unwrap();
    // Zeros (a typical torn tail): truncated, nothing to quarantine.
    let mut b = orig.clone();
    b.extend_from_slice(&[0u8; 100]);
    fs::write(&last, &b).unwrap();
    let (log, rec) = open(dir.path(), small());
    assert_eq!(log.last_index(), 30);
    assert_eq!(rec.truncated_bytes, 100);
    assert!(rec.quarantined.is_empty());
    assert!(rec.problem.is_some());
    assert_eq!(fs::read(&last).unwrap(), orig);
    drop(log);
    // Garbage: truncated and the bytes kept in quarantine.
    let garbage: Vec<u8> = (0..77u8).map(|i| i.wrapping_mul(7) | 0x80).collect();
    let mut b = orig.clone();
    b.extend_from_slice(&garbage);
    fs::write(&last, &b).unwrap();
    let (log, rec) = open(dir.path(), small());
    assert_eq!(log.last_index(), 30);
    assert_eq!(rec.truncated_bytes, 77);
    assert_eq!(rec.quarantined.len(), 1);
    assert_eq!(fs::read(&rec.quarantined[0]).unwrap(), garbage);
    assert_eq!(fs::read(&last).unwrap(), orig);
    check_entries(&log, 1, 30);
}

#[test]
fn flipped_byte_in_last_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 100, 10);
    drop(log);
    let files = log_files(dir.path());
    let before = total_len(&files);
    let last = files.last().unwrap().clone();
    let orig = fs::read(&last).unwrap();
    let at = orig.len() as u64 / 2;
    flip(&last, at);
    let (log, rec) = open(dir.path(), small());
    assert!(log.last_index() < 100);
    assert!(log.last_index() >= log.segments.last().unwrap().base - 1);
    check_entries(&log, 1, log.last_index());
    assert!(rec.problem.as_deref().unwrap().contains("checksum"));
    assert_eq!(rec.quarantined.len(), 1);
    // Nothing was destroyed: kept + quarantined bytes == original bytes.
    let kept = fs::metadata(&last).unwrap().len();
    let q = fs::read(&rec.quarantined[0]).unwrap();
    assert_eq!(kept + q.len() as u64, orig.len() as u64);
    assert_eq!(total_len(&log_files(dir.path())) + q.len() as u64, before);
    assert_eq!(rec.truncated_bytes, q.len() as u64);
    let mut rebuilt = fs::read(&last).unwrap();
    rebuilt.extend_from_slice(&q);
    flip_vec(&mut rebuilt, at);
    assert_eq!(rebuilt, orig);
}

fn flip_vec(b: &mut [u8], at: u64) {
    b[at as usize] ^= 0x40;
}

#[test]
fn flipped_byte_in_sealed_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 200, 10);
    let segs = log.segment_count();
    drop(log);
    let files = log_files(dir.path());
    let before = total_len(&files);
    let victim = files[3].clone();
    let vlen = fs::metadata(&victim).unwrap().len();
    flip(&victim, vlen - 40);
    let (mut log, rec) = open(dir.path(), small());
    assert_eq!(log.segment_count(), 4);
    let last = log.last_index();
    assert!(last < 200 && last > 0);
    check_entries(&log, 1, last);
    assert!(rec.problem.is_some());
    // Every later segment and the tail of the victim are in quarantine.
    assert_eq!(rec.quarantined.len(), segs - 4 + 1);
    let q = quarantine_files(dir.path());
    assert_eq!(q.len(), rec.quarantined.len());
    for p in &rec.quarantined {
        assert!(p.starts_with(dir.path().join("quarantine")));
    }
    assert_eq!(total_len(&log_files(dir.path())) + total_len(&q), before);
    // The log continues contiguously, and opens cleanly again.
    fill(&mut log, 5, 5);
    let l2 = log.last_index();
    assert_eq!(l2, last + 5);
    drop(log);
    let (log, rec) = open(dir.path(), small());
    assert!(rec.problem.is_none(), "{:?}", rec.problem);
    assert_eq!(log.last_index(), l2);
}

#[test]
fn gap_between_segments_is_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 100, 10);
    drop(log);
    let files = log_files(dir.path());
    let n = files.len();
    fs::remove_file(&files[2]).unwrap();
    let (log, rec) = open(dir.path(), small());
    assert_eq!(log.segment_count(), 2);
    check_entries(&log, 1, log.last_index());
    assert_eq!(rec.quarantined.len(), n - 3);
    assert!(rec
        .problem
        .as_deref()
        .unwrap()
        .contains("previous one ends"));
}

#[test]
fn indexes_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 150, 10);
    drop(log);
    let files = log_files(dir.path());
    let idx: Vec<PathBuf> = files.iter().map(|f| f.with_extension("idx")).collect();
    let orig: Vec<Vec<u8>> = idx.iter().map(|p| fs::read(p).unwrap()).collect();
    fs::remove_file(&idx[0]).unwrap();
    fs::write(&idx[1], b"garbage garbage garbage!").unwrap();
    let short = &orig[2][..orig[2].len() - 8];
    fs::write(&idx[2], short).unwrap();
    // An index pointing past the end of the log.
    let mut long = orig[3].clone();
    long.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0, 0]);
    fs::write(&idx[3], &long).unwrap();
    // An orphan index without its segment.
    let orphan = dir.path().join(format!("{:020}.idx", 999_999));
    fs::write(&orphan, b"12345678").unwrap();
    let (log, rec) = open(dir.path(), small());
    assert_eq!(rec.rebuilt_indexes, 4);
    assert!(rec.problem.is_none());
    assert!(!orphan.exists());
    for (p, o) in idx.iter().zip(&orig) {
        assert_eq!(&fs::read(p).unwrap(), o);
    }
    check_entries(&log, 1, 150);
}

#[test]
fn wrong_index_entry_falls_back_to_scan() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 100, 10);
    // Corrupt a sealed segment's index while the log is open (not trusted blindly).
    let idx = log_files(dir.path())[0].with_extension("idx");
    let mut b = fs::read(&idx).unwrap();
    assert!(b.len() >= 16);
    b[8] = b[8].wrapping_add(1); // delta of the second entry
    fs::write(&idx, &b).unwrap();
    check_entries(&log, 1, 100);
}

#[test]
fn bad_magic_is_quarantined_and_new_version_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 50, 10);
    drop(log);
    let files = log_files(dir.path());
    // A future format version: refused, nothing touched.
    let mut b = fs::read(&files[0]).unwrap();
    b[8] = 2;
    fs::write(&files[0], &b).unwrap();
    let err = Log::open(dir.path(), small()).unwrap_err();
    assert!(
        matches!(err, StorageError::UnsupportedVersion { version: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("version 2"));
    assert_eq!(log_files(dir.path()), files);
    // Bad magic: not a Shoal segment; it and everything after are quarantined.
    b[8] = 1;
    b[0] = b'X';
    fs::write(&files[0], &b).unwrap();
    let (mut log, rec) = open(dir.path(), small());
    assert!(rec
        .problem
        .as_deref()
        .unwrap()
        .contains("bad segment header"));
    assert_eq!(rec.quarantined.len(), files.len());
    assert_eq!((log.first_index(), log.last_index()), (1, 0));
    assert_eq!(quarantine_files(dir.path()).len(), files.len());
    fill(&mut log, 3, 3);
    check_entries(&log, 1, 3);
}

#[test]
fn torn_segment_creation() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 20, 20);
    drop(log);
    // A crash right after creating the next segment file.
    let next = dir.path().join(format!("{:020}.log", 21));
    fs::write(&next, b"SHOAL").unwrap();
    let (mut log, rec) = open(dir.path(), small());
    assert_eq!(log.last_index(), 20);
    assert!(rec.quarantined.is_empty());
    fill(&mut log, 5, 5);
    check_entries(&log, 1, 25);
    drop(log);
    let (log, rec) = open(dir.path(), small());
    assert!(rec.problem.is_none());
    check_entries(&log, 1, 25);
}

#[test]
fn reset_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), small());
    fill(&mut log, 50, 10);
    log.append(1, 1, b"buffered").unwrap();
    log.reset(1000).unwrap();
    assert_eq!(
        (log.first_index(), log.last_index(), log.last_term()),
        (1000, 999, 0)
    );
    assert_eq!(log.written_index(), 999);
    assert_eq!(log.segment_count(), 1);
    assert!(matches!(
        log.read(5, 1, 1),
        Err(StorageError::Compacted { first_index: 1000 })
    ));
    assert!(log.read(1000, 1, 1).unwrap().is_empty());
    assert_eq!(log.append(7, 1, b"x").unwrap(), 1000);
    log.write_buffered().unwrap();
    drop(log);
    let (mut log, rec) = open(dir.path(), small());
    assert!(rec.problem.is_none());
    assert_eq!(
        (log.first_index(), log.last_index(), log.last_term()),
        (1000, 1000, 7)
    );
    assert!(log.reset(0).is_err());
}

#[test]
fn random_ops_match_a_model() {
    for seed in 0..12u64 {
        random_ops(seed);
    }
}

fn random_ops(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 700,
        index_interval_bytes: 64,
    };
    let (mut log, _) = open(dir.path(), config.clone());
    // Model: first index and the entries from it (written + buffered).
    let mut first = 1u64;
    let mut model: Vec<Entry> = Vec::new();
    let mut term = 1u64;
    for step in 0..250 {
        let op = rng.u8(0..100);
        if std::env::var("TRACE_OPS").is_ok() {
            eprintln!(
                "seed {seed} step {step} op {op} first {} last {} written {} segs {:?}",
                log.first_index(),
                log.last_index(),
                log.written_index(),
                log.segments
                    .iter()
                    .map(|s| (s.base, s.last, s.len, s.idx_len))
                    .collect::<Vec<_>>()
            );
        }
        match op {
            0..=49 => {
                for _ in 0..rng.usize(1..6) {
                    if rng.u8(0..20) == 0 {
                        term += 1;
                    }
                    let len = rng.usize(0..200);
                    let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                    let ts = rng.u64(0..10_000);
                    let index = log.append(term, ts, &data).unwrap();
                    assert_eq!(index, first + model.len() as u64);
                    model.push(Entry {
                        index,
                        term,
                        timestamp_ms: ts,
                        data: Bytes::from(data),
                    });
                }
            }
            50..=74 => {
                if let Some(h) = log.write_buffered().unwrap() {
                    if rng.bool() {
                        h.sync().unwrap();
                    }
                }
            }
            75..=84 => {
                let at = rng.u64(first - 1..=first - 1 + model.len() as u64);
                log.truncate_after(at).unwrap();
                model.truncate((at + 1 - first) as usize);
                term = term.max(model.last().map_or(0, |e| e.term));
            }
            85..=89 => {
                let written = log.written_index();
                drop(log);
                model.truncate((written + 1 - first) as usize);
                let (l, rec) = open(dir.path(), config.clone());
                assert!(rec.problem.is_none(), "seed {seed} step {step}: {rec:?}");
                assert_eq!(rec.entries, model.len() as u64);
                log = l;
            }
            90..=94 => {
                if rng.bool() {
                    log.enforce_retention(0, None, Some(rng.u64(0..3000)))
                        .unwrap();
                } else {
                    log.enforce_retention(rng.u64(0..20_000), Some(5000), None)
                        .unwrap();
                }
                let nf = log.first_index();
                assert!(nf >= first);
                model.drain(..((nf - first) as usize).min(model.len()));
                first = nf;
            }
            _ => {
                let w = log.write_buffered().unwrap();
                drop(w);
                let at = first + rng.u64(0..=model.len() as u64);
                let want = rng.usize(1..20);
                let got = log.read(at, want, rng.usize(0..2000)).unwrap();
                let end = (model.len()).min((at - first) as usize + got.len());
                assert_eq!(&got[..], &model[(at - first) as usize..end]);
                assert!(!got.is_empty() || at == first + model.len() as u64);
                let t = rng.u64(0..11_000);
                let want_at = model
                    .iter()
                    .find(|e| e.timestamp_ms >= t)
                    .map_or(first + model.len() as u64, |e| e.index);
                assert_eq!(log.index_at_time(t).unwrap(), want_at);
            }
        }
        assert_eq!(log.first_index(), first, "seed {seed} step {step}");
        assert_eq!(log.last_index(), first - 1 + model.len() as u64);
        assert_eq!(log.last_term(), model.last().map_or(0, |e| e.term));
        if let Some(e) = model.first() {
            assert_eq!(log.term_at(e.index).unwrap(), Some(e.term));
        }
    }
    log.write_buffered().unwrap();
    let all = log.read(first, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all, model);
}

#[test]
fn merged_sync_handles_sync_each_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), LogConfig::default());
    log.append(1, 1, b"a").unwrap();
    let mut h = log.write_buffered().unwrap().unwrap();
    for i in 0..10 {
        log.append(1, i, b"b").unwrap();
        h.merge(log.write_buffered().unwrap().unwrap());
    }
    assert_eq!(
        h.file_count(),
        1,
        "ten writes to one segment need one fsync"
    );
    h.sync().unwrap();
    let (mut small_log, _) = open(&dir.path().join("small"), small());
    let mut h = small_log.write_buffered().unwrap().unwrap_or_else(|| {
        small_log.append(1, 1, &payload(0)).unwrap();
        small_log.write_buffered().unwrap().unwrap()
    });
    for i in 1..200 {
        small_log.append(1, i, &payload(i)).unwrap();
        h.merge(small_log.write_buffered().unwrap().unwrap());
    }
    assert!(small_log.segment_count() > 1);
    assert!(h.file_count() > 1 && h.file_count() <= small_log.segment_count());
    h.sync().unwrap();
}
