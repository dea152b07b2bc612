//! Both sides of the heartbeat exchange between a server and meta, sending only what changed
//! both ways, so that a heartbeat stays small at thousands of replicas per server (most of them
//! idle).
//!
//! Each answer of meta's carries a token, which the server's next heartbeat names (`base_token`):
//! - The server reports the statuses that differ from those meta holds (what the heartbeats meta
//!   answered carried, merged), and the groups it no longer hosts (`delta`); every status when it
//!   has no such base (at start, after a heartbeat without an answer, when meta asks for it, with a
//!   meta that gives no tokens) and every `FULL_REPORT_EVERY` heartbeats.
//! - Meta answers with the assignments that changed since the answer the base token names
//!   (`assignments_delta`), and every assignment when it did not give that answer (it just became
//!   leader, or this server missed an answer) or the heartbeat reports every status. The server
//!   merges them into the set it holds and acts on the whole set
//!   (`crate::store::reconcile_with_meta`), as before.
//!
//! So nothing stays wrong for longer than `FULL_REPORT_EVERY` heartbeats whatever happened, and a
//! message without the new fields (a server or meta of an older version) is read as whole.
//! The real server's heartbeat loop, the keeper and the simulator all drive this same code.

use std::collections::BTreeMap;
use std::sync::Arc;
use tern_proto::{HeartbeatRequest, HeartbeatResponse, ReplicaAssignment, ReplicaStatus};

/// Every this many heartbeats the server reports every status, changed or not, and meta answers
/// with every assignment.
pub const FULL_REPORT_EVERY: u64 = 60;

/// The server's side.
#[derive(Default)]
pub struct MetaLink {
    /// The statuses meta holds for this server, by group, as of the answer named `token`; None
    /// when meta may hold others (every status goes in the next heartbeat).
    acked: Option<BTreeMap<u64, ReplicaStatus>>,
    /// The heartbeat awaiting its answer: its number and the statuses as of it.
    in_flight: Option<(u64, BTreeMap<u64, ReplicaStatus>)>,
    /// Heartbeats prepared.
    sent: u64,
    /// Meta's last answer's token (0: none).
    token: u64,
    /// Every assignment meta's answers made, by group.
    assignments: BTreeMap<u64, ReplicaAssignment>,
    /// Heartbeats since the last that reported every status.
    since_full: u64,
}

impl MetaLink {
    /// Fills `hb`'s report from the replicas' `statuses` now (what changed since the statuses meta
    /// holds, or all of them). Returns the heartbeat's number, for `answered`.
    pub fn prepare(&mut self, hb: &mut HeartbeatRequest, statuses: Vec<ReplicaStatus>) -> u64 {
        let now: BTreeMap<u64, ReplicaStatus> = statuses.into_iter().map(|s| (s.group_id, s)).collect();
        hb.base_token = self.token;
        let base = self.acked.as_ref().filter(|_| self.token != 0 && self.since_full + 1 < FULL_REPORT_EVERY);
        match base {
            Some(acked) => {
                hb.delta = true;
                hb.replicas = now.values().filter(|s| acked.get(&s.group_id) != Some(*s)).cloned().collect();
                hb.removed_groups = acked.keys().filter(|g| !now.contains_key(g)).copied().collect();
                self.since_full += 1;
            }
            None => {
                hb.delta = false;
                hb.replicas = now.values().cloned().collect();
                hb.removed_groups.clear();
                self.since_full = 0;
            }
        }
        self.sent += 1;
        self.in_flight = Some((self.sent, now));
        self.sent
    }

