//! The workload and the clients: what each client does next, and its request loop (routing,
//! retries, deadlines, exactly-once floors) driven by tern-client's decisions.

use super::*;

/// One operation a client is working on.
pub(super) struct Pending {
    pub(super) hashkey: Vec<u8>,
    pub(super) input: Input,
    pub(super) started: u64,
    pub(super) attempts: u32,
    pub(super) attempt: u64,
    pub(super) seq: u64,
    pub(super) node: NodeId,
    /// The partition the last attempt went to.
    pub(super) partition: u32,
}

/// A client identity (client id and sequence numbers) shared by several sessions, as one proxy's
/// or one application's client is shared by its connections: several of its writes are in flight at
/// once, and the floor each carries must never pass another's sequence number.
pub(super) struct ClientIdentity {
    pub(super) client_id: u64,
    /// The real client's exactly-once bookkeeping.
    pub(super) sequencer: tern_client::routing::Sequencer,
}

/// One session of a client: one operation at a time.
pub(super) struct SimClient {
    /// Index into the world's identities.
    pub(super) identity: usize,
    /// The cluster whose table it uses (0, or 1 with two clusters).
    pub(super) cluster: usize,
    pub(super) rng: SeededRandom,
    pub(super) leaders: LeaderTable,
    /// The table as meta last described it (None until the client first refreshes its route: the
    /// partitions the run starts with).
    pub(super) route: Option<tern_proto::TableInfo>,
    pub(super) pending: Option<Pending>,
    /// Final verification reads still to issue (after all workload operations).
    pub(super) verification: Vec<(Vec<u8>, Input)>,
    pub(super) finished: bool,
}

pub(super) const HASHKEYS: [&[u8]; 3] = [b"h0", b"h1", b"h2"];
/// The second cluster's clients use hashkeys of their own: each cluster's history stays
/// linearizable by itself (duplication only adds the other cluster's keys, which its clients
/// never read).
const HASHKEYS_SECOND: [&[u8]; 3] = [b"g0", b"g1", b"g2"];
/// With two clusters, both write this hashkey: conflicting writes that last-writer-wins must
/// settle identically on both sides. Like TTL records, they stay out of the history (reads of them
/// are not linearizable across clusters); the clusters' final comparison checks them.
pub(super) const SHARED_HASHKEY: &[u8] = b"x";
pub(super) const SORTKEYS: [&[u8]; 2] = [b"a", b"b"];
pub(super) const COUNTER: &[u8] = b"n";
/// Records written with a TTL live under this hashkey. The checker has no model of time, so these
/// operations stay out of the history: what checks them is that every replica ends identical (the
/// state machine must expire records by the log's clock, never a node's).
pub(super) const TTL_HASHKEY: &[u8] = b"ttl";
/// With `SimConfig::redis`, the list key of the first cluster's clients (and of the second's).
pub(super) const LIST_HASHKEYS: [&[u8]; 2] = [b"list0", b"list1"];

/// A Redis write of one command.
fn redis_write(args: Vec<bytes::Bytes>) -> write_request::Op {
    write_request::Op::Redis(tern_proto::RedisWrite { commands: vec![tern_proto::RedisCommand { args }], transaction: false })
}

/// A Redis reply as the checker's output (an error reply, which the list workload never earns,
/// becomes an output no model produces, so the history fails).
fn redis_output(wire: &[u8]) -> Output {
    use tern_redis::Reply;
    match Reply::from_wire(wire) {
        Some(Reply::Int(n)) => Output::Integer(n),
        Some(Reply::Bulk(v)) => Output::Value(Some(v.to_vec())),
        Some(Reply::Nil) => Output::Value(None),
        Some(Reply::Array(items)) => {
            Output::Values(items.into_iter().map(|i| if let Reply::Bulk(v) = i { Some(v.to_vec()) } else { None }).collect())
        }
        other => Output::Records(vec![(b"unexpected redis reply".to_vec(), format!("{other:?}").into_bytes())]),
    }
}

