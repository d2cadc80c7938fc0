//! HTTP edges of the app API and the admin port: answers given before a
//! request body was read reach clients that write their whole request first,
//! and every 405 carries the `Allow` header.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::Method;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// 2 MiB: over the default 1 MiB limits of a message and of a JSON body.
const OVER_LIMIT: usize = 2 * 1024 * 1024;
/// 8 MiB: more than the kernel buffers between client and agent hold, so
/// the agent must read what it refused for the client to see the answer.
const BIG: usize = 8 * 1024 * 1024;

/// `host:port` of a client's base URL.
fn addr_of(c: &shoal_agent::client::AgentClient) -> String {
    c.base().trim_start_matches("http://").to_string()
}

/// Like Python's urllib and http.client: writes the whole request (head and
/// body, `chunked` or with a length) before reading a byte of the answer.
/// Returns the status and the body, or the I/O error the client got.
fn write_all_then_read(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    chunked: bool,
) -> std::io::Result<(u16, Value)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", body.len())
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"
    );
    s.write_all(head.as_bytes())?;
    if chunked {
        for chunk in body.chunks(64 * 1024) {
            s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
            s.write_all(chunk)?;
            s.write_all(b"\r\n")?;
        }
        s.write_all(b"0\r\n\r\n")?;
    } else {
        s.write_all(body)?;
    }
    s.flush()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("no complete answer in {text:?}"),
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(0);
    let chunked_answer = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked_answer {
        // One or more chunks: keep the data lines.
        let mut out = String::new();
        let mut lines = rest.split("\r\n");
        while let Some(size) = lines.next() {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(lines.next().unwrap_or(""));
        }
        out
    } else {
        rest.to_string()
    };
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    Ok((status, json))
}

fn expect_json_413(got: std::io::Result<(u16, Value)>, what: &str) {
    let (status, body) =
        got.unwrap_or_else(|e| panic!("{what}: the client never read an answer: {e}"));
    assert_eq!(status, 413, "{what}: got {status} {body}");
    assert_eq!(
        body["error"]["code"], "payload_too_large",
        "{what}: body {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: error without a message: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_limit_body_gets_a_readable_413_when_the_client_writes_it_all_first() {
    let dir = tempdir();
    // Batches get the same 1 MiB limit as messages here (16 MiB by default).
    let agent = start_agent(dir.path(), &["--max-batch-bytes", "1048576"]).await;
    let addr = addr_of(&agent.client);
    let big = vec![b'x'; OVER_LIMIT];
    let bigger = vec![b'x'; BIG];
    let mut json_body = b"{\"topic\":\"t\",\"pad\":\"".to_vec();
    json_body.resize(OVER_LIMIT, b' ');
    let cases: Vec<(&str, &str, &str, Vec<u8>, bool)> = vec![
        (
            "POST",
            "/v1/topics/big/messages",
            "application/octet-stream",
            big.clone(),
            false,
        ),
        (
            "POST",
            "/v1/topics/big/messages",
            "application/octet-stream",
            big.clone(),
            true,
        ),
        (
            "PUT",
            "/v1/subscriptions/big",
            "application/json",
            json_body.clone(),
            false,
        ),
        (
            "PUT",
            "/v1/subscriptions/big",
            "application/json",
            json_body,
            true,
        ),
        (
            "POST",
            "/v1/topics/big/messages",
            "application/octet-stream",
            bigger.clone(),
            false,
        ),
        (
            "POST",
            "/v1/topics/big/messages/batch",
            "application/x-ndjson",
            bigger,
            true,
        ),
        ("POST", "/v1/topics/big/requests", "text/plain", big, false),
    ];
    for (method, path, ct, body, chunked) in cases {
        let what = format!(
            "{method} {path} with {} bytes ({})",
            body.len(),
            if chunked { "chunked" } else { "Content-Length" }
        );
        let a = addr.clone();
        let (m, p, c) = (method.to_string(), path.to_string(), ct.to_string());
        let got = tokio::task::spawn_blocking(move || {
            write_all_then_read(&a, &m, &p, &c, &body, chunked)
        })
        .await
        .unwrap();
        expect_json_413(got, &what);
    }
    // Nothing was stored and the agent keeps serving.
    let r = agent.client.get("/v1/topics/big").await.unwrap();
    expect_error(
        &r,
        404,
        "topic_not_found",
        "the refused publishes stored nothing",
    );
    publish(&agent.client, "after", &[], "ok").await;
}

/// The case from the issue: Python's urllib sends the whole body before it
/// reads, and used to get "Broken pipe" instead of the 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_urllib_reads_the_413_of_an_over_limit_body() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!("python3 is not installed: skipping (the socket test covers the same case)");
        return;
    }
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let url = format!("{}/v1/topics/big/messages", agent.client.base());
    let script = r#"
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], data=b"x" * int(sys.argv[2]), method="POST",
                             headers={"Content-Type": "application/octet-stream"})
