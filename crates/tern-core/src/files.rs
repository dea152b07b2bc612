//! Files, and crash-safe updates of them. A rename is durable only once its directory is synced,
//! and a file's contents only once the file is: both are done here, in one place, for everything
//! that replaces a small metadata file (replica metadata, node identity) or moves a directory into
//! place.
//!
//! Code that decides things (the replica core and its store) reaches files only through
//! `FileSystem`: `RealFileSystem` in production, and `MemoryFileSystem` in the simulator, which keeps
//! only what was made durable when a node crashes (unsynced file contents, and creations, renames and
//! removals in a directory not synced since, are undone).

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// The file operations the core uses. Paths are absolute or relative to the process's directory.
pub trait FileSystem: Send + Sync {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    /// Reads a file in pieces (large files are never held whole).
    fn read_chunks(&self, path: &Path, visit: &mut dyn FnMut(&[u8])) -> std::io::Result<()>;
    /// Creates or replaces a file. Its contents are durable only after `sync_file`, its name only
    /// after its directory is synced.
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
    fn sync_file(&self, path: &Path) -> std::io::Result<()>;
    /// Creates a directory and any missing parents (each durable only once its parent is synced).
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()>;
    /// Renames a file or directory (durable once both directories are synced).
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Makes creations, renames and removals of a directory's entries durable.
    fn sync_directory(&self, dir: &Path) -> std::io::Result<()>;
    /// Removes a file or a directory with everything in it (durable once its parent is synced).
    fn remove_all(&self, path: &Path) -> std::io::Result<()>;
    /// The entries of a directory, as full paths, sorted.
    fn read_dir(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>>;
    fn exists(&self, path: &Path) -> bool;
    fn is_dir(&self, path: &Path) -> bool;
    fn file_len(&self, path: &Path) -> std::io::Result<u64>;

    /// Replaces `path` with `bytes` atomically and durably: a temporary file in the same directory
    /// is written and synced, renamed over `path`, and the directory synced. After a crash the file
    /// holds either the old or the new contents, never a mix, and a completed call is never undone.
    fn write_file_atomically(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let dir = parent(path);
        let name = path.file_name().ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
        // Unique, so that concurrent writers of one path never share a temporary file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".{}.{}.tmp", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let tmp = dir.join(tmp_name);
        self.write(&tmp, bytes)?;
        self.sync_file(&tmp)?;
        self.rename(&tmp, path)?;
        self.sync_directory(&dir)
    }

    /// Renames `from` to `to` and syncs the directories involved, so the move survives a crash.
    fn rename_durably(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.rename(from, to)?;
        let (a, b) = (parent(from), parent(to));
        self.sync_directory(&b)?;
        if a != b {
            self.sync_directory(&a)?;
        }
        Ok(())
    }

    /// Creates a directory (and missing parents) and syncs each parent, so it survives a crash.
    fn create_dir_all_durably(&self, path: &Path) -> std::io::Result<()> {
        let missing: Vec<PathBuf> = path.ancestors().take_while(|p| !p.as_os_str().is_empty() && !self.exists(p)).map(Path::to_path_buf).collect();
        self.create_dir_all(path)?;
        for dir in missing.iter().rev() {
            self.sync_directory(&parent(dir))?;
        }
        Ok(())
    }
}

fn parent(path: &Path) -> PathBuf {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// The operating system's file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFileSystem;

impl FileSystem for RealFileSystem {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn read_chunks(&self, path: &Path, visit: &mut dyn FnMut(&[u8])) -> std::io::Result<()> {
        let mut file = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            visit(&buf[..n]);
        }
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::File::create(path)?.write_all(bytes)
    }

    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }

    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_directory(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    fn remove_all(&self, path: &Path) -> std::io::Result<()> {
        if std::fs::symlink_metadata(path)?.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        }
    }

    fn read_dir(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            out.push(entry?.path());
        }
        out.sort();
        Ok(out)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn file_len(&self, path: &Path) -> std::io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }
}

/// Syncs a directory, making renames, creations and removals of its entries durable.
pub fn sync_directory(dir: &Path) -> std::io::Result<()> {
    RealFileSystem.sync_directory(dir)
}

/// `FileSystem::write_file_atomically` on the real file system.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    RealFileSystem.write_file_atomically(path, bytes)
}

/// The file system as the core sees it, shared by everything on one node.
pub type SharedFileSystem = Arc<dyn FileSystem>;

type Ino = u64;

