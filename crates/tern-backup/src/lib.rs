//! Where cold backups live, and the checks on what is there.
//!
//! Owns: `Target`, a backup location (a local or mounted directory, or a prefix of an S3-compatible
//! bucket) behind one interface built on the `object_store` crate: paced, checksummed uploads and
//! downloads of files, small JSON manifests, listing and removal; and the checks of a backup
//! against its manifests (`read_backup_manifest`, `verify_partition`). The layout itself (names,
//! manifest types, what a location string may be) is `tern_core::backup`, which meta uses without
//! this crate. Used by the servers (which copy data) and the client's backup coordinator. Must not
//! depend on raft, the engine, the servers or the client.
//!
//! S3 credentials and endpoint come from the environment of every process that touches a backup
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for a server other
//! than AWS, `AWS_ALLOW_HTTP=true` for a plain-HTTP one).

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::Deserialize as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_core::backup::{BackupManifest, Location, PartitionEntry, PartitionManifest, BACKUP_MANIFEST, FORMAT, PARTITION_MANIFEST};
use tern_core::TernError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes read from a local file at a time for an upload.
const CHUNK_BYTES: usize = 1 << 20;
/// A manifest larger than this is refused unread (a partition has a few hundred files at most).
const MANIFEST_BYTES_MAX: u64 = 16 << 20;

/// Object store errors are final here: the store retried what it could itself (with backoff), and
/// what is left (credentials, a missing bucket, a server that keeps failing) is for an operator.
fn store_error(what: impl std::fmt::Display) -> impl FnOnce(object_store::Error) -> TernError {
    move |e| match e {
        object_store::Error::NotFound { .. } => TernError::invalid(format!("{what}: not found")),
        e => TernError::Internal(format!("{what}: {e}")),
    }
}

fn io_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> TernError {
    move |e| TernError::Internal(format!("{what}: {e}"))
}

/// Paces a copy at `bytes_per_second` (0: unpaced).
pub struct Pacer {
    bytes_per_second: u64,
    start: Instant,
    done: u64,
}

impl Pacer {
    pub fn new(bytes_per_second: u64) -> Pacer {
        Pacer { bytes_per_second, start: Instant::now(), done: 0 }
    }

    /// Counts `bytes`; how far ahead of the rate that puts the copy.
    fn count(&mut self, bytes: u64) -> Option<Duration> {
        self.done += bytes;
        if self.bytes_per_second == 0 {
            return None;
        }
        let due = Duration::from_secs_f64(self.done as f64 / self.bytes_per_second as f64);
        due.checked_sub(self.start.elapsed())
    }

    /// Counts `bytes` and waits until they are within the rate.
    pub async fn pace(&mut self, bytes: u64) {
        if let Some(ahead) = self.count(bytes) {
            tokio::time::sleep(ahead).await;
        }
    }

    /// `pace` for a blocking thread.
    pub fn pace_blocking(&mut self, bytes: u64) {
        if let Some(ahead) = self.count(bytes) {
            std::thread::sleep(ahead);
        }
    }
}

/// A backup location: a directory, or a prefix in a bucket. Cheap to clone; `child` names a place
/// under it.
#[derive(Clone)]
pub struct Target {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// For a local directory: where this place is on disk (object_store does not sync files).
    local: Option<std::path::PathBuf>,
    /// How to show it: the location as given, with the child names appended.
    shown: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Target {
    /// Opens a location to read (`/abs/path`, `file:///abs/path` or `s3://bucket/prefix`); a local
    /// directory must exist.
    pub fn open(uri: &str) -> Result<Target, TernError> {
        Self::open_with(uri, false)
    }

    /// Opens a location to write into, creating a local directory if it is missing.
    pub fn create(uri: &str) -> Result<Target, TernError> {
        Self::open_with(uri, true)
    }

    fn open_with(uri: &str, create: bool) -> Result<Target, TernError> {
        let (store, prefix, local): (Arc<dyn ObjectStore>, ObjectPath, _) = match tern_core::backup::parse_location(uri)? {
            Location::Local(dir) => {
                if create {
                    std::fs::create_dir_all(&dir).map_err(io_error(format!("create {}", dir.display())))?;
                } else if !dir.is_dir() {
                    return Err(TernError::invalid(format!("backup location {}: no such directory", dir.display())));
                }
                // Synced like a remote store's acknowledged writes: files before their rename into
                // place, and the directories naming them.
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| TernError::invalid(format!("backup location {uri:?}: {e}")))?
                    .with_automatic_cleanup(true)
                    .with_fsync(true);
                (Arc::new(fs), ObjectPath::default(), Some(dir))
            }
            Location::S3 { bucket, prefix } => {
                // Every upload carries its SHA-256, which the store checks (on plain HTTP nothing
                // else would catch bytes changed on the way).
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
                    .build()
                    .map_err(|e| TernError::invalid(format!("backup location {uri:?}: {e}")))?;
                (Arc::new(s3), ObjectPath::from(prefix.as_str()), None)
            }
        };
        Ok(Target { store, prefix, local, shown: uri.trim_end_matches('/').to_string() })
    }

