//! Who makes the store's raft-log writes durable, and when: the store starts each round's synced
//! write and goes on (raft-rs async ready); the writer reports how many started writes are durable,
//! and the store then finishes those rounds (sends the messages that waited for persistence, lets
//! raft count the entries as persisted). Writes become durable in the order they were started.
//!
//! `SyncLogWriter` writes at once, on the caller's thread (the simulator and tests: a run stays
//! deterministic). `ThreadLogWriter` writes on its own thread, merging every write queued behind the
//! one in progress into one synced write (group commit across rounds), so the store thread prepares
//! the next round while the disk syncs the last.

use crate::log_store::{LogStore, LogWriteBatch};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use tern_core::TernError;

pub trait LogWriter: Send {
    /// Starts a synced write. Writes become durable in the order started.
    fn start(&mut self, batch: LogWriteBatch);
    /// How many of the started writes are durable. An error means a write failed: the store must
    /// stop (its raft state can no longer be trusted to be on disk).
    fn durable(&self) -> Result<u64, TernError>;
    /// Waits until every started write is durable (before a write that must come after them).
    fn wait_all(&mut self) -> Result<(), TernError>;
}

/// Writes at once, on the caller's thread.
pub struct SyncLogWriter {
    log: Arc<dyn LogStore>,
    done: u64,
    failed: Option<TernError>,
}

impl SyncLogWriter {
    pub fn new(log: Arc<dyn LogStore>) -> SyncLogWriter {
        SyncLogWriter { log, done: 0, failed: None }
    }
}

impl LogWriter for SyncLogWriter {
    fn start(&mut self, batch: LogWriteBatch) {
        if self.failed.is_none() {
            match self.log.write(batch, true) {
                Ok(()) => self.done += 1,
                Err(e) => self.failed = Some(e),
            }
        }
    }

    fn durable(&self) -> Result<u64, TernError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(self.done),
        }
    }

    fn wait_all(&mut self) -> Result<(), TernError> {
        self.durable().map(drop)
    }
}

#[derive(Default)]
struct Shared {
    queue: Vec<LogWriteBatch>,
    started: u64,
    done: u64,
    failed: Option<TernError>,
    stop: bool,
}

/// Writes on its own thread; `notify` is called after each durable write (to wake the store).
pub struct ThreadLogWriter {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ThreadLogWriter {
    pub fn start(name: String, log: Arc<dyn LogStore>, notify: impl Fn() + Send + 'static) -> std::io::Result<ThreadLogWriter> {
        let shared: Arc<(Mutex<Shared>, Condvar)> = Default::default();
        let s = shared.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let (lock, wake) = &*s;
            loop {
                let (batches, upto) = {
                    let mut st = lock.lock();
                    while st.queue.is_empty() && !st.stop {
                        wake.wait(&mut st);
                    }
                    if st.queue.is_empty() {
                        return;
                    }
                    (std::mem::take(&mut st.queue), st.started)
                };
                let mut merged = LogWriteBatch::default();
                for mut b in batches {
                    merged.ops.append(&mut b.ops);
                }
                // raft-engine panics when a sync fails: that must stop the store like any other
                // failed write, not leave it waiting for a thread that is gone.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| log.write(merged, true))).unwrap_or_else(|panic| {
                    let why = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                    Err(TernError::Internal(format!("raft log write panicked: {}", why.unwrap_or_default())))
                });
                {
                    let mut st = lock.lock();
                    match result {
                        Ok(()) => st.done = upto,
                        Err(e) => {
                            st.failed = Some(e);
                            st.stop = true;
                        }
                    }
                    wake.notify_all();
                }
                notify();
                if lock.lock().failed.is_some() {
                    return;
                }
            }
        })?;
        Ok(ThreadLogWriter { shared, thread: Some(thread) })
    }
}

impl LogWriter for ThreadLogWriter {
    fn start(&mut self, batch: LogWriteBatch) {
        let (lock, wake) = &*self.shared;
        let mut st = lock.lock();
        st.queue.push(batch);
        st.started += 1;
        wake.notify_all();
    }

