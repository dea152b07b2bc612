//! A behaviour suite every engine must pass. Each check opens a fresh engine from the factory.

use crate::{EngineFactory, KvEngine, WriteBatch};
use std::path::Path;

fn collect(engine: &dyn KvEngine, start: &[u8], end: Option<&[u8]>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    engine
        .scan(start, end, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })
        .expect("scan");
    out
}

/// Puts, deletes and range deletes apply atomically and scans see them in key order.
pub fn check_batches_and_scans(factory: &dyn EngineFactory, dir: &Path) {
    let engine = factory.open(dir).expect("open");
    let mut b = WriteBatch::default();
    for i in 0u8..10 {
        b.put(vec![b'k', i], vec![i]);
    }
    engine.write(b).expect("write");
    assert_eq!(engine.get(&[b'k', 3]).unwrap(), Some(vec![3]));
    assert_eq!(engine.get(b"missing").unwrap(), None);

    let mut b = WriteBatch::default();
    b.delete(vec![b'k', 0]);
    b.delete_range(vec![b'k', 5], vec![b'k', 8]);
    b.put(vec![b'k', 9], vec![99]);
    engine.write(b).expect("write");
    let keys: Vec<u8> = collect(engine.as_ref(), b"k", None).iter().map(|(k, _)| k[1]).collect();
    assert_eq!(keys, vec![1, 2, 3, 4, 8, 9]);
    assert_eq!(engine.get(&[b'k', 9]).unwrap(), Some(vec![99]));

    let bounded = collect(engine.as_ref(), &[b'k', 2], Some(&[b'k', 4]));
    assert_eq!(bounded.len(), 2);
    assert!(collect(engine.as_ref(), &[b'k', 8], Some(&[b'k', 2])).is_empty(), "inverted range is empty");
    let mut b = WriteBatch::default();
    b.delete_range(vec![b'k', 9], vec![b'k', 1]);
    engine.write(b).expect("inverted delete range is a no-op");
    assert_eq!(engine.get(&[b'k', 9]).unwrap(), Some(vec![99]));
    let mut seen = 0;
    engine
        .scan(b"", None, &mut |_, _| {
            seen += 1;
            seen < 3
        })
        .unwrap();
    assert_eq!(seen, 3, "scan stops when the visitor says so");

    // Backwards: from the last key of the range down, bounds and early stop as forwards.
    let mut reversed = Vec::new();
    engine
        .scan_reverse(&[b'k', 2], &[b'k', 9], &mut |k, _| {
            reversed.push(k[1]);
            true
        })
        .unwrap();
    assert_eq!(reversed, vec![8, 4, 3, 2], "[k2, k9) backwards, deleted keys skipped");
    let mut last = Vec::new();
    engine
        .scan_reverse(b"k", b"l", &mut |k, _| {
            last.push(k[1]);
            false
        })
        .unwrap();
    assert_eq!(last, vec![9], "stops after the last key when told");
    engine.scan_reverse(&[b'k', 5], &[b'k', 8], &mut |_, _| panic!("[k5, k8) holds nothing")).unwrap();
    engine.scan_reverse(&[b'k', 8], &[b'k', 2], &mut |_, _| panic!("inverted range is empty")).unwrap();
}

/// A checkpoint is a consistent copy that opens as an engine with the same contents, unaffected by
/// later writes to the original.
pub fn check_checkpoint(factory: &dyn EngineFactory, dir: &Path, checkpoint_dir: &Path) {
    let engine = factory.open(dir).expect("open");
    let mut b = WriteBatch::default();
    b.put(b"a".to_vec(), b"1".to_vec());
    b.put(b"b".to_vec(), b"2".to_vec());
    engine.write(b).unwrap();
    engine.checkpoint(checkpoint_dir).expect("checkpoint");
    let mut b = WriteBatch::default();
    b.put(b"c".to_vec(), b"3".to_vec());
    engine.write(b).unwrap();

    let copy = factory.open(checkpoint_dir).expect("open checkpoint");
    assert_eq!(collect(copy.as_ref(), b"", None).len(), 2);
    assert_eq!(copy.get(b"b").unwrap(), Some(b"2".to_vec()));
    assert_eq!(copy.get(b"c").unwrap(), None);
}

/// Data survives closing and reopening the engine.
pub fn check_reopen(factory: &dyn EngineFactory, dir: &Path) {
    {
        let engine = factory.open(dir).expect("open");
        let mut b = WriteBatch::default();
        b.put(b"durable".to_vec(), b"yes".to_vec());
        engine.write(b).unwrap();
        engine.sync().unwrap();
    }
    let engine = factory.open(dir).expect("reopen");
    assert_eq!(engine.get(b"durable").unwrap(), Some(b"yes".to_vec()));
}

