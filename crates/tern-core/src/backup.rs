//! The layout of a cold backup: names, manifest types, what a backup location may be, and the
//! checks that need no storage. Moving bytes is `tern_backup`'s (local directories and
//! S3-compatible object stores); meta uses this module alone to check policies.
//!
//! A backup is a place (a directory, or a prefix in a bucket) holding `backup.json` (table,
//! partition count, one entry per partition) and, per partition, a place named by its entry
//! (`pN.ATTEMPT`: each attempt writes its own, so a late attempt never mixes its files into another
//! one's) with a RocksDB checkpoint of that partition and `partition.json` (every file with its size
//! and crc32, the checkpoint's applied index). `partition.json` is written after its files and
//! `backup.json` last, so a backup without `backup.json` is unfinished and is never restored.

use crate::TernError;
use std::path::PathBuf;

/// The backup's own manifest, written last.
pub const BACKUP_MANIFEST: &str = "backup.json";
/// Each partition directory's manifest.
pub const PARTITION_MANIFEST: &str = "partition.json";
/// The layout version this code writes and reads.
pub const FORMAT: u32 = 2;
/// Longest backup location.
pub const LOCATION_BYTES_MAX: usize = 4096;

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
    /// The place under the backup holding this partition's files.
    pub dir: String,
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
        self.partitions.iter().fold(0u64, |sum, p| sum.saturating_add(p.bytes))
    }
}

/// Where backups go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local or mounted directory (absolute).
    Local(PathBuf),
    /// A prefix (possibly empty) of a bucket of an S3-compatible object store.
    S3 { bucket: String, prefix: String },
}

/// Parses a backup location: an absolute path, `file:///abs/path`, or `s3://bucket[/prefix]`.
/// Relative paths are refused: each process would resolve them somewhere else.
pub fn parse_location(uri: &str) -> Result<Location, TernError> {
    if uri.is_empty() {
        return Err(TernError::invalid("backup location is empty"));
    }
    if uri.len() > LOCATION_BYTES_MAX {
        return Err(TernError::invalid(format!("backup location is {} bytes; the limit is {LOCATION_BYTES_MAX}", uri.len())));
    }
    match uri.split_once("://") {
        None | Some(("file", _)) => {
            let path = PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri));
            if !path.is_absolute() {
                return Err(TernError::invalid(format!(
                    "backup location {uri:?} is relative; give an absolute path (every server and meta node resolves it)"
                )));
            }
            Ok(Location::Local(path))
        }
        Some(("s3", rest)) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(TernError::invalid(format!("backup location {uri:?} names no bucket (s3://BUCKET/PREFIX)")));
            }
            Ok(Location::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() })
        }
        Some((scheme, _)) => Err(TernError::invalid(format!(
            "backup location {uri:?}: scheme {scheme:?} is not supported; give an absolute path, file:///path or s3://bucket/prefix"
        ))),
    }
}

/// The place of one attempt at backing up partition `p` (`attempt` is unique to the attempt).
pub fn partition_dir(partition: u32, attempt: &str) -> String {
    format!("p{partition}.{attempt}")
}

/// Checks a `backup.json` is whole: one entry per partition, in order, a valid partition count.
pub fn check_backup_manifest(m: &BackupManifest, shown: &str) -> Result<(), TernError> {
    crate::limits::check_partition_count(m.partition_count).map_err(|e| TernError::Corruption(format!("{shown}: {e}")))?;
    if m.partitions.len() != m.partition_count as usize {
        return Err(TernError::Corruption(format!(
            "{shown} lists {} partition entries for a table of {} partitions",
            m.partitions.len(),
            m.partition_count
        )));
    }
    if let Some((i, p)) = m.partitions.iter().enumerate().find(|(i, p)| p.partition != *i as u32) {
        return Err(TernError::Corruption(format!("{shown}: entry {i} is for partition {}; entries must be in partition order", p.partition)));
    }
    if let Some(p) = m.partitions.iter().find(|p| p.dir.is_empty() || p.dir.contains('/') || p.dir.starts_with('.')) {
        return Err(TernError::Corruption(format!("{shown}: partition {} has the place {:?}, not a plain name", p.partition, p.dir)));
    }
    Ok(())
}

