//! Shared helpers of the agent's integration tests: an in-process agent, the
//! real binary as a child process, a fake app that records pushes, and small
//! API helpers that fail with clear messages.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use shoal_agent::client::{AgentClient, Reply};
use shoal_agent::run::Running;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

/// How long any single "wait until" in these tests may take before failing.
pub const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// In-process agent
// ---------------------------------------------------------------------------

/// An agent started in this process with `shoal_agent::run::start`.
pub struct Agent {
    running: Option<Running>,
    /// Client of the app API.
    pub client: AgentClient,
    /// Client of the admin port.
    pub admin: AgentClient,
    /// Data directory.
    pub dir: PathBuf,
}

/// Starts an agent on `dir` with loopback ports chosen by the OS, plus `extra` flags.
pub async fn start_agent(dir: &Path, extra: &[&str]) -> Agent {
    let mut args: Vec<String> = [
        "shoal-agent",
        "--data-dir",
        dir.to_str().unwrap(),
        "--app-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--node-name",
        "test",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let config = <shoal_agent::Config as clap::Parser>::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("bad test agent flags {args:?}: {e}"));
    let running = shoal_agent::run::start(config)
        .await
        .unwrap_or_else(|e| panic!("the agent did not start on {}: {e}", dir.display()));
    let client = AgentClient::new(&format!("http://{}", running.app_addrs[0]));
    let admin = AgentClient::new(&format!("http://{}", running.admin_addr));
    Agent {
        running: Some(running),
        client,
        admin,
        dir: dir.to_path_buf(),
    }
}

/// Starts an agent that pushes to `app_port`.
pub async fn start_agent_with_app(dir: &Path, app_port: u16, extra: &[&str]) -> Agent {
    let port = app_port.to_string();
    let mut args = vec!["--app-port", port.as_str()];
    args.extend_from_slice(extra);
    start_agent(dir, &args).await
}