impl World {
    pub(super) fn serve(&mut self, node: NodeId, client: usize, attempt: u64, request: Request) {
        let i = self.node_index(node);
        let shared = self.shared.clone();
        let reply = move |answer: Answer| {
            let mut s = shared.lock();
            let delay = s.latency();
            s.schedule(delay, Event::Answer { client, attempt, answer });
        };
        self.with_store(i, move |s| {
            match request {
                Request::Write(group, request) => {
                    s.handle(StoreMsg::Write { group, request, callback: Box::new(move |r| reply(Answer::Write(r))) });
                }
                Request::Read(group, request) => {
                    s.handle(StoreMsg::Read { group, request, callback: Box::new(move |r| reply(Answer::Read(r))) });
                }
            }
            s.process_ready();
        });
    }

    pub(super) fn plan_operation(&mut self, client: usize) -> (Vec<u8>, Input) {
        let now = self.now.load(Ordering::SeqCst);
        if self.cfg.reads_only.is_some_and(|(from, to)| (from..to).contains(&now)) {
            let rng = &mut self.clients[client].rng;
            let hashkey = HASHKEYS[rng.range(0, HASHKEYS.len() as u64) as usize].to_vec();
            return (hashkey, Input::Get { sortkey: SORTKEYS[rng.range(0, SORTKEYS.len() as u64) as usize].to_vec() });
        }
        let two_clusters = self.cfg.clusters == 2;
        let c = &mut self.clients[client];
        let keys = if c.cluster == 0 { HASHKEYS } else { HASHKEYS_SECOND };
        let rng = &mut c.rng;
        let hashkey = keys[rng.range(0, keys.len() as u64) as usize].to_vec();
        let sortkey = SORTKEYS[rng.range(0, SORTKEYS.len() as u64) as usize].to_vec();
        let value = format!("c{client}-{}", self.issued).into_bytes();
        if two_clusters && rng.range(0, 100) < 15 {
            let input = match rng.range(0, 4) {
                0 | 1 => Input::Set { sortkey, value },
                2 => Input::Del { sortkey },
                _ => Input::Incr { sortkey: COUNTER.to_vec(), delta: 1 },
            };
            return (SHARED_HASHKEY.to_vec(), input);
        }
        if self.cfg.redis && rng.range(0, 100) < 10 {
            let input = match rng.range(0, 10) {
                0..=4 => Input::ListPush { value },
                5..=7 => Input::ListPop,
                _ => Input::ListRange,
            };
            return (LIST_HASHKEYS[c.cluster].to_vec(), input);
        }
        if rng.range(0, 100) < 8 {
            // Sets expire within seconds; incrs find the record alive or gone depending on the time
            // the log says it is.
            let input = if rng.range(0, 2) == 0 {
                Input::Set { sortkey: COUNTER.to_vec(), value: b"100".to_vec() }
            } else {
                Input::Incr { sortkey: COUNTER.to_vec(), delta: 1 }
            };
            return (TTL_HASHKEY.to_vec(), input);
        }
        let issued = self.issued as u64;
        let expected = |rng: &mut SeededRandom| {
            if rng.range(0, 2) == 0 {
                None
            } else {
                Some(format!("c{}-{}", rng.range(0, 4), rng.range(0, issued + 1)).into_bytes())
            }
        };
        let input = match rng.range(0, 100) {
            0..=24 => Input::Get { sortkey },
            25..=44 => Input::Set { sortkey, value },
            45..=49 => Input::Del { sortkey },
            50..=64 => Input::Incr { sortkey: COUNTER.to_vec(), delta: rng.range(1, 10) as i64 },
            65..=72 => Input::CheckAndSet { check_sortkey: SORTKEYS[0].to_vec(), expected: expected(rng), set_sortkey: SORTKEYS[1].to_vec(), value },
            73..=77 => Input::CheckAndMutate {
                check_sortkey: SORTKEYS[1].to_vec(),
                expected: expected(rng),
                sets: vec![(SORTKEYS[0].to_vec(), value.clone()), (SORTKEYS[1].to_vec(), value)],
                dels: vec![COUNTER.to_vec()],
            },
            78..=85 => Input::MultiSet { pairs: SORTKEYS.iter().map(|s| (s.to_vec(), value.clone())).collect() },
            86..=91 => Input::MultiGet { sortkeys: SORTKEYS.iter().map(|s| s.to_vec()).chain([COUNTER.to_vec()]).collect() },
            92..=95 => Input::Scan { start: SORTKEYS[0].to_vec(), stop: if rng.range(0, 2) == 0 { vec![] } else { SORTKEYS[1].to_vec() } },
            _ => Input::Count,
        };
        (hashkey, input)
    }

