//! The simulated network and clocks: requests and answers in flight, latency, loss and partitions,
//! per-node clocks, and the transport the production store sends through (snapshots copied, or
//! cut short by a fault).

use super::*;

pub(super) enum Request {
    Write(GroupId, WriteRequest),
    Read(GroupId, ReadRequest),
}

pub(super) enum Answer {
    Write(WriteResponse),
    Read(ReadResponse),
}

/// Network conditions, changed by faults.
#[derive(Default)]
pub(super) struct Network {
    /// (from, to) pairs whose messages are dropped.
    pub(super) cut: BTreeSet<(NodeId, NodeId)>,
    pub(super) noisy: bool,
    /// Snapshot transfers may arrive cut short.
    pub(super) cut_snapshots: bool,
    /// Leadership-transfer messages (MsgTimeoutNow) are held up for seconds.
    pub(super) slow_transfers: bool,
}

/// State shared with the transports and callbacks that production code calls into.
pub(super) struct Shared {
    pub(super) now: u64,
    pub(super) seq: u64,
    pub(super) queue: BinaryHeap<Reverse<(u64, u64)>>,
    pub(super) events: BTreeMap<u64, Event>,
    pub(super) rng: SeededRandom,
    pub(super) network: Network,
    /// Every node's file system (snapshot transfers copy from one to another).
    pub(super) files: BTreeMap<NodeId, Arc<MemoryFileSystem>>,
}

