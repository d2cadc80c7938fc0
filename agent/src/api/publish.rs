//! Publishing: one message, a batch, and a request that waits for its reply.

use super::{
    content_type, full, header_duration, header_str, json_response, read_body, AppBody, AppState,
    Body, Query, DEFAULT_REQUEST_TIMEOUT, MAX_BATCH_ENTRIES, MAX_DELAY, MAX_ID_LEN, MAX_TTL,
};
use crate::broker::PublishOutcome;
use crate::error::ApiError;
use crate::message::Message;
use crate::tenancy::Action;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Request, Response, StatusCode};
use serde_json::Value;
use std::time::Duration;

/// Header-level options of a publish that apply to every message of the request.
struct PublishHeaders {
    key: Option<String>,
    id: Option<String>,
    expires_at_ms: Option<u64>,
    deliver_at_ms: Option<u64>,
}

fn publish_headers(headers: &HeaderMap) -> Result<PublishHeaders, ApiError> {
    let now = crate::time::now_ms();
    let key = header_str(headers, "shoal-key")?.map(str::to_string);
    let id = header_str(headers, "shoal-id")?.map(str::to_string);
    for (what, v) in [("Shoal-Key", &key), ("Shoal-Id", &id)] {
        if let Some(v) = v {
            if v.is_empty() || v.len() > MAX_ID_LEN {
                return Err(ApiError::bad_request(
                    "invalid_header",
                    format!("{what} must be 1 to {MAX_ID_LEN} characters"),
                ));
            }
        }
    }
    let ttl = header_duration(headers, "shoal-ttl")?;
    if ttl.is_some_and(|t| t.is_zero() || t > MAX_TTL) {
        return Err(ApiError::bad_request(
            "invalid_header",
            "Shoal-TTL must be positive and at most 365 days",
        ));
    }
    let delay = header_duration(headers, "shoal-delay")?;
    if delay.is_some_and(|d| d > MAX_DELAY) {
        return Err(ApiError::bad_request(
            "invalid_header",
            "Shoal-Delay must be at most 30 days",
        ));
    }
    let at = |d: Duration| now.saturating_add(d.as_millis() as u64);
    Ok(PublishHeaders {
        key,
        id,
        expires_at_ms: ttl.map(at),
        deliver_at_ms: delay.filter(|d| !d.is_zero()).map(at),
    })
}

/// A message from a binary-mode request: headers plus the body as payload.
fn message_from_binary(headers: &HeaderMap, payload: Bytes) -> Result<Message, ApiError> {
    let h = publish_headers(headers)?;
    let event = crate::cloudevents::from_binary_headers(headers)?;
    let client_id = h.id.or(event.id);
    let attributes = event.attributes;
    Ok(Message {
        client_id: client_id.is_some(),
        id: client_id.unwrap_or_else(crate::cloudevents::new_id),
        // The event's own partitionkey wins, as in structured mode.
        key: event.key.or(h.key),
        content_type: header_str(headers, CONTENT_TYPE.as_str())?.map(str::to_string),
        expires_at_ms: h.expires_at_ms,
        deliver_at_ms: h.deliver_at_ms,
        attributes,
        payload,
    })
}

fn check_size(state: &AppState, m: &Message) -> Result<(), ApiError> {
    if m.payload.len() > state.settings.max_message_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the message is larger than the limit of {} bytes",
                state.settings.max_message_bytes
            ),
        ));
    }
    Ok(())
}

pub(super) async fn publish_one<B: AppBody>(
    state: &AppState,
    topic: &str,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    let topic = &state.broker.full_topic_name(topic)?;
    state.broker.authorize(topic, Action::Publish)?;
    let structured = content_type(req.headers()).as_deref() == Some("application/cloudevents+json");
    let limit = if structured {
        state.settings.max_message_bytes * 2 + 64 * 1024
    } else {
        state.settings.max_message_bytes
    };
    let (parts, body) = read_body(req, limit).await?;
    let message = if structured {
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("invalid CloudEvent JSON: {e}"))
        })?;
        let mut m = crate::cloudevents::from_json(v)
            .map_err(|e| ApiError::bad_request("invalid_event", e))?;
        let h = publish_headers(&parts.headers)?;
        for (k, v) in crate::cloudevents::trace_context(&parts.headers)? {
            if !m.attributes.iter().any(|(a, _)| *a == k) {
                m.attributes.push((k, v.into()));
            }
        }
        m.key = m.key.or(h.key);
        m.expires_at_ms = h.expires_at_ms;
        m.deliver_at_ms = h.deliver_at_ms;
        if let Some(id) = h.id {
            m.id = id;
            m.client_id = true;
        }
        m
    } else {
        message_from_binary(&parts.headers, body)?
    };
    check_size(state, &message)?;
    let mut results = state.publish(topic, vec![message]).await?;
    let outcome = results
        .pop()
        .ok_or_else(|| ApiError::internal("publish returned no result"))??;
    let status = if outcome.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_response(status, &outcome))
}

