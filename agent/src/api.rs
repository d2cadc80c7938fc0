//! The app API: HTTP/1.1 and h2c on loopback. Routing, request parsing and
//! JSON errors; the work is done by [`Broker`] and [`Subscriptions`].

mod publish;
mod subscriptions;
mod topics;

use publish::{publish_batch, publish_one, request_reply};
use subscriptions::{ack, get_subscription, pull, put_subscription, stream};
use topics::{cluster, delete_topic, get_topic, list_topics, put_topic};

use crate::broker::{Broker, PublishOutcome};
use crate::delivery::Subscriptions;
use crate::error::ApiError;
use crate::message::Message;
use crate::metrics::{HttpLabels, Metrics};
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

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

/// A request body the app API reads: hyper's, or any other body of bytes
/// whose errors can be boxed (tests send requests with `Full`).
pub trait AppBody:
    http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> AppBody for B where
    B: http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
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
pub async fn serve<B: AppBody>(
    state: Arc<AppState>,
    req: Request<B>,
) -> Result<Response<Body>, Infallible> {
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

async fn route<B: AppBody>(state: &AppState, req: Request<B>) -> Routed {
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
async fn read_body<B: AppBody>(
    req: Request<B>,
    limit: usize,
) -> Result<(http::request::Parts, Bytes), ApiError> {
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

#[cfg(test)]
mod tests;
