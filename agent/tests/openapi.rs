//! The app API against its published contract, docs/openapi.yaml.
//!
//! `openapi_contract` starts the real `shoal-agent` binary on free loopback
//! ports and runs schemathesis (pinned in .ci/python-requirements.txt)
//! against it with `--checks all`: no 5xx (except the documented
//! 502/503/504 of request/reply), every response matching the schema,
//! schema-valid requests accepted and schema-violating ones refused, 405
//! with `Allow` for methods the spec does not list, and the rest of
//! schemathesis' checks. It also fails if the agent logged a panic while
//! being fuzzed. The agent gets an `--app-port` where nothing listens, so
//! push subscriptions are accepted as the spec says (their pushes fail and
//! are retried, which the run does not look at).
//!
//! The other tests are regressions for inputs the fuzzer found hard to reach.
//!
//! Knobs: `SHOAL_SCHEMATHESIS_MAX_EXAMPLES` (default 100 per operation) and
//! `SHOAL_SCHEMATHESIS_SEED` (default a fixed seed, so CI is repeatable;
//! `random` for a fresh one).

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest the schemathesis run may take before the test gives up.
const SCHEMATHESIS_LIMIT: Duration = Duration::from_secs(300);
/// The fixed seed of a default run.
const DEFAULT_SEED: &str = "20261124";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("agent/ has no parent"))
        .to_path_buf()
}

/// A running agent on loopback, killed on drop.
struct Agent {
    child: Child,
    app_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let app_port = free_port();
        let admin_port = free_port();
        let push_port = free_port();
        let log = dir.path().join("agent.log");
        let log_file = fs::File::create(&log).unwrap_or_else(|e| panic!("agent log: {e}"));
        let child = Command::new(env!("CARGO_BIN_EXE_shoal-agent"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--app-addr")
            .arg(format!("127.0.0.1:{app_port}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin_port}"))
            .arg("--app-port")
            .arg(push_port.to_string())
            .arg("--log-level")
            .arg("warn")
            .env("RUST_BACKTRACE", "0")
            .env_remove("SHOAL_APP_PORT")
            .env_remove("SHOAL_SUBSCRIPTIONS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start shoal-agent: {e}"));
        let mut agent = Agent {
            child,
            app_port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "shoal-agent exited at start ({status}):\n{}",
                    agent.log_text()
                );
            }
            if matches!(
                http("127.0.0.1", admin_port, "GET", "/readyz", &[], b""),
                Ok((200, _))
            ) {
                break;
            }
            if Instant::now() > deadline {
                panic!("shoal-agent not ready within 30s:\n{}", agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.app_port)
    }

