//! Serving peers' streams: reading their requests, handing them to the
//! [`Handler`](super::Handler), and writing the answers back in order, within
//! bounds on what a peer leaves unread.

use super::{
    Handler, Sender, MAX_COALESCED_WRITE, MAX_REQUESTS_PER_STREAM, MAX_STREAM_BUFFER,
    MAX_UNREAD_ANSWER_BYTES_PER_CONNECTION, MAX_UNREAD_ANSWER_BYTES_PER_STREAM,
    QUEUED_ANSWER_OVERHEAD, READ_CHUNK, SMALL_ANSWER_BYTES,
};
use crate::metrics::Metrics;
use bytes::Bytes;
use shoal_proto::Message;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;

/// Sends the answer to one request back on the stream it came in on. The
/// request's slot on the stream is freed once its answer is written (or the
/// replier dropped without one), so each request counts once whatever its
/// handler does (even if it panics), and a peer that does not read its
/// answers runs out of slots.
#[derive(Debug)]
pub struct Replier {
    queue: AnswerQueue,
    slot: Option<Slot>,
}

/// An answer encoded and waiting to be written; its bytes count as unread
/// until it is dropped (written, or never to be).
#[derive(Debug)]
struct Queued {
    frame: Bytes,
    /// A refusal: the stream ends after it.
    refused: bool,
    _slot: Option<Slot>,
    counted: usize,
    stream: Arc<Unread>,
    peer: Arc<Unread>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.stream.sub(self.counted);
        self.peer.sub(self.counted);
    }
}

/// Answer bytes encoded but not yet written: a stream's, or its peer's
/// (every stream of the connection).
#[derive(Debug, Default)]
struct Unread {
    bytes: AtomicUsize,
}

impl Unread {
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    fn sub(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
    }

    fn load(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

/// One stream's way out: answers are encoded as they are queued, and
/// counted against the stream's and the peer's unread bytes until written.
#[derive(Clone, Debug)]
struct AnswerQueue {
    tx: mpsc::UnboundedSender<Queued>,
    stream: Arc<Unread>,
    peer: Arc<Unread>,
    metrics: Arc<Metrics>,
}

impl AnswerQueue {
    fn push(&self, answer: Message, slot: Option<Slot>) {
        let mut frame = bytes::BytesMut::new();
        if let Err(e) = shoal_proto::encode(&answer, &mut frame) {
            tracing::error!(error = %e, "cannot encode a mesh answer");
            return;
        }
        if frame.len() > SMALL_ANSWER_BYTES
            && self.peer.load() + frame.len() > MAX_UNREAD_ANSWER_BYTES_PER_CONNECTION
        {
            if let Some(busy) = shed(&answer) {
                self.metrics.mesh_answers_shed.inc();
                frame.clear();
                if shoal_proto::encode(&busy, &mut frame).is_err() {
                    return;
                }
            }
        }
        let counted = frame.len() + QUEUED_ANSWER_OVERHEAD;
        self.stream.add(counted);
        self.peer.add(counted);
        // Not sent (the writer is gone): dropped here, and uncounted.
        let _ = self.tx.send(Queued {
            frame: frame.freeze(),
            refused: matches!(answer, Message::Refuse { .. }),
            _slot: slot,
            counted,
            stream: self.stream.clone(),
            peer: self.peer.clone(),
        });
    }
}

fn too_much_unread() -> shoal_proto::WireError {
    shoal_proto::WireError {
        status: 503,
        code: "peer_busy".into(),
        message: "this peer has too many answers unread".into(),
        retry_after: 1,
    }
}

/// What a large answer becomes when its peer has too much unread: the same
/// fetch answered `peer_busy` (retryable; a fetch only reads, so nothing is
/// lost). `None` for answers that are never shed: a `Reply` carries what a
/// subscriber already did, so requests are refused before they run instead.
fn shed(answer: &Message) -> Option<Message> {
    match answer {
        Message::Fetched { req, .. } => Some(Message::Fetched {
            req: *req,
            result: Err(too_much_unread()),
        }),
        _ => None,
    }
}

/// A request under way on a stream.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Replier {
    /// Sends the answer (dropped if the stream is gone).
    pub fn send(self, answer: Message) {
        self.queue.push(answer, self.slot);
    }
}

/// Serves the streams a peer opens: framed [`shoal_proto::Message`]s. A bad
/// frame ends that stream with a `Refuse` frame and a metric; the connection,
/// its other streams and the agent go on.
pub(super) async fn serve_streams(
    conn: shoal_mesh::quinn::Connection,
    metrics: Arc<Metrics>,
    node: String,
    handler: Arc<OnceLock<Arc<dyn Handler>>>,
) {
    let addr = conn.remote_address();
    // The handshake verified the certificate; a connection without a
    // readable SPIFFE ID gets no streams served.
    let namespace = match shoal_mesh::transport::peer_id(&conn) {
        Ok(id) => Arc::from(id.namespace.as_str()),
        Err(e) => {
            tracing::warn!(peer = %addr, error = %e, "a mesh connection without a SPIFFE ID; its streams are refused");
            conn.close(0u32.into(), b"no SPIFFE ID");
            return;
        }
    };
    let from = Sender {
        addr,
        namespace,
        node: shoal_mesh::transport::peer_node(&conn).map(Arc::from),
    };
    let unread = Arc::new(Unread::default());
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(
            (send, recv),
            metrics.clone(),
            node.clone(),
            handler.clone(),
            from.clone(),
            unread.clone(),
        ));
    }
}