    /// Meta's answer to heartbeat `number`, with every assignment meta makes now (merged with
    /// those this server held): what `reconcile_with_meta` acts on. None for an answer to another
    /// heartbeat than the last one prepared (it came late): it is not used, and the next
    /// heartbeat reports every status.
    pub fn answered(&mut self, mut answer: HeartbeatResponse, number: u64) -> Option<HeartbeatResponse> {
        let sent = match self.in_flight.take() {
            Some((n, sent)) if n == number => sent,
            _ => {
                self.failed();
                return None;
            }
        };
        if answer.error.is_some() {
            // Refused (say, a node meta does not know): nothing of this heartbeat was taken.
            self.acked = None;
            self.token = 0;
            return Some(answer);
        }
        if answer.assignments_delta {
            for group in &answer.unassigned_groups {
                self.assignments.remove(group);
            }
            self.assignments.extend(answer.assignments.drain(..).map(|a| (a.group_id, a)));
        } else {
            self.assignments = answer.assignments.drain(..).map(|a| (a.group_id, a)).collect();
        }
        answer.assignments = self.assignments.values().cloned().collect();
        answer.assignments_delta = false;
        answer.unassigned_groups.clear();
        self.token = answer.token;
        self.acked = if answer.full_report_wanted { None } else { Some(sent) };
        Some(answer)
    }

    /// The heartbeat got no answer: meta may or may not have taken it, so the next reports all.
    pub fn failed(&mut self) {
        self.in_flight = None;
        self.acked = None;
    }
}

/// Meta's side: what it holds of one server's report and what it last told the server. Kept by
/// the meta leader per server (and forgotten when leadership changes, so that the first exchange
/// with a new leader is whole both ways).
#[derive(Default, Clone, Debug)]
pub struct ServerReport {
    /// The server's replica statuses, by group.
    pub statuses: BTreeMap<u64, ReplicaStatus>,
    /// The token of meta's last answer to the server (0: none yet).
    pub token: u64,
    /// The assignments that answer made, by group id (ascending).
    pub assigned: Arc<Vec<ReplicaAssignment>>,
}