enum Node {
    /// A directory's entries now, and as a crash would leave them (as of its last sync).
    Dir { current: BTreeMap<OsString, Ino>, durable: BTreeMap<OsString, Ino> },
    /// A file's contents now, and as of its last sync.
    File { current: Arc<Vec<u8>>, durable: Arc<Vec<u8>> },
}

/// A file system in memory with crash semantics: `crash` keeps exactly what was made durable (file
/// contents as of their last `sync_file`, directory entries as of their directory's last
/// `sync_directory`) and nothing else. Directories and files are inodes, so a renamed directory
/// keeps its contents. One per simulated node. Kinder than a real disk in places: an unsynced
/// overwrite comes back whole as the old contents (never torn), a removal undone by a crash comes
/// back whole, and a crash never keeps part of what was not synced.
pub struct MemoryFileSystem {
    inner: Mutex<MemoryInner>,
}

struct MemoryInner {
    nodes: HashMap<Ino, Node>,
    next: Ino,
}

const ROOT: Ino = 0;

fn not_found(path: &Path) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotFound, format!("{}: not found", path.display()))
}

fn names(path: &Path) -> Vec<OsString> {
    path.components().filter_map(|c| if let Component::Normal(n) = c { Some(n.to_os_string()) } else { None }).collect()
}

impl Default for MemoryFileSystem {
    fn default() -> Self {
        let root = Node::Dir { current: BTreeMap::new(), durable: BTreeMap::new() };
        MemoryFileSystem { inner: Mutex::new(MemoryInner { nodes: HashMap::from([(ROOT, root)]), next: 1 }) }
    }
}

impl MemoryInner {
    fn lookup(&self, path: &Path) -> Option<Ino> {
        let mut at = ROOT;
        for name in names(path) {
            match self.nodes.get(&at)? {
                Node::Dir { current, .. } => at = *current.get(&name)?,
                Node::File { .. } => return None,
            }
        }
        Some(at)
    }

    /// The directory holding `path`, and the entry's name in it.
    fn parent_of(&self, path: &Path) -> std::io::Result<(Ino, OsString)> {
        let mut all = names(path);
        let name = all.pop().ok_or_else(|| std::io::Error::other(format!("{} names no entry", path.display())))?;
        let dir = self.lookup(&all.iter().collect::<PathBuf>()).ok_or_else(|| not_found(path))?;
        match self.nodes.get(&dir) {
            Some(Node::Dir { .. }) => Ok((dir, name)),
            _ => Err(std::io::Error::other(format!("{}: parent is not a directory", path.display()))),
        }
    }

    fn entries(&mut self, dir: Ino) -> &mut BTreeMap<OsString, Ino> {
        match self.nodes.get_mut(&dir) {
            Some(Node::Dir { current, .. }) => current,
            _ => unreachable!("checked to be a directory"),
        }
    }

    fn add(&mut self, node: Node) -> Ino {
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, node);
        ino
    }

    fn file(&self, path: &Path) -> std::io::Result<Arc<Vec<u8>>> {
        match self.lookup(path).and_then(|i| self.nodes.get(&i)) {
            Some(Node::File { current, .. }) => Ok(current.clone()),
            Some(Node::Dir { .. }) => Err(std::io::Error::other(format!("{} is a directory", path.display()))),
            None => Err(not_found(path)),
        }
    }
}

impl MemoryFileSystem {
    pub fn new() -> MemoryFileSystem {
        MemoryFileSystem::default()
    }

    /// What a sync does: the file's contents, or the directory's entries, as they are now become
    /// what a crash keeps.
    fn make_durable(&self, path: &Path, directory: bool) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let ino = inner.lookup(path).ok_or_else(|| not_found(path))?;
        match inner.nodes.get_mut(&ino) {
            Some(Node::File { current, durable }) if !directory => *durable = current.clone(),
            Some(Node::Dir { current, durable }) if directory => *durable = current.clone(),
            _ => return Err(std::io::Error::other(format!("{}: a file and a directory were confused", path.display()))),
        }
        Ok(())
    }

    /// A power failure: everything not made durable is lost.
    pub fn crash(&self) {
        let mut inner = self.inner.lock();
        for node in inner.nodes.values_mut() {
            match node {
                Node::Dir { current, durable } => *current = durable.clone(),
                Node::File { current, durable } => *current = durable.clone(),
            }
        }
        // Drop inodes no directory refers to any more, now or durably.
        let mut reachable = std::collections::HashSet::from([ROOT]);
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if let Some(Node::Dir { current, durable }) = inner.nodes.get(&ino) {
                for child in current.values().chain(durable.values()) {
                    if reachable.insert(*child) {
                        stack.push(*child);
                    }
                }
            }
        }
        inner.nodes.retain(|ino, _| reachable.contains(ino));
    }
}

