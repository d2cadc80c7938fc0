//! The HTTPS webhook server, the HTTPS identity server and the plain-HTTP
//! admin server.
//!
//! All stop on the shutdown signal: no new connections, in-flight requests
//! finish (bounded by the caller's timeout).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admission::Webhook;
use crate::identity::{self, IdentityService, Outcome};
use crate::metrics::Metrics;

/// Largest AdmissionReview body accepted (the API server caps objects near 1.5 MB,
/// and a review carries the object once for CREATE).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// How long a client may take to send its headers or its body, or finish the TLS handshake.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Path of the mutating webhook.
pub const MUTATE_PATH: &str = "/mutate";

type Body = Full<Bytes>;

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A JSON error body `{"error": {"code", "message"}}`.
fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    json_response(status, body.to_string().into_bytes())
}

fn text_response(status: StatusCode, text: String, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Resolves once the shutdown flag is true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

/// Answers one webhook request.
pub async fn handle_webhook(webhook: Webhook, req: Request<Incoming>) -> Response<Body> {
    let metrics = webhook.metrics().clone();
    if req.uri().path() != MUTATE_PATH {
        metrics.bad_request("path");
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "the webhook is served at POST /mutate",
        );
    }
    if req.method() != Method::POST {
        metrics.bad_request("method");
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        );
    }
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(CLIENT_TIMEOUT, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            metrics.bad_request(if too_large { "too_large" } else { "body" });
            let msg = if too_large {
                format!("body larger than {MAX_BODY_BYTES} bytes")
            } else {
                format!("cannot read body: {e}")
            };
            return error_response(StatusCode::BAD_REQUEST, "bad_request", &msg);
        }
        Err(_) => {
            metrics.bad_request("body");
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "body not received in time",
            );
        }
    };
    match webhook.review(&bytes).await {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => error_response(StatusCode::BAD_REQUEST, "bad_request", &e.0),
    }
}

/// Serves the webhook over TLS on `listener` until `shutdown` turns true,
/// then waits for open connections to finish.
pub async fn serve_webhook(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    webhook: Webhook,
    shutdown: watch::Receiver<bool>,
) {
    serve_tls(
        listener,
        tls,
        move |req| {
            let webhook = webhook.clone();
            async move { handle_webhook(webhook, req).await }
        },
        shutdown,
    )
    .await;
}

/// Answers one identity request: `POST /v1/certificates`.
pub async fn handle_identity(service: IdentityService, req: Request<Incoming>) -> Response<Body> {
    let refuse = |status: StatusCode, code: &str, message: &str| {
        service
            .metrics()
            .identity_request(Outcome::BadRequest.as_str());
        error_response(status, code, message)
    };
    let path = req.uri().path().to_owned();
    if path != identity::CERTIFICATES_PATH && path != identity::PEERS_PATH {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "certificates are requested with POST /v1/certificates, peers with POST /v1/peers",
        );
    }
    if req.method() != Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        );
    }
    let body = Limited::new(req.into_body(), identity::MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(CLIENT_TIMEOUT, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest.as_str(),
                &format!(
                    "cannot read the body (at most {} bytes): {e}",
                    identity::MAX_BODY_BYTES
                ),
            )
        }
        Err(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest.as_str(),
                "body not received in time",
            )
        }
    };
    let answer = if path == identity::PEERS_PATH {
        service
            .handle_peers(&bytes)
            .await
            .map(|a| serde_json::to_vec(&a))
    } else {
        service.handle(&bytes).await.map(|a| serde_json::to_vec(&a))
    };
    match answer {
        Ok(answer) => match answer {
            Ok(body) => json_response(StatusCode::OK, body),
            Err(e) => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                Outcome::Internal.as_str(),
                &e.to_string(),
            ),
        },
        Err(d) => error_response(d.outcome.status(), d.outcome.as_str(), &d.message),
    }
}

/// Serves the identity endpoint over TLS on `listener` until `shutdown`
/// turns true, then waits for open connections to finish.
pub async fn serve_identity(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: IdentityService,
    shutdown: watch::Receiver<bool>,
) {
    serve_tls(
        listener,
        tls,
        move |req| {
            let service = service.clone();
            async move { handle_identity(service, req).await }
        },
        shutdown,
    )
    .await;
}

/// Serves `handler` over TLS (HTTP/1.1 and h2) until `shutdown` turns true,
/// then waits for open connections to finish.
async fn serve_tls<H, F>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(CLIENT_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

/// Readiness check of the admin server.
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Answers one admin request: `/metrics`, `/livez`, `/readyz`.
pub fn handle_admin(
    metrics: &Metrics,
    ready: &ReadyCheck,
    req: &Request<Incoming>,
) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            // Prometheus asks for OpenMetrics; curl and promtool get the
            // classic text format.
            let format = shoal_exposition::Format::negotiate(
                req.headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            text_response(
                StatusCode::OK,
                metrics.encode(format),
                format.content_type(),
            )
        }
        "/livez" => text_response(StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/readyz" if ready() => text_response(StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/readyz" => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready\n".to_owned(),
            "text/plain",
        ),
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "try /metrics, /livez or /readyz",
        ),
    }
}

/// Serves the admin endpoints over plain HTTP until `shutdown` turns true.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: ReadyCheck,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = handle_admin(&metrics, &ready, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(CLIENT_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    graceful.shutdown().await;
}