    pub(super) fn next_operation(&mut self, client: usize) {
        if self.clients[client].pending.is_some() || self.clients[client].finished {
            return;
        }
        let planned = if self.issued < self.cfg.operations {
            self.issued += 1;
            Some(self.plan_operation(client))
        } else if client == 0 && self.healed_at.is_some() {
            // After the workload, one client reads everything back: no acknowledged write may be lost.
            if self.clients[0].verification.is_empty() && !self.history.iter().any(|o| o.client == u64::MAX) {
                let mut v = Vec::new();
                for h in HASHKEYS {
                    v.push((h.to_vec(), Input::MultiGet { sortkeys: SORTKEYS.iter().map(|s| s.to_vec()).chain([COUNTER.to_vec()]).collect() }));
                }
                if self.cfg.redis {
                    v.push((LIST_HASHKEYS[0].to_vec(), Input::ListRange));
                }
                self.clients[0].verification = v;
                self.history.push(Operation {
                    client: u64::MAX,
                    hashkey: vec![],
                    input: Input::Get { sortkey: vec![] },
                    output: None,
                    call: 0,
                    ret: 0,
                });
            }
            self.clients[0].verification.pop()
        } else if client == 0 && self.issued >= self.cfg.operations {
            // Wait for healing before verifying.
            self.shared.lock().schedule(500, Event::ClientNext { client });
            return;
        } else {
            None
        };
        let Some((hashkey, input)) = planned else {
            self.clients[client].finished = true;
            return;
        };
        let now = self.now.load(Ordering::SeqCst);
        let c = &mut self.clients[client];
        let identity = &mut self.identities[c.identity];
        // As the real client: only writes take a sequence number.
        let seq = if input.is_read() { 0 } else { identity.sequencer.begin() };
        c.pending = Some(Pending { hashkey, input, started: now, attempts: 0, attempt: 0, seq, node: 0, partition: 0 });
        self.send_attempt(client);
    }