impl FileSystem for MemoryFileSystem {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        Ok(self.inner.lock().file(path)?.to_vec())
    }

    fn read_chunks(&self, path: &Path, visit: &mut dyn FnMut(&[u8])) -> std::io::Result<()> {
        let data = self.inner.lock().file(path)?;
        for chunk in data.chunks(1 << 20) {
            visit(chunk);
        }
        Ok(())
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let (dir, name) = inner.parent_of(path)?;
        if let Some(ino) = inner.entries(dir).get(&name).copied() {
            return match inner.nodes.get_mut(&ino) {
                Some(Node::File { current, .. }) => {
                    *current = Arc::new(bytes.to_vec());
                    Ok(())
                }
                _ => Err(std::io::Error::other(format!("{} is a directory", path.display()))),
            };
        }
        let ino = inner.add(Node::File { current: Arc::new(bytes.to_vec()), durable: Arc::new(Vec::new()) });
        inner.entries(dir).insert(name, ino);
        Ok(())
    }

    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        self.make_durable(path, false)
    }

    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let mut at = ROOT;
        for name in names(path) {
            let next = match inner.nodes.get(&at) {
                Some(Node::Dir { current, .. }) => current.get(&name).copied(),
                _ => return Err(std::io::Error::other(format!("{}: a file is in the way", path.display()))),
            };
            at = match next {
                Some(ino) => ino,
                None => {
                    let ino = inner.add(Node::Dir { current: BTreeMap::new(), durable: BTreeMap::new() });
                    inner.entries(at).insert(name, ino);
                    ino
                }
            };
        }
        match inner.nodes.get(&at) {
            Some(Node::Dir { .. }) => Ok(()),
            _ => Err(std::io::Error::other(format!("{} is a file", path.display()))),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let (from_dir, from_name) = inner.parent_of(from)?;
        let (to_dir, to_name) = inner.parent_of(to)?;
        let ino = *inner.entries(from_dir).get(&from_name).ok_or_else(|| not_found(from))?;
        let is_dir = |inner: &MemoryInner, i: Ino| matches!(inner.nodes.get(&i), Some(Node::Dir { .. }));
        if is_dir(&inner, ino) && to.starts_with(from) {
            return Err(std::io::Error::other(format!("cannot move {} into itself", from.display())));
        }
        if let Some(target) = inner.entries(to_dir).get(&to_name).copied() {
            match inner.nodes.get(&target) {
                Some(Node::Dir { current, .. }) if !current.is_empty() => {
                    return Err(std::io::Error::other(format!("{}: directory not empty", to.display())))
                }
                _ if is_dir(&inner, target) != is_dir(&inner, ino) => {
                    return Err(std::io::Error::other(format!("{}: cannot replace a file with a directory or the reverse", to.display())))
                }
                _ => {}
            }
        }
        inner.entries(from_dir).remove(&from_name);
        inner.entries(to_dir).insert(to_name, ino);
        Ok(())
    }

    fn sync_directory(&self, dir: &Path) -> std::io::Result<()> {
        self.make_durable(dir, true)
    }

    fn remove_all(&self, path: &Path) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let (dir, name) = inner.parent_of(path)?;
        inner.entries(dir).remove(&name).map(|_| ()).ok_or_else(|| not_found(path))
    }

    fn read_dir(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let inner = self.inner.lock();
        match inner.lookup(dir).and_then(|i| inner.nodes.get(&i)) {
            Some(Node::Dir { current, .. }) => Ok(current.keys().map(|n| dir.join(n)).collect()),
            Some(Node::File { .. }) => Err(std::io::Error::other(format!("{} is not a directory", dir.display()))),
            None => Err(not_found(dir)),
        }
    }

    fn exists(&self, path: &Path) -> bool {
        self.inner.lock().lookup(path).is_some()
    }

    fn is_dir(&self, path: &Path) -> bool {
        let inner = self.inner.lock();
        matches!(inner.lookup(path).and_then(|i| inner.nodes.get(&i)), Some(Node::Dir { .. }))
    }

    fn file_len(&self, path: &Path) -> std::io::Result<u64> {
        Ok(self.inner.lock().file(path)?.len() as u64)
    }
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
        RealFileSystem.rename_durably(&path, &dir.join("moved.json")).unwrap();
        assert_eq!(std::fs::read(dir.join("moved.json")).unwrap(), b"two");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The same sequence of operations gives the same view on both file systems.
    #[test]
    fn memory_and_real_agree() {
        let tmp = std::env::temp_dir().join(format!("tern-files-agree-{}", std::process::id()));
        let memory = MemoryFileSystem::new();
        let systems: [(&dyn FileSystem, PathBuf); 2] = [(&RealFileSystem, tmp.clone()), (&memory, PathBuf::from("/data"))];
        let mut views = Vec::new();
        for (fs, root) in systems {
            fs.create_dir_all(&root.join("a/b")).unwrap();
            fs.write(&root.join("a/b/f"), b"1234").unwrap();
            fs.write_file_atomically(&root.join("a/m"), b"meta").unwrap();
            fs.rename(&root.join("a/b"), &root.join("a/c")).unwrap();
            fs.create_dir_all(&root.join("a/gone/deep")).unwrap();
            fs.remove_all(&root.join("a/gone")).unwrap();
            assert!(fs.write(&root.join("missing/f"), b"x").is_err());
            assert!(fs.read(&root.join("a/nothing")).is_err());
            let mut chunks = Vec::new();
            fs.read_chunks(&root.join("a/c/f"), &mut |c| chunks.extend_from_slice(c)).unwrap();
            let listing: Vec<String> =
                fs.read_dir(&root.join("a")).unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
            views.push((
                listing,
                chunks,
                fs.read(&root.join("a/m")).unwrap(),
                fs.file_len(&root.join("a/c/f")).unwrap(),
                fs.is_dir(&root.join("a/c")),
            ));
        }
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(views[0], views[1]);
        assert_eq!(views[0].0, vec!["c".to_string(), "m".to_string()]);
    }

    /// A crash keeps what was synced and undoes the rest: unsynced contents, and entries of
    /// directories not synced since they changed. A renamed directory keeps its contents.
    #[test]
    fn memory_crash_keeps_only_what_is_durable() {
        let fs = MemoryFileSystem::new();
        fs.create_dir_all_durably(Path::new("/n/replicas")).unwrap();
        fs.write_file_atomically(Path::new("/n/replicas/meta"), b"v1").unwrap();
        fs.create_dir_all(Path::new("/n/replicas/1")).unwrap();
        fs.write(Path::new("/n/replicas/1/data"), b"unsynced").unwrap();
        fs.create_dir_all(Path::new("/n/replicas/2")).unwrap();
        fs.write(Path::new("/n/replicas/2/data"), b"synced").unwrap();
        fs.sync_file(Path::new("/n/replicas/2/data")).unwrap();
        fs.sync_directory(Path::new("/n/replicas/2")).unwrap();
        fs.rename_durably(Path::new("/n/replicas/2"), Path::new("/n/replicas/3")).unwrap();
        fs.write(Path::new("/n/replicas/meta"), b"overwritten, unsynced").unwrap();
        fs.crash();
        assert_eq!(fs.read(Path::new("/n/replicas/meta")).unwrap(), b"v1");
        assert!(!fs.exists(Path::new("/n/replicas/2")));
        assert_eq!(fs.read(Path::new("/n/replicas/3/data")).unwrap(), b"synced", "a durable rename keeps the directory's contents");
        // Syncing /n/replicas for the rename made the entry of directory 1 durable too, but not
        // what is in it.
        assert!(fs.exists(Path::new("/n/replicas/1")) && !fs.exists(Path::new("/n/replicas/1/data")));
        fs.create_dir_all(Path::new("/n/replicas/4")).unwrap();
        fs.crash();
        assert!(!fs.exists(Path::new("/n/replicas/4")), "a directory never synced into its parent is gone");

        // A removal not made durable comes back; one made durable stays gone.
        fs.remove_all(Path::new("/n/replicas/3")).unwrap();
        fs.crash();
        assert!(fs.exists(Path::new("/n/replicas/3/data")));
        fs.remove_all(Path::new("/n/replicas/3")).unwrap();
        fs.sync_directory(Path::new("/n/replicas")).unwrap();
        fs.crash();
        assert!(!fs.exists(Path::new("/n/replicas/3")));
    }
}
