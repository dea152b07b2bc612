//! Faults: which ones a run gets and when (the planner), and how each is applied to the world.

use super::*;

#[derive(Clone, Copy, Debug)]
pub enum DiskFault {
    LogWrite,
    LogRead,
    EngineWrite,
    /// A point read of the engine fails (at apply: the replica stops).
    EngineRead,
    /// A point read of the engine returns a value with a flipped byte (its checksum must catch it).
    EngineCorruptRead,
}

#[derive(Clone, Debug)]
pub enum Fault {
    Crash(NodeId),
    Restart(NodeId),
    Isolate(NodeId),
    /// Cut links one way only: `from` cannot reach `to`.
    CutOneWay(NodeId, NodeId),
    Heal,
    ClockJump(NodeId, i64),
    Noise(bool),
    /// The node stops processing (as under SIGSTOP or a long pause) for this many milliseconds.
    Pause(NodeId, u64),
    /// The node's next raft-log write, raft-log read or engine write fails: the store treats it as
    /// fatal and the node restarts.
    DiskFailure(NodeId, DiskFault),
    /// Whichever meta node leads the catalog group now crashes, and restarts this many
    /// milliseconds later.
    CrashMetaLeader(u64),
    /// Whichever node leads this group now crashes, and restarts this many milliseconds later
    /// (for scripts).
    CrashLeader(GroupId, u64),
    /// The node's engines run a compaction now (RocksDB compacts in the background at any moment):
    /// records the expiry filter allows to drop are dropped.
    Compact(NodeId),
    /// While on, snapshot transfers may arrive cut short (the sender died half way, its checkpoint
    /// went away under it): the receiver must refuse them.
    CutSnapshots(bool),
    /// While on, leadership transfers' MsgTimeoutNow messages arrive seconds late, and the node
    /// that sent one is cut off (for 1.5 s) just before it arrives.
    SlowTransfers(bool),
    /// The sender of a late MsgTimeoutNow is cut off from every node (while slow transfers are on).
    CutTransferSender(NodeId),
    /// A node's links, cut by `CutTransferSender`, are restored (other cuts stay).
    Rejoin(NodeId),
    /// Two clusters: every link between them is cut (until `Heal`): duplication stops, both take
    /// writes.
    CutClusters,
    HealAll,
}

