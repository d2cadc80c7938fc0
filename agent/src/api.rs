//! The app API: HTTP/1.1 and h2c on loopback. Routing, request parsing and
//! JSON errors; the work is done by [`Broker`] and [`Subscriptions`].

use crate::broker::{Broker, PublishOutcome};
use crate::delivery::Subscriptions;
use crate::error::ApiError;
use crate::message::Message;
use crate::metrics::{HttpLabels, Metrics, Mode};
use crate::subscription::SubscriptionSpec;
use crate::tenancy::Action;
use crate::topic::TopicSpec;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Response body: a whole buffer or a stream of server-sent events.
pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Most messages in one batch publish.
pub const MAX_BATCH_ENTRIES: usize = 10_000;
/// Default long-poll wait.
pub const DEFAULT_PULL_WAIT: Duration = Duration::from_secs(5);
/// Longest long-poll wait.
pub const MAX_PULL_WAIT: Duration = Duration::from_secs(60);
/// Default and largest `max` of a pull.
pub const DEFAULT_PULL_MAX: usize = 10;
/// Largest `max` of a pull.
pub const MAX_PULL_MAX: usize = 1000;
/// Default request/reply timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval of keep-alive comments on idle streams.
pub const STREAM_KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest `Shoal-Id` and `Shoal-Key`.
pub const MAX_ID_LEN: usize = 1024;
/// Longest `Shoal-TTL`.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest `Shoal-Delay`.
pub const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest nack delay.
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(12 * 3600);
/// Largest JSON request body (topic and subscription configuration, acks).
pub const MAX_JSON_BYTES: usize = 1024 * 1024;

/// Settings of the API.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// Largest message payload.
    pub max_message_bytes: usize,
    /// Largest batch body.
    pub max_batch_bytes: usize,
    /// A client-only agent (`--broker=false`, a Job's sidecar): it stores no
    /// message of its own, so with no mesh to forward to it refuses publishes.
    pub client_only: bool,
}

/// What request handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The mesh, when this agent runs one.
    pub mesh: Option<Arc<crate::mesh::Mesh>>,
    /// Routing across the mesh, when this agent runs one.
    pub router: Option<Arc<crate::router::Router>>,
    /// Topics and publishing.
    pub broker: Arc<Broker>,
    /// Subscriptions and delivery.
    pub subs: Arc<Subscriptions>,
    /// Limits.
    pub settings: ApiSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// Publishes through the mesh when there is one, else on this agent.
    pub async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Result<PublishOutcome, ApiError>>, ApiError> {
        let started = std::time::Instant::now();
        let published = match &self.router {
            Some(r) => r.publish(topic, messages).await,
            None if self.settings.client_only => Err(ApiError::unavailable(
                "no_broker",
                "this agent is client-only (--broker=false, or the pod's shoal.io/broker: \"false\") and has no mesh: it keeps no messages of its own, and has no broker agent to send them to",
                5,
            )),
            None => self.broker.publish(topic, messages).await,
        };
        self.metrics
            .publish_latency
            .observe(started.elapsed().as_secs_f64());
        published
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn json_response(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = Response::new(full(e.body()));
    *r.status_mut() = e.status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(secs) = e.retry_after {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Some(allow) = e.allow {
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    }
    r
}

/// Serves one request: routes it, records metrics, turns errors into JSON.
pub async fn serve<B>(state: Arc<AppState>, req: Request<B>) -> Result<Response<Body>, Infallible>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = req.method().clone();
    let (route, result) = route(&state, req).await;
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            state.metrics.api_error(e.code);
            if e.status.is_server_error() {
                tracing::warn!(route, status = e.status.as_u16(), code = e.code, message = %e.message, "request failed");
            } else {
                tracing::debug!(route, status = e.status.as_u16(), code = e.code, message = %e.message, "request refused");
            }
            error_response(&e)
        }
    };
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            method: crate::metrics::method_label(&method),
            status: response.status().as_u16(),
        })
        .inc();
    Ok(response)
}

type Routed = (&'static str, Result<Response<Body>, ApiError>);

/// 405, with the `Allow` header RFC 9110 requires.
fn method_not_allowed(allow: &'static str) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("allowed methods: {allow}"),
    );
    e.allow = Some(allow);
    e
}