    pub(super) fn send_attempt(&mut self, client: usize) {
        self.next_attempt += 1;
        let attempt = self.next_attempt;
        let partitions = self.cfg.partitions;
        let c = &mut self.clients[client];
        let identity = &self.identities[c.identity];
        let client_id = identity.client_id;
        let p = c.pending.as_mut().expect("pending operation");
        let first_incomplete_seq = identity.sequencer.floor(p.seq);
        // As the real client routes (through a split too).
        let (partition, partition_count) = match &c.route {
            Some(table) => tern_client::routing::locate(table, &p.hashkey),
            None => (tern_core::codec::partition_of(&p.hashkey, partitions), partitions),
        };
        let node = c.leaders.leader(partition);
        p.attempt = attempt;
        p.node = node;
        p.partition = partition;
        let table_id = Self::table_of(c.cluster);
        let group = GroupId::new(table_id, partition);
        let pref = Some(tern_proto::PartitionRef { table_id, partition, partition_count });
        let bytes = |b: &[u8]| bytes::Bytes::copy_from_slice(b);
        let hk = bytes(&p.hashkey);
        let ttl_seconds = if p.hashkey == TTL_HASHKEY { 1 + (p.seq % 3) as u32 } else { 0 };
        let write = |op| Request::Write(group, WriteRequest { partition: pref, client_id, seq: p.seq, first_incomplete_seq, op: Some(op) });
        let read = |op| Request::Read(group, ReadRequest { partition: pref, allow_stale: false, op: Some(op) });
        let request = match &p.input {
            Input::Get { sortkey } => {
                read(read_request::Op::Get(tern_proto::MultiGet { hashkey: hk, sortkeys: vec![bytes(sortkey)], limit: 0, no_value: false }))
            }
            Input::MultiGet { sortkeys } => read(read_request::Op::Get(tern_proto::MultiGet {
                hashkey: hk,
                sortkeys: sortkeys.iter().map(|s| bytes(s)).collect(),
                limit: 0,
                no_value: false,
            })),
            Input::Set { sortkey, value } => write(write_request::Op::Set(tern_proto::MultiSet {
                hashkey: hk,
                values: vec![tern_proto::SortkeyValue { sortkey: bytes(sortkey), value: bytes(value), ttl_seconds, expire_at_ms: 0 }],
            })),
            Input::MultiSet { pairs } => write(write_request::Op::Set(tern_proto::MultiSet {
                hashkey: hk,
                values: pairs
                    .iter()
                    .map(|(s, v)| tern_proto::SortkeyValue { sortkey: bytes(s), value: bytes(v), ttl_seconds: 0, expire_at_ms: 0 })
                    .collect(),
            })),
            Input::Del { sortkey } => write(write_request::Op::Del(tern_proto::MultiDel { hashkey: hk, sortkeys: vec![bytes(sortkey)] })),
            Input::Incr { sortkey, delta } => {
                write(write_request::Op::Incr(tern_proto::Incr { hashkey: hk, sortkey: bytes(sortkey), delta: *delta, ttl_seconds: 0 }))
            }
            Input::CheckAndSet { check_sortkey, expected, set_sortkey, value } => write(write_request::Op::CheckAndSet(tern_proto::CheckAndSet {
                hashkey: hk,
                check_sortkey: bytes(check_sortkey),
                check_type: if expected.is_some() { tern_proto::CheckType::ValueEqual } else { tern_proto::CheckType::ValueNotExist } as i32,
                check_operand: expected.as_deref().map(bytes).unwrap_or_default(),
                set_sortkey: bytes(set_sortkey),
                set_value: bytes(value),
                ..Default::default()
            })),
            Input::CheckAndMutate { check_sortkey, expected, sets, dels } => write(write_request::Op::CheckAndMutate(tern_proto::CheckAndMutate {
                hashkey: hk,
                check_sortkey: bytes(check_sortkey),
                check_type: if expected.is_some() { tern_proto::CheckType::ValueEqual } else { tern_proto::CheckType::ValueNotExist } as i32,
                check_operand: expected.as_deref().map(bytes).unwrap_or_default(),
                mutations: sets
                    .iter()
                    .map(|(s, v)| tern_proto::Mutation { sortkey: bytes(s), value: bytes(v), ..Default::default() })
                    .chain(dels.iter().map(|s| tern_proto::Mutation { sortkey: bytes(s), delete: true, ..Default::default() }))
                    .collect(),
                return_check_value: false,
            })),
            Input::Scan { start, stop } => read(read_request::Op::Scan(tern_proto::Scan {
                hashkey: hk,
                start: bytes(start),
                stop: bytes(stop),
                limit: 100,
                ..Default::default()
            })),
            Input::Count => read(read_request::Op::Count(tern_proto::Count { hashkey: hk })),
            Input::ListPush { value } => write(redis_write(vec![bytes(b"RPUSH"), hk, bytes(value)])),
            Input::ListPop => write(redis_write(vec![bytes(b"LPOP"), hk])),
            Input::ListRange => {
                read(read_request::Op::Redis(tern_proto::RedisCommand { args: vec![bytes(b"LRANGE"), hk, bytes(b"0"), bytes(b"-1")] }))
            }
        };
        let mut s = self.shared.lock();
        // The client-server link shares the nodes' fate: a crashed or unreachable node never answers.
        let delay = s.latency();
        s.schedule(delay, Event::Request { node, client, attempt, request });
        s.schedule(ATTEMPT_TIMEOUT_MS, Event::AttemptTimeout { client, attempt });
    }

