//! Transport-level contracts of the app API: h2c, IPv6 loopback, limits that
//! answer 429, and metrics without topic labels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn the_app_api_speaks_h2c_with_prior_knowledge() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), &[]).await;
    let addr = agent
        .client
        .base()
        .trim_start_matches("http://")
        .to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("an HTTP/2 handshake without upgrade (h2c prior knowledge)");
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}/v1/topics/h2/messages"))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"over h2c")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 201);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["topic"], "h2");
    assert!(body["offset"].as_u64().unwrap() >= 1);
    agent.stop().await;
}

#[tokio::test]
async fn the_app_api_listens_on_ipv6_loopback_when_the_host_has_it() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        // Not a pass by omission: the agent must still start and serve on 127.0.0.1.
        let dir = tempfile::tempdir().unwrap();
        let agent = start_agent(dir.path(), &["--app-addr", "127.0.0.1:0,[::1]:0"]).await;
        publish(&agent.client, "v4", &[], "x").await;
        eprintln!("this host has no IPv6 loopback: checked the IPv4 fallback only");
        agent.stop().await;
        return;
    }
    let port = std::net::TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let v6 = format!("[::1]:{port}");
    let agent = start_agent(dir.path(), &["--app-addr", &v6]).await;
    let client = shoal_agent::client::AgentClient::new(&format!("http://{v6}"));
    publish(&client, "v6", &[], "over ::1").await;
    agent.stop().await;
}

#[tokio::test]
async fn too_many_long_polls_get_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), &["--max-pull-waiters", "1"]).await;
    put_sub(&agent.client, "w", json!({"topic": "quiet"})).await;
    let waiting = {
        let c = agent.client.clone();
        tokio::spawn(async move { c.get("/v1/subscriptions/w/messages?wait=3s").await.unwrap() })
    };
    // The first long poll holds the only slot; a second one is refused.
    let deadline = tokio::time::Instant::now() + WAIT;
    let r = loop {
        let r = agent
            .client
            .get("/v1/subscriptions/w/messages?wait=0s")
            .await
            .unwrap();
        if r.status == 429 {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 429 while the only slot is taken"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    expect_error(&r, 429, "too_many_waiters", "second long poll");
    let stream = agent
        .client
        .get("/v1/subscriptions/w/events")
        .await
        .unwrap();
    expect_error(
        &stream,
        429,
        "too_many_waiters",
        "an event stream while the slot is taken",
    );
    assert_eq!(
        r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let first = waiting.await.unwrap();
    expect_status(&first, 200, "the first long poll ends normally");
    agent.stop().await;
}

#[tokio::test]
async fn topic_labels_can_be_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), &["--metrics-topic-labels", "false"]).await;
    publish(&agent.client, "secret-customer-topic", &[], "x").await;
    let metrics = agent.admin.get("/metrics").await.unwrap().text();
    assert!(
        !metrics.contains("secret-customer-topic"),
        "no topic name in metrics"
    );
    assert!(
        metrics.contains("shoal_messages_published_total{topic=\"_all\"} 1"),
        "published counted under _all:\n{metrics}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn the_agent_serves_after_a_client_vanishes_mid_request() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), &[]).await;
    let addr = agent
        .client
        .base()
        .trim_start_matches("http://")
        .to_string();
    // Announce a large body, send a little, hang up.
    {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(b"POST /v1/topics/t/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\npartial")
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    publish(&agent.client, "t", &[], "whole").await;
    agent.stop().await;
}

#[tokio::test]
async fn json_seq_batches_accept_record_separators() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), &[]).await;
    let body = "\u{1e}{\"n\":1}\n\u{1e}{\"n\":2}\n";
    let r = agent
        .client
        .call(
            http::Method::POST,
            "/v1/topics/seq/messages/batch",
            &[("content-type", "application/json-seq")],
            body,
        )
        .await
        .unwrap();
    expect_status(&r, 200, "json-seq batch");
    assert_eq!(r.json()["published"], 2, "{}", r.text());
    agent.stop().await;
}