/// The app API's routes; path segments are percent-decoded names.
enum Route {
    Cluster,
    Topics,
    Topic(String),
    Publish(String),
    Batch(String),
    Request(String),
    Subscriptions,
    Subscription(String),
    Pull(String),
    Acks(String),
    Events(String),
}

impl Route {
    fn resolve(path: &str) -> Option<Route> {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let d = |s: &str| percent_decode(s);
        Some(match segments.as_slice() {
            ["v1", "cluster"] => Route::Cluster,
            ["v1", "topics"] => Route::Topics,
            ["v1", "topics", t] => Route::Topic(d(t)),
            ["v1", "topics", t, "messages"] => Route::Publish(d(t)),
            ["v1", "topics", t, "messages", "batch"] => Route::Batch(d(t)),
            ["v1", "topics", t, "requests"] => Route::Request(d(t)),
            ["v1", "subscriptions"] => Route::Subscriptions,
            ["v1", "subscriptions", s] => Route::Subscription(d(s)),
            ["v1", "subscriptions", s, "messages"] => Route::Pull(d(s)),
            ["v1", "subscriptions", s, "acks"] => Route::Acks(d(s)),
            ["v1", "subscriptions", s, "events"] => Route::Events(d(s)),
            _ => return None,
        })
    }

    /// The route's template, as metrics label it.
    fn template(&self) -> &'static str {
        match self {
            Route::Cluster => "/v1/cluster",
            Route::Topics => "/v1/topics",
            Route::Topic(_) => "/v1/topics/{topic}",
            Route::Publish(_) => "/v1/topics/{topic}/messages",
            Route::Batch(_) => "/v1/topics/{topic}/messages/batch",
            Route::Request(_) => "/v1/topics/{topic}/requests",
            Route::Subscriptions => "/v1/subscriptions",
            Route::Subscription(_) => "/v1/subscriptions/{name}",
            Route::Pull(_) => "/v1/subscriptions/{name}/messages",
            Route::Acks(_) => "/v1/subscriptions/{name}/acks",
            Route::Events(_) => "/v1/subscriptions/{name}/events",
        }
    }

    fn allowed_methods(&self) -> &'static str {
        match self {
            Route::Topic(_) | Route::Subscription(_) => "GET, PUT, POST, DELETE",
            Route::Cluster
            | Route::Topics
            | Route::Subscriptions
            | Route::Pull(_)
            | Route::Events(_) => "GET",
            Route::Publish(_) | Route::Batch(_) | Route::Request(_) | Route::Acks(_) => "POST",
        }
    }
}

async fn route<B>(state: &AppState, req: Request<B>) -> Routed
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(route) = Route::resolve(req.uri().path()) else {
        let e = ApiError::not_found(
            "route_not_found",
            format!(
                "no route {} {}; see docs/api.md",
                req.method(),
                req.uri().path()
            ),
        );
        return ("unknown", Err(e));
    };
    let template = route.template();
    let result = async {
        let query = Query::parse(req.uri().query());
        let method = req.method().clone();
        match (route, method) {
            (Route::Cluster, Method::GET) => {
                query.only(&[])?;
                Ok(cluster(state))
            }
            (Route::Topics, Method::GET) => {
                query.only(&[])?;
                Ok(list_topics(state).await)
            }
            (Route::Topic(t), Method::GET) => {
                query.only(&[])?;
                get_topic(state, &t).await
            }
            (Route::Topic(t), Method::PUT | Method::POST) => {
                query.only(&[])?;
                put_topic(state, &t, req).await
            }
            (Route::Topic(t), Method::DELETE) => {
                query.only(&[])?;
                delete_topic(state, &t)
            }
            (Route::Publish(t), Method::POST) => {
                query.only(&[])?;
                publish_one(state, &t, req).await
            }
            (Route::Batch(t), Method::POST) => {
                query.only(&[])?;
                publish_batch(state, &t, req).await
            }
            (Route::Request(t), Method::POST) => {
                query.only(&["timeout"])?;
                request_reply(state, &t, &query, req).await
            }
            (Route::Subscriptions, Method::GET) => {
                query.only(&[])?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"subscriptions": state.subs.list()}),
                ))
            }
            (Route::Subscription(s), Method::GET) => {
                query.only(&[])?;
                get_subscription(state, &s)
            }
            (Route::Subscription(s), Method::PUT | Method::POST) => {
                query.only(&[])?;
                put_subscription(state, &s, req).await
            }
            (Route::Subscription(s), Method::DELETE) => {
                query.only(&[])?;
                crate::names::validate("subscription", &s)?;
                state.subs.delete(&s)?;
                Ok(no_content())
            }
            (Route::Pull(s), Method::GET) => {
                query.only(&["max", "wait"])?;
                pull(state, &s, &query).await
            }
            (Route::Acks(s), Method::POST) => {
                query.only(&[])?;
                ack(state, &s, req).await
            }
            (Route::Events(s), Method::GET) => {
                query.only(&[])?;
                stream(state, &s)
            }
            (route, _) => Err(method_not_allowed(route.allowed_methods())),
        }
    }
    .await;
    (template, result)
}

