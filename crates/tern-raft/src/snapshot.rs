//! Snapshot files: a checkpoint directory plus a manifest naming every file with its size and crc32.
//! The sender builds the manifest when it starts a transfer (off the store thread: it reads every
//! byte) and sends it ahead of the files; the receiving transport writes it into the received
//! directory and checks every file against it, sizes and checksums, before raft sees the snapshot;
//! the replica checks presence and sizes again before stepping it, whichever runtime delivered it. A
//! transfer cut short, a file removed during a slow transfer, or a stream that carried only its
//! envelope is refused, never installed.

use std::path::Path;
use tern_core::files::FileSystem;
use tern_core::TernError;

/// The manifest's file name inside a received snapshot directory.
pub const MANIFEST_FILE: &str = "tern-snapshot.manifest";

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub crc32: u32,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub files: Vec<FileEntry>,
}

/// How thoroughly `verify` looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Every listed file present with its size, nothing else (metadata only: cheap).
    Sizes,
    /// And every file's checksum (reads every byte).
    Checksums,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> TernError {
    move |e| TernError::Internal(format!("{what}: {e}"))
}

/// Size and crc32 of a file, read in full.
fn digest(fs: &dyn FileSystem, path: &Path) -> Result<(u64, u32), TernError> {
    let mut hasher = crc32fast::Hasher::new();
    let mut size = 0u64;
    fs.read_chunks(path, &mut |chunk| {
        hasher.update(chunk);
        size += chunk.len() as u64;
    })
    .map_err(io(format!("read {}", path.display())))?;
    Ok((size, hasher.finalize()))
}

/// The regular files of a snapshot directory (the manifest excluded), sorted.
fn data_files(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<String>, TernError> {
    let mut names = Vec::new();
    for path in fs.read_dir(dir).map_err(io(format!("list {}", dir.display())))? {
        let name = path.file_name().unwrap_or_default().to_os_string();
        let name = name.into_string().map_err(|n| TernError::Corruption(format!("snapshot file name {n:?} is not UTF-8")))?;
        if name != MANIFEST_FILE {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

impl Manifest {
    /// The manifest of a checkpoint directory as it is now (reads every byte).
    pub fn of_dir(fs: &dyn FileSystem, dir: &Path) -> Result<Manifest, TernError> {
        let mut files = Vec::new();
        for name in data_files(fs, dir)? {
            let (size, crc32) = digest(fs, &dir.join(&name))?;
            files.push(FileEntry { name, size, crc32 });
        }
        Ok(Manifest { files })
    }

    /// Writes the manifest into a (received) snapshot directory, durably.
    pub fn write_into(&self, fs: &dyn FileSystem, dir: &Path) -> Result<(), TernError> {
        let bytes = serde_json::to_vec(self).expect("encode snapshot manifest");
        fs.write_file_atomically(&dir.join(MANIFEST_FILE), &bytes).map_err(io(format!("write manifest in {}", dir.display())))
    }
}

/// Checks a received snapshot directory against its manifest. The error says what is wrong.
pub fn verify(fs: &dyn FileSystem, dir: &Path, check: Check) -> Result<(), TernError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs.read(&path).map_err(|e| TernError::Corruption(format!("snapshot {} has no readable manifest: {e}", dir.display())))?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| TernError::Corruption(format!("snapshot manifest {}: {e}", path.display())))?;
    let present = data_files(fs, dir)?;
    let listed: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    if present.iter().map(String::as_str).ne(listed.iter().copied()) {
        return Err(TernError::Corruption(format!("snapshot {} holds files {present:?}, its manifest lists {listed:?}", dir.display())));
    }
    for f in &manifest.files {
        let path = dir.join(&f.name);
        let (size, crc32) = match check {
            Check::Sizes => (fs.file_len(&path).map_err(io(format!("stat {}", path.display())))?, f.crc32),
            Check::Checksums => digest(fs, &path)?,
        };
        if (size, crc32) != (f.size, f.crc32) {
            return Err(TernError::Corruption(format!(
                "snapshot file {} is {size} bytes with crc32 {crc32:08x}; the manifest says {} bytes, {:08x}",
                f.name, f.size, f.crc32
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole snapshot verifies; one missing a file, with a file cut short or changed, with an extra
    /// file, or without a manifest (a stream that carried only its envelope) does not. The cheap
    /// check sees everything but same-size changes, which the full one catches.
    #[test]
    fn verify_refuses_incomplete_snapshots() {
        let fs = tern_core::files::RealFileSystem;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("snap");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("000001.sst"), vec![7u8; 5000]).unwrap();
        std::fs::write(dir.join("CURRENT"), b"MANIFEST-000002\n").unwrap();
        Manifest::of_dir(&fs, &dir).unwrap().write_into(&fs, &dir).unwrap();
        verify(&fs, &dir, Check::Checksums).unwrap();
        verify(&fs, &dir, Check::Sizes).unwrap();

        std::fs::write(dir.join("000001.sst"), vec![7u8; 4000]).unwrap();
        assert!(verify(&fs, &dir, Check::Sizes).unwrap_err().to_string().contains("000001.sst"));
        std::fs::write(dir.join("000001.sst"), vec![8u8; 5000]).unwrap();
        assert!(verify(&fs, &dir, Check::Checksums).is_err(), "same size, other bytes");
        std::fs::write(dir.join("000001.sst"), vec![7u8; 5000]).unwrap();
        verify(&fs, &dir, Check::Checksums).unwrap();

        std::fs::remove_file(dir.join("CURRENT")).unwrap();
        assert!(verify(&fs, &dir, Check::Sizes).is_err(), "a file missing");
        std::fs::write(dir.join("CURRENT"), b"MANIFEST-000002\n").unwrap();
        std::fs::write(dir.join("extra"), b"x").unwrap();
        assert!(verify(&fs, &dir, Check::Sizes).is_err(), "a file the manifest does not list");
        std::fs::remove_file(dir.join("extra")).unwrap();
        verify(&fs, &dir, Check::Checksums).unwrap();

        std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        assert!(verify(&fs, &dir, Check::Sizes).unwrap_err().to_string().contains("manifest"));
        let empty = t.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(verify(&fs, &empty, Check::Sizes).is_err(), "only the envelope arrived");
    }
}