impl Agent {
    /// Stops the agent gracefully and waits until it has stopped.
    pub async fn stop(mut self) {
        let running = self.running.take().expect("agent already stopped");
        running.stop();
        match tokio::time::timeout(Duration::from_secs(30), running.wait()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the agent stopped with an error: {e}"),
            Err(_) => panic!("the agent did not stop within 30 s of a graceful stop"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

// ---------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `shoal-agent` binary running as a child process; killed on drop.
pub struct AgentProcess {
    child: Option<std::process::Child>,
    /// Client of the app API.
    pub client: AgentClient,
    /// Client of the admin port.
    pub admin: AgentClient,
    /// Data directory.
    pub dir: PathBuf,
}

/// Spawns the real binary on `dir` and waits for `/readyz`.
pub async fn spawn_agent(dir: &Path, extra: &[&str]) -> AgentProcess {
    let mut last_error = String::new();
    // A free port may be taken again between probing and binding: retry.
    for _ in 0..3 {
        let app = free_port();
        let admin = free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-agent"));
        cmd.arg("--data-dir")
            .arg(dir)
            .arg("--app-addr")
            .arg(format!("127.0.0.1:{app}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin}"))
            .arg("--node-name")
            .arg("test")
            .arg("--log-level")
            .arg("warn")
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        for (k, _) in std::env::vars() {
            if k.starts_with("SHOAL_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().expect("spawning the shoal-agent binary");
        let mut p = AgentProcess {
            child: Some(child),
            client: AgentClient::new(&format!("http://127.0.0.1:{app}")),
            admin: AgentClient::new(&format!("http://127.0.0.1:{admin}")),
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                last_error = format!("the agent exited before it was ready: {status}");
                p.child = None;
                break;
            }
            if let Ok(r) = p.admin.get("/readyz").await {
                if r.status == StatusCode::OK {
                    return p;
                }
            }
            if Instant::now() > deadline {
                panic!("the shoal-agent binary was not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("could not start the shoal-agent binary: {last_error}");
}

impl AgentProcess {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent is not running").id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("running kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits for the child to exit, failing after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("the agent is not running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("the agent did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------
// Fake app
// ---------------------------------------------------------------------------

/// A request the fake app received.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// Request path.
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Arrival number, from 0.
    pub seq: usize,
}

impl Pushed {
    /// A header as text; panics with the header name when missing.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| {
                panic!(
                    "push to {} lacks header {name}: {:?}",
                    self.path, self.headers
                )
            })
            .to_str()
            .unwrap()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How the fake app answers one request.
#[derive(Clone, Debug)]
pub struct AppReply {
    /// Status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
    /// Wait before answering.
    pub delay: Duration,
}

impl AppReply {
    /// An empty answer with `status`.
    pub fn status(status: u16) -> Self {
        AppReply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            delay: Duration::ZERO,
        }
    }
    /// Adds a header.
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    /// Sets the body.
    pub fn body(mut self, b: impl Into<Bytes>) -> Self {
        self.body = b.into();
        self
    }
    /// Answers after `d`.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

type Responder = Arc<dyn Fn(&Pushed) -> AppReply + Send + Sync>;

/// A small HTTP/1 server standing in for the app: records every request
/// (in arrival order) and answers as its responder says.
pub struct FakeApp {
    /// Its port on 127.0.0.1.
    pub port: u16,
    rx: Mutex<mpsc::UnboundedReceiver<Pushed>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApp {
    /// Starts the app; `responder` decides each answer.
    pub async fn start(responder: impl Fn(&Pushed) -> AppReply + Send + Sync + 'static) -> FakeApp {
        let responder: Responder = Arc::new(responder);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        let seq = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                let responder = responder.clone();
                let seq = seq.clone();
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let tx = tx.clone();
                    let responder = responder.clone();
                    let seq = seq.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let pushed = Pushed {
                            path: parts.uri.path().to_string(),
                            headers: parts.headers,
                            body,
                            seq: seq.fetch_add(1, Ordering::SeqCst),
                        };
                        let reply = responder(&pushed);
                        let _ = tx.send(pushed);
                        if !reply.delay.is_zero() {
                            tokio::time::sleep(reply.delay).await;
                        }
                        let mut resp = http::Response::new(Full::new(reply.body));
                        *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap();
                        for (k, v) in reply.headers {
                            resp.headers_mut().append(
                                http::HeaderName::try_from(k).unwrap(),
                                http::HeaderValue::try_from(v).unwrap(),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApp {
            port,
            rx: Mutex::new(rx),
            task,
        }
    }

    /// An app that answers 200 to everything.
    pub async fn ok() -> FakeApp {
        FakeApp::start(|_| AppReply::status(200)).await
    }

    /// The next request; fails after [`WAIT`] with `what` in the message.
    pub async fn recv(&self, what: &str) -> Pushed {
        let mut rx = self.rx.lock().await;
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => panic!("fake app stopped while waiting for {what}"),
            Err(_) => {
                panic!("the app received no request within {WAIT:?} while waiting for {what}")
            }
        }
    }

    /// Fails if a request arrives within `d`.
    pub async fn expect_quiet(&self, d: Duration, why: &str) {
        let mut rx = self.rx.lock().await;
        if let Ok(Some(p)) = tokio::time::timeout(d, rx.recv()).await {
            panic!(
                "{why}: unexpected request to {} (attempt {:?}, body {:?})",
                p.path,
                p.headers.get("shoal-delivery-attempt"),
                p.text()
            );
        }
    }
}

impl Drop for FakeApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// API helpers
// ---------------------------------------------------------------------------

/// Fails unless `r` is `status`.
pub fn expect_status(r: &Reply, status: u16, what: &str) {
    assert_eq!(
        r.status.as_u16(),
        status,
        "{what}: expected {status}, got {} with body {}",
        r.status,
        r.text()
    );
}

/// Fails unless `r` is the documented JSON error: `status`, `{"error":{"code","message"}}`.
pub fn expect_error(r: &Reply, status: u16, code: &str, what: &str) {
    expect_status(r, status, what);
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: error content type is {ct:?}"
    );
    let v = r.json();
    assert_eq!(
        v["error"]["code"],
        code,
        "{what}: wrong error code in {}",
        r.text()
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: error without a message: {}",
        r.text()
    );
}

/// Publishes and expects 201; returns the answer's JSON.
pub async fn publish(
    c: &AgentClient,
    topic: &str,
    headers: &[(&str, &str)],
    payload: impl Into<Bytes>,
) -> Value {
    let r = c.publish(topic, headers, payload).await.unwrap();
    expect_status(&r, 201, &format!("publish to {topic}"));
    r.json()
}

/// Declares a subscription (201 or 200); returns its JSON.
pub async fn put_sub(c: &AgentClient, name: &str, spec: Value) -> Value {
    let r = c
        .put_json(&format!("/v1/subscriptions/{name}"), &spec)
        .await
        .unwrap();
    assert!(
        r.status == StatusCode::CREATED || r.status == StatusCode::OK,
        "declaring subscription {name} {spec}: {} {}",
        r.status,
        r.text()
    );
    r.json()
}

/// Creates or configures a topic; returns the reply.
pub async fn put_topic(c: &AgentClient, name: &str, spec: Value) -> Reply {
    c.put_json(&format!("/v1/topics/{name}"), &spec)
        .await
        .unwrap()
}

/// One pull; fails unless 200 with a JSON array.
pub async fn pull(c: &AgentClient, sub: &str, max: usize, wait: &str) -> Vec<Value> {
    let r = c
        .get(&format!(
            "/v1/subscriptions/{sub}/messages?max={max}&wait={wait}"
        ))
        .await
        .unwrap();
    expect_status(&r, 200, &format!("pull {sub}"));
    match r.json() {
        Value::Array(a) => a,
        other => panic!("pull {sub} answered {other} instead of an array"),
    }
}

/// Pulls until `n` events arrived (without acking); fails after [`WAIT`].
pub async fn pull_n(c: &AgentClient, sub: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        if Instant::now() > deadline {
            panic!(
                "pulled {} of {n} messages from {sub} within {WAIT:?}: {:?}",
                out.len(),
                out.iter().map(text_of).collect::<Vec<_>>()
            );
        }
        out.extend(pull(c, sub, (n - out.len()).min(1000), "500ms").await);
    }
    out
}

/// Pulls until `n` events arrived, acking each batch.
pub async fn pull_ack_n(c: &AgentClient, sub: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        if Instant::now() > deadline {
            panic!(
                "pulled {} of {n} messages from {sub} within {WAIT:?}",
                out.len()
            );
        }
        let got = pull(c, sub, (n - out.len()).min(1000), "500ms").await;
        if !got.is_empty() {
            let ids: Vec<String> = got.iter().map(ackid).collect();
            ack(c, sub, &ids).await;
        }
        out.extend(got);
    }
    out
}

/// Acks ids and expects every one acknowledged.
pub async fn ack(c: &AgentClient, sub: &str, ids: &[String]) -> Value {
    let r = c
        .post_json(
            &format!("/v1/subscriptions/{sub}/acks"),
            &json!({ "ack": ids }),
        )
        .await
        .unwrap();
    expect_status(&r, 200, &format!("ack {sub}"));
    let v = r.json();
    assert_eq!(
        v["acked"].as_u64(),
        Some(ids.len() as u64),
        "ack {sub} {ids:?}: {v}"
    );
    v
}

/// The ack id of a pulled event.
pub fn ackid(e: &Value) -> String {
    e["ackid"]
        .as_str()
        .unwrap_or_else(|| panic!("event without ackid: {e}"))
        .to_string()
}

/// The payload bytes of a pulled event (`data` or `data_base64`).
pub fn payload_of(e: &Value) -> Vec<u8> {
    if let Some(b) = e.get("data_base64") {
        return base64_decode(b.as_str().expect("data_base64 is a string"));
    }
    match e.get("data") {
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(v) => v.to_string().into_bytes(),
        None => Vec::new(),
    }
}

/// The payload of a pulled event as text.
pub fn text_of(e: &Value) -> String {
    String::from_utf8_lossy(&payload_of(e)).into_owned()
}

/// (partition, offset) of a pulled event.
pub fn position(e: &Value) -> (u64, u64) {
    (
        e["shoalpartition"].as_u64().expect("shoalpartition"),
        e["shoaloffset"].as_u64().expect("shoaloffset"),
    )
}

/// Standard base64 decoding (test-side, independent of the agent's).
pub fn base64_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = A.iter().position(|&a| a == c).expect("valid base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Polls `f` until it returns true; fails with `what` after [`WAIT`].
pub async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if f().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {WAIT:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A metric's value in Prometheus text (the sum over its label sets); None if absent.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let series_name = series.split('{').next().unwrap_or("");
        if series_name == name {
            let v: f64 = value.parse().unwrap_or(0.0);
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// The value of one series, written with its labels as the agent writes
/// them (`name{label="value"}`); None if absent.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
}

/// GET /metrics from an admin client.
pub async fn metrics(admin: &AgentClient) -> String {
    let r = admin.get("/metrics").await.unwrap();
    expect_status(&r, 200, "GET /metrics");
    r.text()
}

// ---------------------------------------------------------------------------
// Server-sent events
// ---------------------------------------------------------------------------

/// A server-sent-event stream read incrementally.
pub struct Sse {
    body: Incoming,
    buf: String,
}

/// One event: its `event:` name and `data:` text.
#[derive(Debug)]
pub struct SseEvent {
    /// `event:` (empty when absent).
    pub event: String,
    /// `id:`.
    pub id: String,
    /// Joined `data:` lines.
    pub data: String,
}

impl Sse {
    /// Opens `GET /v1/subscriptions/{sub}/events`; fails unless 200 text/event-stream.
    pub async fn open(c: &AgentClient, sub: &str) -> Sse {
        let resp = c
            .send(
                Method::GET,
                &format!("/v1/subscriptions/{sub}/events"),
                &[],
                Bytes::new(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "opening the stream of {sub}");
        let ct = resp
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(
            ct.starts_with("text/event-stream"),
            "stream content type {ct}"
        );
        Sse {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event that carries data, or None if none comes within `d`.
    pub async fn next_within(&mut self, d: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + d;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf[..end].to_string();
                self.buf.drain(..end + 2);
                let mut ev = SseEvent {
                    event: String::new(),
                    id: String::new(),
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("data:") {
                        if has_data {
                            ev.data.push('\n');
                        }
                        ev.data.push_str(v.trim_start());
                        has_data = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = v.trim().to_string();
                    }
                }
                if has_data {
                    return Some(ev);
                }
            }
            let frame = match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return None,
                Ok(None) => panic!("the event stream ended"),
                Ok(Some(Err(e))) => panic!("the event stream failed: {e}"),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                self.buf
                    .push_str(std::str::from_utf8(&data).expect("UTF-8 stream"));
            }
        }
    }

    /// The next data event; fails after [`WAIT`].
    pub async fn next(&mut self, what: &str) -> SseEvent {
        self.next_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("no stream event within {WAIT:?} while waiting for {what}"))
    }
}

/// A temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("shoal-test-")
        .tempdir()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Mesh agents: the real binary, one process each
// ---------------------------------------------------------------------------

/// A `shoal-agent --dev` process in a test mesh; killed when dropped.
pub struct MeshAgent {
    /// The process.
    pub child: std::process::Child,
    /// Its app API.
    pub client: AgentClient,
    /// Its admin port.
    pub admin: AgentClient,
    /// Its admin address, `127.0.0.1:PORT`.
    pub admin_addr: String,
}

impl Drop for MeshAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free UDP port on loopback for an agent's mesh address.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `shoal-agent --dev` named `name`, with its data in `root/name`, the
/// development CA in `root/ca`, QUIC on `mesh_port`, joining the agent whose
/// mesh port is `join`, plus `extra` flags. `SHOAL_TEST_LOGS=1` shows its logs.
pub fn start_mesh_agent(
    root: &Path,
    ca: &str,
    name: &str,
    mesh_port: u16,
    join: Option<u16>,
    extra: &[&str],
) -> MeshAgent {
    use std::process::{Command, Stdio};
    let (app, admin) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal-agent"));
    cmd.args(["--dev", "--node-name", name])
        .arg("--ca-dir")
        .arg(root.join(ca))
        .arg("--data-dir")
        .arg(root.join(name))
        .arg("--app-addr")
        .arg(format!("127.0.0.1:{app}"))
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--mesh-addr")
        .arg(format!("127.0.0.1:{mesh_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(seed) = join {
        cmd.arg("--join").arg(format!("127.0.0.1:{seed}"));
    }
    cmd.args(extra);
    if std::env::var_os("SHOAL_TEST_LOGS").is_some() {
        cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    }
    // SHOAL_TEST_LOG_DIR=DIR: each agent's logs in DIR/MESH-NAME.log
    // (appended across restarts), to tell the agents of a failing test apart.
    if let Some(dir) = std::env::var_os("SHOAL_TEST_LOG_DIR") {
        // One file per test mesh (its temporary directory) and agent.
        let mesh = root.file_name().and_then(|n| n.to_str()).unwrap_or("mesh");
        let path = Path::new(&dir).join(format!("{mesh}-{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
    }
    MeshAgent {
        child: cmd.spawn().unwrap(),
        client: AgentClient::new(&format!("http://127.0.0.1:{app}")),
        admin: AgentClient::new(&format!("http://127.0.0.1:{admin}")),
        admin_addr: format!("127.0.0.1:{admin}"),
    }
}

/// A mesh peer with a certificate of the dev CA in `root/ca` for namespace
/// `ns`, that speaks raw frames (a stand-in for a compromised agent).
pub async fn raw_mesh_peer(root: &Path, ca: &str, ns: &str) -> shoal_mesh::transport::Endpoint {
    let id = shoal_mesh::SpiffeId::new("shoal.local", ns, "tester").unwrap();
    let source = shoal_mesh::certs::DevCertSource::new(&root.join(ca), "tester", id);
    let identity = shoal_mesh::certs::CertSource::load(&source).unwrap();
    let store = shoal_mesh::tls::CertStore::new(&identity, std::sync::Arc::new(|_, _| {})).unwrap();
    shoal_mesh::transport::Endpoint::bind("127.0.0.1:0".parse().unwrap(), &store).unwrap()
}

/// Writes `bytes` (encoded frames) on a new stream of `conn`, finishes it,
/// and returns every frame the peer answered before closing the stream.
pub async fn exchange_frames(
    conn: &shoal_mesh::quinn::Connection,
    bytes: &[u8],
) -> Vec<shoal_proto::Message> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let got = tokio::time::timeout(WAIT, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap_or_default();
    let mut buf = bytes::BytesMut::from(&got[..]);
    let mut out = Vec::new();
    while let Ok(Some(m)) = shoal_proto::decode::<shoal_proto::Message>(&mut buf) {
        out.push(m);
    }
    out
}