fn no_content() -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// Query parameters of a request.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let mut out = Vec::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.push((percent_decode(k), percent_decode(v)));
        }
        Query(out)
    }

    fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some((k, _)) => Err(ApiError::bad_request(
                "unknown_parameter",
                if allowed.is_empty() {
                    format!("unknown query parameter {k:?}: this route takes none")
                } else {
                    format!(
                        "unknown query parameter {k:?}: this route takes {}",
                        allowed.join(", ")
                    )
                },
            )),
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn duration(&self, key: &str, default: Duration, max: Duration) -> Result<Duration, ApiError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match crate::time::parse_duration(v) {
                Some(d) if d <= max => Ok(d),
                _ => Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!(
                        "{key}={v:?}: expected a duration up to {} (like 500ms, 5s)",
                        crate::time::format_duration(max)
                    ),
                )),
            },
        }
    }

    fn usize(&self, key: &str, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!("{key}={v:?}: expected a whole number from 1 to {max}"),
                )),
            },
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a body up to `limit` bytes; larger gets 413.
async fn read_body<B>(
    req: Request<B>,
    limit: usize,
) -> Result<(http::request::Parts, Bytes), ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(len) = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    if http_body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(ApiError::bad_request(
            "body_read_failed",
            format!("reading the body failed: {e}"),
        )),
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// Parses a JSON request body; an empty body is allowed when `optional`.
fn parse_json<T: serde::de::DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &[u8],
    optional: bool,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        if optional {
            return Ok(T::default());
        }
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    match content_type(headers).as_deref() {
        // curl -d sends form encoding by default; its body is still the JSON the user typed.
        None | Some("application/json") | Some("application/x-www-form-urlencoded") => {}
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("content type {other:?} is not accepted here; send application/json"),
            ))
        }
    }
    // Derived structs would also read an array of their fields in order.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            ApiError::bad_request(
                "invalid_header",
                format!("header {name} must be printable ASCII"),
            )
        }),
    }
}

fn header_duration(headers: &HeaderMap, name: &str) -> Result<Option<Duration>, ApiError> {
    match header_str(headers, name)? {
        None => Ok(None),
        Some(v) => crate::time::parse_duration(v).map(Some).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_header",
                format!("{name}: {v:?} is not a duration (like 30s, 5m, or a number of seconds)"),
            )
        }),
    }
}

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