pub(super) async fn publish_batch<B: AppBody>(
    state: &AppState,
    topic: &str,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    let topic = &state.broker.full_topic_name(topic)?;
    state.broker.authorize(topic, Action::Publish)?;
    let ct = content_type(req.headers());
    let (parts, body) = read_body(req, state.settings.max_batch_bytes).await?;
    let mut entries: Vec<Result<Message, ApiError>> = Vec::new();
    match ct.as_deref() {
        Some("application/cloudevents-batch+json") => {
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid CloudEvents batch: {e}")))?;
            let Value::Array(events) = v else {
                return Err(ApiError::bad_request("invalid_json", "a CloudEvents batch is a JSON array of events"));
            };
            let h = publish_headers(&parts.headers)?;
            for e in events {
                entries.push(
                    crate::cloudevents::from_json(e)
                        .map(|mut m| {
                            m.key = m.key.or_else(|| h.key.clone());
                            m.expires_at_ms = h.expires_at_ms;
                            m.deliver_at_ms = h.deliver_at_ms;
                            m
                        })
                        .map_err(|e| ApiError::bad_request("invalid_event", e)),
                );
            }
        }
        Some("application/x-ndjson") | Some("application/jsonl") | Some("application/json-seq") => {
            let h = publish_headers(&parts.headers)?;
            let trace: Vec<(String, crate::message::AttrValue)> =
                crate::cloudevents::trace_context(&parts.headers)?
                    .into_iter()
                    .map(|(k, v)| (k, v.into()))
                    .collect();
            if h.id.is_some() {
                return Err(ApiError::bad_request(
                    "invalid_header",
                    "Shoal-Id names one message; give ids per entry with a CloudEvents batch",
                ));
            }
            let mut start = 0;
            let data = &body[..];
            while start < data.len() {
                let end = data[start..].iter().position(|&b| b == b'\n').map_or(data.len(), |p| start + p);
                let mut line = &data[start..end];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                // application/json-seq (RFC 7464) starts each record with RS.
                while line.first() == Some(&0x1e) {
                    line = &line[1..];
                }
                start = end + 1;
                // Blank: only whitespace and record separators.
                if line.iter().all(|b| b.is_ascii_whitespace() || *b == 0x1e) {
                    continue;
                }
                entries.push(match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
                    Ok(_) => Ok(Message {
                        id: crate::cloudevents::new_id(),
                        client_id: false,
                        key: h.key.clone(),
                        content_type: Some("application/json".into()),
                        expires_at_ms: h.expires_at_ms,
                        deliver_at_ms: h.deliver_at_ms,
                        attributes: trace.clone(),
                        payload: body.slice_ref(line),
                    }),
                    Err(e) => Err(ApiError::bad_request("invalid_json", format!("line is not JSON: {e}"))),
                });
            }
        }
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "batch content type {:?} is not supported: send application/x-ndjson (one JSON message per line) or application/cloudevents-batch+json",
                    other.unwrap_or("none")
                ),
            ))
        }
    }
    if entries.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the batch holds no messages: send at least one entry",
        ));
    }
    if entries.len() > MAX_BATCH_ENTRIES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("a batch holds at most {MAX_BATCH_ENTRIES} messages"),
        ));
    }
    let mut slots: Vec<Option<Result<PublishOutcome, ApiError>>> =
        Vec::with_capacity(entries.len());
    let mut valid = Vec::new();
    for e in entries {
        match e.and_then(|m| check_size(state, &m).map(|_| m)) {
            Ok(m) => {
                slots.push(None);
                valid.push(m);
            }
            Err(err) => slots.push(Some(Err(err))),
        }
    }
    let mut published = state.publish(topic, valid).await?.into_iter();
    let outcomes: Vec<Result<PublishOutcome, ApiError>> = slots
        .into_iter()
        .map(|s| {
            s.or_else(|| published.next())
                .unwrap_or_else(|| Err(ApiError::internal("missing result")))
        })
        .collect();
    let mut failed = 0;
    let results: Vec<EntryResult<'_>> = outcomes
        .iter()
        .map(|r| match r {
            Ok(o) => EntryResult::Published(o),
            Err(e) => {
                failed += 1;
                state.metrics.api_error(e.code);
                EntryResult::Failed {
                    error: EntryError {
                        code: e.code,
                        message: &e.message,
                        status: e.status.as_u16(),
                    },
                }
            }
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &BatchAnswer {
            published: results.len() - failed,
            failed,
            results,
        },
    ))
}

/// The answer to a batch publish, serialized without building a JSON tree.
#[derive(serde::Serialize)]
struct BatchAnswer<'a> {
    published: usize,
    failed: usize,
    results: Vec<EntryResult<'a>>,
}

/// One entry of a batch answer: where it was stored, or why not.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum EntryResult<'a> {
    Published(&'a PublishOutcome),
    Failed { error: EntryError<'a> },
}

#[derive(serde::Serialize)]
struct EntryError<'a> {
    code: &'a str,
    message: &'a str,
    status: u16,
}

pub(super) async fn request_reply<B: AppBody>(
    state: &AppState,
    topic: &str,
    query: &Query,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    let topic = &state.broker.full_topic_name(topic)?;
    state.broker.authorize(topic, Action::Publish)?;
    let timeout = query.duration(
        "timeout",
        DEFAULT_REQUEST_TIMEOUT,
        crate::delivery::MAX_REQUEST_TIMEOUT,
    )?;
    let (parts, body) = read_body(req, state.settings.max_message_bytes).await?;
    let message = message_from_binary(&parts.headers, body)?;
    let (status, headers, body) = match &state.router {
        Some(r) => r.request(topic, message, timeout).await?,
        None => state.subs.request(topic, message, timeout).await?,
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    for (name, value) in &headers {
        if !matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "transfer-encoding"
                | "content-length"
                | "upgrade"
                | "te"
                | "trailer"
        ) {
            r.headers_mut().append(name.clone(), value.clone());
        }
    }
    Ok(r)
}
