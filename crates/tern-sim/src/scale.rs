//! Meta at scale: meta's real scheduler (`tern_meta::catalog::Catalog::scheduling_pass`, what the
//! keeper runs every second) over many servers and partitions, with the servers simulated by what
//! they report in heartbeats (no data path): a learner reports caught up a few passes after it was
//! added, raft applies a membership change one pass after meta asks for it, and the leader of each
//! partition is its preferred replica when that is alive. Events (a server dies, a zone dies, ten
//! servers join) are followed by passes until the scheduler has nothing left to do, and each phase
//! reports how many passes that took, the replica moves and leader changes it made, meta's CPU time
//! per pass (the scheduling itself, and a heartbeat round: every live server's heartbeat taken and
//! answered), and heartbeat sizes. Heartbeats go through the real exchange
//! (`tern_raft::meta_link`): a server reports only the statuses that changed, meta answers only the
//! assignments that changed, and the scheduler works on the statuses meta merged from them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_core::{GroupId, NodeId, PeerId};
use tern_meta::catalog::{Catalog, RoutingChange};
use tern_proto::{HeartbeatRequest, ReplicaAssignment, ReplicaStatus};
use tern_raft::meta_link::{MetaLink, ServerReport};

/// The applied and commit index every settled replica reports.
const APPLIED: u64 = 1_000;

#[derive(Clone, Debug)]
pub struct ScaleConfig {
    pub servers: usize,
    /// Servers are spread round-robin over this many zones.
    pub zones: usize,
    /// Partitions over all tables (tables of power-of-two sizes adding up to it).
    pub partitions: u32,
    /// Passes a new learner takes to catch up (its snapshot).
    pub fill_passes: u64,
    /// Passes a phase may take before it is reported as not converged.
    pub passes_max: u64,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig { servers: 100, zones: 10, partitions: 100_000, fill_passes: 3, passes_max: 5_000 }
    }
}

#[derive(Clone, Debug, Default)]
pub struct PhaseReport {
    pub name: String,
    /// Scheduling passes (one a second in production) until a pass changed nothing and no
    /// learner or removal was pending; `passes_max` if it never got there.
    pub passes: u64,
    pub converged: bool,
    /// Learners added (repairs and balancing moves).
    pub replica_moves: usize,
    pub leader_changes: usize,
    /// Meta's CPU time per pass: the scheduling pass itself (summarising every status included).
    pub schedule_ms_mean: f64,
    pub schedule_ms_max: f64,
    /// Meta's CPU time for one heartbeat round (every live server's heartbeat taken and
    /// answered), mean.
    pub heartbeat_round_ms: f64,
    /// The largest heartbeat or answer of the phase, encoded (the whole ones come first).
    pub heartbeat_bytes_max: usize,
    /// The largest heartbeat or answer of the phase's last round (with nothing left to do).
    pub heartbeat_bytes_last: usize,
    /// Partitions whose routing changed over the phase: what a client that held every table
    /// before it gets when it refreshes after it (`tern_meta::catalog::routing_changes`).
    pub routing_changed: usize,
    /// Replicas on the most and the least loaded live server at the end.
    pub replicas_max: usize,
    pub replicas_min: usize,
    /// Preferred leaders on the most and the least loaded live server at the end.
    pub leaders_max: usize,
    pub leaders_min: usize,
}

impl PhaseReport {
    pub fn describe(&self) -> String {
        format!(
            "{:<28} {:>6} {:>5} {:>8} {:>8} {:>9.1} {:>9.1} {:>10.1} {:>10} {:>8} {:>8} {:>5}-{:<5} {:>5}-{:<5}",
            self.name,
            self.passes,
            if self.converged { "yes" } else { "NO" },
            self.replica_moves,
            self.leader_changes,
            self.schedule_ms_mean,
            self.schedule_ms_max,
            self.heartbeat_round_ms,
            self.heartbeat_bytes_max,
            self.heartbeat_bytes_last,
            self.routing_changed,
            self.replicas_min,
            self.replicas_max,
            self.leaders_min,
            self.leaders_max
        )
    }