impl Shared {
    pub(super) fn schedule(&mut self, delay_ms: u64, event: Event) {
        self.seq += 1;
        let at = self.now + delay_ms;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// One-way network latency; with noise, longer and more varied (so messages reorder), and now
    /// and then a message stuck for seconds (a retransmission after a lost path): it arrives after
    /// whatever it was part of has timed out.
    pub(super) fn latency(&mut self) -> u64 {
        if self.network.noisy {
            if self.rng.range(0, 200) == 0 {
                self.rng.range(1_000, 3_000)
            } else {
                self.rng.range(1, 40)
            }
        } else {
            self.rng.range(1, 4)
        }
    }

    /// Whether a message from `from` to `to` is lost.
    pub(super) fn lost(&mut self, from: NodeId, to: NodeId) -> bool {
        self.network.cut.contains(&(from, to)) || (self.network.noisy && self.rng.range(0, 100) < 5)
    }
}

pub(super) type SharedRef = Arc<Mutex<Shared>>;

/// One node's clocks: true virtual time run `drift_ppm` fast or slow, the wall clock also offset
/// (and jumped) by `offset_ms`.
#[derive(Clone)]
pub(super) struct SimClock {
    pub(super) now: Arc<AtomicU64>,
    pub(super) offset_ms: Arc<AtomicI64>,
    pub(super) drift_ppm: i64,
}

impl SimClock {
    fn local_us(&self) -> i64 {
        let now_us = self.now.load(Ordering::SeqCst) as i64 * 1000;
        now_us + now_us / 1_000_000 * self.drift_ppm + (now_us % 1_000_000) * self.drift_ppm / 1_000_000
    }
}

impl Clock for SimClock {
    fn now_unix_ms(&self) -> u64 {
        (EPOCH_UNIX_MS as i64 + self.local_us() / 1000 + self.offset_ms.load(Ordering::SeqCst)) as u64
    }
    fn monotonic(&self) -> Duration {
        Duration::from_micros(self.local_us() as u64)
    }
}

pub(super) struct SimTransport {
    pub(super) node: NodeId,
    pub(super) shared: SharedRef,
}

/// Streams a checkpoint from one node's file system into another's, as the real transport's
/// receiver writes it: every file synced, then the directory.
pub(super) fn copy_dir(from_fs: &dyn FileSystem, from: &Path, to_fs: &dyn FileSystem, to: &Path) -> std::io::Result<()> {
    to_fs.create_dir_all(to)?;
    for path in from_fs.read_dir(from)? {
        let target = to.join(path.file_name().expect("entries have names"));
        to_fs.write(&target, &from_fs.read(&path)?)?;
        to_fs.sync_file(&target)?;
    }
    to_fs.sync_directory(to)
}

/// Damages a received snapshot copy the way a transfer cut short would: a file truncated or missing.
/// The sender believes it finished (as when the stream just ended early). Returns true.
pub(super) fn cut_snapshot_short(fs: &dyn FileSystem, dir: &Path, rng: &mut SeededRandom) -> bool {
    let files: Vec<PathBuf> = fs.read_dir(dir).unwrap_or_default();
    if files.is_empty() {
        return true;
    }
    let victim = &files[rng.range(0, files.len() as u64) as usize];
    if rng.range(0, 2) == 0 {
        let _ = fs.remove_all(victim);
    } else if let Ok(bytes) = fs.read(victim) {
        let _ = fs.write(victim, &bytes[..bytes.len() / 2]);
    }
    true
}

impl Transport for SimTransport {
    fn send(&mut self, messages: Vec<OutMessage>) {
        let mut s = self.shared.lock();
        for out in messages {
            let to = out.to_node;
            let lost = s.lost(self.node, to);
            let delay = s.latency();
            if let Some(dir) = out.snapshot_dir {
                // The checkpoint is streamed: the receiver gets its own copy of the files.
                let seq = s.seq;
                let target = node_dir(to).join("snapshots-received").join(format!("sim-{seq}"));
                let cut_short = s.network.cut_snapshots && s.rng.range(0, 2) == 0;
                let (from_fs, to_fs) = (s.files[&self.node].clone(), s.files[&to].clone());
                // As the real transport: the sender's manifest travels with the files.
                let manifest = tern_raft::snapshot::Manifest::of_dir(&*from_fs, &dir);
                let ok = !lost
                    && copy_dir(&*from_fs, &dir, &*to_fs, &target).is_ok()
                    && manifest.and_then(|m| m.write_into(&*to_fs, &target)).is_ok()
                    && (!cut_short || cut_snapshot_short(&*to_fs, &target, &mut s.rng));
                if ok {
                    // On a noisy network a transfer may also be slow (it arrives, and is reported,
                    // late) and be delivered twice (a retried stream): the receiver must install
                    // one snapshot once and drop the copy.
                    let slow = if s.network.noisy { s.rng.range(0, 3_000) } else { 0 };
                    if s.network.noisy && s.rng.range(0, 10) == 0 {
                        let copy = node_dir(to).join("snapshots-received").join(format!("sim-{seq}-copy"));
                        if copy_dir(&*to_fs, &target, &*to_fs, &copy).is_ok() {
                            let later = delay + slow + s.latency();
                            s.schedule(later, Event::Raft { to, group: out.group, message: out.message.clone(), snapshot_dir: Some(copy) });
                        }
                    }
                    s.schedule(delay + slow, Event::Raft { to, group: out.group, message: out.message.clone(), snapshot_dir: Some(target) });
                    s.schedule(delay + slow, Event::SnapshotReport { node: self.node, group: out.group, to_peer: out.message.to, ok });
                    continue;
                }
                s.schedule(delay, Event::SnapshotReport { node: self.node, group: out.group, to_peer: out.message.to, ok });
                continue;
            }
            if lost {
                continue;
            }
            // A transfer's MsgTimeoutNow held up past the transfer's own timeout (a retransmission
            // after a lost path), and the old leader cut off just before it arrives: the target
            // campaigns when the leader has given the transfer up, and the leader cannot hear the
            // election that replaces it.
            let delay = if s.network.slow_transfers && out.message.get_msg_type() == raft::eraftpb::MessageType::MsgTimeoutNow {
                let late = delay + s.rng.range(1_000, 3_000);
                s.schedule(late - 1, Event::Fault(Fault::CutTransferSender(self.node)));
                s.schedule(late + 1_500, Event::Fault(Fault::Rejoin(self.node)));
                late
            } else {
                delay
            };
            let duplicate = s.network.noisy && s.rng.range(0, 100) < 2;
            if duplicate {
                let d2 = s.latency();
                s.schedule(d2, Event::Raft { to, group: out.group, message: out.message.clone(), snapshot_dir: None });
            }
            s.schedule(delay, Event::Raft { to, group: out.group, message: out.message, snapshot_dir: None });
        }
    }

    fn ping(&mut self, nodes: &[NodeId]) {
        let mut s = self.shared.lock();
        for &to in nodes {
            if s.lost(self.node, to) {
                continue;
            }
            let delay = s.latency();
            s.schedule(delay, Event::NodePing { from: self.node, to });
        }
    }
}