impl World {
    /// The fault schedule is drawn up front from the seed, so it can be printed.
    pub(super) fn plan_faults(&mut self) {
        if let Some((from, to)) = self.cfg.quiet {
            self.faults.push(format!("{from:>6} ms  clients quiet until {to} ms"));
        }
        if !self.cfg.faults {
            return;
        }
        if let Some(script) = self.cfg.script.clone() {
            // A directed scenario: exactly these faults, then everything heals.
            let mut s = self.shared.lock();
            for (at, f) in script.into_iter().chain([(self.cfg.fault_phase_ms, Fault::HealAll)]) {
                self.faults.push(format!("{:>6} ms  {f:?}", at));
                s.schedule(at, Event::Fault(f));
            }
            return;
        }
        let mut rng = SeededRandom::new(self.cfg.seed ^ 0xFA17);
        let mut t = rng.range(500, 1500);
        let n = (self.cfg.nodes * self.cfg.clusters) as u64;
        let mut planned = Vec::new();
        while t < self.cfg.fault_phase_ms {
            let node = rng.range(1, n + 1);
            let length = rng.range(300, 3000);
            match rng.range(0, 8) {
                0 => {
                    // One crash in three is a quick bounce (a supervisor restarting the process at
                    // once): the node is back within a lease, having forgotten what it heard.
                    let down = if rng.range(0, 3) == 0 { rng.range(30, 300) } else { length };
                    planned.push((t, Fault::Crash(node)));
                    planned.push((t + down, Fault::Restart(node)));
                }
                1 => {
                    planned.push((t, Fault::Isolate(node)));
                    planned.push((t + length, Fault::Heal));
                }
                2 => {
                    let other = 1 + (node % n);
                    planned.push((t, Fault::CutOneWay(node, other)));
                    planned.push((t + length, Fault::Heal));
                }
                3 => planned.push((t, Fault::ClockJump(node, rng.range(0, 20_000) as i64 - 10_000))),
                4 => planned.push((t, Fault::Pause(node, length))),
                5 => {
                    let kind = [DiskFault::LogWrite, DiskFault::LogRead, DiskFault::EngineWrite][rng.range(0, 3) as usize];
                    planned.push((t, Fault::DiskFailure(node, kind)));
                }
                _ => {
                    planned.push((t, Fault::Noise(true)));
                    planned.push((t + length, Fault::Noise(false)));
                }
            }
            t += rng.range(500, 2500);
        }
        if self.cfg.clusters == 2 {
            // The link between the clusters goes down for seconds at a time, from a generator of
            // its own.
            let mut rng = SeededRandom::new(self.cfg.seed ^ 0xC0717);
            let mut t = rng.range(1_000, 3_000);
            while t < self.cfg.fault_phase_ms {
                let length = rng.range(1_000, 4_000);
                planned.push((t, Fault::CutClusters));
                planned.push((t + length, Fault::Heal));
                t += length + rng.range(1_000, 4_000);
            }
        }
        if self.cfg.scheduler {
            // Outages long enough for meta to replace replicas, and meta outages, from their own
            // generator so the schedules above stay as they were.
            let mut rng = SeededRandom::new(self.cfg.seed ^ 0x5C4ED);
            let mut t = rng.range(1_000, 3_000);
            while t < self.cfg.fault_phase_ms {
                let node = rng.range(1, n + 1);
                let length = rng.range(4_000, 8_000);
                if rng.range(0, 3) == 0 {
                    planned.push((t, Fault::CrashMetaLeader(length / 2)));
                } else {
                    planned.push((t, Fault::Crash(node)));
                    planned.push((t + length, Fault::Restart(node)));
                }
                t += rng.range(3_000, 6_000);
            }
        }
        if let Some(meta) = self.meta.as_ref() {
            // The meta nodes get the faults every process gets: pauses, isolation, clock jumps,
            // crashes (quick bounces and longer ones).
            let mut rng = SeededRandom::new(self.cfg.seed ^ 0x3E7A);
            let first = meta.indices[0] as u64 + 1;
            let mut t = rng.range(2_000, 4_000);
            while t < self.cfg.fault_phase_ms {
                let node = rng.range(first, first + meta.indices.len() as u64);
                let length = rng.range(300, 3_000);
                match rng.range(0, 4) {
                    0 => planned.push((t, Fault::Pause(node, length))),
                    1 => {
                        planned.push((t, Fault::Isolate(node)));
                        planned.push((t + length, Fault::Heal));
                    }
                    2 => planned.push((t, Fault::ClockJump(node, rng.range(0, 20_000) as i64 - 10_000))),
                    _ => {
                        planned.push((t, Fault::Crash(node)));
                        planned.push((t + length / 10 + rng.range(0, length), Fault::Restart(node)));
                    }
                }
                t += rng.range(1_500, 4_000);
            }
        }
        // Faults added later come from their own generator, so the schedules above stay as they were.
        let mut rng = SeededRandom::new(self.cfg.seed ^ 0xD15C);
        let mut t = rng.range(500, 1500);
        while t < self.cfg.fault_phase_ms {
            let node = rng.range(1, n + 1);
            match rng.range(0, 6) {
                0 => planned.push((t, Fault::DiskFailure(node, DiskFault::EngineRead))),
                1 => planned.push((t, Fault::DiskFailure(node, DiskFault::EngineCorruptRead))),
                2 => {
                    planned.push((t, Fault::CutSnapshots(true)));
                    planned.push((t + rng.range(1_000, 4_000), Fault::CutSnapshots(false)));
                }
                _ => planned.push((t, Fault::Compact(node))),
            }
            t += rng.range(500, 2500);
        }
        // Compactions go on after healing too: what they drop must never matter.
        let mut t = self.cfg.fault_phase_ms;
        while t < self.cfg.fault_phase_ms + 20_000 {
            t += rng.range(1_000, 4_000);
            planned.push((t, Fault::Compact(rng.range(1, n + 1))));
        }
        planned.push((self.cfg.fault_phase_ms, Fault::HealAll));
        let mut s = self.shared.lock();
        for (at, f) in planned {
            self.faults.push(format!("{:>6} ms  {f:?}", at));
            s.schedule(at, Event::Fault(f));
        }
    }