/// Checks a partition's manifest (whose bytes have crc32 `crc`) is the one `entry` names.
pub fn check_partition_manifest(m: &PartitionManifest, crc: u32, entry: &PartitionEntry, shown: &str) -> Result<(), TernError> {
    if crc != entry.manifest_crc32 {
        return Err(TernError::Corruption(format!(
            "{shown} is not the manifest {BACKUP_MANIFEST} names (crc32 {crc:08x}, expected {:08x})",
            entry.manifest_crc32
        )));
    }
    if (m.partition, m.applied_index) != (entry.partition, entry.applied_index) {
        return Err(TernError::Corruption(format!(
            "{shown} describes partition {} at index {}; {BACKUP_MANIFEST} says partition {} at index {}",
            m.partition, m.applied_index, entry.partition, entry.applied_index
        )));
    }
    if let Some(f) = m.files.iter().find(|f| matches!(f.name.as_str(), "" | "." | ".." | PARTITION_MANIFEST) || f.name.contains('/')) {
        return Err(TernError::Corruption(format!("{shown} lists a file named {:?}", f.name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(parse_location("/tmp/x").unwrap(), Location::Local(PathBuf::from("/tmp/x")));
        assert_eq!(parse_location("file:///tmp/x").unwrap(), Location::Local(PathBuf::from("/tmp/x")));
        assert_eq!(parse_location("s3://bucket/a/b/").unwrap(), Location::S3 { bucket: "bucket".into(), prefix: "a/b".into() });
        assert_eq!(parse_location("s3://bucket").unwrap(), Location::S3 { bucket: "bucket".into(), prefix: String::new() });
        assert!(parse_location("s3:///x").unwrap_err().to_string().contains("bucket"));
        assert!(parse_location("gs://bucket/x").unwrap_err().to_string().contains("gs"));
        assert!(parse_location("").is_err());
        assert!(parse_location("backups").unwrap_err().to_string().contains("absolute"));
        assert!(parse_location("file://x/y").is_err());
        assert!(parse_location(&format!("/{}", "x".repeat(5000))).is_err());
    }

    /// Manifests out of order, short, with odd places or file names, or not the one named, are refused.
    #[test]
    fn manifest_checks() {
        let entry = |partition, dir: &str| PartitionEntry { partition, dir: dir.into(), applied_index: 5, bytes: 1, manifest_crc32: 7 };
        let mut m = BackupManifest {
            format: FORMAT,
            table: "t".into(),
            table_id: 1,
            partition_count: 2,
            replica_count: 3,
            started_unix_ms: 1,
            finished_unix_ms: 2,
            partitions: vec![entry(0, "p0.a"), entry(1, "p1.b")],
        };
        check_backup_manifest(&m, "b").unwrap();
        m.partitions.swap(0, 1);
        assert!(check_backup_manifest(&m, "b").unwrap_err().to_string().contains("order"));
        m.partitions = vec![entry(0, "p0.a"), entry(1, "../x")];
        assert!(check_backup_manifest(&m, "b").is_err());
        m.partitions.pop();
        assert!(check_backup_manifest(&m, "b").unwrap_err().to_string().contains("1 partition entries"));
        m.partition_count = 3;
        m.partitions = vec![entry(0, "a"), entry(1, "b"), entry(2, "c")];
        assert!(check_backup_manifest(&m, "b").is_err(), "not a power of two");

        let pm = PartitionManifest { partition: 0, applied_index: 5, files: vec![BackupFile { name: "x.sst".into(), size: 1, crc32: 2 }] };
        check_partition_manifest(&pm, 7, &entry(0, "p0.a"), "p").unwrap();
        assert!(check_partition_manifest(&pm, 8, &entry(0, "p0.a"), "p").unwrap_err().to_string().contains("crc32"));
        assert!(check_partition_manifest(&pm, 7, &entry(1, "p1.a"), "p").unwrap_err().to_string().contains("partition 0"));
        let bad = PartitionManifest { files: vec![BackupFile { name: "../../etc".into(), size: 1, crc32: 2 }], ..pm };
        assert!(check_partition_manifest(&bad, 7, &entry(0, "p0.a"), "p").is_err());
    }
}
