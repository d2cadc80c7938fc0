//! A small HTTP client for the app API, shared by the `shoal` CLI, tests and
//! benchmarks.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Default agent URL.
pub const DEFAULT_URL: &str = "http://127.0.0.1:4700";
/// How long a connection to the agent may take to open.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The host name does not resolve.
    #[error("cannot find the host of {url} ({reason}); check --url (SHOAL_URL)")]
    Dns {
        /// The URL.
        url: String,
        /// The resolver's error.
        reason: String,
    },
    /// Nothing listens at the address.
    #[error("no Shoal agent is listening at {url} ({reason}); start a local mesh with `shoal dev`, or point --url (SHOAL_URL) at your agent")]
    NotListening {
        /// The URL.
        url: String,
        /// The connection error.
        reason: String,
    },
    /// The address did not answer in time.
    #[error(
        "{url} did not answer in time ({reason}); is the address right, and reachable from here?"
    )]
    Timeout {
        /// The URL.
        url: String,
        /// The error.
        reason: String,
    },
    /// The connection failed otherwise (a TLS-only server, a reset, ...).
    #[error("cannot talk to {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// The error.
        reason: String,
    },
    /// The request could not be built or sent.
    #[error("request failed: {0}")]
    Request(String),
}

impl ClientError {
    /// Sorts a connection error by its cause, for a message that says what
    /// to check.
    fn connect(url: &str, reason: String, kind: Option<std::io::ErrorKind>) -> ClientError {
        let url = url.to_string();
        let lower = reason.to_ascii_lowercase();
        if lower.contains("lookup")
            || lower.contains("resolve")
            || lower.contains("name or service")
        {
            ClientError::Dns { url, reason }
        } else if kind == Some(std::io::ErrorKind::ConnectionRefused) || lower.contains("refused") {
            ClientError::NotListening { url, reason }
        } else if kind == Some(std::io::ErrorKind::TimedOut) || lower.contains("timed out") {
            ClientError::Timeout { url, reason }
        } else {
            ClientError::Connect { url, reason }
        }
    }
}

fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = c.source();
    }
    None
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A response read in full.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON, or null.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Client of one agent's app API.
#[derive(Clone, Debug)]
pub struct AgentClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AgentClient {
    /// A client for the agent at `base` (such as `http://127.0.0.1:4700`).
    pub fn new(base: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A black-holed address fails in seconds, not the kernel's minutes.
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        AgentClient {
            base: base.trim_end_matches('/').to_string(),
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(64)
                .build(connector),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request and returns the response with its body unread.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(body.into()))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                ClientError::connect(&self.base, root_cause(&e), io_kind(&e))
            } else {
                ClientError::Request(root_cause(&e))
            }
        })
    }

    /// Sends a request and reads the whole response.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, ClientError> {
        let resp = self.send(method, path, headers, body).await?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| ClientError::Request(e.to_string()))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// GET a path.
    pub async fn get(&self, path: &str) -> Result<Reply, ClientError> {
        self.call(Method::GET, path, &[], Bytes::new()).await
    }

    /// PUT a JSON value.
    pub async fn put_json(&self, path: &str, v: &serde_json::Value) -> Result<Reply, ClientError> {
        self.call(
            Method::PUT,
            path,
            &[("content-type", "application/json")],
            v.to_string(),
        )
        .await
    }

    /// POST a JSON value.
    pub async fn post_json(&self, path: &str, v: &serde_json::Value) -> Result<Reply, ClientError> {
        self.call(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            v.to_string(),
        )
        .await
    }

    /// Publishes one message.
    pub async fn publish(
        &self,
        topic: &str,
        headers: &[(&str, &str)],
        payload: impl Into<Bytes>,
    ) -> Result<Reply, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/topics/{topic}/messages"),
            headers,
            payload,
        )
        .await
    }
}