    pub(super) fn apply_fault(&mut self, fault: Fault) {
        let shared = self.shared.clone();
        let net = |f: &dyn Fn(&mut Network)| f(&mut shared.lock().network);
        match fault {
            Fault::Crash(node) => {
                let i = self.node_index(node);
                if self.nodes[i].store.is_some() {
                    self.crash(i);
                }
            }
            Fault::Restart(node) => {
                let i = self.node_index(node);
                if self.nodes[i].store.is_none() {
                    self.start_node(i);
                }
            }
            Fault::Isolate(node) => {
                let n = self.nodes.len() as u64;
                net(&|w: &mut Network| {
                    for other in 1..=n {
                        if other != node {
                            w.cut.insert((node, other));
                            w.cut.insert((other, node));
                        }
                    }
                });
            }
            Fault::CutOneWay(from, to) => net(&|w: &mut Network| {
                w.cut.insert((from, to));
            }),
            Fault::Heal => net(&|w: &mut Network| w.cut.clear()),
            Fault::Noise(on) => net(&|w: &mut Network| w.noisy = on),
            Fault::ClockJump(node, delta) => {
                self.nodes[self.node_index(node)].clock_offset.fetch_add(delta, Ordering::SeqCst);
            }
            Fault::CrashMetaLeader(down) => {
                if let Some(i) = self.meta_leader() {
                    let id = self.nodes[i].id;
                    self.faults.push(format!("{:>6} ms  the meta leader is node {id}", self.now.load(Ordering::SeqCst)));
                    self.crash(i);
                    self.shared.lock().schedule(down, Event::Fault(Fault::Restart(id)));
                }
            }
            Fault::CrashLeader(group, down) => {
                let now = self.now.load(Ordering::SeqCst);
                let leader = (0..self.nodes.len())
                    .find_map(|i| self.statuses(i).into_iter().find(|r| r.group_id == group.0 && r.is_leader).map(|r| (i, r.hibernating)));
                if let Some((i, asleep)) = leader {
                    let id = self.nodes[i].id;
                    let state = if asleep { "hibernating" } else { "awake" };
                    self.faults.push(format!("{now:>6} ms  node {id} leads group {group} ({state}): crashed"));
                    self.crash(i);
                    self.shared.lock().schedule(down, Event::Fault(Fault::Restart(id)));
                }
            }
            Fault::Compact(node) => {
                self.nodes[self.node_index(node)].engines.compact_everything();
            }
            Fault::CutSnapshots(on) => net(&|w: &mut Network| w.cut_snapshots = on),
            Fault::SlowTransfers(on) => net(&|w: &mut Network| w.slow_transfers = on),
            Fault::CutTransferSender(node) => {
                let n = self.nodes.len() as u64;
                net(&|w: &mut Network| {
                    if w.slow_transfers {
                        for other in (1..=n).filter(|o| *o != node) {
                            w.cut.insert((node, other));
                            w.cut.insert((other, node));
                        }
                    }
                })
            }
            Fault::Rejoin(node) => net(&|w: &mut Network| w.cut.retain(|(a, b)| *a != node && *b != node)),
            Fault::CutClusters => {
                let n = self.cfg.nodes as u64;
                net(&|w: &mut Network| {
                    for a in 1..=n {
                        for b in n + 1..=2 * n {
                            w.cut.insert((a, b));
                            w.cut.insert((b, a));
                        }
                    }
                })
            }
            Fault::Pause(node, length) => {
                let i = self.node_index(node);
                self.nodes[i].paused_until = self.now.load(Ordering::SeqCst) + length;
                self.nodes[i].pause_salt = self.shared.lock().rng.next_u64();
            }
            Fault::DiskFailure(node, kind) => {
                let i = self.node_index(node);
                if self.nodes[i].store.is_some() {
                    self.nodes[i].disk_faults_armed += 1;
                    match kind {
                        DiskFault::LogWrite => self.nodes[i].log.fail_writes(1),
                        DiskFault::LogRead => self.nodes[i].log.fail_reads(1),
                        DiskFault::EngineWrite => self.nodes[i].engines.fail_writes(1),
                        DiskFault::EngineRead => self.nodes[i].engines.fail_reads(1),
                        DiskFault::EngineCorruptRead => self.nodes[i].engines.corrupt_reads(1),
                    }
                }
            }
            Fault::HealAll => {
                net(&|w: &mut Network| {
                    w.cut.clear();
                    w.noisy = false;
                    w.cut_snapshots = false;
                    w.slow_transfers = false;
                });
                for i in 0..self.nodes.len() {
                    self.nodes[i].log.fail_writes(0);
                    self.nodes[i].log.fail_reads(0);
                    self.nodes[i].engines.fail_writes(0);
                    self.nodes[i].engines.fail_reads(0);
                    self.nodes[i].engines.corrupt_reads(0);
                    self.nodes[i].disk_faults_armed = 0;
                    self.nodes[i].paused_until = 0;
                    if self.nodes[i].store.is_none() {
                        self.start_node(i);
                    }
                    self.nodes[i].clock_offset.store(0, Ordering::SeqCst);
                }
                self.healed_at = Some(self.now.load(Ordering::SeqCst));
            }
        }
    }
}