try:
    with urllib.request.urlopen(req, timeout=30) as r:
        print(r.status)
        print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code)
    print(e.read().decode())
"#;
    // 2 MiB may still fit in the kernel's socket buffers; 8 MiB did not, and
    // got "Broken pipe" before the fix.
    for size in [OVER_LIMIT, BIG] {
        let (url, size_arg) = (url.clone(), size.to_string());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("timeout")
                .args(["60", "python3", "-c", script, &url, &size_arg])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "python3 failed ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let (status, body) = stdout.split_once('\n').unwrap_or((&stdout, ""));
        let body: Value = serde_json::from_str(body.trim()).unwrap_or(Value::Null);
        expect_json_413(
            Ok((status.trim().parse().unwrap_or(0), body)),
            &format!("urllib POST of {size} bytes"),
        );
    }
}

fn allow_set(r: &shoal_agent::client::Reply, what: &str) -> BTreeSet<String> {
    let allow = r
        .headers
        .get("allow")
        .unwrap_or_else(|| panic!("{what}: 405 without an Allow header"))
        .to_str()
        .unwrap();
    allow
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_405_carries_an_allow_header_with_the_methods_the_route_serves() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    // Every route of docs/api.md, with the methods it serves. Names that do
    // not exist keep the served methods quick (404s, no streams, no waits).
    let routes: &[(&str, &[&str])] = &[
        ("/v1/cluster", &["GET"]),
        ("/v1/topics", &["GET"]),
        ("/v1/topics/t405", &["GET", "PUT", "POST", "DELETE"]),
        ("/v1/topics/t405/messages", &["POST"]),
        ("/v1/topics/t405/messages/batch", &["POST"]),
        ("/v1/topics/t405/requests", &["POST"]),
        ("/v1/subscriptions", &["GET"]),
        ("/v1/subscriptions/s405", &["GET", "PUT", "POST", "DELETE"]),
        ("/v1/subscriptions/s405/messages", &["GET"]),
        ("/v1/subscriptions/s405/acks", &["POST"]),
        ("/v1/subscriptions/s405/events", &["GET"]),
    ];
    let methods = [
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
    ];
    for (path, served) in routes {
        let served: BTreeSet<String> = served.iter().map(|m| m.to_string()).collect();
        for method in &methods {
            let what = format!("{method} {path}");
            if served.contains(method.as_str()) {
                // A served method is not refused as a method (the Allow header tells the truth).
                let body = if *method == Method::PUT || *method == Method::POST {
                    "{}"
                } else {
                    ""
                };
                let p = if path.ends_with("/messages") && *method == Method::GET {
                    format!("{path}?wait=0s")
                } else if path.ends_with("/requests") {
                    format!("{path}?timeout=1s")
                } else {
                    path.to_string()
                };
                let r = c
                    .call(
                        method.clone(),
                        &p,
                        &[("content-type", "application/json")],
                        body,
                    )
                    .await
                    .unwrap();
                assert_ne!(r.status.as_u16(), 405, "{what}: {}", r.text());
                continue;
            }
            let r = c.call(method.clone(), path, &[], "").await.unwrap();
            assert_eq!(r.status.as_u16(), 405, "{what}: {}", r.text());
            assert_eq!(allow_set(&r, &what), served, "{what}: Allow header");
            if *method != Method::HEAD {
                expect_error(&r, 405, "method_not_allowed", &what);
            }
        }
    }
    // The admin port serves GET only.
    for path in ["/metrics", "/livez", "/readyz"] {
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            let what = format!("admin {method} {path}");
            let r = agent.admin.call(method, path, &[], "").await.unwrap();
            assert_eq!(r.status.as_u16(), 405, "{what}: {}", r.text());
            let expected: BTreeSet<String> = ["GET".to_string()].into();
            assert_eq!(allow_set(&r, &what), expected, "{what}: Allow header");
        }
    }
}
