//! Snapshot files and replica metadata: generating checkpoints to send, keeping received ones until
//! raft installs one, installing them, and `replica.json` (written atomically and durably).

use super::*;

/// Received snapshot directories kept while waiting for raft to install one.
pub(super) const RECEIVED_SNAPSHOTS_MAX: usize = 4;

/// What a replica remembers about itself across restarts (besides the raft log and its engine).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ReplicaMeta {
    pub group: u64,
    pub peer_id: PeerId,
    /// (peer id, node id) of every member.
    pub peers: Vec<(PeerId, NodeId)>,
    pub partition_count: u32,
    /// The engine directory under the replica's directory (changes when a snapshot is installed).
    pub engine_dir: String,
}

impl ReplicaMeta {
    pub fn load(fs: &dyn FileSystem, dir: &Path) -> Result<ReplicaMeta, TernError> {
        let path = dir.join("replica.json");
        let bytes = fs.read(&path).map_err(|e| TernError::Internal(format!("read {}: {e}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|e| TernError::Corruption(format!("{}: {e}", path.display())))
    }

    /// Atomic, durable replace (temporary file synced, renamed, directory synced).
    pub fn save(&self, fs: &dyn FileSystem, dir: &Path) -> Result<(), TernError> {
        let bytes = serde_json::to_vec_pretty(self).expect("serialize replica meta");
        fs.write_file_atomically(&dir.join("replica.json"), &bytes)
            .map_err(|e| TernError::Internal(format!("save replica meta in {}: {e}", dir.display())))
    }
}

impl Replica {
    /// Generates a snapshot if raft asked for one (called after every event that may step raft).
    pub fn maybe_generate_snapshot(&mut self) {
        if !self.raw.store().take_snapshot_wanted() {
            return;
        }
        self.ensure_engine();
        if self.failure.is_some() {
            return;
        }
        let state = self.sm.state().clone();
        if self.raw.store().generated_snapshot().is_some_and(|s| s.get_metadata().index == state.applied_index) {
            return;
        }
        let name = format!("{}_{}", state.applied_index, state.applied_term);
        let dir = self.snapshot_dir.join(&name);
        if self.files.exists(&dir) {
            let _ = self.files.remove_all(&dir);
        }
        if let Err(e) = self.sm.engine().checkpoint(&dir) {
            tracing::warn!(group = %self.group, "snapshot checkpoint failed: {e}");
            return;
        }
        let mut snap = Snapshot::default();
        snap.set_data(name.clone().into_bytes().into());
        let meta = snap.mut_metadata();
        meta.index = state.applied_index;
        meta.term = state.applied_term;
        meta.set_conf_state(state.conf_state);
        self.raw.mut_store().set_generated_snapshot(snap);
        self.remove_old_snapshots(&name);
        tracing::info!(group = %self.group, index = state.applied_index, "made a snapshot for a peer that fell behind the log");
    }

    /// Keeps the newest generated checkpoint and one before it (a transfer may still be reading it).
    pub(super) fn remove_old_snapshots(&self, keep: &str) {
        let Ok(dir) = self.files.read_dir(&self.snapshot_dir) else { return };
        let mut names: Vec<(u64, String)> = dir
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .filter(|n| n != keep)
            .filter_map(|n| n.split('_').next().and_then(|i| i.parse().ok()).map(|i| (i, n)))
            .collect();
        names.sort();
        names.pop();
        for (_, n) in names {
            let _ = self.files.remove_all(&self.snapshot_dir.join(n));
        }
    }

    pub(super) fn install_snapshot(&mut self, snapshot: Snapshot, log_batch: &mut LogWriteBatch) {
        let meta = snapshot.get_metadata();
        let key = (meta.index, meta.term);
        let Some(received) = self.received_snapshots.remove(&key) else {
            return self.fail(StorageFailure(TernError::Internal(format!("no received data for snapshot {key:?}"))));
        };
        for (_, stale) in self.received_snapshots.drain() {
            let _ = self.files.remove_all(&stale);
        }
        let engine_dir = format!("engine-{}-{}", meta.index, meta.term);
        let target = self.dir.join(&engine_dir);
        // Through the factory: it owns what an engine directory means (the memory engine keeps
        // contents by path, and would otherwise hand back an earlier install's).
        if let Err(e) = self.engines.destroy(&target) {
            return self.fail(StorageFailure(crate::apply::engine_error(e)));
        }
        if let Err(e) = self.files.rename_durably(&received, &target) {
            return self.fail(StorageFailure(TernError::Internal(format!("move received snapshot into place: {e}"))));
        }
        // A snapshot that passed its manifest yet does not open, or is not at the index raft says,
        // stops this replica (meta replaces it); it never takes the node down.
        let engine = match self.engines.open(&target) {
            Ok(e) => e,
            Err(e) => return self.fail(StorageFailure(crate::apply::engine_error(e))),
        };
        let sm = match open_state_machine(engine, ApplyState::default(), &self.meta, &self.cfg.planted) {
            Ok(sm) => sm,
            Err(e) => return self.fail(StorageFailure(e)),
        };
        if sm.state().applied_index != meta.index {
            let found = sm.state().applied_index;
            return self.fail(StorageFailure(TernError::Corruption(format!("snapshot {key:?} holds a state machine at index {found}"))));
        }
        // Our proposals the snapshot covers may or may not be in it (committed by another leader,
        // or overwritten): their outcome is unknown, not "did not happen".
        while self.proposals.front().is_some_and(|p| p.index <= meta.index) {
            let p = self.proposals.pop_front().expect("front exists");
            (p.callback)(error_response(TernError::Timeout(format!(
                "entry {} was replaced by a snapshot at index {}; outcome unknown",
                p.index, meta.index
            ))));
        }
        let old_dir = self.dir.join(&self.meta.engine_dir);
        self.sm = sm; // drops (closes) the old engine
        self.sync_in_flight = None; // a sync of the old engine says nothing about the new one
        self.meta.engine_dir = engine_dir;
        if let Err(e) = self.meta.save(&*self.files, &self.dir) {
            return self.fail(StorageFailure(e));
        }
        let _ = self.engines.destroy(&old_dir);
        self.raw.mut_store().apply_snapshot(&snapshot, log_batch);
        self.snapshots_applied += 1;
        tracing::info!(group = %self.group, index = meta.index, "installed snapshot");
    }
}
