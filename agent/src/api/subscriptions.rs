//! Subscriptions: read, create or change; pull, ack, and the event stream.

use super::{
    full, json_response, parse_json, read_body, AppBody, AppState, Body, Query, DEFAULT_PULL_MAX,
    DEFAULT_PULL_WAIT, MAX_JSON_BYTES, MAX_NACK_DELAY, MAX_PULL_MAX, MAX_PULL_WAIT,
    STREAM_KEEPALIVE,
};
use crate::error::ApiError;
use crate::metrics::Mode;
use crate::subscription::SubscriptionSpec;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

fn subscription_json(state: &AppState, sub: &crate::subscription::Subscription) -> Value {
    let mut v = serde_json::to_value(sub).unwrap_or_else(|_| json!({}));
    if let (Value::Object(o), Some(topic)) = (&mut v, state.broker.topic(&sub.topic)) {
        let partitions: Vec<Value> = topic
            .partitions()
            .iter()
            .map(|p| {
                let held = state
                    .router
                    .as_ref()
                    .and_then(|r| r.replicated(&sub.topic))
                    .map(|r| r.position(&sub.topic, p.id, &sub.group));
                if let Some(position) = held {
                    // A replicated partition: its Raft group's figures, when
                    // this agent holds a replica (null otherwise).
                    let (committed, end, lag) = match position {
                        Some((c, e, l)) => (c, Some(e), l),
                        None => (None, None, None),
                    };
                    return json!({
                        "partition": p.id,
                        "committedOffset": committed,
                        "endOffset": end,
                        "lag": lag,
                    });
                }
                let end = p.committed() + 1;
                let committed = p.committed_offset(&sub.group);
                json!({
                    "partition": p.id,
                    "committedOffset": committed,
                    "endOffset": end,
                    "lag": committed.map(|c| end.saturating_sub(c)),
                })
            })
            .collect();
        o.insert("partitions".into(), partitions.into());
    }
    v
}

pub(super) fn get_subscription(state: &AppState, name: &str) -> Result<Response<Body>, ApiError> {
    crate::names::validate("subscription", name)?;
    let sub = state.subs.existing(name)?;
    Ok(json_response(
        StatusCode::OK,
        &subscription_json(state, &sub),
    ))
}

pub(super) async fn put_subscription<B: AppBody>(
    state: &AppState,
    name: &str,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    crate::names::validate("subscription", name)?;
    let (parts, body) = read_body(req, MAX_JSON_BYTES).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object with at least \"topic\"",
        ));
    }
    let spec: SubscriptionSpec = parse_json(&parts.headers, &body, false)?;
    if spec.name.as_deref().is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(
            "invalid_subscription",
            "\"name\" in the body differs from the path",
        ));
    }
    let (sub, created) = state.subs.put(name, spec)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(status, &subscription_json(state, &sub)))
}

pub(super) async fn pull(
    state: &AppState,
    name: &str,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    crate::names::validate("subscription", name)?;
    let max = query.usize("max", DEFAULT_PULL_MAX, MAX_PULL_MAX)?;
    let wait = query.duration("wait", DEFAULT_PULL_WAIT, MAX_PULL_WAIT)?;
    let (sub, deliveries) = state.subs.pull(name, max, wait, Mode::Pull).await?;
    let mut body = Vec::with_capacity(
        deliveries
            .iter()
            .map(|d| d.message.payload.len() + 256)
            .sum::<usize>()
            + 2,
    );
    body.push(b'[');
    for (i, d) in deliveries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        crate::cloudevents::write_json(d, &sub.topic, &mut body);
    }
    body.push(b']');
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/cloudevents-batch+json"),
    );
    Ok(r)
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AckBody {
    #[serde(default)]
    ack: Vec<String>,
    #[serde(default)]
    nack: Vec<String>,
    #[serde(default, with = "crate::time::serde_opt_duration")]
    delay: Option<Duration>,
}

pub(super) async fn ack<B: AppBody>(
    state: &AppState,
    name: &str,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    crate::names::validate("subscription", name)?;
    let (parts, body) = read_body(req, MAX_JSON_BYTES).await?;
    let b: AckBody = parse_json(&parts.headers, &body, false)?;
    if b.delay.is_some_and(|d| d > MAX_NACK_DELAY) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!(
                "delay must be at most {}",
                crate::time::format_duration(MAX_NACK_DELAY)
            ),
        ));
    }
    if b.ack.is_empty() && b.nack.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "give ack ids in \"ack\" or \"nack\"",
        ));
    }
    let result = state
        .subs
        .ack(name, &b.ack, &b.nack, b.delay.unwrap_or(Duration::ZERO))
        .await?;
    Ok(json_response(StatusCode::OK, &result))
}

/// A response body fed by a channel: the server-sent event stream.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

pub(super) fn stream(state: &AppState, name: &str) -> Result<Response<Body>, ApiError> {
    crate::names::validate("subscription", name)?;
    let sub = state.subs.existing(name)?;
    if sub.push_path.is_some() {
        return Err(ApiError::conflict(
            "push_subscription",
            format!("subscription {name:?} pushes to the app; streams need a subscription without pushPath"),
        ));
    }
    // Refuse before answering 200: once the stream starts, errors can only be events.
    if state.subs.waiters_full() {
        return Err(ApiError::too_many(
            "too_many_waiters",
            "the agent's limit of long polls and streams is reached",
            1,
        ));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let subs = state.subs.clone();
    let name = name.to_string();
    let max = sub.max_in_flight as usize;
    let mut stopping = subs.stopping();
    tokio::spawn(async move {
        if tx
            .send(Bytes::from_static(b": connected\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            if *stopping.borrow() {
                break;
            }
            let pulled = tokio::select! {
                r = subs.pull(&name, max, STREAM_KEEPALIVE, Mode::Stream) => r,
                _ = tx.closed() => break,
                _ = stopping.changed() => break,
            };
            match pulled {
                Ok((sub, deliveries)) if deliveries.is_empty() => {
                    let _ = sub;
                    if tx
                        .send(Bytes::from_static(b": keepalive\n\n"))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok((sub, deliveries)) => {
                    let mut out = Vec::new();
                    for d in &deliveries {
                        out.extend_from_slice(
                            format!("id: {}\nevent: message\ndata: ", d.ack_id).as_bytes(),
                        );
                        crate::cloudevents::write_json(d, &sub.topic, &mut out);
                        out.extend_from_slice(b"\n\n");
                    }
                    if let Err(back) = tx.send(Bytes::from(out)).await {
                        let ids: Vec<String> =
                            deliveries.iter().map(|d| d.ack_id.to_string()).collect();
                        let _ = subs.ack(&name, &[], &ids, Duration::ZERO).await;
                        drop(back);
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Bytes::from(format!("event: error\ndata: {}\n\n", e.body())))
                        .await;
                    break;
                }
            }
        }
    });
    let mut r = Response::new(ChannelBody { rx }.boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    Ok(r)
}