    pub fn header() -> String {
        format!(
            "{:<28} {:>6} {:>5} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8} {:>11} {:>11}",
            "phase",
            "passes",
            "done",
            "moves",
            "leaders",
            "pass ms",
            "max ms",
            "hb round ms",
            "hb bytes",
            "hb last",
            "routing",
            "replicas",
            "leaders"
        )
    }
}

/// The simulated servers: what they report about the catalog's replicas.
#[derive(Default)]
struct Servers {
    /// Pass at which each learner has caught up.
    learner_ready: HashMap<PeerId, u64>,
    /// Pass at which raft no longer counts each peer meta is removing.
    removed_at: HashMap<PeerId, u64>,
}

impl Servers {
    /// Every live server's replica statuses now.
    fn statuses(&mut self, catalog: &Catalog, alive: &BTreeSet<NodeId>, pass: u64, fill_passes: u64) -> HashMap<NodeId, Vec<ReplicaStatus>> {
        let mut out: HashMap<NodeId, Vec<ReplicaStatus>> = HashMap::new();
        for t in catalog.tables.values() {
            for (i, p) in t.partitions.iter().enumerate() {
                let group = GroupId::new(t.id, i as u32);
                let removing: Vec<(PeerId, NodeId)> =
                    p.removing.iter().copied().filter(|(x, _)| pass < *self.removed_at.entry(*x).or_insert(pass + 1)).collect();
                let voters: Vec<PeerId> = p.peers.iter().chain(removing.iter()).map(|(x, _)| *x).collect();
                let learners: Vec<PeerId> = p.learners.iter().map(|(x, _)| *x).collect();
                let applied = |peer: PeerId, learner: bool, ready: &mut HashMap<PeerId, u64>| {
                    if learner && pass < *ready.entry(peer).or_insert(pass + fill_passes) {
                        0
                    } else {
                        APPLIED
                    }
                };
                let leader = p
                    .peers
                    .iter()
                    .find(|(_, n)| *n == p.preferred_leader && alive.contains(n))
                    .or_else(|| p.peers.iter().find(|(_, n)| alive.contains(n)))
                    .map(|(x, _)| *x);
                let mut matched = HashMap::new();
                let mut leader_at = None;
                for (x, n) in p.peers.iter().chain(removing.iter()).chain(p.learners.iter()) {
                    let learner = learners.contains(x);
                    let a = applied(*x, learner, &mut self.learner_ready);
                    if alive.contains(n) {
                        matched.insert(*x, a);
                        let list = out.entry(*n).or_default();
                        if Some(*x) == leader {
                            leader_at = Some((*n, list.len()));
                        }
                        list.push(ReplicaStatus {
                            group_id: group.0,
                            peer_id: *x,
                            is_leader: Some(*x) == leader,
                            term: 1,
                            applied_index: a,
                            commit_index: APPLIED,
                            leader_peer: leader.unwrap_or(0),
                            voters: voters.clone(),
                            learners: learners.clone(),
                            ..Default::default()
                        });
                    }
                }
                if let Some((n, i)) = leader_at {
                    let s = &mut out.get_mut(&n).expect("pushed")[i];
                    s.matched = matched.into_iter().filter(|(x, _)| *x != s.peer_id).collect();
                }
            }
        }
        out
    }
}

/// Power-of-two partition counts adding up to `n`.
fn table_sizes(n: u32) -> Vec<u32> {
    (0..32).rev().map(|b| 1u32 << b).filter(|s| n & s != 0).collect()
}

struct Cluster {
    cfg: ScaleConfig,
    catalog: Catalog,
    alive: BTreeSet<NodeId>,
    servers: Servers,
    pass: u64,
    /// Each server's side of its heartbeats, and meta's.
    links: HashMap<NodeId, MetaLink>,
    reports: HashMap<NodeId, ServerReport>,
    tokens: u64,
    /// Every node's assignments, as the keeper keeps them until the catalog changes.
    assignments: Option<HashMap<NodeId, Arc<Vec<ReplicaAssignment>>>>,
}

