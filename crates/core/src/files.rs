//! Files other processes read while we write them, and the run lock:
//! whole-file replacement (Apache reads the vhost include and the page
//! files, another cron may look at the lock) and the lock that keeps one
//! cron run (or one watcher) at a time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{CoreError, Result};

/// The content of `path`, or `None` if there is no such file.
pub fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(CoreError::io(format!("reading {}", path.display()), err)),
    }
}

/// Replaces `path` whole: a temporary file in the same directory, fsync,
/// rename, fsync of the directory. Callers serialise writers of one path
/// (cron's run lock). Readers see the old file or the new one,
/// never a mix. The new file's mtime is made strictly later than the old
/// one's, because Apache notices a changed map by its mtime and two quick
/// writes can otherwise share one timestamp.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io_err =
        |what: &str, err: io::Error| CoreError::io(format!("{what} {}", path.display()), err);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let previous_mtime = fs::metadata(path).and_then(|m| m.modified()).ok();
    remove_stale_temps(dir, path);
    let temp = temp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| io_err("creating a temporary file beside", e))?;
        file.write_all(bytes).map_err(|e| io_err("writing", e))?;
        advance_mtime(&file, previous_mtime).map_err(|e| io_err("setting the mtime of", e))?;
        // Keep the old file's mode, so a map readable by Apache stays so.
        if let Ok(meta) = fs::metadata(path) {
            file.set_permissions(meta.permissions())
                .map_err(|e| io_err("copying the mode of", e))?;
        }
        file.sync_all().map_err(|e| io_err("syncing", e))?;
        fs::rename(&temp, path).map_err(|e| io_err("renaming into", e))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Gives a replacement file an mtime strictly later than its predecessor's:
/// Apache keeps using a cached map until the mtime changes.
fn advance_mtime(file: &File, previous: Option<SystemTime>) -> io::Result<()> {
    match previous {
        Some(previous) => {
            file.set_modified(SystemTime::now().max(previous + Duration::from_millis(10)))
        }
        None => Ok(()),
    }
}

fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp.")
}

/// A temporary name unique to this write (pid, time and a counter), so a
/// writer killed mid-way can never block a later one that reuses its pid.
fn temp_path(path: &Path) -> PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let count = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(
        "{}{}.{nanos}.{count}",
        temp_prefix(path),
        std::process::id()
    ))
}

/// Removes temporary files that killed writers left beside `path`. Callers
/// hold the lock that serialises writers of `path`, so any such file is
/// stale.
fn remove_stale_temps(dir: &Path, path: &Path) {
    let prefix = temp_prefix(path);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// An exclusive lock held while this value lives (released on drop).
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Opens for reading where the file exists: flock needs no write
    /// access, so a lock file another user created (cron as root, the
    /// endpoints as the web server) still works for everyone who can read it.
    fn open(path: &Path) -> Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e| CoreError::io(format!("opening lock file {}", path.display()), e);
        match File::open(path) {
            Ok(file) => Ok(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o664)
                .open(path)
                .map_err(err),
            Err(e) => Err(err(e)),
        }
    }

    /// Waits for the lock.
    pub fn acquire(path: &Path) -> Result<Self> {
        let file = Self::open(path)?;
        file.lock()
            .map_err(|e| CoreError::io(format!("locking {}", path.display()), e))?;
        Ok(FileLock { _file: file })
    }

    /// Takes the lock if free; `None` if another process holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>> {
        let file = Self::open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                Err(CoreError::io(format!("locking {}", path.display()), e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_whole_and_advance_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.map");
        write_atomically(&path, b"one\n").unwrap();
        let first = fs::metadata(&path).unwrap().modified().unwrap();
        write_atomically(&path, b"two\n").unwrap();
        let second = fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two\n");
        assert!(second > first);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }
}
