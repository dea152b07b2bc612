//! A replica's configuration, and the bugs simulator tests plant through it.

/// Bugs planted on purpose by the tests that prove the simulator catches them. They travel in the
/// configuration of the thing under test (never a process-wide switch that tests sharing a process
/// could race on); production leaves every one off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// A leader answers linearizable reads from local state without confirming leadership.
    pub read_without_read_index: bool,
    /// The read lease is 40 times longer than followers refuse votes for.
    pub lease_too_long: bool,
    /// A leader keeps using its lease after it started a leadership transfer.
    pub lease_through_transfer: bool,
    /// Compaction expires records by the node's wall clock instead of the applied log's clock.
    pub expiry_by_local_clock: bool,
    /// A storage failure at apply is answered as an error and the entry counts as applied.
    pub storage_failure_as_answer: bool,
    /// A received snapshot is handed to raft without checking it against its manifest.
    pub unverified_snapshot: bool,
    /// A restarted replica votes at once, forgetting it may have heard from a leader just before.
    pub vote_right_after_restart: bool,
    /// A new replica's directory is created without syncing its parent: a crash can lose the
    /// replica while its raft log (votes, acknowledged entries) survives.
    pub replica_dir_not_durable: bool,
    /// A store opens its raft log without removing entries the log store brought back from at or
    /// below a group's truncated index (raft-engine can, after purges): the next append leaves a hole.
    pub keep_resurrected_log_entries: bool,
    /// A duplicated write compares with an expired record as if it were absent (whatever its
    /// version): an older write from the other cluster replaces a newer, expired one on one side.
    pub lww_ignores_expired: bool,
}

#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Ticks without a leader before an election; the real value is drawn per replica from
    /// [election_tick, 2 * election_tick) by the store's seeded generator.
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Compact the log once this many applied entries sit in it (up to what the engine holds
    /// durably); at two to three times this many, sync the engine for it instead of waiting for the
    /// periodic sync.
    pub log_gc_count_threshold: u64,
    /// A leader keeps entries a follower still needs unless the follower lags by more than this.
    pub log_gc_lag_max: u64,
    /// Check for log compaction every this many ticks.
    pub log_gc_interval_ticks: u64,
    /// Sync the engine every this many ticks (when it applied something meanwhile), so compaction
    /// may expire records up to the durable applied clock (see `StateMachine::sync_finished`).
    pub expiry_sync_interval_ticks: u64,
    /// Client writes proposed but not yet applied, per replica.
    pub pending_proposals_max: usize,
    /// Client reads waiting for a read index, per replica.
    pub pending_reads_max: usize,
    /// Give up on a read index after this many ticks (the client retries).
    pub read_timeout_ticks: u64,
    /// How long after a read-index round a leader may answer reads without another one (a lease).
    /// The store sets it below the time followers refuse to vote after hearing from a leader
    /// (election_tick ticks); zero turns lease reads off.
    pub read_lease: std::time::Duration,
    /// A leader quiescent for this many ticks lets its group hibernate (stop ticking; see
    /// `replica::hibernation`); zero keeps every group ticking. Followers hibernate when their
    /// leader says so, whatever their own setting.
    pub hibernate_after_ticks: u64,
    /// Bugs put back on purpose by simulator tests (all off in production).
    pub planted: PlantedBugs,
    /// The cluster's id once the server knows it (0 before): leaders stamp entries with its tag,
    /// which versions every record they write.
    pub cluster_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Ticks to an election by default (heartbeats every tick): with 100 ms ticks, a follower campaigns
/// 0.5 to 1 s after its leader's last heartbeat, so writes stall for about a second at most when a
/// leader's server dies; read leases last (5 - 2) ticks times 7/8 (see `Store::new`).
pub const ELECTION_TICK_DEFAULT: usize = 5;

/// Quiet ticks before a leader lets its group hibernate by default: 2 s with 100 ms ticks, long
/// enough that a group in use (even by one request a second) never sleeps between requests.
pub const HIBERNATE_AFTER_TICKS_DEFAULT: u64 = 20;

impl ReplicaConfig {
    /// Sets the election timeout, with heartbeats five times per timeout (at least one per tick):
    /// a follower campaigns only after missing several heartbeats in a row.
    pub fn set_election_tick(&mut self, ticks: usize) {
        self.election_tick = ticks;
        self.heartbeat_tick = (ticks / 5).max(1);
    }
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            election_tick: ELECTION_TICK_DEFAULT,
            heartbeat_tick: (ELECTION_TICK_DEFAULT / 5).max(1),
            log_gc_count_threshold: 10_000,
            log_gc_lag_max: 50_000,
            log_gc_interval_ticks: 10,
            expiry_sync_interval_ticks: 100,
            pending_proposals_max: 20_000,
            pending_reads_max: 20_000,
            read_timeout_ticks: 50,
            read_lease: std::time::Duration::ZERO,
            hibernate_after_ticks: HIBERNATE_AFTER_TICKS_DEFAULT,
            planted: PlantedBugs::default(),
            cluster_id: Default::default(),
        }
    }
}
