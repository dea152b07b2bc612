//! Two clusters duplicating into each other: every partition leader runs the production shipper
//! (`tern_server::dup::PartitionShipper`, the same code the server drives on tokio), whose actions
//! are carried out here in virtual time: reads and proposals through the node's store, batches to
//! the other cluster over the simulated network (lost when the link is cut, answered with the
//! remote replica's own answer), full copies from a checkpoint on the node's simulated disk. At the
//! end both clusters must hold the same records in every partition.

use super::*;
use tern_proto::{DupApply, DupRecord, Duplication};
use tern_server::dup::{copy_records, Action, PartitionShipper};

/// How often a node looks for partitions it leads that need a shipper.
const SHIP_TICK_MS: u64 = 100;
/// A batch sent to the other cluster without an answer in this long has failed.
const SEND_TIMEOUT_MS: u64 = 1_000;
/// Change-log entries each duplication may hold back: small, so that cut links and crashes
/// push duplications into full copies now and then.
const LOG_ENTRIES_MAX: u64 = 40;
/// How long (virtual ms) the clusters get to converge after the run, and how often they are compared.
const CONVERGE_MS_MAX: u64 = 60_000;
const CONVERGE_STEP_MS: u64 = 1_000;

/// What a shipper waited for.
#[derive(Debug)]
pub(super) enum ShipOutcome {
    Proposed(Result<(), TernError>),
    Sent(Result<(), TernError>),
    Wake,
    TimedOut,
}

struct SimShipper {
    machine: PartitionShipper,
    /// The incarnation of the node it runs on (a crash ends it).
    epoch: u64,
    /// The outcome it waits for carries this token; others are stale.
    token: u64,
    /// A full copy's batches, read from its checkpoint at once.
    copy: std::collections::VecDeque<Vec<DupRecord>>,
    /// The node of the other cluster the batch in flight went to.
    sent_to: NodeId,
}

#[derive(Default)]
pub(super) struct DupWorld {
    shippers: BTreeMap<(NodeId, GroupId), SimShipper>,
    next_token: u64,
    /// Where each cluster's partitions are led, as the shippers of the other one route to them
    /// (the client's own routing: leader hints followed, the next replica tried on failure).
    remote_routes: BTreeMap<usize, LeaderTable>,
}

impl World {
    /// The duplication from a cluster's table to the other's, as meta would hand it to servers.
    fn duplication_of(&self, cluster: usize) -> Duplication {
        let other = 1 - cluster;
        Duplication {
            id: 1 + cluster as u64,
            table: "t".into(),
            table_id: Self::table_of(cluster),
            remote_meta: vec![],
            remote_table: "t".into(),
            remote_tag: tern_core::codec::cluster_tag(1 + other as u64),
            paused: false,
            log_entries_max: LOG_ENTRIES_MAX,
            partitions: vec![],
        }
    }

    fn cluster_tag_of(&self, node: NodeId) -> u32 {
        tern_core::codec::cluster_tag(1 + self.cluster_of(node) as u64)
    }

    /// Starts a shipper on every partition the node leads that has none.
    pub(super) fn ship_tick(&mut self, node: NodeId, epoch: u64) {
        let i = self.node_index(node);
        if self.nodes[i].epoch != epoch || self.nodes[i].store.is_none() {
            return;
        }
        self.dup.shippers.retain(|(n, _), s| *n != node || s.epoch == epoch);
        let led: Vec<GroupId> = self.statuses(i).iter().filter(|s| s.is_leader && s.failure.is_empty()).map(|s| GroupId(s.group_id)).collect();
        for group in led {
            if !self.dup.shippers.contains_key(&(node, group)) {
                let machine = PartitionShipper::new(group, self.cluster_tag_of(node));
                let action = machine.start();
                self.dup.shippers.insert((node, group), SimShipper { machine, epoch, token: 0, copy: Default::default(), sent_to: 0 });
                self.drive_shipper(node, group, action);
            }
        }
        self.shared.lock().schedule(SHIP_TICK_MS, Event::ShipTick { node, epoch });
    }

    /// The routing of the other cluster's table, from `node`'s cluster.
    fn remote_route(&mut self, node: NodeId) -> &LeaderTable {
        let (other, n, partitions) = (1 - self.cluster_of(node), self.cfg.nodes as u64, self.cfg.partitions);
        self.dup.remote_routes.entry(other).or_insert_with(|| {
            let first = other as u64 * n;
            let replicas: Vec<NodeId> = (first + 1..=first + n).collect();
            LeaderTable::new((0..partitions).map(|p| (replicas.clone(), first + 1 + p as u64 % n)).collect())
        })
    }

