//! What a run reports: the report itself, the event trace, replica statuses and state dumps.

use super::*;

/// A leader of a group's term, as first seen (virtual ms), and the node it was on.
#[derive(Clone, Copy, Debug)]
pub struct Election {
    pub at_ms: u64,
    pub group: GroupId,
    pub term: u64,
    pub node: NodeId,
}

#[derive(Debug)]
pub struct SimReport {
    pub seed: u64,
    pub trace_hash: u64,
    /// A hash of every replica's whole state at the end (0 if replicas were never compared).
    pub state_hash: u64,
    pub events: u64,
    pub virtual_ms: u64,
    pub operations: usize,
    /// Replicas found hibernating, summed over every node's ticks (how much of the run groups slept).
    pub hibernating_ticks: u64,
    /// Every leader the run saw, when it was first seen.
    pub elections: Vec<Election>,
    /// Writes whose outcome the client could not learn (they may or may not have happened).
    pub unknown_outcomes: usize,
    pub verdict: Verdict,
    /// Invariant and liveness failures, in the order found.
    pub failures: Vec<String>,
    pub faults: Vec<String>,
    /// The last events before the end (or the first failure).
    pub trace_tail: Vec<String>,
}

impl SimReport {
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && !matches!(self.verdict, Verdict::Violation { .. })
    }

    pub fn describe(&self) -> String {
        let mut out = format!(
            "seed {}: {} operations, {} events, {:.1} s simulated, {} replica-ticks asleep, verdict {:?}, trace hash {:#x}\n",
            self.seed,
            self.operations,
            self.events,
            self.virtual_ms as f64 / 1000.0,
            self.hibernating_ticks,
            self.verdict,
            self.trace_hash
        );
        for f in &self.failures {
            out.push_str(&format!("  failure: {f}\n"));
        }
        if !self.ok() {
            out.push_str("  fault schedule:\n");
            for f in &self.faults {
                out.push_str(&format!("    {f}\n"));
            }
            out.push_str("  last events:\n");
            for e in &self.trace_tail {
                out.push_str(&format!("    {e}\n"));
            }
        }
        out
    }
}

impl World {
    pub(super) fn trace(&mut self, at: u64, event: &Event) {
        self.events += 1;
        for b in at.to_be_bytes().iter().chain(event.trace_key().to_be_bytes().iter()) {
            self.trace_hash ^= *b as u64;
            self.trace_hash = self.trace_hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        if self.trace_tail.len() == 40 {
            self.trace_tail.pop_front();
        }
        self.trace_tail.push_back(format!("{at:>7} ms  {}", event.describe()));
        if self.print_trace {
            eprintln!("{at:>7} ms  {}", event.describe());
        }
    }

    pub(super) fn replica_statuses(&mut self) -> String {
        let mut out = String::new();
        for i in 0..self.nodes.len() {
            let Some(store) = self.nodes[i].store.as_mut() else {
                out.push_str(&format!("\n    node {} down", i + 1));
                continue;
            };
            let (tx, rx) = std::sync::mpsc::channel();
            store.handle(StoreMsg::Status(Box::new(move |s| drop(tx.send(s)))));
            for r in rx.try_recv().unwrap_or_default() {
                out.push_str(&format!(
                    "\n    node {} group {} peer {} leader={} term {} leader_peer {} commit {} applied {} first_log {} voters {:?} learners {:?} {}",
                    i + 1,
                    GroupId(r.group_id),
                    r.peer_id,
                    r.is_leader,
                    r.term,
                    r.leader_peer,
                    r.commit_index,
                    r.applied_index,
                    r.first_log_index,
                    r.voters,
                    r.learners,
                    r.failure
                ));
            }
        }
        out
    }

    /// With TERN_SIM_DUMP=1, prints every replica's records of a group, to see what differs.
    pub(super) fn dump_replicas(&self, group: u64) {
        if std::env::var("TERN_SIM_DUMP").is_err() {
            return;
        }
        for node in &self.nodes {
            let dir = node.dir.join("replicas").join(group.to_string());
            let Ok(meta) = tern_raft::replica::ReplicaMeta::load(&*node.files, &dir) else { continue };
            use tern_engine::EngineFactory as _;
            let Ok(engine) = node.engines.open(&dir.join(&meta.engine_dir)) else { continue };
            eprintln!("--- node {} engine {}", node.id, meta.engine_dir);
            let _ = engine.scan(b"", None, &mut |k, v| {
                eprintln!("  {:?} = {:?}", String::from_utf8_lossy(k), String::from_utf8_lossy(v));
                true
            });
        }
    }
}
