//! The client KV API of a replica server (the raft transport's receiving end is in tern-transport).

use crate::validate;
use std::time::Duration;
use tern_core::{GroupId, TernError};
use tern_proto::kv_server::Kv;
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

