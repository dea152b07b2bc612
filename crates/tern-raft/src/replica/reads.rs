//! Linearizable reads: read-index rounds batched per tick, and the leader lease that lets a leader
//! answer without one (and every way the lease ends).

use super::*;

pub(super) struct ReadBatch {
    pub(super) id: u64,
    pub(super) issued_tick: u64,
    pub(super) first_tick: u64,
    pub(super) index: Option<u64>,
    pub(super) reads: Vec<(ReadRequest, ReadCallback)>,
    /// Monotonic time of the first read-index request, its term and lease epoch: a quorum confirmed
    /// this leader at or after that time, which starts a lease.
    pub(super) issued_at: Duration,
    pub(super) term: u64,
    pub(super) lease_epoch: u64,
}

/// A leader's read lease. Followers with check_quorum refuse votes for election_tick ticks after they
/// last heard from the leader, so no other leader can exist until `until` (monotonic) when the lease
/// was started by a confirmed read-index round. Leadership transfers and membership changes end it.
#[derive(Default)]
pub(super) struct Lease {
    pub(super) until: Duration,
    pub(super) term: u64,
    /// Bumped whenever the lease is revoked: rounds issued before cannot renew it.
    pub(super) epoch: u64,
    /// When a read last used the lease (renewals are only worth it while reads come).
    pub(super) used_at: Duration,
    /// A term in which a leadership transfer was started: no lease for the rest of it. raft-rs may
    /// abort the transfer, but a late MsgTimeoutNow can still elect the transferee, which never waits
    /// out followers' vote refusal.
    pub(super) forbidden_term: u64,
}

impl Replica {
    /// Ends the read lease (a transfer lets the target campaign at once, ignoring follower leases).
    pub(super) fn revoke_lease(&mut self) {
        self.lease.until = Duration::ZERO;
        self.lease.epoch += 1;
    }

    /// Whether reads may skip the read-index round: leader with a live lease in this term and no
    /// transfer under way. Its commit index then covers every acknowledged write.
    pub(super) fn lease_covers(&self, now: Duration) -> bool {
        self.is_leader()
            && self.active()
            && now < self.lease.until
            && self.lease.term == self.raw.raft.term
            && self.lease.forbidden_term != self.raw.raft.term
            && self.raw.raft.lead_transferee.is_none()
    }

    /// The term of the read lease this replica holds now, if it holds one (a leader answering reads
    /// without a read-index round). No other replica may lead a later term while it does.
    pub fn lease_term(&self, now: Duration) -> Option<u64> {
        self.lease_covers(now).then_some(self.raw.raft.term)
    }

    /// Executes a read on the state machine as it is now. A read addressed by another partition
    /// count than the one applied now (the partition split while the read waited) is refused: a
    /// full-partition scan would otherwise return half the partition it was sent for.
    fn execute(&self, request: &ReadRequest, now_unix_ms: u64) -> ReadResponse {
        let (addressed, owner) = (request.partition.as_ref().map_or(0, |p| p.partition_count), self.sm.owner());
        if addressed != 0 && owner.count != 0 && addressed != owner.count {
            return ReadResponse { error: Some(self.addressed_by_another_count(addressed).into()), ..Default::default() };
        }
        // Never behind the log's clock as of now (entries applied while the read waited may carry
        // later stamps): a record the log has expired stays expired to the read.
        let mut r = execute_read(self.sm.engine(), request, self.read_time(now_unix_ms), owner);
        r.applied_index = self.sm.state().applied_index;
        r
    }

    /// Queues a read. Stale reads are answered at once from local state; linearizable reads wait for
    /// a read index (one per batch of reads) and for apply to reach it.
    pub fn read(&mut self, request: ReadRequest, now_unix_ms: u64, now: Duration, callback: ReadCallback) {
        let now_unix_ms = self.read_time(now_unix_ms);
        if self.failure.is_some() {
            return callback(ReadResponse { error: Some(self.unavailable().into()), ..Default::default() });
        }
        if request.allow_stale {
            return callback(self.execute(&request, now_unix_ms));
        }
        self.client_activity();
        if !self.is_leader() || self.removed {
            return callback(ReadResponse { error: Some(self.not_leader().into()), ..Default::default() });
        }
        if self.cfg.planted.read_without_read_index {
            return callback(self.execute(&request, now_unix_ms));
        }
        if self.lease_covers(now) {
            self.lease.used_at = now;
            let committed = self.raw.raft.raft_log.committed;
            if self.read_batches.is_empty() && self.sm.state().applied_index >= committed {
                return callback(self.execute(&request, now_unix_ms));
            }
            // Answered once apply reaches today's commit index, in order with earlier reads (id 0:
            // no read-index request behind it).
            let batch = self.new_read_batch(0, Some(committed), vec![(request, callback)], now);
            self.read_batches.push_back(batch);
            return;
        }
        let queued: usize = self.waiting_reads.len() + self.read_batches.iter().map(|b| b.reads.len()).sum::<usize>();
        if queued >= self.cfg.pending_reads_max {
            let e = TernError::Busy(format!("partition {} has {queued} reads queued (limit {})", self.group, self.cfg.pending_reads_max));
            return callback(ReadResponse { error: Some(e.into()), ..Default::default() });
        }
        self.waiting_reads.push((request, callback));
    }

