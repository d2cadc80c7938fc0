//! Crash-safe small files (topic metadata, committed offsets).
//!
//! [`write_atomic`] writes a temporary file `.<name>.tmp-<pid>-<n>` next to the target,
//! fsyncs it, renames it over the target and fsyncs the directory, so after a crash
//! the target holds either the old or the new content, never a mix. [`read`] removes
//! temporary files left over by a crash. Do not call `read` concurrently with
//! `write_atomic` for the same path (it could remove the writer's temporary file).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(test)]
mod tests;

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a file path with a UTF-8 name", path.display()),
            )
        })?
        .to_string();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

/// Writes `bytes` to `path` atomically: write to a temp file in the same dir, fsync it,
/// rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (dir, name) = split(path)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("{}{}-{n}", temp_prefix(&name), std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a file written by [`write_atomic`]; `Ok(None)` if it does not exist. Leftover
/// temp files from a crash are ignored (and removed).
pub fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let (dir, name) = split(path)?;
    let prefix = temp_prefix(&name);
    match fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let is_temp = entry
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&prefix));
                if is_temp {
                    let p = entry.path();
                    tracing::info!(path = %p.display(), "removing leftover temporary file");
                    let _ = fs::remove_file(p);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