    pub(super) fn on_answer(&mut self, client: usize, attempt: u64, answer: Answer) {
        let Some(p) = self.clients[client].pending.as_ref() else { return };
        if p.attempt != attempt {
            return; // an answer to an attempt the client already gave up on
        }
        let error = match &answer {
            Answer::Write(w) => tern_proto::check(&w.error),
            Answer::Read(r) => tern_proto::check(&r.error),
        };
        match error {
            Err(e) => self.on_error(client, e),
            Ok(()) => {
                let output = match (&p.input, answer) {
                    (Input::Get { .. }, Answer::Read(r)) => Output::Value(r.records.first().map(|r| r.value.to_vec())),
                    (Input::MultiGet { sortkeys }, Answer::Read(r)) => {
                        Output::Values(sortkeys.iter().map(|s| r.records.iter().find(|x| x.sortkey[..] == s[..]).map(|x| x.value.to_vec())).collect())
                    }
                    (Input::Set { .. } | Input::MultiSet { .. }, Answer::Write(_)) => Output::Done,
                    (Input::Del { .. }, Answer::Write(w)) => Output::Existed(w.count > 0),
                    (Input::Incr { .. }, Answer::Write(w)) => Output::Integer(w.new_value),
                    (Input::CheckAndSet { .. } | Input::CheckAndMutate { .. }, Answer::Write(w)) => Output::Applied(w.set_done),
                    (Input::Scan { .. }, Answer::Read(r)) => {
                        Output::Records(r.records.iter().map(|x| (x.sortkey.to_vec(), x.value.to_vec())).collect())
                    }
                    (Input::Count, Answer::Read(r)) => Output::Count(r.count),
                    (Input::ListPush { .. } | Input::ListPop, Answer::Write(w)) => redis_output(&w.redis_reply),
                    (Input::ListRange, Answer::Read(r)) => redis_output(&r.redis_reply),
                    _ => unreachable!("answer kind matches request kind"),
                };
                self.complete(client, Some(output));
            }
        }
    }

    pub(super) fn on_error(&mut self, client: usize, error: TernError) {
        let now = self.now.load(Ordering::SeqCst);
        // What the real client gets when it refreshes its route from meta.
        let held = self.clients[client].route.as_ref().map(|t| (t, &self.clients[client].leaders));
        let fresh_route = self.route_from_meta(held);
        let c = &mut self.clients[client];
        let p = c.pending.as_mut().expect("pending operation");
        // As the real client: a split learned from the partition itself routes at once.
        let learned = match (&error, &c.route) {
            (TernError::PartitionSplit { partition_count, .. }, Some(table)) => {
                tern_client::routing::learn_split(table, p.partition, *partition_count, p.node)
            }
            _ => None,
        };
        let reaction = if let Some((table, child)) = learned {
            c.leaders = LeaderTable::learned(&table, &c.leaders, child, p.node);
            c.route = Some(table);
            tern_client::routing::Reaction::None
        } else {
            c.leaders.observe(p.partition, p.node, &error)
        };
        if reaction == tern_client::routing::Reaction::RefreshRoute {
            if let Some((leaders, table)) = fresh_route {
                c.leaders = leaders;
                c.route = Some(table);
            }
        }
        let remaining = Duration::from_millis((p.started + OPERATION_DEADLINE_MS).saturating_sub(now));
        let attempts = p.attempts;
        p.attempts += 1;
        let attempt = p.attempt;
        match next_step(error, attempts, remaining, &self.policy, &mut c.rng) {
            NextStep::Retry(pause) => {
                let mut s = self.shared.lock();
                s.schedule(pause.as_millis() as u64, Event::ClientRetry { client, attempt });
            }
            NextStep::GiveUp(_) => self.complete(client, None),
        }
    }

    /// Records the operation (writes that failed have an unknown outcome; failed reads are dropped).
    pub(super) fn complete(&mut self, client: usize, output: Option<Output>) {
        let now = self.now.load(Ordering::SeqCst);
        let c = &mut self.clients[client];
        let p = c.pending.take().expect("pending operation");
        let is_read = p.input.is_read();
        if !is_read {
            self.identities[c.identity].sequencer.finish(p.seq);
        }
        if (output.is_some() || !is_read) && p.hashkey != TTL_HASHKEY && p.hashkey != SHARED_HASHKEY {
            self.history.push(Operation { client: client as u64, hashkey: p.hashkey, input: p.input, output, call: p.started, ret: now });
        }
        let mut think = c.rng.range(0, 80);
        if let Some((from, to)) = self.cfg.quiet.filter(|(from, to)| (*from..*to).contains(&(now + think))) {
            think += to - from; // past the quiet window, wherever in it this falls
        }
        self.shared.lock().schedule(think, Event::ClientNext { client });
    }
}
