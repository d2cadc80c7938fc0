//! Request/reply across agents: a request goes to a push subscriber of its
//! topic, here or on another agent, and its reply comes back.

use super::{api_error, lock, stopping, wire_error, Router, SHORT_CALL};
use crate::error::ApiError;
use crate::mesh::Replier;
use crate::message::Message as AppMessage;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use shoal_cluster::membership::Liveness;
use shoal_proto::{Message, ReplyBody};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl Router {
    /// Sends a request to a push subscriber of `topic`: on this agent if it
    /// has one, else on another agent that does.
    pub async fn request(
        &self,
        topic: &str,
        message: AppMessage,
        timeout: Duration,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ApiError> {
        let subs = self.subs().ok_or_else(stopping)?;
        if subs.has_push_subscriber(topic) {
            return subs.request(topic, message, timeout).await;
        }
        let targets: Vec<(String, SocketAddr)> = {
            let inner = lock(&self.inner);
            inner
                .remote_subs
                .iter()
                .filter(|(_, r)| {
                    self.may_read(&r.namespace, topic)
                        && r.subs.iter().any(|s| s.topic == topic && s.push)
                })
                .filter_map(|(n, _)| {
                    inner
                        .known
                        .get(n)
                        .filter(|k| k.state != Liveness::Down)
                        .map(|k| (n.clone(), k.addr))
                })
                .collect()
        };
        if targets.is_empty() {
            return subs.request(topic, message, timeout).await;
        }
        let (node, addr) =
            &targets[self.request_rr.fetch_add(1, Ordering::Relaxed) % targets.len()];
        let data = message
            .encode()
            .map_err(|what| {
                ApiError::bad_request("invalid_message", format!("message {what} is too long"))
            })?
            .to_vec();
        let t = topic.to_string();
        let answer = self
            .mesh
            .call(*addr, timeout + SHORT_CALL, |req| Message::Request {
                req,
                topic: t,
                message: data,
                timeout_ms: timeout.as_millis() as u64,
            })
            .await;
        match answer {
            Ok(Message::Reply { result: Ok(r), .. }) => {
                let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let mut headers = HeaderMap::new();
                for (k, v) in r.headers {
                    if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                        headers.append(k, v);
                    }
                }
                Ok((status, headers, Bytes::from(r.body)))
            }
            Ok(Message::Reply { result: Err(e), .. }) | Ok(Message::Failed { error: e, .. }) => {
                Err(api_error(e))
            }
            Ok(_) => Err(ApiError::internal("unexpected answer to a request")),
            Err(e) => Err(ApiError::unavailable(
                "no_subscriber",
                format!("the subscriber's agent {node} does not answer ({e})"),
                1,
            )),
        }
    }

    pub(super) fn serve_request(
        self: Arc<Self>,
        req: u64,
        topic: String,
        message: Vec<u8>,
        timeout_ms: u64,
        reply: Replier,
    ) {
        tokio::spawn(async move {
            let result = async {
                let subs = self
                    .subs()
                    .ok_or_else(|| ApiError::unavailable("shutting_down", "stopping", 1))?;
                let m = AppMessage::decode(&Bytes::from(message))
                    .map_err(|e| ApiError::bad_request("invalid_message", e.to_string()))?;
                let timeout =
                    Duration::from_millis(timeout_ms).min(crate::subscription::MAX_ACK_TIMEOUT);
                let (status, headers, body) = subs.request(&topic, m, timeout).await?;
                if body.len() > MAX_REPLY_BYTES {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "reply_too_large",
                        format!("the subscriber's reply is larger than {MAX_REPLY_BYTES} bytes"),
                    ));
                }
                Ok::<_, ApiError>(ReplyBody {
                    status: status.as_u16(),
                    headers: headers
                        .iter()
                        .filter_map(|(k, v)| {
                            v.to_str().ok().map(|v| (k.to_string(), v.to_string()))
                        })
                        .collect(),
                    body: body.to_vec(),
                })
            }
            .await;
            reply.send(Message::Reply {
                req,
                result: result.map_err(|e| wire_error(&e)),
            });
        });
    }
}

/// Largest reply body carried back across the mesh.
pub const MAX_REPLY_BYTES: usize = 16 << 20;