    /// The place `name` under this one.
    pub fn child(&self, name: &str) -> Target {
        Target {
            store: self.store.clone(),
            prefix: self.path(name),
            local: self.local.as_ref().map(|d| d.join(name)),
            shown: format!("{}/{name}", self.shown),
        }
    }

    fn path(&self, name: &str) -> ObjectPath {
        self.prefix.clone().join(name)
    }

    /// Uploads a local file as `name`, at the pacer's rate, reporting bytes as they go; returns
    /// (size, crc32) of what it read. Stops with an error once `cancelled` says so.
    pub async fn upload(
        &self,
        name: &str,
        local: &Path,
        pacer: &mut Pacer,
        cancelled: &(dyn Fn() -> bool + Sync),
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(u64, u32), TernError> {
        let mut input = tokio::fs::File::open(local).await.map_err(io_error(format!("open {}", local.display())))?;
        let upload = self.store.put_multipart(&self.path(name)).await.map_err(store_error(format!("upload {self}/{name}")))?;
        let mut writer = WriteMultipart::new(upload);
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut size = 0u64;
        let result: Result<(), TernError> = async {
            loop {
                if cancelled() {
                    return Err(TernError::Unavailable("cancelled".into()));
                }
                let n = input.read(&mut buf).await.map_err(io_error(format!("read {}", local.display())))?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                writer.wait_for_capacity(4).await.map_err(store_error(format!("upload {self}/{name}")))?;
                writer.write(&buf[..n]);
                size += n as u64;
                pacer.pace(n as u64).await;
                progress(n as u64);
            }
        }
        .await;
        match result {
            Ok(()) => {
                writer.finish().await.map_err(store_error(format!("upload {self}/{name}")))?;
                Ok((size, hasher.finalize()))
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Downloads `name` into a new local file, at the pacer's rate; returns (size, crc32) of what
    /// it wrote (synced before returning).
    pub async fn download(
        &self,
        name: &str,
        local: &Path,
        pacer: &mut Pacer,
        cancelled: &(dyn Fn() -> bool + Sync),
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(u64, u32), TernError> {
        let got = self.store.get(&self.path(name)).await.map_err(store_error(format!("read {self}/{name}")))?;
        let mut stream = got.into_stream();
        let mut output = tokio::fs::File::create(local).await.map_err(io_error(format!("create {}", local.display())))?;
        let mut hasher = crc32fast::Hasher::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            if cancelled() {
                return Err(TernError::Unavailable("cancelled".into()));
            }
            let chunk = chunk.map_err(store_error(format!("read {self}/{name}")))?;
            hasher.update(&chunk);
            output.write_all(&chunk).await.map_err(io_error(format!("write {}", local.display())))?;
            size += chunk.len() as u64;
            pacer.pace(chunk.len() as u64).await;
            progress(chunk.len() as u64);
        }
        // flush first: tokio's write_all may return before the write happened, and sync_all would
        // not report its error.
        output.flush().await.map_err(io_error(format!("write {}", local.display())))?;
        output.sync_all().await.map_err(io_error(format!("sync {}", local.display())))?;
        Ok((size, hasher.finalize()))
    }

    /// Writes `value` as JSON to `name` (atomically: whole or not at all; refused if `name` exists
    /// already) and returns the crc32 of the bytes written.
    pub async fn put_json(&self, name: &str, value: &impl serde::Serialize) -> Result<u32, TernError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| TernError::Internal(format!("encode {self}/{name}: {e}")))?;
        let crc = crc32fast::hash(&bytes);
        let options = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
        self.store
            .put_opts(&self.path(name), PutPayload::from(Bytes::from(bytes)), options)
            .await
            .map_err(store_error(format!("write {self}/{name}")))?;
        Ok(crc)
    }

    /// Reads a JSON manifest with the crc32 of its bytes; None if it does not exist.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<(T, u32)>, TernError> {
        let path = self.path(name);
        let meta = match self.store.head(&path).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_error(format!("read {self}/{name}"))(e)),
        };
        if meta.size > MANIFEST_BYTES_MAX {
            return Err(TernError::Corruption(format!("{self}/{name} is {} bytes; a manifest is at most {MANIFEST_BYTES_MAX}", meta.size)));
        }
        let bytes = self.store.get(&path).await.map_err(store_error(format!("read {self}/{name}")))?;
        let bytes = bytes.bytes().await.map_err(store_error(format!("read {self}/{name}")))?;
        let value = serde_json::from_slice(&bytes).map_err(|e| TernError::Corruption(format!("{self}/{name} is not a valid manifest: {e}")))?;
        Ok(Some((value, crc32fast::hash(&bytes))))
    }

    /// The objects directly under this place: (name, size), sorted.
    pub async fn files(&self) -> Result<Vec<(String, u64)>, TernError> {
        let listed = self.store.list_with_delimiter(Some(&self.prefix)).await.map_err(store_error(format!("list {self}")))?;
        // A "folder marker" (an empty object named like this place, made by some S3 tools) is not
        // a file here.
        let mut files: Vec<(String, u64)> = listed
            .objects
            .into_iter()
            .filter(|o| o.location != self.prefix)
            .filter_map(|o| o.location.filename().map(|n| (n.to_string(), o.size)))
            .collect();
        files.sort();
        Ok(files)
    }

    /// The names of the places directly under this one (directories, or common prefixes), sorted.
    pub async fn children(&self) -> Result<Vec<String>, TernError> {
        let listed = self.store.list_with_delimiter(Some(&self.prefix)).await.map_err(store_error(format!("list {self}")))?;
        let mut names: Vec<String> = listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        names.sort();
        Ok(names)
    }

    /// Removes `name` (a missing one is not an error).
    pub async fn remove(&self, name: &str) -> Result<(), TernError> {
        match self.store.delete(&self.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(format!("remove {self}/{name}"))(e)),
        }
    }

    /// Removes everything under this place.
    pub async fn remove_all(&self) -> Result<(), TernError> {
        let mut listed = self.store.list(Some(&self.prefix));
        let mut paths = Vec::new();
        while let Some(meta) = listed.next().await {
            match meta {
                Ok(m) => paths.push(m.location),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(format!("list {self}"))(e)),
            }
        }
        for p in paths {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(format!("remove {p}"))(e)),
            }
        }
        // On a disk, also what object_store does not list: empty directories, and the staging
        // files of uploads a crash cut short.
        if let Some(dir) = self.local.clone() {
            tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_error(format!("remove {}", dir.display()))(e)),
            })
            .await
            .map_err(|e| TernError::Internal(format!("remove task: {e}")))??;
        }
        Ok(())
    }
}