impl Cluster {
    fn new(cfg: ScaleConfig) -> Cluster {
        let mut catalog = Catalog::default();
        let mut alive = BTreeSet::new();
        for i in 0..cfg.servers {
            let id = catalog.register(&format!("10.0.{}.{}:7001", i / 250, i % 250), &format!("zone{}", i % cfg.zones.max(1))).expect("register");
            alive.insert(id);
        }
        Cluster {
            cfg,
            catalog,
            alive,
            servers: Servers::default(),
            pass: 0,
            links: HashMap::new(),
            reports: HashMap::new(),
            tokens: 0,
            assignments: None,
        }
    }

    /// Every live server heartbeats once and meta answers, as the keeper does (`Keeper::heartbeat`):
    /// the largest heartbeat or answer, encoded, and the time meta spent on them.
    fn heartbeat_round(&mut self, alive: &[NodeId], statuses: &mut HashMap<NodeId, Vec<ReplicaStatus>>) -> (usize, Duration) {
        let (mut largest, mut meta_time) = (0, Duration::ZERO);
        for n in alive {
            let mut hb = HeartbeatRequest { node_id: *n, ..Default::default() };
            let link = self.links.entry(*n).or_default();
            let number = link.prepare(&mut hb, statuses.remove(n).unwrap_or_default());
            largest = largest.max(prost::Message::encoded_len(&hb));
            let started = Instant::now();
            if self.assignments.is_none() {
                self.assignments = Some(self.catalog.assignments_by_node());
            }
            let assigned = self.assignments.as_ref().and_then(|a| a.get(n)).cloned().unwrap_or_default();
            let report = self.reports.entry(*n).or_default();
            let mut answer = self.catalog.heartbeat_answer_without_assignments(*n);
            self.tokens += 1;
            report.answer(&mut hb, &mut answer, assigned, self.tokens);
            meta_time += started.elapsed();
            largest = largest.max(prost::Message::encoded_len(&answer));
            link.answered(answer, number);
        }
        (largest, meta_time)
    }

    fn add_servers(&mut self, count: usize) {
        let first = self.catalog.nodes.len();
        for i in first..first + count {
            let id = self
                .catalog
                .register(&format!("10.1.{}.{}:7001", i / 250, i % 250), &format!("zone{}", i % self.cfg.zones.max(1)))
                .expect("register");
            self.alive.insert(id);
        }
    }

