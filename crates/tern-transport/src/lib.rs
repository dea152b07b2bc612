//! The raft transport over gRPC, shared by replica servers and meta nodes: `GrpcTransport` (sending:
//! one long-lived stream per destination node carrying batches, snapshots streamed in chunks) and
//! `RaftService` (receiving).
//!
//! Owns: moving raft messages and snapshots between nodes. Must not contain consensus logic
//! (tern-raft) or request handling (tern-server, tern-meta).

mod transport;

pub use transport::{AddressBook, GrpcTransport};

use protobuf::Message as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tern_core::{GroupId, NodeId};
use tern_proto::raft_server::Raft;
use tern_proto::{Done, RaftBatch, SnapshotChunk};
use tern_raft::store::{StoreHandle, StoreMsg};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

/// The connections a node's gRPC server accepts, with TCP_NODELAY set on each. tonic's
/// `Server::tcp_nodelay` only applies to listeners it binds itself, not to an incoming stream:
/// without this, replies on long-lived streams (batched requests, raft) wait for Nagle's algorithm
/// and the peer's delayed acknowledgement.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Stops a node (replica server or meta): signals its tasks and gives each a moment to close
/// gracefully (peers' long-lived raft streams would otherwise hold them open), then stops its store
/// thread, which answers waiting clients.
pub async fn stop_node(
    stop: &tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    store: &StoreHandle,
    store_thread: Option<std::thread::JoinHandle<()>>,
) {
    let _ = stop.send(true);
    for mut t in tasks {
        if tokio::time::timeout(std::time::Duration::from_millis(500), &mut t).await.is_err() {
            t.abort();
        }
    }
    // A full mailbox must not swallow the stop request (the thread would run on, unstoppable).
    let handle = store.clone();
    let _ = tokio::task::spawn_blocking(move || handle.request_shutdown(STORE_STOP_WAIT)).await;
    if let Some(t) = store_thread {
        if tokio::time::timeout(STORE_STOP_WAIT, tokio::task::spawn_blocking(move || t.join())).await.is_err() {
            tracing::error!("the store thread did not stop within {STORE_STOP_WAIT:?}; leaving it behind");
        }
    }
}

/// How long stopping a node waits for its store thread to take the stop request and to finish.
const STORE_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts a node's store thread. If the thread ends while the node is not stopping (a panic, a
/// storage failure that stops the store), `stop` is raised so the node stops serving and
/// heartbeating (meta then sees it down and re-replicates its partitions) and the returned flag turns
/// true, so the process can exit instead of lingering half-alive.
pub fn spawn_store_thread(
    name: String,
    run: impl FnOnce() + Send + 'static,
    stop: &tokio::sync::watch::Sender<bool>,
) -> std::io::Result<(std::thread::JoinHandle<()>, tokio::sync::watch::Receiver<bool>)> {
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name(name.clone()).spawn(move || {
        let _ended = ended_tx; // dropped when the thread ends, by return or by unwinding
        run();
    })?;
    let (failed_tx, failed_rx) = tokio::sync::watch::channel(false);
    let (stop, stopping) = (stop.clone(), stop.subscribe());
    tokio::spawn(async move {
        let _ = ended_rx.await;
        if !*stopping.borrow() {
            tracing::error!("{name} ended unexpectedly: this node stops serving");
            let _ = failed_tx.send(true);
            let _ = stop.send(true);
        }
    });
    Ok((thread, failed_rx))
}

/// Largest snapshot file name accepted from a peer.
const SNAPSHOT_FILE_NAME_BYTES_MAX: usize = 255;

#[derive(Clone)]
pub struct RaftService {
    node_id: NodeId,
    /// This server's cluster (0 until known): messages from another cluster are refused.
    cluster_id: Arc<AtomicU64>,
    store: StoreHandle,
    receive_dir: PathBuf,
}

impl RaftService {
    pub fn new(node_id: NodeId, cluster_id: Arc<AtomicU64>, store: StoreHandle, receive_dir: PathBuf) -> RaftService {
        RaftService { node_id, cluster_id, store, receive_dir }
    }

    /// Whether an envelope may come in: every envelope names its cluster, and only this node's
    /// cluster is let in (a node that does not know its cluster yet takes no raft messages).
    fn admit(&self, envelope: &tern_proto::RaftEnvelope) -> Result<(), Status> {
        let mine = self.cluster_id.load(Ordering::Relaxed);
        if mine == 0 || envelope.cluster_id != mine {
            return Err(Status::failed_precondition(format!("this node belongs to cluster {mine:x}, not {:x}", envelope.cluster_id)));
        }
        if envelope.to_node != self.node_id {
            return Err(Status::failed_precondition(format!("this is node {}, not {}", self.node_id, envelope.to_node)));
        }
        Ok(())
    }

    fn deliver(&self, envelope: tern_proto::RaftEnvelope, snapshot_dir: Option<PathBuf>) -> Result<(), Status> {
        self.admit(&envelope)?;
        if envelope.ping {
            self.store.send(StoreMsg::NodePing { from: envelope.from_node });
            return Ok(());
        }
        let message = raft::eraftpb::Message::parse_from_bytes(&envelope.message)
            .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
        self.store.send(StoreMsg::Raft { group: GroupId(envelope.group_id), message, snapshot_dir });
        Ok(())
    }
}

fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= SNAPSHOT_FILE_NAME_BYTES_MAX
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn send(&self, request: Request<Streaming<RaftBatch>>) -> Result<Response<Done>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            for envelope in batch.messages {
                self.deliver(envelope, None)?;
            }
        }
        Ok(Response::new(Done {}))
    }

    async fn send_snapshot(&self, request: Request<Streaming<SnapshotChunk>>) -> Result<Response<Done>, Status> {
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let envelope = first.envelope.ok_or_else(|| Status::invalid_argument("snapshot stream must start with its raft message"))?;
        self.admit(&envelope)?; // before a byte of it is written to disk
        let manifest = tern_raft::snapshot::Manifest {
            files: first.manifest.iter().map(|f| tern_raft::snapshot::FileEntry { name: f.name.clone(), size: f.size, crc32: f.crc32 }).collect(),
        };
        let dir = self.receive_dir.join(format!("{}-{}-{}", envelope.group_id, envelope.from_node, rand::random::<u64>()));
        let io = |e: std::io::Error| Status::internal(format!("write received snapshot: {e}"));
        tokio::fs::create_dir_all(&dir).await.map_err(io)?;
        let received = async {
            let mut current: Option<(String, tokio::fs::File)> = None;
            while let Some(chunk) = stream.message().await? {
                if !valid_file_name(&chunk.file_name) {
                    return Err(Status::invalid_argument(format!("bad snapshot file name {:?}", chunk.file_name)));
                }
                if current.as_ref().map(|(n, _)| n != &chunk.file_name).unwrap_or(true) {
                    let f = tokio::fs::File::create(dir.join(&chunk.file_name)).await.map_err(io)?;
                    current = Some((chunk.file_name.clone(), f));
                }
                let (_, f) = current.as_mut().expect("opened above");
                f.write_all(&chunk.data).await.map_err(io)?;
                if chunk.file_done {
                    f.sync_all().await.map_err(io)?;
                    current = None;
                }
            }
            Ok(())
        }
        .await;
        // Only a whole snapshot is handed on: a stream cut short (the sender failed half way, its
        // checkpoint was removed under it, only the envelope came) is refused here, so the sender
        // reports a failure and raft sends it again.
        let checked = match received {
            Ok(()) => {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || {
                    manifest.write_into(&tern_core::files::RealFileSystem, &d)?;
                    // (Writing the manifest synced the directory.)
                    tern_raft::snapshot::verify(&tern_core::files::RealFileSystem, &d, tern_raft::snapshot::Check::Checksums)
                })
                .await
                .map_err(|e| Status::internal(format!("verify received snapshot: {e}")))?
                .map_err(|e| Status::data_loss(format!("refused snapshot: {e}")))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = checked.and_then(|()| self.deliver(envelope, Some(dir.clone()))) {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        Ok(Response::new(Done {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(cluster_id: u64, to_node: NodeId) -> tern_proto::RaftEnvelope {
        let message = raft::eraftpb::Message::default().write_to_bytes().unwrap();
        tern_proto::RaftEnvelope { group_id: 1, from_node: 2, to_node, message: message.into(), cluster_id, ping: false }
    }

    /// Raft messages of another cluster (a server that took over an address another cluster still
    /// dials), without a cluster id, or for another node are refused before they reach a replica.
    #[test]
    fn refuses_other_clusters_and_nodes() {
        let (store, mailbox) = tern_raft::store::mailbox(16);
        let cluster = Arc::new(AtomicU64::new(0xabc));
        let service = RaftService::new(1, cluster.clone(), store, std::env::temp_dir());
        let e = service.deliver(envelope(0xdef, 1), None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("cluster"), "{e}");
        assert!(service.deliver(envelope(0xabc, 2), None).is_err(), "addressed to another node");
        assert!(mailbox.try_recv().is_err(), "nothing reached the store");
        assert!(service.deliver(envelope(0, 1), None).is_err(), "no cluster id");
        service.deliver(envelope(0xabc, 1), None).unwrap();
        cluster.store(0, Ordering::Relaxed);
        assert!(service.deliver(envelope(0xabc, 1), None).is_err(), "a node that does not know its cluster takes nothing");
        assert_eq!(mailbox.try_iter().count(), 1, "only its own cluster's message got through");
    }

    /// A store thread that dies while its node is not stopping raises the node's stop signal and its
    /// failed flag (the node stops serving and heartbeating instead of lingering half-alive); one that
    /// ends because the node stops does neither.
    #[tokio::test]
    async fn a_dead_store_thread_fails_the_node() {
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let (thread, mut failed) = spawn_store_thread("test-store".into(), || panic!("store bug"), &stop).unwrap();
        assert!(thread.join().is_err());
        tokio::time::timeout(std::time::Duration::from_secs(5), failed.wait_for(|f| *f)).await.unwrap().unwrap();
        assert!(*stopping.borrow_and_update(), "the node was told to stop");

        let (stop, _) = tokio::sync::watch::channel(false);
        let (thread, failed) = spawn_store_thread("test-store".into(), || {}, &stop).unwrap();
        stop.send(true).unwrap();
        thread.join().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!*failed.borrow(), "a store that stopped on request is not a failure");
    }
}