/// A background sync finishes by itself, covers what was written before it began, and the data
/// survives reopening.
pub fn check_background_sync(factory: &dyn EngineFactory, dir: &Path) {
    {
        let engine = factory.open(dir).expect("open");
        assert!(engine.sync_finished().unwrap(), "nothing written: nothing to wait for");
        let mut b = WriteBatch::default();
        b.put(b"before".to_vec(), b"1".to_vec());
        engine.write(b).unwrap();
        assert!(engine.begin_sync().unwrap(), "an idle engine starts a sync");
        let mut b = WriteBatch::default();
        b.put(b"after".to_vec(), b"2".to_vec());
        engine.write(b).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !engine.sync_finished().unwrap() {
            assert!(std::time::Instant::now() < deadline, "a background sync never finished");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(engine.get(b"after").unwrap(), Some(b"2".to_vec()), "writes go on during a sync");
    }
    let engine = factory.open(dir).expect("reopen");
    assert_eq!(engine.get(b"before").unwrap(), Some(b"1".to_vec()));
}

/// Compaction drops what the expiry filter calls expired at the engine's horizon, never by the
/// machine's clock: nothing before a horizon is set, then only what expired by the horizon (records
/// here expire at the time in their key, long ago by any wall clock).
pub fn check_expiry_filter(factory: &dyn EngineFactory, dir: &Path) {
    let engine = factory.open(dir).expect("open");
    let mut b = WriteBatch::default();
    b.put(b"expires:100".to_vec(), b"x".to_vec());
    b.put(b"expires:200".to_vec(), b"y".to_vec());
    b.put(b"live".to_vec(), b"z".to_vec());
    engine.write(b).unwrap();
    engine.compact_all().unwrap();
    assert!(engine.get(b"expires:100").unwrap().is_some(), "no horizon yet: nothing has expired");
    engine.set_expiry_horizon(crate::Horizon { unix_ms: 150, ..Default::default() });
    engine.compact_all().unwrap();
    assert_eq!(engine.get(b"expires:100").unwrap(), None);
    assert_eq!(engine.get(b"expires:200").unwrap(), Some(b"y".to_vec()), "expires after the horizon");
    engine.set_expiry_horizon(crate::Horizon { unix_ms: 120, ..Default::default() });
    engine.set_expiry_horizon(crate::Horizon { unix_ms: 250, ..Default::default() });
    engine.compact_all().unwrap();
    assert_eq!(engine.get(b"expires:200").unwrap(), None);
    assert_eq!(engine.get(b"live").unwrap(), Some(b"z".to_vec()));
}

/// The filter the expiry check uses: a key "expires:T" expires at unix millisecond T.
pub fn test_expiry_filter(key: &[u8], _value: &[u8], horizon: crate::Horizon) -> bool {
    let expiry = key.strip_prefix(b"expires:").and_then(|t| std::str::from_utf8(t).ok()).and_then(|t| t.parse::<u64>().ok());
    expiry.is_some_and(|t| t <= horizon.unix_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryEngineFactory, RocksEngineFactory, RocksSharedResources};

    fn rocks() -> RocksEngineFactory {
        RocksEngineFactory::new(RocksSharedResources::new(8 << 20, 8 << 20), Some(test_expiry_filter))
    }
    fn memory() -> MemoryEngineFactory {
        MemoryEngineFactory::new(Some(test_expiry_filter))
    }

    /// Both engines pass the whole suite.
    #[test]
    fn rocksdb_conformance() {
        let t = tempfile::tempdir().unwrap();
        let f = rocks();
        check_batches_and_scans(&f, &t.path().join("a"));
        check_checkpoint(&f, &t.path().join("b"), &t.path().join("b-cp"));
        check_reopen(&f, &t.path().join("c"));
        check_expiry_filter(&f, &t.path().join("d"));
        check_background_sync(&f, &t.path().join("e"));
    }

    /// The memory engine models power loss: unsynced writes vanish on crash, synced ones stay.
    #[test]
    fn memory_engine_crash_loses_unsynced_writes() {
        let t = tempfile::tempdir().unwrap();
        let f = memory();
        let e = f.open(t.path()).unwrap();
        let mut b = WriteBatch::default();
        b.put(b"synced".to_vec(), b"1".to_vec());
        e.write(b).unwrap();
        e.sync().unwrap();
        let mut b = WriteBatch::default();
        b.put(b"unsynced".to_vec(), b"2".to_vec());
        e.write(b).unwrap();
        f.crash();
        let e = f.open(t.path()).unwrap();
        assert_eq!(e.get(b"synced").unwrap(), Some(b"1".to_vec()));
        assert_eq!(e.get(b"unsynced").unwrap(), None);

        // A background sync is durable only once it is seen finished.
        let mut b = WriteBatch::default();
        b.put(b"begun".to_vec(), b"3".to_vec());
        e.write(b).unwrap();
        e.begin_sync().unwrap();
        f.crash();
        let e = f.open(t.path()).unwrap();
        assert_eq!(e.get(b"begun").unwrap(), None, "lost: the sync was never seen finished");
        let mut b = WriteBatch::default();
        b.put(b"begun".to_vec(), b"3".to_vec());
        e.write(b).unwrap();
        e.begin_sync().unwrap();
        assert!(!e.sync_finished().unwrap(), "a sync spans two polls");
        assert!(e.sync_finished().unwrap());
        f.crash();
        let e = f.open(t.path()).unwrap();
        assert_eq!(e.get(b"begun").unwrap(), Some(b"3".to_vec()));
    }

    #[test]
    fn memory_conformance() {
        let t = tempfile::tempdir().unwrap();
        let f = memory();
        check_batches_and_scans(&f, &t.path().join("a"));
        check_checkpoint(&f, &t.path().join("b"), &t.path().join("b-cp"));
        check_reopen(&f, &t.path().join("c"));
        check_expiry_filter(&f, &t.path().join("d"));
        check_background_sync(&f, &t.path().join("e"));
    }
}