/// Reads a backup's `backup.json` and checks it is whole. Err if it is missing (an unfinished
/// backup) or damaged; the message says which.
pub async fn read_backup_manifest(backup: &Target) -> Result<BackupManifest, TernError> {
    #[derive(serde::Deserialize)]
    struct Format {
        format: u32,
    }
    let Some((value, _)) = backup.get_json::<serde_json::Value>(BACKUP_MANIFEST).await? else {
        return Err(TernError::invalid(format!("{backup} is not a finished backup: {BACKUP_MANIFEST} is missing")));
    };
    // The layout version first, so that another version's backup is named as such.
    match Format::deserialize(&value) {
        Ok(f) if f.format == FORMAT => {}
        Ok(f) => return Err(TernError::invalid(format!("backup {backup} has layout version {}; this build reads {FORMAT}", f.format))),
        Err(e) => return Err(TernError::Corruption(format!("{backup}/{BACKUP_MANIFEST} is not a valid manifest: {e}"))),
    }
    let m: BackupManifest =
        serde_json::from_value(value).map_err(|e| TernError::Corruption(format!("{backup}/{BACKUP_MANIFEST} is not a valid manifest: {e}")))?;
    tern_core::backup::check_backup_manifest(&m, &format!("{backup}/{BACKUP_MANIFEST}"))?;
    Ok(m)
}

