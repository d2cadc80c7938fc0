//! A lean HTTP/1.1 keep-alive connection for the measuring loops (or a
//! share of one h2c connection).
//!
//! `shoal_agent::client::AgentClient` (a pooled hyper client) sets the agent
//! up; the hot loops use one hyper connection per task instead, which costs
//! the client less CPU on a machine it shares with the agent.

use crate::BoxError;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;

/// One keep-alive connection to the agent's app API, or a share of an h2c
/// connection (requests of all its shares in flight at once on it).
pub struct Conn {
    tx: Sender,
    host: HeaderValue,
}

enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    /// Opens a connection with TCP_NODELAY.
    pub async fn open(addr: SocketAddr) -> Result<Conn, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (tx, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the bench drops the sender or the agent closes.
            let _ = conn.await;
        });
        Ok(Conn {
            tx: Sender::Http1(tx),
            host: HeaderValue::from_str(&addr.to_string())?,
        })
    }

    /// Opens an h2c connection (HTTP/2 with prior knowledge, TCP_NODELAY);
    /// [`Conn::share`] gives more senders on it.
    pub async fn open_h2(addr: SocketAddr) -> Result<Conn, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            tx: Sender::Http2(tx),
            host: HeaderValue::from_str(&addr.to_string())?,
        })
    }

    /// A new connection: h2c with `h2`, else HTTP/1.1.
    pub async fn open_as(addr: SocketAddr, h2: bool) -> Result<Conn, BoxError> {
        if h2 {
            Conn::open_h2(addr).await
        } else {
            Conn::open(addr).await
        }
    }

    /// Another sender on the same h2c connection; `None` for HTTP/1.1, whose
    /// connection carries one request at a time.
    pub fn share(&self) -> Option<Conn> {
        match &self.tx {
            Sender::Http1(_) => None,
            Sender::Http2(tx) => Some(Conn {
                tx: Sender::Http2(tx.clone()),
                host: self.host.clone(),
            }),
        }
    }

    /// Sends a request and reads the whole answer.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), BoxError> {
        let mut req = Request::builder().method(method);
        req = match &self.tx {
            Sender::Http1(_) => req.uri(path).header(HOST, self.host.clone()),
            // HTTP/2 takes the authority from the URI.
            Sender::Http2(_) => req.uri(format!("http://{}{path}", self.host.to_str()?)),
        };
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        let req = req.body(Full::new(body))?;
        let resp = match &mut self.tx {
            Sender::Http1(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
            Sender::Http2(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// POSTs a body.
    pub async fn post(
        &mut self,
        path: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), BoxError> {
        self.call(Method::POST, path, Some(content_type), body)
            .await
    }
}

/// Idle connections shared by the tasks of an open-loop run: a task takes one
/// (or opens a new one when all are busy) and gives it back when answered.
#[derive(Clone)]
pub struct Pool {
    addr: SocketAddr,
    idle: Arc<Mutex<Vec<Conn>>>,
}

impl Pool {
    /// A pool with `warm` connections opened in advance.
    pub async fn new(addr: SocketAddr, warm: usize) -> Result<Pool, BoxError> {
        let mut idle = Vec::with_capacity(warm);
        for _ in 0..warm {
            idle.push(Conn::open(addr).await?);
        }
        Ok(Pool {
            addr,
            idle: Arc::new(Mutex::new(idle)),
        })
    }

    /// An idle connection, or a new one.
    pub async fn take(&self) -> Result<Conn, BoxError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(c) => Ok(c),
            None => Conn::open(self.addr).await,
        }
    }

    /// Returns a connection after a successful exchange.
    pub fn give(&self, c: Conn) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// Connections currently idle (after a run: the most ever needed at once).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