    /// Turns the reads that arrived since the last round into one read-index request.
    pub fn flush_reads(&mut self, now: Duration) {
        if self.waiting_reads.is_empty() {
            return;
        }
        let reads = std::mem::take(&mut self.waiting_reads);
        self.issue_read_index(reads, now);
    }

    pub(super) fn issue_read_index(&mut self, reads: Vec<(ReadRequest, ReadCallback)>, now: Duration) {
        let id = self.next_read_id;
        self.next_read_id += 1;
        self.raw.read_index(id.to_be_bytes().to_vec());
        let batch = self.new_read_batch(id, None, reads, now);
        self.read_batches.push_back(batch);
    }

    pub(super) fn new_read_batch(&self, id: u64, index: Option<u64>, reads: Vec<(ReadRequest, ReadCallback)>, now: Duration) -> ReadBatch {
        let (term, lease_epoch, ticks) = (self.raw.raft.term, self.lease.epoch, self.ticks);
        ReadBatch { id, issued_tick: ticks, first_tick: ticks, index, reads, issued_at: now, term, lease_epoch }
    }

    pub(super) fn serve_reads(&mut self, now_unix_ms: u64) {
        let applied = self.sm.state().applied_index;
        let servable = |b: &ReadBatch| b.index.is_some_and(|i| i <= applied);
        // Batches without reads (lease renewals) are done without the engine.
        while self.read_batches.front().is_some_and(|b| servable(b) && b.reads.is_empty()) {
            self.read_batches.pop_front();
        }
        match self.read_batches.front() {
            Some(b) if servable(b) => {}
            _ => return,
        }
        self.ensure_engine();
        if self.failure.is_some() {
            return; // stopping failed the reads
        }
        let now_unix_ms = self.read_time(now_unix_ms);
        while self.read_batches.front().is_some_and(servable) {
            let batch = self.read_batches.pop_front().expect("front exists");
            for (request, callback) in batch.reads {
                callback(self.execute(&request, now_unix_ms));
            }
        }
    }

    /// The time reads (and checksums) look at: never before the log's clock. What the state machine
    /// already treats as expired may or may not have been compacted away yet; it must read as expired
    /// either way, whatever this node's clock says.
    pub(super) fn read_time(&self, now_unix_ms: u64) -> u64 {
        now_unix_ms.max(self.sm.state().stamp_ms)
    }

    /// Starts a background flush of the engine (`begin`: whether it could start), or says whether
    /// it has finished. Only makes more durable what apply wrote: no state changes.
    pub fn flush_engine(&self, begin: bool) -> Result<bool, TernError> {
        let engine = self.sm.engine();
        let r = if begin { engine.begin_sync() } else { engine.sync_finished() };
        r.map_err(crate::apply::engine_error)
    }

    /// Checkpoints the engine into `dir` for a backup: the state at the applied index, which must
    /// be at least `min_applied_index` (what a linearizable read just saw here: a replica that
    /// replaced it since, and is behind, is refused).
    pub fn checkpoint_into(&self, dir: &Path, min_applied_index: u64) -> Result<crate::store::Checkpointed, TernError> {
        if self.failure.is_some() {
            return Err(self.unavailable());
        }
        let applied = self.sm.state().applied_index;
        if applied < min_applied_index {
            return Err(TernError::Unavailable(format!(
                "replica of {} has applied {applied}, behind the read at {min_applied_index}: it was replaced",
                self.group
            )));
        }
        self.sm.engine().checkpoint(dir).map_err(crate::apply::engine_error)?;
        Ok(crate::store::Checkpointed { applied_index: self.sm.state().applied_index })
    }

    /// A leader's duplication state and change log after `after` (see `StoreMsg::DupLog`).
    pub fn dup_log(&self, after: u64, max_entries: usize, max_bytes: usize) -> Result<crate::store::DupLogRead, TernError> {
        if self.failure.is_some() {
            return Err(self.unavailable());
        }
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let state = self.sm.state();
        let entries = if max_entries == 0 { Vec::new() } else { self.sm.read_change_log(after, max_entries, max_bytes)? };
        Ok(crate::store::DupLogRead {
            applied_index: state.applied_index,
            hlc: state.hlc,
            stamp_ms: state.stamp_ms,
            partition_count: self.partition_count(),
            state: self.sm.dup_state().clone(),
            entries,
        })
    }

    /// (applied index, checksum, record count) of the replica's contents (or of its user records
    /// only, as a reader sees them).
    pub fn checksum(&self, now_unix_ms: u64, data_only: bool) -> Result<(u64, u64, u64), TernError> {
        let sum = if data_only { crate::read::data_checksum } else { checksum };
        let (sum, count) = sum(self.sm.engine(), self.read_time(now_unix_ms), self.sm.owner())?;
        Ok((self.sm.state().applied_index, sum, count))
    }
}

pub(super) fn fail_reads(reads: Vec<(ReadRequest, ReadCallback)>, e: TernError) {
    for (_, callback) in reads {
        callback(ReadResponse { error: Some(e.clone().into()), ..Default::default() });
    }
}