    fn log_text(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        if lines.len() <= 200 {
            return log;
        }
        format!(
            "[first 100 and last 100 of {} lines]\n{}\n...\n{}",
            lines.len(),
            lines[..100].join("\n"),
            lines[lines.len() - 100..].join("\n")
        )
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        http("127.0.0.1", self.app_port, method, path, headers, body).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: no answer ({e}); agent log:\n{}",
                self.log_text()
            )
        })
    }

    /// Fails the test if the agent panicked anywhere, in a handler or a task.
    fn assert_no_panic(&self) {
        let log = self.log_text();
        assert!(!log.contains("panicked at"), "shoal-agent panicked:\n{log}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request over a fresh connection; returns the status and body.
fn http(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect((host, port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("no HTTP status in {text:?}"),
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Schemathesis settings the spec cannot carry: bounded long polls, the
/// never-ending event stream left out, request/reply's documented 5xx, and
/// a serializer for ndjson bodies.
const CONFIG: &str = r#"
hooks = "HOOKS"

[[operations]]
include-path = "/v1/subscriptions/{name}/messages"
parameters = { "query.wait" = "0s" }

[[operations]]
include-path = "/v1/subscriptions/{name}/events"
enabled = false

[[operations]]
include-path = "/v1/topics/{topic}/requests"
parameters = { "query.timeout" = "1s" }
checks.not_a_server_error.expected-statuses = ["1XX", "2XX", "3XX", "4XX", "502", "503", "504"]

# Declaring a subscription has rules across fields (backoff.max at least
# backoff.initial, deadLetterTopic other than topic) that the hooks'
# filter_body keeps out of generated valid bodies; the coverage phase does
# not run hooks, so it would report the documented 400s as valid data
# refused. The other phases still test these operations with every check.
[[operations]]
include-path = "/v1/subscriptions/{name}"
include-method = ["PUT", "POST"]
phases.coverage.enabled = false

# 413 (a body or batch over its limit) is a refusal too.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5XX"]
"#;

/// Hooks for what OpenAPI 3.0 cannot say:
///
/// - ndjson batch bodies: the spec can only call them a string, so
///   schemathesis would send the spec's example and random text, never
///   other ndjson. Every generated string body of the batch operation is
///   replaced here by real ndjson: 0 to 20 JSON values, one per line,
///   sometimes with blank lines, CRLF endings or a line that is not JSON (a
///   per-entry error), and the serializer sends it as it is.
/// - rules across fields of a subscription that docs/api.md documents and a
///   schema cannot express (`backoff.max` at least `backoff.initial`,
///   `deadLetterTopic` other than `topic`), and the names of CloudEvents
///   extension attributes (no `propertyNames` in OpenAPI 3.0): bodies
///   breaking them are not sent.
const HOOKS: &str = r#"
import json
import re
import schemathesis
from hypothesis import strategies as st

BATCH = "/v1/topics/{topic}/messages/batch"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
ndjson_line = json_values.map(lambda v: json.dumps(v, ensure_ascii=False)) | st.sampled_from(["", "   ", "not json", "{\"open\": "])
# At least one line that is not blank: an empty batch is refused.
ndjson_text = st.tuples(
    json_values.map(json.dumps),
    st.lists(ndjson_line, max_size=20),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
).map(lambda t: t[2].join([t[0]] + t[1]) + (t[2] if t[3] else ""))


# The spec's pattern for ndjson: a line that is not blank.
HAS_ENTRY = re.compile(r"[^\t\n\f\r \x1e]")

@schemathesis.hook
def flatmap_body(context, body):
    op = context.operation
    # Only text the schema allows is replaced: blank text (negative data)
    # is sent as it is.
    if op is not None and op.path == BATCH and isinstance(body, str) and HAS_ENTRY.search(body):
        return ndjson_text
    return st.just(body)

# Text is sent as it is. A value that is not text only comes from negative
# generation (the schema says string); written as JSON it would be a valid
# one-line batch, so it is sent as a body without entries instead, which
# the schema's pattern refuses and so must the agent.
@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return b"\n"

UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}

def seconds(d):
    if isinstance(d, bool):
        return None
    if isinstance(d, int):
        return d
    m = re.fullmatch(r"([0-9]+)(ms|s|m|h|d)?", d) if isinstance(d, str) else None
    return int(m.group(1)) * UNITS[m.group(2) or ""] if m else None

CE_ATTRIBUTES = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data", "data_base64", "partitionkey"}

@schemathesis.hook
def filter_body(context, body):
    op = context.operation
    if op is None or not isinstance(body, dict):
        return True
    if op.path == "/v1/topics/{topic}/messages":
        # A structured CloudEvent's extension attributes need names of
        # lowercase letters and digits (CloudEvents 1.0); OpenAPI 3.0 has no
        # propertyNames to say so.
        return all(k in CE_ATTRIBUTES or re.fullmatch(r"[a-z0-9]+", k) for k in body)
    if op.path != "/v1/subscriptions/{name}":
        return True
    backoff = body.get("backoff")
    if isinstance(backoff, dict):
        initial, most = seconds(backoff.get("initial")), seconds(backoff.get("max"))
        if initial is not None and most is not None and most < initial:
            return False
    dlq = body.get("deadLetterTopic")
    return dlq is None or dlq != body.get("topic")
"#;

#[test]
fn openapi_contract() {
    match Command::new("schemathesis").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`schemathesis --version` failed ({}): {}\nInstall it with: pip install -r .ci/python-requirements.txt",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "the `schemathesis` command is not available ({e}).\nInstall it with: pip install -r .ci/python-requirements.txt"
        ),
    }
    let agent = Agent::start();
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let hooks = work.path().join("hooks.py");
    fs::write(&hooks, HOOKS).unwrap_or_else(|e| panic!("writing hooks: {e}"));
    let config = work.path().join("schemathesis.toml");
    let hooks_text = hooks.display().to_string().replace('\\', "/");
    fs::write(&config, CONFIG.replace("HOOKS", &hooks_text))
        .unwrap_or_else(|e| panic!("writing config: {e}"));
    let spec = repo_root().join("docs/openapi.yaml");
    let max_examples =
        std::env::var("SHOAL_SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| "100".into());
    let seed = std::env::var("SHOAL_SCHEMATHESIS_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    let out_path = work.path().join("schemathesis.out");
    let out = fs::File::create(&out_path).unwrap_or_else(|e| panic!("output file: {e}"));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("output file: {e}"));
    let mut cmd = Command::new("schemathesis");
    cmd.current_dir(work.path())
        .arg("--config-file")
        .arg(&config)
        .arg("--no-color")
        .arg("run")
        .arg(&spec)
        .arg("--url")
        .arg(agent.url())
        .arg("--checks")
        .arg("all")
        .arg("--max-examples")
        .arg(&max_examples)
        .arg("--request-timeout")
        .arg("10")
        .arg("--generation-database")
        .arg("none")
        .arg("--suppress-health-check")
        .arg("all");
    if seed != "random" {
        cmd.arg("--seed").arg(&seed);
    }
    eprintln!("running: {cmd:?}");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run schemathesis: {e}"));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap_or_else(|e| panic!("waiting: {e}")) {
            break s;
        }
        if started.elapsed() > SCHEMATHESIS_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "schemathesis ran longer than {SCHEMATHESIS_LIMIT:?}:\n{}",
                fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = fs::read_to_string(&out_path).unwrap_or_default();
    eprintln!(
        "schemathesis finished in {:?} ({status})",
        started.elapsed()
    );
    assert!(
        status.success(),
        "schemathesis found problems ({status}):\n{output}\n--- agent log ---\n{}",
        agent.log_text()
    );
    agent.assert_no_panic();
    let (code, _) = agent.request("GET", "/v1/topics", &[], b"");
    assert_eq!(code, 200, "the agent stopped answering after the run");
}

/// Durations in publish headers are checked, never added unchecked to the clock.
#[test]
fn huge_publish_durations_are_refused_not_a_crash() {
    let agent = Agent::start();
    for header in ["Shoal-TTL", "Shoal-Delay"] {
        for value in [
            "18446744073709551615",
            "20000000000000000s",
            "500000000years",
        ] {
            let (code, body) = agent.request(
                "POST",
                "/v1/topics/durations/messages",
                &[(header, value), ("Content-Type", "text/plain")],
                b"x",
            );
            assert!(
                (200..500).contains(&code),
                "{header}: {value} got {code} {body}"
            );
        }
    }
    agent.assert_no_panic();
}

/// A nack delay from the app cannot stop the consumer group.
#[test]
fn huge_nack_delay_keeps_the_group_alive() {
    let agent = Agent::start();
    let (code, body) = agent.request(
        "PUT",
        "/v1/subscriptions/nacker",
        &[("Content-Type", "application/json")],
        br#"{"topic":"nacks","start":"earliest"}"#,
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = agent.request("POST", "/v1/topics/nacks/messages", &[], b"m");
    assert_eq!(code, 201, "{body}");
    let (code, body) = agent.request("GET", "/v1/subscriptions/nacker/messages?wait=5s", &[], b"");
    assert_eq!(code, 200, "{body}");
    let ack_id = body
        .split("\"ackid\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no ackid in {body}"))
        .to_string();
    let nack = format!(r#"{{"nack":["{ack_id}"],"delay":"18446744073709551615"}}"#);
    let (code, body) = agent.request(
        "POST",
        "/v1/subscriptions/nacker/acks",
        &[("Content-Type", "application/json")],
        nack.as_bytes(),
    );
    assert!((200..500).contains(&code), "nack got {code} {body}");
    let (code, body) = agent.request("GET", "/v1/subscriptions/nacker/messages?wait=0s", &[], b"");
    assert_eq!(code, 200, "pull after the nack got {code} {body}");
    agent.assert_no_panic();
}