    fn durable(&self) -> Result<u64, TernError> {
        let st = self.shared.0.lock();
        match &st.failed {
            Some(e) => Err(e.clone()),
            None => Ok(st.done),
        }
    }

    fn wait_all(&mut self) -> Result<(), TernError> {
        let (lock, wake) = &*self.shared;
        let mut st = lock.lock();
        while st.failed.is_none() && st.done < st.started {
            wake.wait(&mut st);
        }
        match &st.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

impl Drop for ThreadLogWriter {
    /// Finishes the writes already started, then stops the thread.
    fn drop(&mut self) {
        {
            let (lock, wake) = &*self.shared;
            lock.lock().stop = true;
            wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_store::{LogOp, MemoryLogStore};
    use raft::eraftpb::Entry;

    fn append(group: u64, index: u64) -> LogWriteBatch {
        let mut b = LogWriteBatch::default();
        let mut e = Entry::default();
        e.index = index;
        e.term = 1;
        b.push(group, LogOp::Append(vec![e]));
        b
    }

    /// Writes started on the thread become durable in order, and all of them by `wait_all`.
    #[test]
    fn thread_writer_makes_writes_durable_in_order() {
        let log = Arc::new(MemoryLogStore::default());
        let notified = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n = notified.clone();
        let mut w = ThreadLogWriter::start("test-log-writer".into(), log.clone(), move || {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .unwrap();
        for i in 1..=100 {
            w.start(append(7, i));
        }
        w.wait_all().unwrap();
        assert_eq!(w.durable().unwrap(), 100);
        assert_eq!(log.last_index(7), Some(100));
        drop(w); // joins the thread: its wake-ups have all been sent
        assert!(notified.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        log.crash();
        assert_eq!(log.last_index(7), Some(100), "synced");
    }

    /// A log store that panics on a write (as raft-engine does when a sync fails).
    struct PanickingLog;
    impl LogStore for PanickingLog {
        fn write(&self, _: LogWriteBatch, _: bool) -> Result<(), TernError> {
            panic!("sync failed");
        }
        fn entries(&self, _: u64, _: u64, _: u64, _: Option<u64>) -> Result<Vec<Entry>, TernError> {
            unreachable!()
        }
        fn entry(&self, _: u64, _: u64) -> Result<Option<Entry>, TernError> {
            unreachable!()
        }
        fn last_index(&self, _: u64) -> Option<u64> {
            unreachable!()
        }
        fn first_index(&self, _: u64) -> Option<u64> {
            unreachable!()
        }
        fn hard_state(&self, _: u64) -> Result<Option<raft::eraftpb::HardState>, TernError> {
            unreachable!()
        }
        fn truncated(&self, _: u64) -> Result<Option<(u64, u64)>, TernError> {
            unreachable!()
        }
        fn groups(&self) -> Vec<u64> {
            unreachable!()
        }
        fn purge(&self) -> Result<(), TernError> {
            unreachable!()
        }
    }

    /// A write that panics on the writer thread is a failed write: the store hears of it (and
    /// stops) instead of waiting forever for a thread that is gone.
    #[test]
    fn a_panicking_write_is_a_failed_write() {
        let mut w = ThreadLogWriter::start("test-log-writer".into(), Arc::new(PanickingLog), || {}).unwrap();
        w.start(append(7, 1));
        let e = w.wait_all().unwrap_err();
        assert!(e.to_string().contains("sync failed"), "{e}");
    }

    /// A failed write is reported, and the writer stops.
    #[test]
    fn a_failed_write_is_reported() {
        let log = Arc::new(MemoryLogStore::default());
        log.fail_writes(1);
        let mut w = ThreadLogWriter::start("test-log-writer".into(), log.clone(), || {}).unwrap();
        w.start(append(7, 1));
        assert!(w.wait_all().is_err());
        assert!(w.durable().is_err());
        let mut s = SyncLogWriter::new(log.clone());
        log.fail_writes(1);
        s.start(append(7, 1));
        assert!(s.durable().is_err());
    }
}
