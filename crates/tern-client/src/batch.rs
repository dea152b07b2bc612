//! One long-lived `Kv.Batch` stream per server: requests that queue up while a message is on its way
//! go out together as the next message, and replies come back several to a message. Per request this
//! replaces a unary gRPC call (HTTP/2 stream, headers, a server task) with a slot in a shared message.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tern_core::limits::GRPC_MESSAGE_BYTES_MAX;
use tern_core::TernError;
use tern_proto::kv_client::KvClient;
use tern_proto::{batch_item, batch_reply, BatchItem, BatchRequest};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

type Responder = oneshot::Sender<Result<batch_reply::Result, TernError>>;

/// Most requests the client packs into one message (the store's round is bounded similarly).
const BATCH_ITEMS_MAX: usize = 512;

/// A batch stream to one server. Dead once the stream failed; the owner then opens a new one.
pub struct BatchConn {
    queue: mpsc::UnboundedSender<(batch_item::Op, Responder)>,
    alive: Arc<AtomicBool>,
}

impl BatchConn {
    pub fn open(channel: Channel) -> BatchConn {
        let (queue, rx) = mpsc::unbounded_channel();
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(run(channel, rx, alive.clone()));
        BatchConn { queue, alive }
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Sends one request and waits for its reply. A lost stream answers Unavailable (for a write:
    /// outcome unknown; the client's retry is deduplicated by its sequence number).
    pub async fn call(&self, op: batch_item::Op) -> Result<batch_reply::Result, TernError> {
        let (tx, rx) = oneshot::channel();
        if self.queue.send((op, tx)).is_err() {
            return Err(TernError::Unavailable("connection to the server was lost".into()));
        }
        rx.await.unwrap_or_else(|_| Err(TernError::Unavailable("connection to the server was lost".into())))
    }
}

async fn run(channel: Channel, mut queue: mpsc::UnboundedReceiver<(batch_item::Op, Responder)>, alive: Arc<AtomicBool>) {
    let pending: Mutex<HashMap<u64, Responder>> = Mutex::new(HashMap::new());
    let next_id = AtomicU64::new(1);
    let (requests, request_stream) = mpsc::unbounded_channel::<BatchRequest>();
    let mut kv = KvClient::new(channel).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX.max(64 << 20)).max_encoding_message_size(usize::MAX);
    let opened = kv.batch(tokio_stream::wrappers::UnboundedReceiverStream::new(request_stream));
    // Requests queued before the stream is up go out as soon as it is.
    let mut replies = match opened.await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            alive.store(false, Ordering::Relaxed);
            let e = tern_proto::from_status(&status);
            queue.close();
            while let Ok((_, tx)) = queue.try_recv() {
                let _ = tx.send(Err(e.clone()));
            }
            return;
        }
    };
    let failure = loop {
        tokio::select! {
            item = queue.recv() => {
                let Some(first) = item else { break TernError::Unavailable("client closed".into()) };
                // Callers woken by the same poll queue up behind this task: let them enqueue first.
                tokio::task::yield_now().await;
                let mut items = Vec::with_capacity(16);
                let mut bytes = 0usize;
                let mut next = Some(first);
                // One message stays under the server's message size limit.
                while let Some((op, tx)) = next.take() {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    pending.lock().insert(id, tx);
                    bytes += match &op {
                        batch_item::Op::Write(w) => prost::Message::encoded_len(w),
                        batch_item::Op::Read(r) => prost::Message::encoded_len(r),
                    };
                    items.push(BatchItem { id, op: Some(op) });
                    if items.len() < BATCH_ITEMS_MAX && bytes < GRPC_MESSAGE_BYTES_MAX / 2 {
                        next = queue.try_recv().ok();
                    }
                }
                if requests.send(BatchRequest { items }).is_err() {
                    break TernError::Unavailable("batch stream closed".into());
                }
            }
            message = replies.message() => match message {
                Ok(Some(batch)) => {
                    let mut pending = pending.lock();
                    for reply in batch.replies {
                        if let (Some(tx), Some(result)) = (pending.remove(&reply.id), reply.result) {
                            let _ = tx.send(Ok(result));
                        }
                    }
                }
                Ok(None) => break TernError::Unavailable("server closed the batch stream".into()),
                Err(status) => break tern_proto::from_status(&status),
            },
        }
    };
    alive.store(false, Ordering::Relaxed);
    queue.close();
    for (_, tx) in pending.lock().drain() {
        let _ = tx.send(Err(failure.clone()));
    }
    while let Ok((_, tx)) = queue.try_recv() {
        let _ = tx.send(Err(failure.clone()));
    }
}