    fn new_token(&mut self, node: NodeId, group: GroupId) -> u64 {
        self.dup.next_token += 1;
        let token = self.dup.next_token;
        if let Some(s) = self.dup.shippers.get_mut(&(node, group)) {
            s.token = token;
        }
        token
    }

    /// A change-log read on the node's replica (synchronous, as the store answers it at once).
    fn read_dup_log(&mut self, i: usize, group: GroupId, after: u64, max_entries: usize) -> Result<tern_raft::store::DupLogRead, TernError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let max_bytes = tern_server::dup::READ_BYTES_MAX;
        self.with_store(i, |s| {
            s.handle(StoreMsg::DupLog { group, after, max_entries, max_bytes, callback: Box::new(move |r| drop(tx.send(r))) });
        });
        rx.try_recv().unwrap_or_else(|_| Err(TernError::Unavailable("the node is down".into())))
    }

    /// Carries out a shipper's actions until it waits for something.
    fn drive_shipper(&mut self, node: NodeId, group: GroupId, mut action: Action) {
        let i = self.node_index(node);
        loop {
            let now_unix = self.nodes[i].clock(&self.now).now_unix_ms();
            let Some(shipper) = self.dup.shippers.get_mut(&(node, group)) else { return };
            action = match action {
                Action::Stop => {
                    self.dup.shippers.remove(&(node, group));
                    return;
                }
                Action::ReadState => {
                    let read = self.read_dup_log(i, group, 0, 0);
                    let wanted = vec![self.duplication_of(self.cluster_of(node))];
                    let Some(shipper) = self.dup.shippers.get_mut(&(node, group)) else { return };
                    shipper.machine.on_state(now_unix, read, &wanted)
                }
                Action::ReadLog { after } => {
                    let read = self.read_dup_log(i, group, after, tern_server::dup::READ_ENTRIES_MAX);
                    let Some(shipper) = self.dup.shippers.get_mut(&(node, group)) else { return };
                    shipper.machine.on_log(now_unix, read)
                }
                Action::Propose(op) => {
                    let partition = partition_ref(group, shipper.machine.partition_count());
                    let token = self.new_token(node, group);
                    let shared = self.shared.clone();
                    let request = WriteRequest { partition: Some(partition), op: Some(op), ..Default::default() };
                    self.with_store(i, move |s| {
                        s.handle(StoreMsg::Write {
                            group,
                            request,
                            callback: Box::new(move |r| {
                                let outcome = ShipOutcome::Proposed(tern_proto::check(&r.error));
                                shared.lock().schedule(0, Event::Shipper { node, group, token, outcome });
                            }),
                        });
                        s.process_ready();
                    });
                    return;
                }
                Action::Send { dup: _, apply } => {
                    let token = self.new_token(node, group);
                    let other = 1 - self.cluster_of(node);
                    let partition = group.partition();
                    let to = self.remote_route(node).leader(partition);
                    if let Some(s) = self.dup.shippers.get_mut(&(node, group)) {
                        s.sent_to = to;
                    }
                    let remote_group = GroupId::new(Self::table_of(other), partition);
                    let mut s = self.shared.lock();
                    if !s.lost(node, to) {
                        let delay = s.latency();
                        s.schedule(delay, Event::DupRequest { to, group: remote_group, apply, from: node, from_group: group, token });
                    }
                    s.schedule(SEND_TIMEOUT_MS, Event::Shipper { node, group, token, outcome: ShipOutcome::TimedOut });
                    return;
                }
                Action::BeginCopy { dup: _, min_applied_index } => {
                    let begun = self.checkpoint_records(i, group, min_applied_index);
                    let Some(shipper) = self.dup.shippers.get_mut(&(node, group)) else { return };
                    let begun = begun.map(|(index, batches)| {
                        shipper.copy = batches;
                        index
                    });
                    shipper.machine.on_copy_begun(now_unix, begun)
                }
                Action::CopyNext => {
                    // As the server's driver: only while this replica still leads.
                    let leads = self.read_dup_log(i, group, 0, 0).map(|_| ());
                    let Some(shipper) = self.dup.shippers.get_mut(&(node, group)) else { return };
                    let batch = leads.map(|()| shipper.copy.pop_front());
                    shipper.machine.on_copy_batch(now_unix, batch)
                }
                Action::Wait { ms } => {
                    let token = self.new_token(node, group);
                    self.shared.lock().schedule(ms, Event::Shipper { node, group, token, outcome: ShipOutcome::Wake });
                    return;
                }
            };
        }
    }

    /// A full copy's batches: a checkpoint of the replica on the node's disk, read at once.
    fn checkpoint_records(
        &mut self,
        i: usize,
        group: GroupId,
        min_applied_index: u64,
    ) -> Result<(u64, std::collections::VecDeque<Vec<DupRecord>>), TernError> {
        self.dup.next_token += 1;
        let dir = self.nodes[i].dir.join(format!("dup-copy-{}", self.dup.next_token));
        let (tx, rx) = std::sync::mpsc::channel();
        let target = dir.clone();
        self.with_store(i, |s| {
            s.handle(StoreMsg::Checkpoint {
                group,
                dir: target,
                min_applied_index,
                partition_count: 0,
                callback: Box::new(move |r| drop(tx.send(r))),
            });
        });
        let checkpoint = rx.try_recv().unwrap_or_else(|_| Err(TernError::Unavailable("the node is down".into())))?;
        let dest_tag = tern_core::codec::cluster_tag(1 + (1 - self.cluster_of(self.nodes[i].id)) as u64);
        let engines = self.nodes[i].engines.clone();
        let mut batches = std::collections::VecDeque::new();
        let read = (|| {
            use tern_engine::EngineFactory as _;
            let engine = engines.open(&dir).map_err(tern_raft::apply::engine_error)?;
            copy_records(engine.as_ref(), dest_tag, &mut |batch| {
                batches.push_back(batch);
                Ok(())
            })
        })();
        let _ = self.nodes[i].files.remove_all(&dir);
        read.map(|_| (checkpoint.applied_index, batches))
    }

    pub(super) fn on_ship_outcome(&mut self, node: NodeId, group: GroupId, token: u64, outcome: ShipOutcome) {
        let i = self.node_index(node);
        let epoch = self.nodes[i].epoch;
        let now_unix = self.nodes[i].clock(&self.now).now_unix_ms();
        let Some(shipper) = self.dup.shippers.get_mut(&(node, group)) else { return };
        if shipper.epoch != epoch || shipper.token != token || self.nodes[i].store.is_none() {
            return; // stale: an answer to something given up on, or from before a crash
        }
        shipper.token = 0;
        let action = match outcome {
            ShipOutcome::Proposed(r) => shipper.machine.on_proposed(now_unix, r),
            ShipOutcome::Sent(_) | ShipOutcome::TimedOut => {
                let sent = match outcome {
                    ShipOutcome::Sent(r) => r,
                    _ => Err(TernError::Timeout("no answer from the other cluster".into())),
                };
                let sent_to = shipper.sent_to;
                if let Err(e) = &sent {
                    // As the client routes: a leader hint followed, else the next replica.
                    let _ = self.remote_route(node).observe(group.partition(), sent_to, e);
                }
                let Some(shipper) = self.dup.shippers.get_mut(&(node, group)) else { return };
                shipper.machine.on_sent(now_unix, sent)
            }
            ShipOutcome::Wake => shipper.machine.on_wake(),
        };
        self.drive_shipper(node, group, action);
    }

    /// A batch from the other cluster, applied through this node's replica as a client's write
    /// would be (checked first, as the server's edge checks it).
    pub(super) fn serve_dup_request(&mut self, to: NodeId, group: GroupId, apply: DupApply, from: NodeId, from_group: GroupId, token: u64) {
        let i = self.node_index(to);
        let partition = partition_ref(group, self.cfg.partitions);
        let request = WriteRequest { partition: Some(partition), op: Some(write_request::Op::DupApply(apply)), ..Default::default() };
        let shared = self.shared.clone();
        let reply = move |r: Result<(), TernError>| {
            let mut s = shared.lock();
            if !s.lost(to, from) {
                let delay = s.latency();
                s.schedule(delay, Event::Shipper { node: from, group: from_group, token, outcome: ShipOutcome::Sent(r) });
            }
        };
        self.with_store(i, move |s| {
            s.handle(StoreMsg::Write { group, request, callback: Box::new(move |r| reply(tern_proto::check(&r.error))) });
            s.process_ready();
        });
    }

    /// After the run: both clusters must come to hold the same records in every partition (every
    /// replica of both, compared at one time past every TTL written).
    pub(super) fn settle_and_compare_clusters(&mut self) {
        let mut waited = 0;
        loop {
            let at_unix_ms = EPOCH_UNIX_MS + self.now.load(Ordering::SeqCst) + 600_000;
            let mut differing = Vec::new();
            for p in 0..self.cfg.partitions {
                let mut sums = Vec::new();
                for i in 0..self.cfg.nodes * 2 {
                    let group = GroupId::new(Self::table_of(self.cluster_of(self.nodes[i].id)), p);
                    let (tx, rx) = std::sync::mpsc::channel();
                    self.with_store(i, |s| {
                        s.handle(StoreMsg::Checksum { group, at_unix_ms, data_only: true, callback: Box::new(move |r| drop(tx.send(r))) });
                    });
                    sums.push((self.nodes[i].id, rx.try_recv().ok().and_then(|r| r.ok()).map(|(_, sum, count)| (sum, count))));
                }
                if sums.iter().any(|(_, s)| s.is_none() || *s != sums[0].1) {
                    differing.push((p, sums));
                }
            }
            if differing.is_empty() {
                return;
            }
            if waited >= CONVERGE_MS_MAX {
                let statuses = self.replica_statuses();
                let shippers: Vec<String> = self
                    .dup
                    .shippers
                    .iter()
                    .map(|((node, group), s)| format!("node {node} group {group}: {:?}", s.machine.statuses().collect::<Vec<_>>()))
                    .collect();
                for (p, _) in &differing {
                    self.dump_records(0, *p);
                    self.dump_records(self.cfg.nodes, *p);
                }
                self.failures.push(format!(
                    "the clusters differ {CONVERGE_MS_MAX} ms after the run (partition, [(node, (checksum, records))]): {differing:?}\n    shippers: {shippers:#?}{statuses}"
                ));
                return;
            }
            self.settle(CONVERGE_STEP_MS);
            waited += CONVERGE_STEP_MS;
        }
    }
}

