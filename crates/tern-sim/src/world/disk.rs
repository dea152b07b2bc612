//! The disk's timing: a node's raft-log writes become durable some milliseconds after the store
//! starts them (the store's async-ready path, as with `server --log-writer-thread`). A crash loses
//! the writes not yet durable, except a random number of the oldest, which reached the disk
//! unobserved; a pause holds them back until the node runs again.

use super::*;
use std::collections::VecDeque;
use tern_raft::log_store::{LogStore, LogWriteBatch};
use tern_raft::log_writer::LogWriter;

/// Writes started and not yet durable, shared by a node's writer and the world's `LogSynced` events.
#[derive(Default)]
pub(super) struct PendingLogWrites {
    queue: VecDeque<LogWriteBatch>,
    done: u64,
    failed: Option<TernError>,
}

pub(super) type PendingLogWritesRef = Arc<Mutex<PendingLogWrites>>;

pub(super) struct SimLogWriter {
    pub(super) node: NodeId,
    pub(super) epoch: u64,
    pub(super) log: Arc<MemoryLogStore>,
    pub(super) pending: PendingLogWritesRef,
    pub(super) shared: SharedRef,
}

impl LogWriter for SimLogWriter {
    fn start(&mut self, batch: LogWriteBatch) {
        self.pending.lock().queue.push_back(batch);
        let mut s = self.shared.lock();
        let delay = s.rng.range(0, LOG_SYNC_MS_MAX + 1);
        s.schedule(delay, Event::LogSynced { node: self.node, epoch: self.epoch });
    }

    fn durable(&self) -> Result<u64, TernError> {
        let p = self.pending.lock();
        match &p.failed {
            Some(e) => Err(e.clone()),
            None => Ok(p.done),
        }
    }

    fn wait_all(&mut self) -> Result<(), TernError> {
        while sync_one(&self.log, &self.pending) {}
        self.durable().map(drop)
    }
}

/// Makes the oldest pending write durable; false if there was none (or writing failed before).
pub(super) fn sync_one(log: &MemoryLogStore, pending: &PendingLogWritesRef) -> bool {
    let mut p = pending.lock();
    if p.failed.is_some() {
        return false;
    }
    let Some(batch) = p.queue.pop_front() else { return false };
    match log.write(batch, true) {
        Ok(()) => p.done += 1,
        Err(e) => p.failed = Some(e),
    }
    true
}

/// At a crash: a random number of the oldest pending writes made it to disk (durable, but the
/// process never learned it).
pub(super) fn sync_some(log: &MemoryLogStore, pending: &PendingLogWritesRef, rng: &mut SeededRandom) {
    let queued = pending.lock().queue.len() as u64;
    for _ in 0..rng.range(0, queued + 1) {
        sync_one(log, pending);
    }
}

/// A raft-log sync takes up to this long.
const LOG_SYNC_MS_MAX: u64 = 4;
