//! The layout of a cold backup, shared by the servers that write and read partition backups and by
//! the coordinator that drives them (`tern_client::backup`).
//!
//! A backup is a directory: `backup.json` (table, partition count, one entry per partition) and one
//! directory `p<N>` per partition holding a RocksDB checkpoint of that partition plus
//! `partition.json` (every file with its size and crc32, the checkpoint's applied index). Partition
//! directories are complete before `backup.json` names them, and `backup.json` is written last, so a
//! directory without it is an unfinished backup and is never restored. Every byte is checked against
//! the manifests before a restore writes anything, and again as a server copies it.

use crate::TernError;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The backup's own manifest, written last.
pub const BACKUP_MANIFEST: &str = "backup.json";
/// Each partition directory's manifest.
pub const PARTITION_MANIFEST: &str = "partition.json";
/// The layout version this code writes and reads.
pub const FORMAT: u32 = 1;
/// Bytes read or written at a time when copying.
const CHUNK_BYTES: usize = 1 << 20;
/// A copy syncs what it wrote every this many bytes.
const SYNC_EVERY_BYTES: u64 = 4 << 20;
/// A manifest larger than this is refused unread (a partition has a few hundred files at most).
const MANIFEST_BYTES_MAX: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupFile {
    pub name: String,
    pub size: u64,
    pub crc32: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionManifest {
    pub partition: u32,
    /// The raft index the checkpoint was taken at: every entry up to it, none after.
    pub applied_index: u64,
    pub files: Vec<BackupFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionEntry {
    pub partition: u32,
    pub applied_index: u64,
    pub bytes: u64,
    /// crc32 of the partition's `partition.json`.
    pub manifest_crc32: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupManifest {
    pub format: u32,
    pub table: String,
    pub table_id: u32,
    pub partition_count: u32,
    pub replica_count: u32,
    /// When the backup started and finished (unix milliseconds).
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub partitions: Vec<PartitionEntry>,
}

impl BackupManifest {
    pub fn bytes(&self) -> u64 {
        self.partitions.iter().map(|p| p.bytes).sum()
    }
}

/// The directory of partition `p` inside a backup.
pub fn partition_dir(backup: &Path, partition: u32) -> PathBuf {
    backup.join(format!("p{partition}"))
}

/// Where a backup goes: a local or mounted directory, given as an absolute path or a `file://` URI
/// (relative paths would mean another directory to each process that resolves them). Other schemes
/// are refused with the reason.
pub fn local_dir(uri: &str) -> Result<PathBuf, TernError> {
    let path = match uri.split_once("://") {
        None => uri,
        Some(("file", rest)) => rest,
        Some((scheme, _)) => {
            return Err(TernError::invalid(format!(
                "backup location {uri:?}: scheme {scheme:?} is not supported; give a directory every server can reach (a path or file:///path)"
            )))
        }
    };
    if path.is_empty() {
        return Err(TernError::invalid("backup location is empty"));
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(TernError::invalid(format!(
            "backup location {uri:?} is relative; give an absolute path (every server and meta node resolves it)"
        )));
    }
    Ok(path)
}

/// Paces a copy at `bytes_per_second` (0: unpaced) by sleeping the calling thread.
pub struct RateLimiter {
    bytes_per_second: u64,
    start: Instant,
    done: u64,
}

impl RateLimiter {
    pub fn new(bytes_per_second: u64) -> RateLimiter {
        RateLimiter { bytes_per_second, start: Instant::now(), done: 0 }
    }

    /// Counts `bytes` and sleeps until they are within the rate.
    pub fn pace(&mut self, bytes: u64) {
        self.done += bytes;
        if self.bytes_per_second == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.done as f64 / self.bytes_per_second as f64);
        if let Some(ahead) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

fn io_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> TernError {
    move |e| TernError::Internal(format!("{what}: {e}"))
}

/// Copies `src` to `dst` (created; synced before returning) at the limiter's pace, reporting bytes
/// as they go, and returns (size, crc32) of what it read. Stops with an error once `cancelled` says so.
pub fn copy_file(
    src: &Path,
    dst: &Path,
    limiter: &mut RateLimiter,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(u64),
) -> Result<(u64, u32), TernError> {
    let mut input = std::fs::File::open(src).map_err(io_error(format!("open {}", src.display())))?;
    let mut output = std::fs::File::create(dst).map_err(io_error(format!("create {}", dst.display())))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        if cancelled() {
            return Err(TernError::Unavailable("cancelled".into()));
        }
        let n = input.read(&mut buf).map_err(io_error(format!("read {}", src.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n]).map_err(io_error(format!("write {}", dst.display())))?;
        size += n as u64;
        if size % SYNC_EVERY_BYTES < n as u64 {
            // Written back a little at a time: one large sync at the end would queue the raft
            // log's syncs behind it.
            output.sync_data().map_err(io_error(format!("sync {}", dst.display())))?;
        }
        limiter.pace(n as u64);
        progress(n as u64);
    }
    output.sync_all().map_err(io_error(format!("sync {}", dst.display())))?;
    Ok((size, hasher.finalize()))
}

/// Writes `value` as JSON to `path` durably (a temporary file synced and renamed, the directory
/// synced) and returns the crc32 of the bytes written.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<u32, TernError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| TernError::Internal(format!("encode {}: {e}", path.display())))?;
    crate::files::write_file_atomically(path, &bytes).map_err(io_error(format!("write {}", path.display())))?;
    Ok(crc32fast::hash(&bytes))
}

/// Reads a manifest, returning it with the crc32 of its bytes.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path, missing: &str) -> Result<(T, u32), TernError> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(TernError::invalid(format!("{missing}: {} is missing", path.display()))),
        Err(e) => return Err(io_error(format!("stat {}", path.display()))(e)),
    };
    if len > MANIFEST_BYTES_MAX {
        return Err(TernError::Corruption(format!("{} is {len} bytes; a manifest is at most {MANIFEST_BYTES_MAX}", path.display())));
    }
    let bytes = std::fs::read(path).map_err(io_error(format!("read {}", path.display())))?;
    let value = serde_json::from_slice(&bytes).map_err(|e| TernError::Corruption(format!("{} is not a valid manifest: {e}", path.display())))?;
    Ok((value, crc32fast::hash(&bytes)))
}

/// Reads a backup's `backup.json` and checks it is whole (one entry per partition, in order).
pub fn read_backup_manifest(backup: &Path) -> Result<BackupManifest, TernError> {
    if !backup.is_dir() {
        return Err(TernError::invalid(format!("no backup at {}: not a directory", backup.display())));
    }
    let (m, _): (BackupManifest, u32) = read_json(&backup.join(BACKUP_MANIFEST), &format!("{} is not a finished backup", backup.display()))?;
    if m.format != FORMAT {
        return Err(TernError::invalid(format!("backup {} has layout version {}; this build reads {FORMAT}", backup.display(), m.format)));
    }
    let path = backup.join(BACKUP_MANIFEST);
    if m.partitions.len() != m.partition_count as usize {
        return Err(TernError::Corruption(format!(
            "{} lists {} partition entries for a table of {} partitions",
            path.display(),
            m.partitions.len(),
            m.partition_count
        )));
    }
    if let Some((i, p)) = m.partitions.iter().enumerate().find(|(i, p)| p.partition != *i as u32) {
        return Err(TernError::Corruption(format!(
            "{}: entry {i} is for partition {}; entries must be in partition order",
            path.display(),
            p.partition
        )));
    }
    crate::limits::check_partition_count(m.partition_count).map_err(|e| TernError::Corruption(format!("{}: {e}", path.display())))?;
    Ok(m)
}

/// Size and crc32 of a file, read in full.
fn digest(path: &Path) -> Result<(u64, u32), TernError> {
    let mut input = std::fs::File::open(path).map_err(io_error(format!("open {}", path.display())))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io_error(format!("read {}", path.display())))?;
        if n == 0 {
            return Ok((size, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
}

/// Reads a partition directory's manifest and checks it is the one `backup.json` names (by crc32)
/// and that the directory holds exactly the files it lists. With `checksums`, every file is read
/// and its crc32 compared too. The error names the first bad file.
pub fn verify_partition(dir: &Path, entry: &PartitionEntry, checksums: bool) -> Result<PartitionManifest, TernError> {
    let path = dir.join(PARTITION_MANIFEST);
    let (m, crc): (PartitionManifest, u32) = read_json(&path, &format!("partition {} of the backup is incomplete", entry.partition))?;
    if crc != entry.manifest_crc32 {
        return Err(TernError::Corruption(format!(
            "{} is not the manifest {BACKUP_MANIFEST} names (crc32 {crc:08x}, expected {:08x})",
            path.display(),
            entry.manifest_crc32
        )));
    }
    if (m.partition, m.applied_index) != (entry.partition, entry.applied_index) {
        return Err(TernError::Corruption(format!(
            "{} describes partition {} at index {}; {BACKUP_MANIFEST} says partition {} at index {}",
            path.display(),
            m.partition,
            m.applied_index,
            entry.partition,
            entry.applied_index
        )));
    }
    let mut present = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_error(format!("list {}", dir.display())))? {
        let name = e.map_err(io_error(format!("list {}", dir.display())))?.file_name().to_string_lossy().into_owned();
        if name != PARTITION_MANIFEST {
            present.push(name);
        }
    }
    for f in &m.files {
        let file = dir.join(&f.name);
        let Some(at) = present.iter().position(|p| *p == f.name) else {
            return Err(TernError::Corruption(format!("backup file {} is missing", file.display())));
        };
        present.swap_remove(at);
        let (size, crc32) =
            if checksums { digest(&file)? } else { (std::fs::metadata(&file).map_err(io_error(format!("stat {}", file.display())))?.len(), f.crc32) };
        if (size, crc32) != (f.size, f.crc32) {
            return Err(TernError::Corruption(format!(
                "backup file {} is {size} bytes with crc32 {crc32:08x}; its manifest says {} bytes, {:08x}",
                file.display(),
                f.size,
                f.crc32
            )));
        }
    }
    if let Some(extra) = present.first() {
        return Err(TernError::Corruption(format!("backup file {} is not in its manifest", dir.join(extra).display())));
    }
    Ok(m)
}

/// Checks a whole backup: its manifest and every partition's files, reading every byte.
pub fn verify_backup(backup: &Path) -> Result<BackupManifest, TernError> {
    let m = read_backup_manifest(backup)?;
    for p in &m.partitions {
        verify_partition(&partition_dir(backup, p.partition), p, true)?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup_with_one_partition(root: &Path) -> PathBuf {
        let b = root.join("b");
        let p = partition_dir(&b, 0);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("000001.sst"), vec![7u8; 5000]).unwrap();
        std::fs::write(p.join("CURRENT"), b"MANIFEST-000002\n").unwrap();
        let files = ["000001.sst", "CURRENT"]
            .iter()
            .map(|n| {
                let (size, crc32) = digest(&p.join(n)).unwrap();
                BackupFile { name: n.to_string(), size, crc32 }
            })
            .collect();
        let pm = PartitionManifest { partition: 0, applied_index: 9, files };
        let manifest_crc32 = write_json(&p.join(PARTITION_MANIFEST), &pm).unwrap();
        let entry = PartitionEntry { partition: 0, applied_index: 9, bytes: 5016, manifest_crc32 };
        let m = BackupManifest {
            format: FORMAT,
            table: "t".into(),
            table_id: 1,
            partition_count: 1,
            replica_count: 3,
            started_unix_ms: 1,
            finished_unix_ms: 2,
            partitions: vec![entry],
        };
        write_json(&b.join(BACKUP_MANIFEST), &m).unwrap();
        b
    }

    /// A whole backup verifies. One without `backup.json`, with a file changed (same size), cut
    /// short, missing or unlisted, or with a partition manifest that is not the one `backup.json`
    /// names, is refused with the bad file's name.
    #[test]
    fn bad_backups_are_refused_naming_the_file() {
        let t = tempfile::tempdir().unwrap();
        let b = backup_with_one_partition(t.path());
        assert_eq!(verify_backup(&b).unwrap().bytes(), 5016);
        let sst = partition_dir(&b, 0).join("000001.sst");

        std::fs::write(&sst, vec![8u8; 5000]).unwrap();
        let e = verify_backup(&b).unwrap_err().to_string();
        assert!(e.contains("000001.sst") && e.contains("crc32"), "{e}");
        std::fs::write(&sst, vec![7u8; 4000]).unwrap();
        assert!(verify_backup(&b).unwrap_err().to_string().contains("000001.sst"));
        std::fs::remove_file(&sst).unwrap();
        assert!(verify_backup(&b).unwrap_err().to_string().contains("000001.sst is missing"));
        std::fs::write(&sst, vec![7u8; 5000]).unwrap();
        verify_backup(&b).unwrap();

        let extra = partition_dir(&b, 0).join("000009.sst");
        std::fs::write(&extra, b"x").unwrap();
        assert!(verify_backup(&b).unwrap_err().to_string().contains("000009.sst"));
        std::fs::remove_file(&extra).unwrap();

        let pm = partition_dir(&b, 0).join(PARTITION_MANIFEST);
        let original = std::fs::read(&pm).unwrap();
        std::fs::write(&pm, String::from_utf8(original.clone()).unwrap().replace("\"size\": 5000", "\"size\": 5001")).unwrap();
        assert!(verify_backup(&b).unwrap_err().to_string().contains(PARTITION_MANIFEST));
        std::fs::write(&pm, original).unwrap();
        verify_backup(&b).unwrap();

        std::fs::remove_file(b.join(BACKUP_MANIFEST)).unwrap();
        let e = verify_backup(&b).unwrap_err().to_string();
        assert!(e.contains("not a finished backup"), "{e}");
    }

    #[test]
    fn locations() {
        assert_eq!(local_dir("/tmp/x").unwrap(), PathBuf::from("/tmp/x"));
        assert_eq!(local_dir("file:///tmp/x").unwrap(), PathBuf::from("/tmp/x"));
        assert!(local_dir("s3://bucket/x").unwrap_err().to_string().contains("s3"));
        assert!(local_dir("").is_err());
        assert!(local_dir("backups").unwrap_err().to_string().contains("absolute"));
        assert!(local_dir("file://x/y").is_err());
    }

    /// A copy reports its bytes and checksum, is paced, and stops when cancelled.
    #[test]
    fn copies_are_checksummed_paced_and_cancellable() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::write(&src, vec![3u8; 300_000]).unwrap();
        let mut seen = 0;
        let start = Instant::now();
        let mut limiter = RateLimiter::new(1_000_000);
        let (size, crc) = copy_file(&src, &t.path().join("dst"), &mut limiter, &|| false, &mut |n| seen += n).unwrap();
        assert_eq!((size, seen, crc), (300_000, 300_000, crc32fast::hash(&vec![3u8; 300_000])));
        assert!(start.elapsed() >= Duration::from_millis(250), "paced at 1 MB/s");
        assert_eq!(std::fs::read(t.path().join("dst")).unwrap().len(), 300_000);
        let cancelled = copy_file(&src, &t.path().join("dst2"), &mut RateLimiter::new(0), &|| true, &mut |_| {});
        assert!(cancelled.is_err());
    }
}