impl World {
    /// With TERN_SIM_DUMP set: a replica's user records and tombstones, decoded.
    pub(super) fn dump_records(&self, i: usize, partition: u32) {
        if std::env::var("TERN_SIM_DUMP").is_err() {
            return;
        }
        let node = &self.nodes[i];
        let group = GroupId::new(Self::table_of(self.cluster_of(node.id)), partition);
        let dir = node.dir.join("replicas").join(group.0.to_string());
        let Ok(meta) = tern_raft::replica::ReplicaMeta::load(&*node.files, &dir) else { return };
        use tern_engine::EngineFactory as _;
        let Ok(engine) = node.engines.open(&dir.join(&meta.engine_dir)) else { return };
        eprintln!("--- node {} group {group}", node.id);
        let _ = engine.scan(&[0x00, b'c'], None, &mut |k, v| {
            if k.first() == Some(&0x01) {
                let s = tern_core::codec::decode_stored(v).expect("decodes");
                eprintln!("  {:?} v={:x} exp={} {:?}", String::from_utf8_lossy(&k[3..]), s.version, s.expire_at_ms, String::from_utf8_lossy(s.value));
            } else if k.starts_with(&[0x00, b'c']) {
                let v = tern_core::codec::decode_value(v).map(|(_, v)| v).unwrap_or_default();
                eprintln!("  change log {:?}: {:?}", &k[2..], <tern_proto::DupLogEntry as prost::Message>::decode(v));
            } else if k == [0x00, b'u'] {
                let v = tern_core::codec::decode_value(v).map(|(_, v)| v).unwrap_or_default();
                eprintln!("  dup state {:?}", <tern_proto::PartitionDupState as prost::Message>::decode(v));
            } else if k.starts_with(&[0x00, b't']) {
                eprintln!("  tombstone {:?} v={:x}", String::from_utf8_lossy(&k[4..]), tern_raft::apply::decode_tombstone(v.to_vec()).unwrap_or(0));
            }
            true
        });
    }
}

/// A partition reference for a group (the client's view of it).
fn partition_ref(group: GroupId, partition_count: u32) -> tern_proto::PartitionRef {
    tern_proto::PartitionRef { table_id: group.table_id(), partition: group.partition(), partition_count }
}
