//! gRPC services of a replica server: the client KV API and the raft transport's receiving end.

use crate::validate;
use protobuf::Message as _;
use std::path::PathBuf;
use std::time::Duration;
use tern_core::{GroupId, NodeId, TernError};
use tern_proto::kv_server::Kv;
use tern_proto::raft_server::Raft;
use tern_proto::{
    ChecksumRequest, ChecksumResponse, Done, RaftBatch, ReadRequest, ReadResponse, SnapshotChunk, WriteRequest, WriteResponse,
};
use tern_raft::store::{StoreHandle, StoreMsg};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

/// How long a request may wait inside the server before it is answered with Timeout (outcome
/// unknown for writes). Clients retry within their own deadline.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest snapshot file name accepted from a peer.
const SNAPSHOT_FILE_NAME_BYTES_MAX: usize = 255;

#[derive(Clone)]
pub struct KvService {
    store: StoreHandle,
}

impl KvService {
    pub fn new(store: StoreHandle) -> KvService {
        KvService { store }
    }
}

fn write_error(e: TernError) -> WriteResponse {
    WriteResponse { error: Some(e.into()), ..Default::default() }
}

fn read_error(e: TernError) -> ReadResponse {
    ReadResponse { error: Some(e.into()), ..Default::default() }
}

async fn wait<T>(rx: oneshot::Receiver<T>, on_error: impl FnOnce(TernError) -> T) -> T {
    match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => on_error(TernError::Unavailable("replica went away".into())),
        Err(_) => on_error(TernError::Timeout(format!("no answer within {REQUEST_TIMEOUT:?}; outcome unknown"))),
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        let group = match validate::write(&request) {
            Ok(g) => g,
            Err(e) => return Ok(Response::new(write_error(e))),
        };
        let (tx, rx) = oneshot::channel();
        self.store.send(StoreMsg::Write { group, request, callback: Box::new(move |r| drop(tx.send(r))) });
        Ok(Response::new(wait(rx, write_error).await))
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        let request = request.into_inner();
        let group = match validate::read(&request) {
            Ok(g) => g,
            Err(e) => return Ok(Response::new(read_error(e))),
        };
        let (tx, rx) = oneshot::channel();
        self.store.send(StoreMsg::Read { group, request, callback: Box::new(move |r| drop(tx.send(r))) });
        Ok(Response::new(wait(rx, read_error).await))
    }

    async fn checksum(&self, request: Request<ChecksumRequest>) -> Result<Response<ChecksumResponse>, Status> {
        let group = GroupId(request.into_inner().group_id);
        let (tx, rx) = oneshot::channel();
        self.store.send(StoreMsg::Checksum { group, callback: Box::new(move |r| drop(tx.send(r))) });
        let r = wait(rx, Err).await;
        Ok(Response::new(match r {
            Ok((applied_index, checksum, record_count)) => ChecksumResponse { error: None, applied_index, checksum, record_count },
            Err(e) => ChecksumResponse { error: Some(e.into()), ..Default::default() },
        }))
    }
}

#[derive(Clone)]
pub struct RaftService {
    node_id: NodeId,
    store: StoreHandle,
    receive_dir: PathBuf,
}

impl RaftService {
    pub fn new(node_id: NodeId, store: StoreHandle, receive_dir: PathBuf) -> RaftService {
        RaftService { node_id, store, receive_dir }
    }

    fn deliver(&self, envelope: tern_proto::RaftEnvelope, snapshot_dir: Option<PathBuf>) -> Result<(), Status> {
        if envelope.to_node != self.node_id {
            return Err(Status::failed_precondition(format!("this is node {}, not {}", self.node_id, envelope.to_node)));
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
        if let Err(e) = received {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        self.deliver(envelope, Some(dir))?;
        Ok(Response::new(Done {}))
    }
}
