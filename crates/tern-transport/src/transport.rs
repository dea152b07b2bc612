//! Sending raft messages over gRPC: one long-lived client stream per destination node carrying batches
//! of messages, and a separate streamed transfer per snapshot (checkpoint files in chunks, rate
//! limited). Sending never blocks the store: each destination has a bounded queue, and messages that
//! do not fit are dropped (raft retransmits) and reported as unreachable.

use parking_lot::RwLock;
use protobuf::Message as _;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_core::limits::{GRPC_MESSAGE_BYTES_MAX, RAFT_BATCH_BYTES_MAX};
use tern_core::{GroupId, NodeId};
use tern_proto::raft_client::RaftClient;
use tern_proto::{RaftBatch, RaftEnvelope, SnapshotChunk, SnapshotFile};
use tern_raft::replica::OutMessage;
use tern_raft::store::{StoreHandle, StoreMsg, Transport};
use tokio::sync::mpsc;

/// Node id -> address, refreshed from meta's heartbeat answers.
pub type AddressBook = Arc<RwLock<HashMap<NodeId, String>>>;

/// Messages queued per destination before new ones are dropped.
const PEER_QUEUE_MESSAGES_MAX: usize = 16_384;
/// Messages per batch on the wire.
const BATCH_MESSAGES_MAX: usize = 512;
/// Snapshot file chunk size.
const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

pub struct GrpcTransport {
    node_id: NodeId,
    cluster_id: Arc<AtomicU64>,
    runtime: tokio::runtime::Handle,
    addresses: AddressBook,
    peers: HashMap<NodeId, mpsc::Sender<RaftEnvelope>>,
    store: StoreHandle,
    snapshot_bytes_per_second: u64,
}

impl GrpcTransport {
    pub fn new(
        node_id: NodeId,
        cluster_id: Arc<AtomicU64>,
        runtime: tokio::runtime::Handle,
        addresses: AddressBook,
        store: StoreHandle,
        snapshot_bytes_per_second: u64,
    ) -> GrpcTransport {
        GrpcTransport { node_id, cluster_id, runtime, addresses, peers: HashMap::new(), store, snapshot_bytes_per_second }
    }

    fn peer_queue(&mut self, to: NodeId) -> &mpsc::Sender<RaftEnvelope> {
        self.peers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_MESSAGES_MAX);
            self.runtime.spawn(peer_sender(to, self.addresses.clone(), rx));
            tx
        })
    }
}

impl Transport for GrpcTransport {
    fn send(&mut self, messages: Vec<OutMessage>) {
        for out in messages {
            let envelope = RaftEnvelope {
                group_id: out.group.0,
                from_node: self.node_id,
                to_node: out.to_node,
                message: out.message.write_to_bytes().expect("encode raft message").into(),
                cluster_id: self.cluster_id.load(Ordering::Relaxed),
                ping: false,
            };
            if let Some(dir) = out.snapshot_dir {
                let task = send_snapshot(
                    self.addresses.clone(),
                    envelope,
                    dir,
                    self.store.clone(),
                    out.group,
                    out.message.to,
                    self.snapshot_bytes_per_second,
                );
                self.runtime.spawn(task);
                continue;
            }
            let to_peer = out.message.to;
            if self.peer_queue(out.to_node).try_send(envelope).is_err() {
                self.store.send(StoreMsg::Unreachable { group: out.group, to_peer });
            }
        }
    }

    fn ping(&mut self, nodes: &[NodeId]) {
        let cluster_id = self.cluster_id.load(Ordering::Relaxed);
        for to in nodes {
            let envelope = RaftEnvelope { from_node: self.node_id, to_node: *to, cluster_id, ping: true, ..Default::default() };
            // A full queue drops the ping: the node is not reachable now, which is what it tells.
            let _ = self.peer_queue(*to).try_send(envelope);
        }
    }
}

async fn connect(addresses: &AddressBook, to: NodeId) -> Option<RaftClient<tonic::transport::Channel>> {
    let address = addresses.read().get(&to).cloned()?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect()
        .await
        .ok()?;
    Some(RaftClient::new(channel).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX).max_encoding_message_size(RAFT_BATCH_BYTES_MAX))
}

