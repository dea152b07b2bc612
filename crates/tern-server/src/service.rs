//! The client KV API of a replica server (the raft transport's receiving end is in tern-transport).

use crate::validate;
use std::time::Duration;
use tern_core::{GroupId, TernError};
use tern_proto::kv_server::Kv;
use tern_proto::{batch_item, batch_reply, BatchReply, BatchRequest, BatchResponse};
use tern_proto::{ChecksumRequest, ChecksumResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse};
use tern_raft::store::{StoreHandle, StoreMsg};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// How long a request may wait inside the server before it is answered with Timeout (outcome
/// unknown for writes). Clients retry within their own deadline.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct KvService {
    store: StoreHandle,
    /// Client requests served, for the load figures in heartbeats.
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl KvService {
    pub fn new(store: StoreHandle, requests: std::sync::Arc<std::sync::atomic::AtomicU64>) -> KvService {
        KvService { store, requests }
    }

    fn count(&self) {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Most replies the server packs into one batch message.
const BATCH_REPLIES_MAX: usize = 1024;
/// Reply bytes after which a batch message is sent without waiting for more.
const BATCH_REPLY_BYTES_MAX: usize = 4 << 20;

impl KvService {
    /// Validates one request and hands it to the store; the answer goes to `reply` when it is ready.
    fn dispatch(&self, op: batch_item::Op, reply: impl FnOnce(batch_reply::Result) + Send + 'static) {
        self.count();
        match op {
            batch_item::Op::Write(request) => match validate::write(&request) {
                Ok(group) => self.store.send(StoreMsg::Write { group, request, callback: Box::new(move |r| reply(batch_reply::Result::Write(r))) }),
                Err(e) => reply(batch_reply::Result::Write(write_error(e))),
            },
            batch_item::Op::Read(request) => match validate::read(&request) {
                Ok(group) => self.store.send(StoreMsg::Read { group, request, callback: Box::new(move |r| reply(batch_reply::Result::Read(r))) }),
                Err(e) => reply(batch_reply::Result::Read(read_error(e))),
            },
        }
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
        self.count();
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
        self.count();
        let request = request.into_inner();
        let group = match validate::read(&request) {
            Ok(g) => g,
            Err(e) => return Ok(Response::new(read_error(e))),
        };
        let (tx, rx) = oneshot::channel();
        self.store.send(StoreMsg::Read { group, request, callback: Box::new(move |r| drop(tx.send(r))) });
        Ok(Response::new(wait(rx, read_error).await))
    }

    type BatchStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<BatchResponse, Status>> + Send + 'static>>;

    async fn batch(&self, request: Request<tonic::Streaming<BatchRequest>>) -> Result<Response<Self::BatchStream>, Status> {
        let mut inbound = request.into_inner();
        // Unbounded, yet bounded in practice: one reply per request the client sent and still
        // waits for, and the client bounds those.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<BatchReply>();
        let service = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(batch)) = inbound.message().await {
                for item in batch.items {
                    let (id, tx) = (item.id, tx.clone());
                    let Some(op) = item.op else {
                        let e = TernError::invalid("batch item without an operation");
                        let _ = tx.send(BatchReply { id, result: Some(batch_reply::Result::Write(write_error(e))) });
                        continue;
                    };
                    service.dispatch(op, move |r| drop(tx.send(BatchReply { id, result: Some(r) })));
                }
            }
        });
        let replies = futures::stream::unfold(rx, |mut rx| async move {
            let first = rx.recv().await?;
            let mut bytes = prost::Message::encoded_len(&first);
            let mut replies = vec![first];
            // A message stays well under what a client decodes (large reads go alone).
            while replies.len() < BATCH_REPLIES_MAX && bytes < BATCH_REPLY_BYTES_MAX {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += prost::Message::encoded_len(&r);
                        replies.push(r);
                    }
                    Err(_) => break,
                }
            }
            Some((Ok(BatchResponse { replies }), rx))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn checksum(&self, request: Request<ChecksumRequest>) -> Result<Response<ChecksumResponse>, Status> {
        let request = request.into_inner();
        let (group, at_unix_ms, data_only) = (GroupId(request.group_id), request.at_unix_ms, request.data_only);
        let (tx, rx) = oneshot::channel();
        self.store.send(StoreMsg::Checksum { group, at_unix_ms, data_only, callback: Box::new(move |r| drop(tx.send(r))) });
        let r = wait(rx, Err).await;
        Ok(Response::new(match r {
            Ok((applied_index, checksum, record_count)) => ChecksumResponse { error: None, applied_index, checksum, record_count },
            Err(e) => ChecksumResponse { error: Some(e.into()), ..Default::default() },
        }))
    }
}
