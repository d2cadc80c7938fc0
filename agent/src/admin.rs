//! The admin port: `/metrics`, `/livez`, `/readyz`. It carries no message data.

use crate::metrics::Metrics;
use bytes::Bytes;
use http::{header::CONTENT_TYPE, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use shoal_exposition::Format;

/// What the admin port reports.
#[derive(Debug)]
pub struct AdminState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Set once storage is recovered and listeners are bound; cleared when stopping.
    pub ready: AtomicBool,
    /// Why the agent is not ready, when something other than starting or
    /// stopping keeps it so (a node name another agent has); `/readyz` says it.
    pub not_ready_reason: std::sync::Mutex<Option<String>>,
    /// The broker, once open: its consumer lag is computed at each scrape.
    pub broker: std::sync::OnceLock<std::sync::Weak<crate::broker::Broker>>,
}

/// Serves one admin request.
pub async fn serve<B>(
    state: Arc<AdminState>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            if let Some(b) = state.broker.get().and_then(std::sync::Weak::upgrade) {
                b.refresh_lag_metrics();
            }
            // Prometheus asks for OpenMetrics first; curl and promtool get
            // the classic text format.
            let format = Format::negotiate(
                req.headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            (
                StatusCode::OK,
                format.content_type(),
                state.metrics.encode_as(format),
            )
        }
        (&Method::GET, "/livez") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") => {
            if state.ready.load(Ordering::Acquire) {
                (StatusCode::OK, "text/plain", "ready\n".to_string())
            } else {
                let reason = state
                    .not_ready_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    match reason {
                        Some(r) => format!("not ready: {r}\n"),
                        None => "not ready\n".to_string(),
                    },
                )
            }
        }
        (_, "/metrics" | "/livez" | "/readyz") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "admin routes: /metrics /livez /readyz\n".to_string(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        // RFC 9110: a 405 lists the methods the route serves.
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET"));
    }
    Ok(r)
}
