//! Crash-safe file updates. A rename is durable only once its directory is synced, and a file's
//! contents only once the file is: both are done here, in one place, for everything that replaces a
//! small metadata file (replica metadata, node identity) or moves a directory into place.

use std::io::Write;
use std::path::Path;

/// Syncs a directory, making renames, creations and removals of its entries durable.
pub fn sync_directory(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file in the same directory is
/// written and synced, renamed over `path`, and the directory synced. After a crash the file holds
/// either the old or the new contents, never a mix, and a completed call is never undone.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    // Unique, so that concurrent writers of one path never share a temporary file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".{}.{}.tmp", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let tmp = dir.join(tmp_name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_directory(dir)
}

/// Renames `from` to `to` and syncs the directories involved, so the move survives a crash.
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    let parent = |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let (a, b) = (parent(from), parent(to));
    sync_directory(&b)?;
    if a != b {
        sync_directory(&a)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The atomic write replaces the contents and leaves no temporary file behind.
    #[test]
    fn atomic_write_replaces() {
        let dir = std::env::temp_dir().join(format!("tern-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meta.json");
        write_file_atomically(&path, b"one").unwrap();
        write_file_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left behind");
        rename_durably(&path, &dir.join("moved.json")).unwrap();
        assert_eq!(std::fs::read(dir.join("moved.json")).unwrap(), b"two");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