async fn publish_one<B>(
    state: &AppState,
    topic: &str,
    req: Request<B>,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

async fn publish_batch<B>(
    state: &AppState,
    topic: &str,
    req: Request<B>,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

/// A topic's configuration, subscriptions and figures. In a mesh the
/// figures of each partition are its home's ([`Router::topics_stats`]), with
/// `home` and `source` (`home`, or `local` when the home could not be asked).
///
/// [`Router::topics_stats`]: crate::router::Router::topics_stats
async fn topics_json(state: &AppState, topics: &[Arc<crate::topic::Topic>]) -> Vec<Value> {
    let figures = match &state.router {
        Some(r) => r.topics_stats(topics).await,
        None => Vec::new(),
    };
    topics
        .iter()
        .enumerate()
        .map(|(i, topic)| {
            let partitions: Vec<Value> = match figures.get(i) {
                Some(f) => f
                    .iter()
                    .map(|f| {
                        let mut p = stats_json(&f.stats);
                        if let Value::Object(o) = &mut p {
                            o.insert("home".into(), f.home.clone().into());
                            o.insert(
                                "source".into(),
                                if f.from_home { "home" } else { "local" }.into(),
                            );
                        }
                        p
                    })
                    .collect(),
                None => topic
                    .partitions()
                    .iter()
                    .map(|p| stats_json(&crate::router::local_stats(p)))
                    .collect(),
            };
            let mut v = serde_json::to_value(topic.config()).unwrap_or_else(|_| json!({}));
            if let Value::Object(o) = &mut v {
                o.insert("name".into(), topic.name.to_string().into());
                o.insert(
                    "subscriptions".into(),
                    state.subs.uses_topic(&topic.name).into(),
                );
                o.insert("stats".into(), json!({"partitions": partitions}));
                // The Raft groups of this topic this agent holds a replica
                // of: leader, term, commit index, voters, followers' lag.
                if let Some(r) = &state.router {
                    let held: Vec<_> = r
                        .replica_view()
                        .into_iter()
                        .filter(|g| {
                            g.topic == *topic.name && g.namespace == crate::topic::TOPIC_NAMESPACE
                        })
                        .collect();
                    if !held.is_empty() {
                        o.insert("replication".into(), json!(held));
                    }
                }
            }
            v
        })
        .collect()
}

async fn topic_json(state: &AppState, topic: &Arc<crate::topic::Topic>) -> Value {
    topics_json(state, std::slice::from_ref(topic))
        .await
        .pop()
        .unwrap_or_else(|| json!({}))
}

fn stats_json(s: &shoal_proto::PartitionStats) -> Value {
    json!({
        "partition": s.partition,
        "firstOffset": s.first_offset,
        "nextOffset": s.next_offset,
        "bytes": s.bytes,
        "segments": s.segments,
    })
}

/// The cluster as this agent sees it, and the partitions each member is home to.
fn cluster(state: &AppState) -> Response<Body> {
    let Some(mesh) = &state.mesh else {
        return json_response(
            StatusCode::OK,
            &json!({"mesh": false, "joined": true, "members": [], "note": "mesh off: start the agent with --dev to join other agents"}),
        );
    };
    let view = mesh.view();
    let mut homes: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut unavailable = Vec::new();
    let partitions = state
        .router
        .as_ref()
        .map(|r| r.partition_view())
        .unwrap_or_default();
    for p in &partitions {
        homes
            .entry(p.home.clone())
            .or_default()
            .push(format!("{}/{}", p.topic, p.partition));
        if !p.available {
            unavailable.push(format!("{}/{}", p.topic, p.partition));
        }
    }
    let departed = state
        .router
        .as_ref()
        .map(|r| r.departed())
        .unwrap_or_default();
    let mut local_groups: Vec<(String, String)> = state
        .subs
        .list()
        .into_iter()
        .map(|s| (s.topic, s.group))
        .collect();
    local_groups.sort();
    local_groups.dedup();
    let groups: Vec<Value> = local_groups
        .into_iter()
        .map(|(topic, group)| {
            let count = state
                .broker
                .topic(&topic)
                .map_or(0, |t| t.partition_count());
            let read = state
                .router
                .as_ref()
                .map(|r| r.assigned(&topic, &group, count))
                .unwrap_or_default();
            json!({"topic": topic, "group": group, "partitions": read})
        })
        .collect();
    let describe = |m: &crate::mesh::MemberView, me: bool| {
        let mut v = serde_json::to_value(m).unwrap_or_else(|_| json!({}));
        if let Value::Object(o) = &mut v {
            o.insert("self".into(), me.into());
            o.insert(
                "partitions".into(),
                homes.get(&m.node).cloned().unwrap_or_default().into(),
            );
        }
        v
    };
    let name_conflict = view
        .name_conflict
        .as_ref()
        .map(|c| json!({"node": c.node, "holder": c.holder, "message": c.message()}));
    let members: Vec<Value> = view
        .me
        .iter()
        .map(|m| describe(m, true))
        .chain(view.members.iter().map(|m| describe(m, false)))
        .collect();
    let replicated = state
        .router
        .as_ref()
        .map(|r| r.replica_view())
        .unwrap_or_default();
    json_response(
        StatusCode::OK,
        &json!({"mesh": true, "id": mesh.id.to_string(), "addr": mesh.advertised, "bound": mesh.local_addr, "joined": view.joined, "members": members, "departed": departed, "unavailable": unavailable, "groups": groups, "name_conflict": name_conflict, "replicated": replicated}),
    )
}

async fn list_topics(state: &AppState) -> Response<Body> {
    // Every topic's homes are asked at once: one slow home delays the answer
    // by at most one call's timeout, not one per topic.
    let topics = topics_json(state, &state.broker.topics()).await;
    json_response(StatusCode::OK, &json!({"topics": topics}))
}

async fn get_topic(state: &AppState, name: &str) -> Result<Response<Body>, ApiError> {
    let name = &state.broker.full_topic_name(name)?;
    let topic = state
        .broker
        .topic(name)
        .ok_or_else(|| ApiError::not_found("topic_not_found", format!("no topic {name:?}")))?;
    Ok(json_response(
        StatusCode::OK,
        &topic_json(state, &topic).await,
    ))
}

async fn put_topic<B>(
    state: &AppState,
    name: &str,
    req: Request<B>,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let name = &state.broker.full_topic_name(name)?;
    state.broker.may_configure(name)?;
    let (parts, body) = read_body(req, MAX_JSON_BYTES).await?;
    let spec: TopicSpec = parse_json(&parts.headers, &body, true)?;
    let (topic, created) = state.broker.put_topic(name, &spec)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(status, &topic_json(state, &topic).await))
}

fn delete_topic(state: &AppState, name: &str) -> Result<Response<Body>, ApiError> {
    let name = &state.broker.full_topic_name(name)?;
    state.broker.may_configure(name)?;
    let users = state.subs.uses_topic(name);
    if !users.is_empty() {
        return Err(ApiError::conflict(
            "topic_in_use",
            format!("topic {name:?} has subscriptions {users:?}; delete them first"),
        ));
    }
    state.broker.delete_topic(name)?;
    Ok(no_content())
}

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

fn get_subscription(state: &AppState, name: &str) -> Result<Response<Body>, ApiError> {
    crate::names::validate("subscription", name)?;
    let sub = state.subs.get(name).ok_or_else(|| {
        ApiError::not_found(
            "subscription_not_found",
            format!("no subscription {name:?}"),
        )
    })?;
    Ok(json_response(
        StatusCode::OK,
        &subscription_json(state, &sub),
    ))
}

async fn put_subscription<B>(
    state: &AppState,
    name: &str,
    req: Request<B>,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

async fn pull(state: &AppState, name: &str, query: &Query) -> Result<Response<Body>, ApiError> {
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

async fn ack<B>(state: &AppState, name: &str, req: Request<B>) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

fn stream(state: &AppState, name: &str) -> Result<Response<Body>, ApiError> {
    crate::names::validate("subscription", name)?;
    let sub = state.subs.get(name).ok_or_else(|| {
        ApiError::not_found(
            "subscription_not_found",
            format!("no subscription {name:?}"),
        )
    })?;
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

async fn request_reply<B>(
    state: &AppState,
    topic: &str,
    query: &Query,
    req: Request<B>,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(
            percent_decode("2026-11-24T10%3A00%3A00Z"),
            "2026-11-24T10:00:00Z"
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn query_rules() {
        let q = Query::parse(Some("max=5&wait=2s"));
        assert!(q.only(&["max", "wait"]).is_ok());
        assert_eq!(q.only(&["max"]).unwrap_err().code, "unknown_parameter");
        assert_eq!(q.usize("max", 1, 10).unwrap(), 5);
        assert_eq!(
            q.duration("wait", Duration::ZERO, Duration::from_secs(60))
                .unwrap(),
            Duration::from_secs(2)
        );
        let bad = Query::parse(Some("max=0&wait=forever"));
        assert!(bad.usize("max", 1, 10).is_err());
        assert!(bad
            .duration("wait", Duration::ZERO, Duration::from_secs(60))
            .is_err());
    }
}