/// Reads a partition's manifest and checks it is the one `backup.json` names (by crc32) and that
/// its directory holds exactly the files it lists, with their sizes. The error names the first
/// bad file. (Checksums are checked as the files are read: `Target::download`.)
pub async fn verify_partition(backup: &Target, entry: &PartitionEntry) -> Result<PartitionManifest, TernError> {
    let dir = backup.child(&entry.dir);
    let Some((m, crc)) = dir.get_json::<PartitionManifest>(PARTITION_MANIFEST).await? else {
        return Err(TernError::invalid(format!("partition {} of the backup is incomplete: {dir}/{PARTITION_MANIFEST} is missing", entry.partition)));
    };
    tern_core::backup::check_partition_manifest(&m, crc, entry, &format!("{dir}/{PARTITION_MANIFEST}"))?;
    let mut present: Vec<(String, u64)> = dir.files().await?.into_iter().filter(|(n, _)| n != PARTITION_MANIFEST).collect();
    for f in &m.files {
        let Some(at) = present.iter().position(|(n, _)| *n == f.name) else {
            return Err(TernError::Corruption(format!("backup file {dir}/{} is missing", f.name)));
        };
        let (_, size) = present.swap_remove(at);
        if size != f.size {
            return Err(TernError::Corruption(format!("backup file {dir}/{} is {size} bytes; its manifest says {}", f.name, f.size)));
        }
    }
    if let Some((extra, _)) = present.first() {
        return Err(TernError::Corruption(format!("backup file {dir}/{extra} is not in its manifest")));
    }
    Ok(m)
}

/// Checks a whole backup's manifests and files (sizes; checksums are checked when files are read).
pub async fn verify_backup(backup: &Target) -> Result<BackupManifest, TernError> {
    let m = read_backup_manifest(backup).await?;
    for p in &m.partitions {
        verify_partition(backup, p).await?;
    }
    Ok(m)
}

