//! A link: one long-lived stream to a peer that carries this agent's calls,
//! many in flight, answers matched by request number.

use super::{
    lock, CallError, DIAL_TIMEOUT, LINK_QUEUE, MAX_COALESCED_WRITE, MAX_STREAM_BUFFER, READ_CHUNK,
};
use crate::metrics::Metrics;
use shoal_proto::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// One long-lived stream to a peer: requests and one-way messages go out
/// through a writer that combines small frames into one write; answers come
/// back on the same stream and complete their calls by request id.
pub(super) struct Link {
    /// Frames for the writer task.
    tx: mpsc::Sender<Message>,
    /// Calls waiting for their answers, by request number.
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>,
    /// The connection the link's stream runs on.
    conn: shoal_mesh::quinn::Connection,
    /// Set when its stream could not be opened in time, or its writer or
    /// answer reader ended: the next call opens a new link.
    dead: Arc<AtomicBool>,
}

impl Link {
    /// Opens the link's stream on `conn` and starts its writer and answer reader.
    pub(super) fn open(conn: shoal_mesh::quinn::Connection, metrics: Arc<Metrics>) -> Arc<Link> {
        let (tx, mut rx) = mpsc::channel::<Message>(LINK_QUEUE);
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>> = Default::default();
        let dead = Arc::new(AtomicBool::new(false));
        let link = Arc::new(Link {
            tx,
            pending: pending.clone(),
            conn: conn.clone(),
            dead: dead.clone(),
        });
        tokio::spawn(async move {
            // A peer that grants no stream (at its limit) must not leave a
            // link that looks usable and swallows every call.
            let Ok(Ok((mut send, recv))) = tokio::time::timeout(DIAL_TIMEOUT, conn.open_bi()).await
            else {
                dead.store(true, Ordering::Release);
                return;
            };
            let reader_dead = dead.clone();
            let reader_pending = pending.clone();
            let reader_metrics = metrics.clone();
            tokio::spawn(async move {
                read_answers(recv, reader_pending, reader_metrics).await;
                reader_dead.store(true, Ordering::Release);
            });
            let mut buf = bytes::BytesMut::new();
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some(m) = next.take() {
                    match shoal_proto::encode(&m, &mut buf) {
                        Ok(()) => {
                            metrics.mesh_frames_out.inc();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode a mesh message");
                            if let Some(req) = m.req() {
                                lock(&pending).remove(&req);
                            }
                        }
                    }
                    if buf.len() < MAX_COALESCED_WRITE {
                        next = rx.try_recv().ok();
                    }
                }
                metrics.mesh_writes.inc();
                metrics.mesh_bytes_out.inc_by(buf.len() as u64);
                if send.write_all(&buf).await.is_err() {
                    break;
                }
                buf.clear();
            }
            let _ = send.finish();
            dead.store(true, Ordering::Release);
            // Callers waiting on this stream learn it closed.
            lock(&pending).clear();
        });
        link
    }

    /// Sends `request`, numbered `req`, and waits for its answer until
    /// `deadline`.
    pub(super) async fn call(
        &self,
        to: SocketAddr,
        req: u64,
        deadline: tokio::time::Instant,
        request: Message,
    ) -> Result<Message, CallError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(req, tx);
        let forget = || {
            lock(&self.pending).remove(&req);
        };
        match tokio::time::timeout_at(deadline, self.tx.send(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                forget();
                return Err(CallError::Closed(to));
            }
            Err(_) => {
                forget();
                return Err(CallError::Timeout(to));
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(CallError::Closed(to)),
            Err(_) => {
                forget();
                Err(CallError::Timeout(to))
            }
        }
    }

    /// Sends a one-way message, in order with the link's other messages.
    pub(super) async fn tell(&self, to: SocketAddr, msg: Message) -> Result<(), CallError> {
        self.tx.send(msg).await.map_err(|_| CallError::Closed(to))
    }

    /// Whether the link's stream runs on `conn`.
    pub(super) fn runs_on(&self, conn: &shoal_mesh::quinn::Connection) -> bool {
        self.conn.stable_id() == conn.stable_id()
    }

    /// Whether calls may still go over it (else the next call opens a new link).
    pub(super) fn usable(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
            && !self.tx.is_closed()
            && self.conn.close_reason().is_none()
    }
}

async fn read_answers(
    mut recv: shoal_mesh::quinn::RecvStream,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>,
    metrics: Arc<Metrics>,
) {
    let mut buf = bytes::BytesMut::new();
    loop {
        loop {
            match shoal_proto::decode::<Message>(&mut buf) {
                Ok(Some(m)) => {
                    metrics.mesh_frames_in.inc();
                    if let Some(req) = m.req() {
                        if let Some(waiter) = lock(&pending).remove(&req) {
                            let _ = waiter.send(m);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    metrics
                        .mesh_bad_frames
                        .get_or_create(&crate::metrics::ReasonLabel {
                            reason: "bad_answer",
                        })
                        .inc();
                    tracing::warn!(error = %e, "bad answer frame from a peer; closing the stream");
                    lock(&pending).clear();
                    return;
                }
            }
        }
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                metrics.mesh_bytes_in.inc_by(chunk.bytes.len() as u64);
                if buf.len() + chunk.bytes.len() > MAX_STREAM_BUFFER {
                    lock(&pending).clear();
                    return;
                }
                buf.extend_from_slice(&chunk.bytes);
            }
            Ok(None) | Err(_) => {
                lock(&pending).clear();
                return;
            }
        }
    }
}