    /// Runs scheduling passes until one changes nothing with no learner or removal pending.
    fn converge(&mut self, name: &str) -> PhaseReport {
        let mut report = PhaseReport { name: name.to_string(), ..Default::default() };
        let alive: Vec<NodeId> = self.alive.iter().copied().collect();
        let (mut total, mut heartbeats) = (Duration::ZERO, Duration::ZERO);
        let start = self.catalog.clone();
        let mut passes = 0;
        while passes < self.cfg.passes_max {
            self.pass += 1;
            passes += 1;
            let mut statuses = self.servers.statuses(&self.catalog, &self.alive, self.pass, self.cfg.fill_passes);
            let (largest, meta_time) = self.heartbeat_round(&alive, &mut statuses);
            heartbeats += meta_time;
            report.heartbeat_bytes_max = report.heartbeat_bytes_max.max(largest);
            report.heartbeat_bytes_last = largest;
            // What meta holds from the heartbeats, as the keeper hands it to the scheduler.
            let statuses: Vec<ReplicaStatus> = alive.iter().flat_map(|n| self.reports[n].statuses.values().cloned()).collect();
            let started = Instant::now();
            let changes = self.catalog.scheduling_pass(&alive, &statuses, false);
            if !changes.is_empty() {
                self.assignments = None;
            }
            let took = started.elapsed();
            total += took;
            report.schedule_ms_max = report.schedule_ms_max.max(took.as_secs_f64() * 1000.0);
            report.replica_moves += changes.iter().filter(|c| c.contains("learner") && !c.contains("cancelled")).count();
            report.leader_changes += changes.iter().filter(|c| c.contains("preferred leader")).count();
            let pending = self.catalog.tables.values().flat_map(|t| t.partitions.iter()).any(|p| !p.learners.is_empty() || !p.removing.is_empty());
            if changes.is_empty() && !pending {
                report.converged = true;
                break;
            }
        }
        report.passes = passes;
        report.schedule_ms_mean = total.as_secs_f64() * 1000.0 / passes.max(1) as f64;
        report.heartbeat_round_ms = heartbeats.as_secs_f64() * 1000.0 / passes.max(1) as f64;
        report.routing_changed = tern_meta::catalog::routing_changes(&start, &self.catalog)
            .into_iter()
            .map(|(id, change)| match change {
                RoutingChange::Whole => self.catalog.tables.values().find(|t| t.id == id).map_or(0, |t| t.partitions.len()),
                RoutingChange::Partitions(p) => p.len(),
            })
            .sum();
        let mut replicas: HashMap<NodeId, usize> = alive.iter().map(|n| (*n, 0)).collect();
        let mut leaders: HashMap<NodeId, usize> = alive.iter().map(|n| (*n, 0)).collect();
        for p in self.catalog.tables.values().flat_map(|t| t.partitions.iter()) {
            for (_, n) in &p.peers {
                *replicas.entry(*n).or_default() += 1;
            }
            *leaders.entry(p.preferred_leader).or_default() += 1;
        }
        let live = |m: &HashMap<NodeId, usize>| alive.iter().map(|n| m.get(n).copied().unwrap_or(0)).collect::<Vec<_>>();
        report.replicas_max = live(&replicas).into_iter().max().unwrap_or(0);
        report.replicas_min = live(&replicas).into_iter().min().unwrap_or(0);
        report.leaders_max = live(&leaders).into_iter().max().unwrap_or(0);
        report.leaders_min = live(&leaders).into_iter().min().unwrap_or(0);
        report
    }
}

/// Creates the tables, then: one server dies; then a whole zone dies; then ten new servers join.
/// Each phase runs to convergence (or `passes_max`).
pub fn run(cfg: ScaleConfig) -> Vec<PhaseReport> {
    run_reporting(cfg, |_| {})
}

/// `run`, handing each phase's report to `done` as soon as it is known.
pub fn run_reporting(cfg: ScaleConfig, mut done: impl FnMut(&PhaseReport)) -> Vec<PhaseReport> {
    let mut cluster = Cluster::new(cfg.clone());
    let alive: Vec<NodeId> = cluster.alive.iter().copied().collect();
    for (i, size) in table_sizes(cfg.partitions).into_iter().enumerate() {
        cluster.catalog.create_table(&format!("t{i}"), size, 3, &alive).expect("create table");
    }
    let mut reports = Vec::new();
    let mut phase = |report: PhaseReport| {
        done(&report);
        reports.push(report);
    };
    phase(cluster.converge(&format!("create {} partitions", cfg.partitions)));
    let victim = *cluster.alive.iter().next().expect("servers");
    cluster.alive.remove(&victim);
    phase(cluster.converge("one server dies"));
    let zone = cluster.catalog.nodes.get(cluster.alive.iter().next().expect("servers")).map(|n| n.zone.clone()).unwrap_or_default();
    let doomed: Vec<NodeId> = cluster.alive.iter().copied().filter(|n| cluster.catalog.nodes[n].zone == zone).collect();
    for n in &doomed {
        cluster.alive.remove(n);
    }
    phase(cluster.converge(&format!("zone dies ({} servers)", doomed.len())));
    cluster.add_servers(10);
    phase(cluster.converge("ten servers join"));
    reports
}