/// Downloads a partition's files into `local` (created), checking each one's size and crc32
/// against the manifest; the error names the file that differs.
pub async fn download_partition(
    backup: &Target,
    entry: &PartitionEntry,
    files: &PartitionManifest,
    local: &Path,
    pacer: &mut Pacer,
    cancelled: &(dyn Fn() -> bool + Sync),
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), TernError> {
    let dir = backup.child(&entry.dir);
    tokio::fs::create_dir(local).await.map_err(io_error(format!("create {}", local.display())))?;
    for f in &files.files {
        let got = dir.download(&f.name, &local.join(&f.name), pacer, cancelled, progress).await?;
        if got != (f.size, f.crc32) {
            return Err(TernError::Corruption(format!(
                "backup file {dir}/{} is {} bytes with crc32 {:08x}; its manifest says {} bytes, {:08x}",
                f.name, got.0, got.1, f.size, f.crc32
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::backup::BackupFile;

    async fn backup_with_one_partition(root: &Target, local: &Path) -> Target {
        let b = root.child("t-1");
        let p = b.child("p0.a");
        std::fs::write(local.join("000001.sst"), vec![7u8; 5000]).unwrap();
        std::fs::write(local.join("CURRENT"), b"MANIFEST-000002\n").unwrap();
        let mut files = Vec::new();
        for n in ["000001.sst", "CURRENT"] {
            let (size, crc32) = p.upload(n, &local.join(n), &mut Pacer::new(0), &|| false, &mut |_| {}).await.unwrap();
            files.push(BackupFile { name: n.to_string(), size, crc32 });
        }
        let pm = PartitionManifest { partition: 0, applied_index: 9, files };
        let manifest_crc32 = p.put_json(PARTITION_MANIFEST, &pm).await.unwrap();
        let entry = PartitionEntry { partition: 0, dir: "p0.a".into(), applied_index: 9, bytes: 5016, manifest_crc32 };
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
        b.put_json(BACKUP_MANIFEST, &m).await.unwrap();
        b
    }

    /// A whole backup verifies and downloads. One without `backup.json`, with a file cut short,
    /// missing or unlisted, or with a partition manifest that is not the one `backup.json` names,
    /// is refused with the bad file's name; a file changed in place is caught by its checksum as
    /// it is downloaded.
    #[tokio::test]
    async fn bad_backups_are_refused_naming_the_file() {
        let t = tempfile::tempdir().unwrap();
        let local = t.path().join("local");
        std::fs::create_dir(&local).unwrap();
        let root = Target::create(&t.path().join("root").to_string_lossy()).unwrap();
        let b = backup_with_one_partition(&root, &local).await;
        let m = verify_backup(&b).await.unwrap();
        assert_eq!(m.bytes(), 5016);
        assert_eq!(root.children().await.unwrap(), vec!["t-1".to_string()]);
        let sst = t.path().join("root/t-1/p0.a/000001.sst");
        let entry = &m.partitions[0];
        let pm = verify_partition(&b, entry).await.unwrap();
        download_partition(&b, entry, &pm, &t.path().join("d1"), &mut Pacer::new(0), &|| false, &mut |_| {}).await.unwrap();

        std::fs::write(&sst, vec![8u8; 5000]).unwrap();
        verify_backup(&b).await.unwrap();
        let e = download_partition(&b, entry, &pm, &t.path().join("d2"), &mut Pacer::new(0), &|| false, &mut |_| {}).await.unwrap_err();
        assert!(e.to_string().contains("000001.sst") && e.to_string().contains("crc32"), "{e}");
        std::fs::write(&sst, vec![7u8; 4000]).unwrap();
        assert!(verify_backup(&b).await.unwrap_err().to_string().contains("000001.sst"));
        std::fs::remove_file(&sst).unwrap();
        assert!(verify_backup(&b).await.unwrap_err().to_string().contains("000001.sst is missing"));
        std::fs::write(&sst, vec![7u8; 5000]).unwrap();
        verify_backup(&b).await.unwrap();

        let extra = t.path().join("root/t-1/p0.a/000009.sst");
        std::fs::write(&extra, b"x").unwrap();
        assert!(verify_backup(&b).await.unwrap_err().to_string().contains("000009.sst"));
        std::fs::remove_file(&extra).unwrap();

        let pm_path = t.path().join("root/t-1/p0.a").join(PARTITION_MANIFEST);
        let original = std::fs::read(&pm_path).unwrap();
        std::fs::write(&pm_path, String::from_utf8(original.clone()).unwrap().replace("\"size\": 5000", "\"size\": 5001")).unwrap();
        assert!(verify_backup(&b).await.unwrap_err().to_string().contains(PARTITION_MANIFEST));
        std::fs::write(&pm_path, original).unwrap();
        verify_backup(&b).await.unwrap();

        b.remove(BACKUP_MANIFEST).await.unwrap();
        let e = verify_backup(&b).await.unwrap_err().to_string();
        assert!(e.contains("not a finished backup"), "{e}");
        b.remove_all().await.unwrap();
        assert!(b.files().await.unwrap().is_empty());
    }

    /// An upload reports its bytes and checksum, is paced, and stops when cancelled.
    #[tokio::test]
    async fn uploads_are_checksummed_paced_and_cancellable() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::write(&src, vec![3u8; 300_000]).unwrap();
        let root = Target::create(&t.path().join("root").to_string_lossy()).unwrap();
        let mut seen = 0;
        let start = Instant::now();
        let (size, crc) = root.upload("f", &src, &mut Pacer::new(1_000_000), &|| false, &mut |n| seen += n).await.unwrap();
        assert_eq!((size, seen, crc), (300_000, 300_000, crc32fast::hash(&vec![3u8; 300_000])));
        assert!(start.elapsed() >= Duration::from_millis(250), "paced at 1 MB/s");
        assert_eq!(std::fs::read(t.path().join("root/f")).unwrap().len(), 300_000);
        assert!(root.upload("g", &src, &mut Pacer::new(0), &|| true, &mut |_| {}).await.is_err());
        assert_eq!(root.files().await.unwrap(), vec![("f".to_string(), 300_000)], "a cancelled upload leaves nothing");
    }
}
