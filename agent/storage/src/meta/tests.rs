#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on errors.

use super::*;

#[test]
fn write_then_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("offsets.json");
    assert_eq!(read(&p).unwrap(), None);
    write_atomic(&p, b"one").unwrap();
    assert_eq!(read(&p).unwrap().as_deref(), Some(&b"one"[..]));
    write_atomic(&p, b"two, longer").unwrap();
    assert_eq!(read(&p).unwrap().as_deref(), Some(&b"two, longer"[..]));
}

#[test]
fn leftover_temp_file_is_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("topic.meta");
    write_atomic(&p, b"good").unwrap();
    // A crash between creating the temp file and the rename leaves this behind.
    let tmp = dir.path().join(".topic.meta.tmp-1-7");
    fs::write(&tmp, b"half-writ").unwrap();
    let other = dir.path().join("unrelated");
    fs::write(&other, b"x").unwrap();
    assert_eq!(read(&p).unwrap().as_deref(), Some(&b"good"[..]));
    assert!(!tmp.exists());
    assert!(other.exists());
    // Only a temp file, no target: reads as missing.
    let q = dir.path().join("never");
    fs::write(dir.path().join(".never.tmp-1-1"), b"x").unwrap();
    assert_eq!(read(&q).unwrap(), None);
    assert!(!dir.path().join(".never.tmp-1-1").exists());
}

#[test]
fn missing_directory_reads_none() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(read(&dir.path().join("nope/file")).unwrap(), None);
}