impl ServerReport {
    /// Takes heartbeat `hb` and puts in `answer` the server's `assigned` replicas (by group id,
    /// ascending) as they travel, naming the answer `token` (unique: never given before by any
    /// meta node). Changes to statuses are taken only when they apply to what this report holds
    /// (the heartbeat names the last answer given), else the answer asks for every status;
    /// assignments go as changes only when the server holds those of the answer it names, and
    /// whole with a whole report. Meta shares one list per server between answers while the
    /// catalog does not change, so an unchanged list costs nothing here.
    pub fn answer(&mut self, hb: &mut HeartbeatRequest, answer: &mut HeartbeatResponse, assigned: Arc<Vec<ReplicaAssignment>>, token: u64) {
        let statuses = std::mem::take(&mut hb.replicas).into_iter().map(|s| (s.group_id, s));
        let same_base = self.token != 0 && hb.base_token == self.token;
        answer.full_report_wanted = false;
        if !hb.delta {
            self.statuses = statuses.collect();
        } else if same_base {
            for group in &hb.removed_groups {
                self.statuses.remove(group);
            }
            self.statuses.extend(statuses);
        } else {
            answer.full_report_wanted = true;
        }
        answer.unassigned_groups.clear();
        answer.assignments.clear();
        answer.assignments_delta = same_base && hb.delta;
        if !answer.assignments_delta {
            answer.assignments = assigned.to_vec();
        } else if !Arc::ptr_eq(&assigned, &self.assigned) {
            // Both lists are by group id: one walk through them.
            let (before, now) = (&self.assigned[..], &assigned[..]);
            let (mut b, mut n) = (0, 0);
            while b < before.len() || n < now.len() {
                match (before.get(b), now.get(n)) {
                    (Some(x), Some(y)) if x.group_id == y.group_id => {
                        if x != y {
                            answer.assignments.push(y.clone());
                        }
                        (b, n) = (b + 1, n + 1);
                    }
                    (Some(x), Some(y)) if x.group_id < y.group_id => {
                        answer.unassigned_groups.push(x.group_id);
                        b += 1;
                    }
                    (Some(x), None) => {
                        answer.unassigned_groups.push(x.group_id);
                        b += 1;
                    }
                    (_, Some(y)) => {
                        answer.assignments.push(y.clone());
                        n += 1;
                    }
                    (None, None) => unreachable!("the loop runs while either has more"),
                }
            }
        }
        self.assigned = assigned;
        self.token = token;
        answer.token = token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(group: u64, applied: u64) -> ReplicaStatus {
        ReplicaStatus { group_id: group, peer_id: group * 10, applied_index: applied, ..Default::default() }
    }

    fn assignment(group: u64, peer: u64) -> ReplicaAssignment {
        ReplicaAssignment { group_id: group, peer_id: peer, ..Default::default() }
    }

    /// One heartbeat from `link` to meta's `report`, which assigns `assigned`; the answer as the
    /// server acts on it, and the request and answer as they travelled.
    fn exchange(
        link: &mut MetaLink,
        report: &mut ServerReport,
        statuses: Vec<ReplicaStatus>,
        assigned: Vec<ReplicaAssignment>,
        token: u64,
    ) -> (HeartbeatResponse, HeartbeatRequest, HeartbeatResponse) {
        let mut hb = HeartbeatRequest::default();
        let number = link.prepare(&mut hb, statuses);
        let sent = hb.clone();
        let mut answer = HeartbeatResponse::default();
        report.answer(&mut hb, &mut answer, Arc::new(assigned), token);
        let travelled = answer.clone();
        (link.answered(answer, number).expect("the answer to the last heartbeat"), sent, travelled)
    }

    /// Only what changed travels, both ways, and both sides end up with everything: statuses
    /// meta holds equal the server's, assignments the server acts on equal meta's.
    #[test]
    fn only_changes_travel_and_both_sides_stay_whole() {
        let (mut link, mut report) = (MetaLink::default(), ServerReport::default());
        let statuses = vec![status(1, 5), status(2, 5), status(3, 5)];
        let assigned = vec![assignment(1, 10), assignment(2, 20), assignment(3, 30)];
        let (acted, sent, travelled) = exchange(&mut link, &mut report, statuses.clone(), assigned.clone(), 1);
        assert!(!sent.delta && sent.replicas.len() == 3, "the first heartbeat reports everything");
        assert!(!travelled.assignments_delta && travelled.assignments.len() == 3);
        assert_eq!(acted.assignments, assigned);

        // Nothing changed: nothing travels.
        let (acted, sent, travelled) = exchange(&mut link, &mut report, statuses.clone(), assigned.clone(), 2);
        assert!(sent.delta && sent.replicas.is_empty() && sent.removed_groups.is_empty() && sent.base_token == 1);
        assert!(travelled.assignments_delta && travelled.assignments.is_empty() && travelled.unassigned_groups.is_empty());
        assert_eq!(acted.assignments, assigned, "the server still acts on every assignment");

        // One status changes, one replica goes; one assignment changes, one goes, one comes.
        let statuses = vec![status(1, 5), status(2, 6)];
        let assigned = vec![assignment(1, 10), assignment(2, 21), assignment(4, 40)];
        let (acted, sent, travelled) = exchange(&mut link, &mut report, statuses.clone(), assigned.clone(), 3);
        assert_eq!((sent.replicas.clone(), sent.removed_groups.clone()), (vec![status(2, 6)], vec![3]));
        assert_eq!(travelled.assignments, vec![assignment(2, 21), assignment(4, 40)]);
        assert_eq!(travelled.unassigned_groups, vec![3]);
        assert_eq!(acted.assignments, assigned);
        assert_eq!(report.statuses.values().cloned().collect::<Vec<_>>(), statuses);
    }

    /// A lost answer, a meta that became leader (it holds nothing) and a refused heartbeat all end
    /// in a whole exchange, never in changes applied to the wrong base.
    #[test]
    fn a_lost_answer_or_a_new_meta_leader_makes_the_next_exchange_whole() {
        let (mut link, mut report) = (MetaLink::default(), ServerReport::default());
        let statuses = vec![status(1, 5), status(2, 5)];
        let assigned = vec![assignment(1, 10), assignment(2, 20)];
        exchange(&mut link, &mut report, statuses.clone(), assigned.clone(), 1);

        // Meta takes a heartbeat but its answer is lost: the next heartbeat reports everything,
        // and meta sends every assignment (the server does not hold those of the lost answer).
        let mut hb = HeartbeatRequest::default();
        let number = link.prepare(&mut hb, vec![status(1, 6), status(2, 5)]);
        let mut lost = HeartbeatResponse::default();
        report.answer(&mut hb, &mut lost, Arc::new(vec![assignment(1, 11), assignment(2, 20)]), 2);
        assert!(!lost.full_report_wanted);
        link.failed();
        assert!(link.answered(lost, number).is_none(), "an answer after the heartbeat was given up is not used");
        let (acted, sent, travelled) = exchange(&mut link, &mut report, statuses.clone(), vec![assignment(1, 11), assignment(2, 20)], 3);
        assert!(!sent.delta && sent.replicas.len() == 2);
        assert!(!travelled.assignments_delta && travelled.assignments.len() == 2);
        assert_eq!(acted.assignments, vec![assignment(1, 11), assignment(2, 20)]);
        assert_eq!(report.statuses.values().cloned().collect::<Vec<_>>(), statuses, "meta holds the statuses as they are");

        // A new meta leader holds nothing: it takes no changes, asks for everything and sends
        // every assignment; the heartbeat after that is whole.
        let mut fresh = ServerReport::default();
        let changed = vec![status(1, 7), status(2, 5)];
        let (acted, sent, travelled) = exchange(&mut link, &mut fresh, changed.clone(), assigned.clone(), 100);
        assert!(sent.delta && travelled.full_report_wanted && !travelled.assignments_delta);
        assert_eq!(acted.assignments, assigned);
        assert!(fresh.statuses.is_empty(), "changes to a report it does not hold are left out");
        let (_, sent, _) = exchange(&mut link, &mut fresh, changed.clone(), assigned.clone(), 101);
        assert!(!sent.delta);
        assert_eq!(fresh.statuses.values().cloned().collect::<Vec<_>>(), changed);

        // A refused heartbeat keeps the server's assignments as they were and makes the next whole.
        let mut hb = HeartbeatRequest::default();
        let number = link.prepare(&mut hb, changed.clone());
        let refused = link.answered(HeartbeatResponse { error: Some(Default::default()), ..Default::default() }, number).unwrap();
        assert!(refused.assignments.is_empty(), "a refusal assigns nothing");
        let (acted, sent, _) = exchange(&mut link, &mut fresh, changed.clone(), assigned.clone(), 102);
        assert!(!sent.delta);
        assert_eq!(acted.assignments, assigned);

        // Two heartbeats in flight (to two meta nodes): the earlier one's answer, arriving last,
        // is not used, and the next heartbeat is whole.
        let (mut first, mut second) = (HeartbeatRequest::default(), HeartbeatRequest::default());
        let early = link.prepare(&mut first, changed.clone());
        let late = link.prepare(&mut second, changed.clone());
        let (mut a1, mut a2) = (HeartbeatResponse::default(), HeartbeatResponse::default());
        fresh.answer(&mut second, &mut a2, Arc::new(assigned.clone()), 103);
        fresh.answer(&mut first, &mut a1, Arc::new(assigned.clone()), 104);
        assert!(link.answered(a2, late).is_some());
        assert!(link.answered(a1, early).is_none());
        let (acted, sent, _) = exchange(&mut link, &mut fresh, changed, assigned.clone(), 105);
        assert!(!sent.delta);
        assert_eq!(acted.assignments, assigned);
    }

    /// Every `FULL_REPORT_EVERY` heartbeats the server reports everything and meta answers with
    /// everything, even with nothing lost; a meta that gives no tokens (an older version) always
    /// gets every status.
    #[test]
    fn a_full_report_goes_out_regularly() {
        let (mut link, mut report) = (MetaLink::default(), ServerReport::default());
        let whole: Vec<u64> = (0..2 * FULL_REPORT_EVERY)
            .filter(|i| {
                let (_, sent, travelled) = exchange(&mut link, &mut report, vec![status(1, 5)], vec![assignment(1, 10)], i + 1);
                assert_eq!(sent.delta, travelled.assignments_delta);
                !sent.delta
            })
            .collect();
        assert_eq!(whole, vec![0, FULL_REPORT_EVERY]);
        let mut old_meta = MetaLink::default();
        for _ in 0..3 {
            let mut hb = HeartbeatRequest::default();
            let n = old_meta.prepare(&mut hb, vec![status(1, 5)]);
            assert!(!hb.delta);
            old_meta.answered(HeartbeatResponse { assignments: vec![assignment(1, 10)], ..Default::default() }, n).unwrap();
        }
    }
}