/// Keeps one stream open to a node and forwards batches; reconnects with a pause after failures,
/// dropping what was queued meanwhile (raft resends).
async fn peer_sender(to: NodeId, addresses: AddressBook, mut queue: mpsc::Receiver<RaftEnvelope>) {
    loop {
        let Some(mut client) = connect(&addresses, to).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            while queue.try_recv().is_ok() {}
            if queue.is_closed() {
                return;
            }
            continue;
        };
        let (tx, rx) = mpsc::channel::<RaftBatch>(64);
        let call = tokio::spawn(async move { client.send(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
        let mut carried: Option<RaftEnvelope> = None;
        loop {
            let first = match carried.take() {
                Some(m) => m,
                None => match queue.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            let (messages, next) = fill_batch(first, &mut queue);
            carried = next;
            if tx.send(RaftBatch { messages }).await.is_err() {
                break; // stream ended: reconnect
            }
        }
        drop(tx);
        let _ = call.await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Takes queued messages after `first` into one batch, up to BATCH_MESSAGES_MAX messages and half of
/// the receiver's RAFT_BATCH_BYTES_MAX (a batch the receiver refused would end the stream and drop
/// everything queued behind it). Returns the batch and the message that did not fit, if any.
fn fill_batch(first: RaftEnvelope, queue: &mut mpsc::Receiver<RaftEnvelope>) -> (Vec<RaftEnvelope>, Option<RaftEnvelope>) {
    use prost::Message as _;
    let mut bytes = first.encoded_len();
    let mut messages = vec![first];
    while messages.len() < BATCH_MESSAGES_MAX && bytes < RAFT_BATCH_BYTES_MAX / 2 {
        let Ok(next) = queue.try_recv() else { break };
        let size = next.encoded_len();
        if bytes + size > RAFT_BATCH_BYTES_MAX / 2 {
            return (messages, Some(next));
        }
        bytes += size;
        messages.push(next);
    }
    (messages, None)
}

/// Streams a checkpoint directory to a peer, file by file in chunks at a bounded rate, then tells the
/// store whether it arrived.
async fn send_snapshot(
    addresses: AddressBook,
    envelope: RaftEnvelope,
    dir: PathBuf,
    store: StoreHandle,
    group: GroupId,
    to_peer: u64,
    bytes_per_second: u64,
) {
    let to = envelope.to_node;
    let result = async {
        let mut client = connect(&addresses, to).await.ok_or_else(|| format!("cannot connect to node {to}"))?;
        let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
        let source = dir.clone();
        let feeder = tokio::spawn(async move { feed_snapshot(&source, envelope, tx, bytes_per_second).await });
        let sent = client.send_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        let fed = feeder.await.map_err(|e| e.to_string())?;
        fed.map_err(|e| format!("read snapshot {}: {e}", dir.display()))?;
        sent.map(|_| ()).map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = &result {
        tracing::warn!(%group, to, "snapshot transfer failed: {e}");
    }
    store.send(StoreMsg::SnapshotReport { group, to_peer, ok: result.is_ok() });
}

/// Reads the checkpoint's files in chunks into the stream, pacing to `bytes_per_second` (0 = no limit).
async fn feed_snapshot(dir: &Path, envelope: RaftEnvelope, tx: mpsc::Sender<SnapshotChunk>, bytes_per_second: u64) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let closed = || std::io::Error::other("receiver closed the stream");
    // The manifest goes first: the receiver installs nothing that does not match it.
    let source = dir.to_path_buf();
    let manifest = tokio::task::spawn_blocking(move || tern_raft::snapshot::Manifest::of_dir(&tern_core::files::RealFileSystem, &source))
        .await
        .map_err(std::io::Error::other)?
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let files: Vec<SnapshotFile> = manifest.files.iter().map(|f| SnapshotFile { name: f.name.clone(), size: f.size, crc32: f.crc32 }).collect();
    let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    tx.send(SnapshotChunk { envelope: Some(envelope), manifest: files, ..Default::default() }).await.map_err(|_| closed())?;
    let started = tokio::time::Instant::now();
    let mut sent: u64 = 0;
    for name in names {
        let mut file = tokio::fs::File::open(dir.join(&name)).await?;
        let length = file.metadata().await?.len();
        let mut remaining = length;
        loop {
            let mut data = vec![0u8; (remaining as usize).min(SNAPSHOT_CHUNK_BYTES)];
            file.read_exact(&mut data).await?;
            remaining -= data.len() as u64;
            sent += data.len() as u64;
            if bytes_per_second > 0 {
                tokio::time::sleep_until(started + Duration::from_secs_f64(sent as f64 / bytes_per_second as f64)).await;
            }
            let chunk = SnapshotChunk { file_name: name.clone(), data: data.into(), file_done: remaining == 0, ..Default::default() };
            tx.send(chunk).await.map_err(|_| closed())?;
            if remaining == 0 {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(bytes: usize) -> RaftEnvelope {
        RaftEnvelope { group_id: 1, from_node: 1, to_node: 2, message: vec![0u8; bytes].into(), cluster_id: 1, ping: false }
    }

    /// Batches stay within the receiver's limit however large the queued messages are (512
    /// messages of about 1 MiB each used to go out as one 512 MiB batch the receiver refused); a
    /// message that does not fit starts the next batch, and small ones still travel together.
    #[tokio::test]
    async fn batches_are_capped_by_bytes() {
        use prost::Message as _;
        let (tx, mut rx) = mpsc::channel(1024);
        for _ in 0..20 {
            tx.try_send(envelope(1 << 20)).unwrap();
        }
        let mut sent = 0;
        let mut carried = None;
        while sent < 20 {
            let first = carried.take().unwrap_or_else(|| rx.try_recv().unwrap());
            let (batch, next) = fill_batch(first, &mut rx);
            let bytes = RaftBatch { messages: batch.clone() }.encoded_len();
            assert!(bytes <= RAFT_BATCH_BYTES_MAX, "batch of {bytes} bytes");
            assert!(batch.len() > 1, "several large messages still share a batch");
            sent += batch.len();
            carried = next;
        }
        for _ in 0..100 {
            tx.try_send(envelope(10)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        assert_eq!(fill_batch(first, &mut rx).0.len(), 100);
    }
}
