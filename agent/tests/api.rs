//! The app API of an in-process agent: dedupe, request/reply, batches, the
//! topics API, bad input, durable committed offsets, the admin port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_start_skips_older_messages_and_gets_newer_ones() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    // The subscription exists once PUT answered: a message published right
    // after must be delivered. Several rounds, since a lazily resolved start
    // position loses that race only sometimes.
    for round in 0..20 {
        let topic = format!("latest{round}");
        publish(c, &topic, &[("content-type", "text/plain")], "before").await;
        let sub = format!("late{round}");
        put_sub(c, &sub, json!({"topic": topic})).await;
        let after = publish(c, &topic, &[("content-type", "text/plain")], "after").await;
        let got = pull(c, &sub, 10, "2s").await;
        if got.is_empty() {
            let state = c
                .get(&format!("/v1/subscriptions/{sub}"))
                .await
                .unwrap()
                .text();
            panic!(
                "round {round}: the message published right after the subscription was declared \
                 ({after}) was never delivered; subscription state: {state}"
            );
        }
        let texts: Vec<String> = got.iter().map(text_of).collect();
        assert_eq!(texts, ["after"], "round {round}");
        ack(c, &sub, &[ackid(&got[0])]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_id_is_stored_once_also_across_a_restart() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    put_sub(c, "d", json!({"topic": "dedupe", "start": "earliest"})).await;
    let first = c
        .publish(
            "dedupe",
            &[("shoal-id", "order-42"), ("content-type", "text/plain")],
            "one",
        )
        .await
        .unwrap();
    expect_status(&first, 201, "first publish");
    let first = first.json();
    assert!(first.get("duplicate").is_none(), "{first}");
    let second = c
        .publish(
            "dedupe",
            &[("shoal-id", "order-42"), ("content-type", "text/plain")],
            "two",
        )
        .await
        .unwrap();
    expect_status(&second, 200, "repeated Shoal-Id");
    let second = second.json();
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["partition"], first["partition"]);
    assert_eq!(second["offset"], first["offset"]);
    assert_eq!(second["id"], "order-42");
    // ce-id deduplicates too.
    publish(
        c,
        "dedupe",
        &[("ce-id", "ev-1"), ("content-type", "text/plain")],
        "ce",
    )
    .await;
    let again = c
        .publish(
            "dedupe",
            &[("ce-id", "ev-1"), ("content-type", "text/plain")],
            "ce",
        )
        .await
        .unwrap();
    expect_status(&again, 200, "repeated ce-id");
    let got: Vec<String> = pull_ack_n(c, "d", 2).await.iter().map(text_of).collect();
    assert_eq!(got.iter().filter(|t| *t == "one").count(), 1, "{got:?}");
    assert!(got.contains(&"ce".to_string()), "{got:?}");
    let more = pull(c, "d", 10, "300ms").await;
    assert!(more.is_empty(), "a duplicate was stored: {more:?}");

    agent.stop().await;
    let agent = start_agent(dir.path(), &[]).await;
    let r = agent
        .client
        .publish(
            "dedupe",
            &[("shoal-id", "order-42"), ("content-type", "text/plain")],
            "three",
        )
        .await
        .unwrap();
    expect_status(&r, 200, "repeated Shoal-Id after a restart");
    let r = r.json();
    assert_eq!(r["duplicate"], true);
    assert_eq!(r["partition"], first["partition"]);
    assert_eq!(r["offset"], first["offset"]);
    let more = pull(&agent.client, "d", 10, "300ms").await;
    assert!(
        more.is_empty(),
        "a duplicate was stored after restart: {more:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_returns_the_apps_answer_or_504_or_503() {
    let app = FakeApp::start(|p| match p.path.as_str() {
        "/rpc" => AppReply::status(202)
            .header("x-answer", "forty-two")
            .header("content-type", "text/plain")
            .body(format!("pong:{}", p.text())),
        _ => AppReply::status(200).delay(Duration::from_secs(3)),
    })
    .await;
    let dir = tempdir();
    let agent = start_agent_with_app(dir.path(), app.port, &[]).await;
    let c = &agent.client;
    put_sub(c, "rpc", json!({"topic": "rpc", "pushPath": "/rpc"})).await;
    put_sub(c, "slow", json!({"topic": "slowrpc", "pushPath": "/slow"})).await;

    let r = c
        .call(
            Method::POST,
            "/v1/topics/rpc/requests?timeout=2s",
            &[("content-type", "text/plain"), ("ce-type", "ping")],
            "ping",
        )
        .await
        .unwrap();
    expect_status(&r, 202, "request answered by the app");
    assert_eq!(r.headers.get("x-answer").unwrap(), "forty-two");
    assert_eq!(r.text(), "pong:ping");
    let p = app.recv("the request").await;
    assert_eq!(p.path, "/rpc");
    assert_eq!(p.header("shoal-request"), "true");
    assert_eq!(p.header("ce-type"), "ping");
    assert_eq!(p.text(), "ping");
    assert!(
        p.headers.get("shoal-partition").is_none(),
        "a request is not stored"
    );
    assert!(
        p.headers.get("shoal-offset").is_none(),
        "a request has no offset"
    );

    let r = c
        .call(
            Method::POST,
            "/v1/topics/slowrpc/requests?timeout=500ms",
            &[],
            "x",
        )
        .await
        .unwrap();
    expect_error(
        &r,
        504,
        "request_timeout",
        "request to an app slower than the timeout",
    );

    let r = c
        .call(
            Method::POST,
            "/v1/topics/nobody/requests?timeout=1s",
            &[],
            "x",
        )
        .await
        .unwrap();
    expect_error(
        &r,
        503,
        "no_subscriber",
        "request without a push subscriber",
    );
    assert!(
        r.headers.get("retry-after").is_some(),
        "503 carries Retry-After"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_give_per_entry_results() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    put_sub(c, "nd", json!({"topic": "batch", "start": "earliest"})).await;
    let r = c
        .call(
            Method::POST,
            "/v1/topics/batch/messages/batch",
            &[("content-type", "application/x-ndjson")],
            "{\"a\":1}\nthis is not json\n{\"b\":2}\n",
        )
        .await
        .unwrap();
    expect_status(&r, 200, "ndjson batch");
    let v = r.json();
    assert_eq!(v["published"], 2, "{v}");
    assert_eq!(v["failed"], 1, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert!(results[0]["offset"].as_u64().is_some(), "{v}");
    assert_eq!(results[1]["error"]["code"], "invalid_json", "{v}");
    assert_eq!(results[1]["error"]["status"], 400, "{v}");
    assert!(results[2]["offset"].as_u64().is_some(), "{v}");
    let mut data: Vec<Value> = pull_ack_n(c, "nd", 2)
        .await
        .iter()
        .map(|e| e["data"].clone())
        .collect();
    data.sort_by_key(|d| d.to_string());
    assert_eq!(data, [json!({"a": 1}), json!({"b": 2})]);

    put_sub(c, "ce", json!({"topic": "cebatch", "start": "earliest"})).await;
    let batch = json!([
        {"specversion": "1.0", "id": "e1", "source": "/s", "type": "t", "partitionkey": "k1",
         "datacontenttype": "application/json", "data": {"x": 1}},
        {"specversion": "1.0", "id": "e2", "source": "/s", "type": "t", "partitionkey": "k1",
         "datacontenttype": "text/plain", "data": "two"},
        {"specversion": "1.0", "id": 5, "source": "/s", "type": "t"}
    ]);
    let send = || async {
        c.call(
            Method::POST,
            "/v1/topics/cebatch/messages/batch",
            &[("content-type", "application/cloudevents-batch+json")],
            batch.to_string(),
        )
        .await
        .unwrap()
    };
    let r = send().await;
    expect_status(&r, 200, "CloudEvents batch");
    let v = r.json();
    assert_eq!(v["published"], 2, "{v}");
    assert_eq!(v["failed"], 1, "{v}");
    let res = v["results"].as_array().unwrap();
    assert_eq!(res[0]["id"], "e1");
    assert_eq!(res[1]["id"], "e2");
    assert_eq!(
        res[0]["partition"], res[1]["partition"],
        "same partitionkey, same partition"
    );
    assert_eq!(
        res[1]["offset"].as_u64().unwrap(),
        res[0]["offset"].as_u64().unwrap() + 1
    );
    assert_eq!(res[2]["error"]["code"], "invalid_event", "{v}");
    // The same batch again: ids dedupe.
    let v2 = send().await.json();
    assert_eq!(v2["results"][0]["duplicate"], true, "{v2}");
    assert_eq!(v2["results"][0]["offset"], res[0]["offset"]);
    assert_eq!(v2["results"][1]["duplicate"], true, "{v2}");
    let events = pull_ack_n(c, "ce", 2).await;
    let e1 = events
        .iter()
        .find(|e| e["id"] == "e1")
        .expect("e1 delivered");
    let e2 = events
        .iter()
        .find(|e| e["id"] == "e2")
        .expect("e2 delivered");
    assert_eq!(e1["data"], json!({"x": 1}));
    assert_eq!(e1["partitionkey"], "k1");
    assert_eq!(e1["source"], "/s");
    assert_eq!(e1["type"], "t");
    assert_eq!(e2["data"], "two");
    assert!(
        pull(c, "ce", 10, "300ms").await.is_empty(),
        "duplicates were stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_api_creates_configures_lists_and_deletes() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    let r = put_topic(c, "t10", json!({"partitions": 3})).await;
    expect_status(&r, 201, "create");
    assert_eq!(r.json()["partitions"], 3);
    assert_eq!(r.json()["name"], "t10");
    assert_eq!(r.json()["kind"], "durable");
    expect_status(
        &put_topic(c, "t10", json!({"partitions": 3})).await,
        200,
        "same again",
    );
    expect_error(
        &put_topic(c, "t10", json!({"partitions": 2})).await,
        409,
        "partitions_decrease",
        "shrink",
    );
    expect_error(
        &put_topic(c, "t10", json!({"kind": "ephemeral"})).await,
        409,
        "kind_change",
        "kind change",
    );
    let grown = put_topic(c, "t10", json!({"partitions": 5})).await;
    expect_status(&grown, 200, "grow");
    assert_eq!(grown.json()["partitions"], 5);
    let got = c.get("/v1/topics/t10").await.unwrap();
    expect_status(&got, 200, "GET topic");
    assert_eq!(got.json()["partitions"], 5);
    assert_eq!(
        got.json()["stats"]["partitions"].as_array().unwrap().len(),
        5
    );
    let list = c.get("/v1/topics").await.unwrap();
    expect_status(&list, 200, "list");
    assert!(
        list.json()["topics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "t10"),
        "{}",
        list.text()
    );
    put_sub(c, "uses-t10", json!({"topic": "t10"})).await;
    let r = c
        .call(Method::DELETE, "/v1/topics/t10", &[], "")
        .await
        .unwrap();
    expect_error(&r, 409, "topic_in_use", "delete a topic in use");
    let r = c
        .call(Method::DELETE, "/v1/subscriptions/uses-t10", &[], "")
        .await
        .unwrap();
    expect_status(&r, 204, "delete subscription");
    let r = c
        .call(Method::DELETE, "/v1/topics/t10", &[], "")
        .await
        .unwrap();
    expect_status(&r, 204, "delete topic");
    assert!(
        !dir.path().join("topics/t10").exists(),
        "topic data left behind"
    );
    expect_error(
        &c.get("/v1/topics/t10").await.unwrap(),
        404,
        "topic_not_found",
        "GET deleted",
    );
    let r = c
        .call(Method::DELETE, "/v1/topics/t10", &[], "")
        .await
        .unwrap();
    expect_error(&r, 404, "topic_not_found", "delete twice");
    expect_error(
        &c.get("/v1/topics/never").await.unwrap(),
        404,
        "topic_not_found",
        "GET unknown",
    );
    let r = c
        .call(Method::DELETE, "/v1/subscriptions/never", &[], "")
        .await
        .unwrap();
    expect_error(
        &r,
        404,
        "subscription_not_found",
        "delete unknown subscription",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_topic_fans_out_and_stores_nothing() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    let r = put_topic(c, "eph", json!({"kind": "ephemeral", "partitions": 2})).await;
    expect_status(&r, 201, "create ephemeral");
    assert_eq!(r.json()["kind"], "ephemeral");
    assert_eq!(r.json()["replicas"], 0);
    put_sub(c, "e1", json!({"topic": "eph", "start": "earliest"})).await;
    put_sub(c, "e2", json!({"topic": "eph", "start": "earliest"})).await;
    let sent: BTreeSet<String> = (0..5).map(|i| format!("e{i}")).collect();
    for m in &sent {
        publish(c, "eph", &[("content-type", "text/plain")], m.clone()).await;
    }
    for sub in ["e1", "e2"] {
        let got: BTreeSet<String> = pull_ack_n(c, sub, 5).await.iter().map(text_of).collect();
        assert_eq!(got, sent, "{sub} gets every message");
    }
    agent.stop().await;
    let mut files = Vec::new();
    let mut stack = vec![dir.path().join("topics/eph")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files.push(
                    e.path()
                        .strip_prefix(dir.path())
                        .unwrap()
                        .display()
                        .to_string(),
                );
            }
        }
    }
    files.sort();
    assert_eq!(
        files,
        ["topics/eph/topic.json", "topics/eph/version"],
        "an ephemeral topic wrote data (only its configuration and catalog version belong on disk)"
    );
}

#[tokio::test]
async fn a_client_only_agent_with_no_mesh_refuses_publishes_and_stores_nothing() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &["--broker", "false"]).await;
    let c = &agent.client;
    let r = c
        .publish("jobs", &[("content-type", "text/plain")], "a Job's result")
        .await
        .unwrap();
    expect_error(
        &r,
        503,
        "no_broker",
        "publish through a client-only agent alone",
    );
    assert!(
        r.headers.get("retry-after").is_some(),
        "a no_broker answer says when to retry"
    );
    let m = metrics(&agent.admin).await;
    assert_eq!(
        series_value(&m, "shoal_api_errors_total{code=\"no_broker\"}"),
        Some(1.0),
        "the refusal is counted"
    );
    agent.stop().await;
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                assert!(
                    path.extension().is_none_or(|x| x != "log"),
                    "a client-only agent wrote a segment: {}",
                    path.display()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_overrun_by_an_ephemeral_ring_counts_what_it_skipped() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    let r = put_topic(c, "burst", json!({"kind": "ephemeral", "partitions": 1})).await;
    expect_status(&r, 201, "create ephemeral");
    put_sub(c, "slow", json!({"topic": "burst", "start": "earliest"})).await;
    // More than the ring holds, published while the group reads nothing.
    let total = shoal_agent::topic::EPHEMERAL_CAPACITY_ENTRIES + 2_500;
    let lines: Vec<String> = (0..total).map(|i| format!("{{\"n\":{i}}}")).collect();
    for chunk in lines.chunks(500) {
        let r = c
            .call(
                Method::POST,
                "/v1/topics/burst/messages/batch",
                &[("content-type", "application/x-ndjson")],
                chunk.join("\n"),
            )
            .await
            .unwrap();
        expect_status(&r, 200, "ndjson batch");
        assert_eq!(r.json()["published"], chunk.len(), "{}", r.json());
    }
    let mut received = 0;
    loop {
        let got = pull(c, "slow", 1000, "300ms").await;
        if got.is_empty() {
            break;
        }
        received += got.len();
        let ids: Vec<String> = got.iter().map(ackid).collect();
        ack(c, "slow", &ids).await;
    }
    let text = metrics(&agent.admin).await;
    let overrun = series_value(
        &text,
        "shoal_messages_dropped_total{topic=\"burst\",reason=\"overrun\"}",
    )
    .unwrap_or(0.0) as usize;
    assert!(overrun > 0, "the ring overran the group: {text}");
    assert!(received > 0, "the group reads what the ring still holds");
    assert_eq!(
        received + overrun,
        total,
        "every message is delivered or counted as skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_documented_errors_and_the_agent_keeps_serving() {
    let app = FakeApp::ok().await;
    let dir = tempdir();
    let agent = start_agent_with_app(dir.path(), app.port, &["--max-message-bytes", "1024"]).await;
    let c = &agent.client;
    let json_ct = [("content-type", "application/json")];
    let still_serving = || async {
        publish(c, "alive", &[], "ok").await;
    };

    let r = c
        .call(
            Method::PUT,
            "/v1/subscriptions/s1",
            &json_ct,
            "{\"topic\": ",
        )
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_json", "malformed JSON subscription");
    still_serving().await;
    let r = c
        .call(
            Method::PUT,
            "/v1/subscriptions/s1",
            &json_ct,
            "{\"topic\":\"t\",\"bogus\":1}",
        )
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_json", "unknown subscription field");
    let r = c
        .call(Method::PUT, "/v1/subscriptions/s1", &json_ct, "")
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_json", "empty subscription body");

    let long = "x".repeat(201);
    for bad in ["bad%20name", "-x", long.as_str()] {
        let r = put_topic(c, bad, json!({})).await;
        expect_error(&r, 400, "invalid_name", &format!("topic name {bad:?}"));
        let r = c.publish(bad, &[], "x").await.unwrap();
        expect_error(&r, 400, "invalid_name", &format!("publish to {bad:?}"));
        let r = c
            .put_json(&format!("/v1/subscriptions/{bad}"), &json!({"topic": "t"}))
            .await
            .unwrap();
        expect_error(
            &r,
            400,
            "invalid_name",
            &format!("subscription name {bad:?}"),
        );
    }
    let ok200 = "x".repeat(200);
    expect_status(
        &put_topic(c, &ok200, json!({})).await,
        201,
        "200-character name",
    );
    still_serving().await;

    let r = c
        .get("/v1/subscriptions/nope/messages?wait=100ms")
        .await
        .unwrap();
    expect_error(
        &r,
        404,
        "subscription_not_found",
        "pull unknown subscription",
    );
    let r = c.get("/v1/subscriptions/nope").await.unwrap();
    expect_error(
        &r,
        404,
        "subscription_not_found",
        "GET unknown subscription",
    );
    let r = c
        .post_json("/v1/subscriptions/nope/acks", &json!({"ack": ["0-1-1"]}))
        .await
        .unwrap();
    expect_error(
        &r,
        404,
        "subscription_not_found",
        "ack unknown subscription",
    );

    let r = c.publish("big", &[], vec![b'x'; 1025]).await.unwrap();
    expect_error(&r, 413, "payload_too_large", "oversized message");
    expect_status(
        &c.publish("big", &[], vec![b'x'; 1024]).await.unwrap(),
        201,
        "message at the limit",
    );
    still_serving().await;

    let r = c
        .call(
            Method::PUT,
            "/v1/topics/xml",
            &[("content-type", "text/xml")],
            "<topic/>",
        )
        .await
        .unwrap();
    expect_error(&r, 415, "unsupported_media_type", "PUT topic as text/xml");
    let r = c
        .call(
            Method::POST,
            "/v1/topics/alive/messages/batch",
            &[("content-type", "text/plain")],
            "a\nb\n",
        )
        .await
        .unwrap();
    expect_error(&r, 415, "unsupported_media_type", "batch as text/plain");

    put_sub(c, "pl", json!({"topic": "alive"})).await;
    let r = c.get("/v1/topics?foo=1").await.unwrap();
    expect_error(&r, 400, "unknown_parameter", "list topics with ?foo");
    let r = c
        .get("/v1/subscriptions/pl/messages?bogus=1")
        .await
        .unwrap();
    expect_error(&r, 400, "unknown_parameter", "pull with ?bogus");
    let r = c
        .get("/v1/subscriptions/pl/messages?wait=forever")
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_parameter", "wait=forever");
    let r = c.get("/v1/subscriptions/pl/messages?max=0").await.unwrap();
    expect_error(&r, 400, "invalid_parameter", "max=0");
    let r = c
        .get("/v1/subscriptions/pl/messages?max=1001")
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_parameter", "max=1001");
    let r = c
        .post_json("/v1/subscriptions/pl/acks", &json!({"ack": [], "nack": []}))
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_json", "ack without ids");
    let r = c
        .post_json("/v1/subscriptions/pl/acks", &json!({"acks": ["0-1-1"]}))
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_json", "ack with a misspelled field");

    put_sub(c, "pusher", json!({"topic": "alive", "pushPath": "/p"})).await;
    let r = c
        .get("/v1/subscriptions/pusher/messages?wait=100ms")
        .await
        .unwrap();
    expect_error(&r, 409, "push_subscription", "pull on a push subscription");
    let r = c.get("/v1/subscriptions/pusher/events").await.unwrap();
    expect_error(
        &r,
        409,
        "push_subscription",
        "stream on a push subscription",
    );
    let r = c
        .put_json("/v1/subscriptions/pl", &json!({"topic": "other"}))
        .await
        .unwrap();
    expect_error(
        &r,
        409,
        "subscription_exists",
        "changing a subscription's topic",
    );
    let r = c
        .put_json(
            "/v1/subscriptions/bad-ack",
            &json!({"topic": "t", "ackTimeout": "10ms"}),
        )
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_subscription", "ackTimeout below 100ms");

    let r = c.get("/v2/whatever").await.unwrap();
    expect_error(&r, 404, "route_not_found", "unknown route");
    let r = c
        .call(Method::DELETE, "/v1/topics/alive/messages", &[], "")
        .await
        .unwrap();
    expect_error(&r, 405, "method_not_allowed", "DELETE on messages");
    let r = c.call(Method::PATCH, "/v1/topics", &[], "").await.unwrap();
    expect_error(&r, 405, "method_not_allowed", "PATCH on topics");

    for ttl in ["soon", "0", "-5"] {
        let r = c
            .publish("alive", &[("shoal-ttl", ttl)], "x")
            .await
            .unwrap();
        expect_error(&r, 400, "invalid_header", &format!("Shoal-TTL {ttl:?}"));
    }
    let r = c
        .publish("alive", &[("shoal-delay", "tomorrow")], "x")
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_header", "Shoal-Delay tomorrow");
    let r = c
        .publish("alive", &[("ce-specversion", "0.3")], "x")
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_event", "ce-specversion 0.3");
    let r = c
        .publish(
            "alive",
            &[("content-type", "application/cloudevents+json")],
            "{oops",
        )
        .await
        .unwrap();
    expect_error(&r, 400, "invalid_json", "broken structured CloudEvent");

    still_serving().await;
    let r = agent.admin.get("/livez").await.unwrap();
    expect_status(&r, 200, "livez after bad input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_a_graceful_restart() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "dur",
        json!({"topic": "durable", "start": "earliest", "maxInFlight": 100}),
    )
    .await;
    for i in 1..=10 {
        publish(
            c,
            "durable",
            &[("shoal-key", "one"), ("content-type", "text/plain")],
            format!("{i}"),
        )
        .await;
    }
    let events = pull_n(c, "dur", 10).await;
    let by_text = |t: &str| events.iter().find(|e| text_of(e) == t).map(ackid).unwrap();
    // Ack 1-4 and 6; leave 5 and 7-10 unacknowledged.
    let acked: Vec<String> = ["1", "2", "3", "4", "6"]
        .iter()
        .map(|t| by_text(t))
        .collect();
    ack(c, "dur", &acked).await;
    agent.stop().await;

    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    let mut again: Vec<String> = Vec::new();
    loop {
        let got = pull(c, "dur", 100, "1s").await;
        if got.is_empty() {
            break;
        }
        ack(c, "dur", &got.iter().map(ackid).collect::<Vec<_>>()).await;
        again.extend(got.iter().map(text_of));
        assert!(
            again.len() <= 10,
            "more redeliveries than messages: {again:?}"
        );
    }
    for t in ["1", "2", "3", "4"] {
        assert!(
            !again.contains(&t.to_string()),
            "acked and committed message {t} redelivered: {again:?}"
        );
    }
    for t in ["5", "7", "8", "9", "10"] {
        assert!(
            again.contains(&t.to_string()),
            "unacked message {t} lost across the restart: {again:?}"
        );
    }
    let unique: BTreeSet<&String> = again.iter().collect();
    assert_eq!(
        unique.len(),
        again.len(),
        "delivered twice after the restart: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_answers_probes_and_metrics() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let a = &agent.admin;
    let r = a.get("/livez").await.unwrap();
    expect_status(&r, 200, "livez");
    let r = a.get("/readyz").await.unwrap();
    expect_status(&r, 200, "readyz");
    publish(&agent.client, "measured", &[], "x").await;
    let text = metrics(a).await;
    for name in [
        "shoal_messages_published_total",
        "shoal_publish_duration_seconds_bucket",
        "process_resident_memory_bytes",
        "shoal_http_requests_total",
    ] {
        assert!(
            metric_value(&text, name).is_some(),
            "/metrics lacks {name}:\n{text}"
        );
    }
    assert!(
        metric_value(&text, "shoal_messages_published_total").unwrap() >= 1.0,
        "the publish is counted"
    );
    assert!(
        text.contains("topic=\"measured\""),
        "topic label on metrics"
    );
    assert!(metric_value(&text, "process_resident_memory_bytes").unwrap() > 0.0);
    // A method the app made up is counted as `other`, so apps cannot grow
    // the label set.
    let brew = http::Method::from_bytes(b"BREW").unwrap();
    let r = agent
        .client
        .call(brew, "/v1/topics/measured/messages", &[], "")
        .await
        .unwrap();
    expect_status(&r, 405, "an unknown method");
    let text = metrics(a).await;
    assert!(text.contains("method=\"other\""), "{text}");
    assert!(!text.contains("BREW"), "{text}");
    // Known outcomes exist at 0 before their first event.
    assert!(
        text.contains("shoal_request_reply_exchanges_total{outcome=\"request_timeout\"} 0\n"),
        "{text}"
    );
    let r = a.get("/nothing").await.unwrap();
    expect_status(&r, 404, "unknown admin route");
    let r = a.call(Method::POST, "/metrics", &[], "").await.unwrap();
    expect_status(&r, 405, "POST /metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_forgets_ids_after_the_topic_window() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    expect_status(
        &put_topic(c, "short-window", json!({"dedupeWindow": "1s"})).await,
        201,
        "create",
    );
    let first = publish(c, "short-window", &[("shoal-id", "x")], "a").await;
    let dup = c
        .publish("short-window", &[("shoal-id", "x")], "a")
        .await
        .unwrap();
    expect_status(&dup, 200, "inside the window");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let later = publish(c, "short-window", &[("shoal-id", "x")], "a").await;
    assert!(later.get("duplicate").is_none(), "{later}");
    assert_ne!(
        (later["partition"].clone(), later["offset"].clone()),
        (first["partition"].clone(), first["offset"].clone()),
        "stored anew after the window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeclared_subscription_resumes_its_groups_committed_offsets() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "r1",
        json!({"topic": "resume", "group": "G", "start": "earliest"}),
    )
    .await;
    for i in 0..4 {
        publish(
            c,
            "resume",
            &[("shoal-key", "k"), ("content-type", "text/plain")],
            format!("{i}"),
        )
        .await;
    }
    let got: Vec<String> = pull_ack_n(c, "r1", 4).await.iter().map(text_of).collect();
    assert_eq!(got, ["0", "1", "2", "3"]);
    let r = c
        .call(Method::DELETE, "/v1/subscriptions/r1", &[], "")
        .await
        .unwrap();
    expect_status(&r, 204, "delete subscription");
    publish(
        c,
        "resume",
        &[("shoal-key", "k"), ("content-type", "text/plain")],
        "4",
    )
    .await;
    put_sub(
        c,
        "r2",
        json!({"topic": "resume", "group": "G", "start": "earliest"}),
    )
    .await;
    let got: Vec<String> = pull_ack_n(c, "r2", 1).await.iter().map(text_of).collect();
    assert_eq!(
        got,
        ["4"],
        "the group resumes where it was, not from earliest"
    );
    assert!(pull(c, "r2", 10, "300ms").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_group_holds_publishers_at_max_backlog() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    let r = put_topic(c, "capped", json!({"partitions": 1, "maxBacklog": 5})).await;
    expect_status(&r, 201, "create capped");
    assert_eq!(r.json()["maxBacklog"], 5);
    expect_error(
        &put_topic(c, "zero", json!({"maxBacklog": 0})).await,
        400,
        "invalid_config",
        "maxBacklog 0",
    );
    // Without a consumer group nothing is behind: no limit.
    for i in 0..7 {
        publish(c, "capped", &[], format!("early-{i}")).await;
    }
    put_sub(c, "slow", json!({"topic": "capped", "start": "latest"})).await;
    for i in 0..5 {
        publish(c, "capped", &[], format!("m{i}")).await;
    }
    let r = c.publish("capped", &[], "one too many").await.unwrap();
    expect_error(&r, 429, "backlog_full", "publish past maxBacklog");
    assert!(r.headers.contains_key("retry-after"));
    // The group catches up by three: three more fit.
    let got = pull_ack_n(c, "slow", 3).await;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        ["m0", "m1", "m2"]
    );
    for i in 5..8 {
        publish(c, "capped", &[], format!("m{i}")).await;
    }
    expect_error(
        &c.publish("capped", &[], "again").await.unwrap(),
        429,
        "backlog_full",
        "full again",
    );
    // A deleted subscription's group holds nobody back.
    let r = c
        .call(http::Method::DELETE, "/v1/subscriptions/slow", &[], "")
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());
    publish(c, "capped", &[], "free").await;
}
