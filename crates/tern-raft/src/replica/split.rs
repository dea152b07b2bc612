//! A partition split, the replica's part (docs/design/split.md). Meta asks for a larger partition
//! count; the leader proposes a split entry; every replica that applies it owns half its hashkeys
//! from then on (`apply::Owner`) and checkpoints its engine at exactly that entry for the child
//! partition, which the store opens beside it: the child's members are the parent's, on the same
//! nodes, and its log starts at the split entry, so no data crosses the network.

use super::*;

/// Directory under a node's data directory where children are checkpointed before the store moves
/// them into place (what a crash leaves there is removed when the store opens).
pub const SPLITS_DIR: &str = "splits";

/// Ticks a leader waits before proposing a split again (one that was refused or lost).
const SPLIT_PROPOSE_INTERVAL_TICKS: u64 = 20;

/// A child partition checkpointed at a split entry, for the store to open.
#[derive(Clone, Debug)]
pub struct SplitChild {
    /// Holds the child's `replica.json` and engine; the store renames it into place.
    pub staging: PathBuf,
    pub meta: ReplicaMeta,
    /// This replica led the parent when it split: the child campaigns at once (its peers elect
    /// it as soon as they have split too, instead of after an election timeout).
    pub leader: bool,
}

impl Replica {
    /// Meta wants the table at `count` partitions: a leader of a partition that has not split that
    /// far proposes the split (again after a while, if the entry was refused or lost). `store_tick`
    /// is the store's tick count (it goes on while the group hibernates, as its own does not).
    pub fn want_partition_count(&mut self, count: u32, now_unix_ms: u64, store_tick: u64) {
        if count <= self.partition_count() || !self.is_leader() || !self.active() {
            return;
        }
        if self.split_proposed_tick.is_some_and(|t| store_tick < t + SPLIT_PROPOSE_INTERVAL_TICKS) {
            return;
        }
        self.split_proposed_tick = Some(store_tick);
        let target = (self.partition_count() * 2).min(count);
        let group = self.group;
        let write =
            WriteRequest { op: Some(tern_proto::write_request::Op::Split(tern_proto::Split { partition_count: target })), ..Default::default() };
        tracing::info!(group = %group, from = self.partition_count(), to = target, "proposing a split");
        self.propose(
            write,
            now_unix_ms,
            Box::new(move |r| {
                if let Some(e) = r.error {
                    tracing::info!(group = %group, "split not applied: {}", e.message);
                }
            }),
        );
    }

    /// The answer to a request addressed by another partition count than this replica has applied:
    /// the partition has split (the client may route by the new count at once), or the client
    /// knows of a split this replica has not applied yet (it asks again). An empty replica's count
    /// from meta proves no split.
    pub fn addressed_by_another_count(&self, addressed: u32) -> TernError {
        let (table, partition, count) = (self.group.table_id(), self.group.partition(), self.applied_partition_count());
        if count > addressed {
            TernError::PartitionSplit {
                partition_count: count,
                message: format!("partition {partition} of table {table} has split: {count} partitions"),
            }
        } else {
            TernError::StaleConfig(format!("partition {partition} of table {table} has not split to {addressed} partitions yet"))
        }
    }

    /// The split entry at `index` has been applied and written: checkpoints the engine for the
    /// child (partition + count / 2) with the same members. A checkpoint that fails is a storage
    /// failure of this replica.
    pub(super) fn checkpoint_child(&mut self, count: u32, index: u64) -> Result<(), TernError> {
        let child = GroupId::new(self.group.table_id(), self.group.partition() + count / 2);
        let data_dir =
            self.dir.parent().and_then(Path::parent).ok_or_else(|| TernError::Internal(format!("replica directory {}", self.dir.display())))?;
        let staging = data_dir.join(SPLITS_DIR).join(child.0.to_string());
        let io = |e: std::io::Error| TernError::Internal(format!("split checkpoint {}: {e}", staging.display()));
        if self.files.exists(&staging) {
            self.files.remove_all(&staging).map_err(io)?;
        }
        // Durably (`splits/` too, which an earlier split may have left unsynced): a restart opens
        // a whole staged child (see `Store::open`), and its parent will not split it again.
        self.files.create_dir_all(&staging).map_err(io)?;
        self.files.sync_directory(data_dir).map_err(io)?;
        self.files.sync_directory(&data_dir.join(SPLITS_DIR)).map_err(io)?;
        let meta = ReplicaMeta {
            group: child.0,
            peer_id: self.peer_id,
            peers: self.meta.peers.clone(),
            partition_count: count,
            engine_dir: "engine".into(),
        };
        self.sm.engine().checkpoint(&staging.join(&meta.engine_dir)).map_err(crate::apply::engine_error)?;
        meta.save(&*self.files, &staging)?;
        tracing::info!(group = %self.group, child = %child, index, partitions = count, "partition split");
        self.split_children.push(SplitChild { staging, meta, leader: self.is_leader() });
        Ok(())
    }
}