async fn serve_stream(
    (mut send, mut recv): (shoal_mesh::quinn::SendStream, shoal_mesh::quinn::RecvStream),
    metrics: Arc<Metrics>,
    node: String,
    handler: Arc<OnceLock<Arc<dyn Handler>>>,
    from: Sender,
    peer_unread: Arc<Unread>,
) {
    use shoal_proto::FrameError;
    let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
    let under_way = Arc::new(AtomicUsize::new(0));
    let stream_unread = Arc::new(Unread::default());
    let replier = Replier {
        queue: AnswerQueue {
            tx,
            stream: stream_unread.clone(),
            peer: peer_unread.clone(),
            metrics: metrics.clone(),
        },
        slot: None,
    };
    let drained = Arc::new(tokio::sync::Notify::new());
    let writer_metrics = metrics.clone();
    let writer_drained = drained.clone();
    let mut writer = tokio::spawn(async move {
        write_answers(&mut send, &mut rx, &writer_metrics, &writer_drained).await;
        // Answers it will never write are dropped with `rx`, uncounted.
    });
    let mut buf = bytes::BytesMut::new();
    loop {
        loop {
            match shoal_proto::decode::<Message>(&mut buf) {
                Ok(Some(msg)) => {
                    metrics.mesh_frames_in.inc();
                    match msg {
                        Message::Ping { seq } => {
                            replier.queue.push(Message::Pong { seq }, None);
                        }
                        Message::Hello { .. } => {
                            replier.queue.push(
                                Message::Hello {
                                    node: node.clone(),
                                    incarnation: 0,
                                    broker: true,
                                },
                                None,
                            );
                        }
                        Message::Pong { .. } | Message::Refuse { .. } => {}
                        msg => {
                            // Looked up per message: a stream accepted before the
                            // router was installed is served once it is.
                            let Some(h) = handler.get() else {
                                if let Some(req) = msg.req().filter(|_| !msg.is_answer()) {
                                    replier.queue.push(
                                        Message::Failed {
                                            req,
                                            error: shoal_proto::WireError {
                                                status: 503,
                                                code: "not_ready".into(),
                                                message: "the agent is still starting".into(),
                                                retry_after: 1,
                                            },
                                        },
                                        None,
                                    );
                                }
                                continue;
                            };
                            let mut slot = None;
                            if let Some(req) = msg.req().filter(|_| !msg.is_answer()) {
                                if under_way.fetch_add(1, Ordering::AcqRel)
                                    >= MAX_REQUESTS_PER_STREAM
                                {
                                    under_way.fetch_sub(1, Ordering::AcqRel);
                                    replier.queue.push(
                                        Message::Failed {
                                            req,
                                            error: shoal_proto::WireError {
                                                status: 503,
                                                code: "peer_busy".into(),
                                                message:
                                                    "too many requests under way on one mesh stream"
                                                        .into(),
                                                retry_after: 1,
                                            },
                                        },
                                        None,
                                    );
                                    continue;
                                }
                                slot = Some(Slot(under_way.clone()));
                                if matches!(msg, Message::Fetch { .. } | Message::Request { .. })
                                    && peer_unread.load() > MAX_UNREAD_ANSWER_BYTES_PER_CONNECTION
                                {
                                    metrics.mesh_answers_shed.inc();
                                    replier.queue.push(
                                        Message::Failed {
                                            req,
                                            error: too_much_unread(),
                                        },
                                        slot,
                                    );
                                    continue;
                                }
                            }
                            let reply = Replier {
                                queue: replier.queue.clone(),
                                slot,
                            };
                            h.clone().handle(&from, msg, reply);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let reason = match &e {
                        FrameError::UnsupportedVersion { .. } => "version",
                        FrameError::TooLarge { .. } => "too_large",
                        FrameError::Empty => "empty",
                        FrameError::Malformed(_) | FrameError::Encode(_) => "malformed",
                    };
                    metrics
                        .mesh_bad_frames
                        .get_or_create(&crate::metrics::ReasonLabel { reason })
                        .inc();
                    tracing::warn!(error = %e, "closing a mesh stream after a bad frame");
                    replier.queue.push(
                        Message::Refuse {
                            reason: e.to_string(),
                        },
                        None,
                    );
                    drop(replier);
                    let _ = writer.await;
                    let _ = recv.stop(1u32.into());
                    return;
                }
            }
        }
        // A peer that does not read its answers gets no more of its
        // requests read until it does.
        loop {
            let notified = drained.notified();
            if stream_unread.load() <= MAX_UNREAD_ANSWER_BYTES_PER_STREAM {
                break;
            }
            tokio::select! {
                _ = notified => {}
                // The writer is gone (the peer reset the stream): so is this.
                _ = &mut writer => return,
            }
        }
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                metrics.mesh_bytes_in.inc_by(chunk.bytes.len() as u64);
                if buf.len() + chunk.bytes.len() > MAX_STREAM_BUFFER {
                    metrics
                        .mesh_bad_frames
                        .get_or_create(&crate::metrics::ReasonLabel {
                            reason: "too_large",
                        })
                        .inc();
                    return;
                }
                buf.extend_from_slice(&chunk.bytes);
            }
            Ok(None) | Err(_) => {
                // The peer finished sending: answers still under way go out,
                // then the writer finishes the stream.
                drop(replier);
                let _ = writer.await;
                return;
            }
        }
    }
}

/// Writes a stream's answers as they are queued, several at once; each
/// counts as read once written (when it is dropped).
async fn write_answers(
    send: &mut shoal_mesh::quinn::SendStream,
    rx: &mut mpsc::UnboundedReceiver<Queued>,
    metrics: &Metrics,
    drained: &tokio::sync::Notify,
) {
    let mut batch: Vec<Queued> = Vec::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut size = first.frame.len();
        let mut refused = first.refused;
        batch.push(first);
        while size < MAX_COALESCED_WRITE && !refused {
            let Ok(next) = rx.try_recv() else { break };
            size += next.frame.len();
            refused |= next.refused;
            batch.push(next);
        }
        metrics.mesh_frames_out.inc_by(batch.len() as u64);
        metrics.mesh_writes.inc();
        metrics.mesh_bytes_out.inc_by(size as u64);
        chunks.extend(batch.iter().map(|q| q.frame.clone()));
        let wrote = send.write_all_chunks(&mut chunks).await;
        chunks.clear();
        batch.clear();
        drained.notify_waiters();
        if wrote.is_err() || refused {
            break;
        }
    }
    let _ = send.finish();
}
