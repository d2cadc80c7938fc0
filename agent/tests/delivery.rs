//! Delivery through an in-process agent: pull, push and stream round trips,
//! consumer groups, order, redelivery, dead letters, TTL and delay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_round_trip_returns_cloudevents_with_ackid_and_ack_stops_redelivery() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    // A short ack timeout: were the ack ignored, the message would come back within ~0.5 s.
    put_sub(
        c,
        "p1",
        json!({"topic": "orders", "start": "earliest", "ackTimeout": "200ms",
               "backoff": {"initial": "50ms", "max": "100ms"}}),
    )
    .await;
    let published = publish(
        c,
        "orders",
        &[
            ("content-type", "application/json"),
            ("ce-type", "com.example.order.created"),
            ("ce-source", "/shop"),
            ("ce-subject", "order-7"),
            ("ce-tenant", "acme"),
            ("shoal-key", "customer-1"),
        ],
        r#"{"n":1}"#,
    )
    .await;
    let events = pull_n(c, "p1", 1).await;
    assert_eq!(
        events.len(),
        1,
        "one message published, one pulled: {events:?}"
    );
    let e = &events[0];
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["id"], published["id"]);
    assert_eq!(e["type"], "com.example.order.created");
    assert_eq!(e["source"], "/shop");
    assert_eq!(e["subject"], "order-7");
    assert_eq!(e["tenant"], "acme", "custom ce-* extension delivered back");
    assert_eq!(e["datacontenttype"], "application/json");
    assert_eq!(e["data"], json!({"n": 1}));
    assert_eq!(e["partitionkey"], "customer-1");
    assert_eq!(e["shoaltopic"], "orders");
    assert_eq!(e["shoalpartition"], published["partition"]);
    assert_eq!(e["shoaloffset"], published["offset"]);
    assert_eq!(e["shoaldeliveryattempt"], 1);
    assert!(
        e["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "time: {e}"
    );
    let id = ackid(e);
    ack(c, "p1", std::slice::from_ref(&id)).await;
    // Acked: not redelivered although the ack timeout passes several times.
    let again = pull(c, "p1", 10, "1500ms").await;
    assert!(again.is_empty(), "an acked message came back: {again:?}");
    // A second ack of the same id is reported unknown.
    let r = c
        .post_json("/v1/subscriptions/p1/acks", &json!({"ack": [id]}))
        .await
        .unwrap();
    expect_status(&r, 200, "second ack");
    assert_eq!(r.json()["acked"], 0);
    assert_eq!(r.json()["unknown"], json!([id]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_defaults_source_type_and_base64_for_binary_payloads() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    put_sub(c, "p2", json!({"topic": "raw", "start": "earliest"})).await;
    let bytes: Vec<u8> = (0..=255u8).collect();
    publish(
        c,
        "raw",
        &[("content-type", "application/octet-stream")],
        bytes.clone(),
    )
    .await;
    let e = &pull_n(c, "p2", 1).await[0];
    assert_eq!(e["source"], "/topics/raw");
    assert_eq!(e["type"], "io.shoal.message");
    assert!(
        e.get("data_base64").is_some(),
        "binary payload as data_base64: {e}"
    );
    assert_eq!(payload_of(e), bytes, "exact payload bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delivers_headers_and_exact_payload_and_2xx_acks() {
    let app = FakeApp::ok().await;
    let dir = tempdir();
    let agent = start_agent_with_app(dir.path(), app.port, &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "push1",
        json!({"topic": "events", "pushPath": "/hooks/events", "start": "earliest",
               "ackTimeout": "300ms", "backoff": {"initial": "50ms", "max": "100ms"}}),
    )
    .await;
    let bytes: Vec<u8> = (0..=255u8).rev().chain(0..=255u8).collect();
    let published = publish(
        c,
        "events",
        &[
            ("content-type", "application/octet-stream"),
            ("ce-type", "com.example.thing"),
            ("ce-source", "/things"),
            ("ce-traceparent", "00-abc-def-01"),
            ("shoal-key", "k1"),
        ],
        bytes.clone(),
    )
    .await;
    let p = app.recv("the push").await;
    assert_eq!(p.path, "/hooks/events");
    assert_eq!(
        &p.body[..],
        &bytes[..],
        "payload bytes are delivered exactly"
    );
    assert_eq!(p.header("ce-id"), published["id"].as_str().unwrap());
    assert_eq!(p.header("ce-source"), "/things");
    assert_eq!(p.header("ce-type"), "com.example.thing");
    assert_eq!(p.header("ce-specversion"), "1.0");
    assert_eq!(p.header("ce-traceparent"), "00-abc-def-01");
    assert!(
        p.header("ce-time").ends_with('Z'),
        "ce-time {}",
        p.header("ce-time")
    );
    assert_eq!(p.header("content-type"), "application/octet-stream");
    assert_eq!(p.header("shoal-topic"), "events");
    assert_eq!(p.header("shoal-subscription"), "push1");
    assert_eq!(
        p.header("shoal-partition"),
        published["partition"].to_string()
    );
    assert_eq!(p.header("shoal-offset"), published["offset"].to_string());
    assert_eq!(p.header("shoal-delivery-attempt"), "1");
    assert_eq!(p.header("shoal-key"), "k1");
    // 200 acked it: no redelivery although the ack timeout passes several times.
    app.expect_quiet(
        Duration::from_millis(1500),
        "a message the app answered 200 to",
    )
    .await;
    // And the group's committed offset moved past it.
    let partition = published["partition"].as_u64().unwrap() as usize;
    let next = published["offset"].as_u64().unwrap() + 1;
    wait_until("the push ack is committed", || async {
        let s = c.get("/v1/subscriptions/push1").await.unwrap().json();
        s["partitions"][partition]["committedOffset"].as_u64() == Some(next)
    })
    .await;

    // Defaults when the publisher gave no ce-* headers.
    publish(c, "events", &[], "plain").await;
    let p = app.recv("the second push").await;
    assert_eq!(p.header("ce-source"), "/topics/events");
    assert_eq!(p.header("ce-type"), "io.shoal.message");
    assert_eq!(p.text(), "plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_delivers_server_sent_events_acked_by_ackid() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "s1",
        json!({"topic": "ticks", "start": "earliest", "ackTimeout": "300ms",
               "backoff": {"initial": "50ms", "max": "100ms"}}),
    )
    .await;
    let mut sse = Sse::open(c, "s1").await;
    let mut sent = Vec::new();
    for i in 0..3 {
        let body = format!("tick-{i}");
        publish(
            c,
            "ticks",
            &[("content-type", "text/plain"), ("ce-type", "tick")],
            body.clone(),
        )
        .await;
        sent.push(body);
    }
    let mut got = Vec::new();
    let mut ids = Vec::new();
    while got.len() < 3 {
        let ev = sse.next("three stream events").await;
        assert_eq!(ev.event, "message", "event name: {ev:?}");
        let v: Value = serde_json::from_str(&ev.data).expect("data is a CloudEvent JSON");
        assert_eq!(ev.id, ackid(&v), "SSE id is the ack id");
        assert_eq!(v["type"], "tick");
        assert_eq!(v["shoaldeliveryattempt"], 1);
        got.push(text_of(&v));
        ids.push(ackid(&v));
    }
    got.sort();
    assert_eq!(got, sent);
    ack(c, "s1", &ids).await;
    // Acked: nothing more on the stream although the ack timeout passes.
    if let Some(ev) = sse.next_within(Duration::from_millis(1500)).await {
        panic!("an acked message was streamed again: {ev:?}");
    }
    // An unacked one comes back on the stream with attempt 2.
    publish(c, "ticks", &[("content-type", "text/plain")], "again").await;
    let first: Value = serde_json::from_str(&sse.next("the new event").await.data).unwrap();
    assert_eq!(text_of(&first), "again");
    let second: Value = serde_json::from_str(&sse.next("its redelivery").await.data).unwrap();
    assert_eq!(text_of(&second), "again");
    assert_eq!(second["shoaldeliveryattempt"], 2);
    assert_eq!(position(&first), position(&second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_group_shares_messages_and_other_groups_get_all() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    expect_status(
        &put_topic(c, "shared", json!({"partitions": 4})).await,
        201,
        "create topic",
    );
    for (name, group) in [("a1", "A"), ("a2", "A"), ("b1", "B")] {
        put_sub(
            c,
            name,
            json!({"topic": "shared", "group": group, "start": "earliest", "maxInFlight": 1000}),
        )
        .await;
    }
    let n = 40;
    let mut all = BTreeSet::new();
    for i in 0..n {
        let body = format!("m{i}");
        publish(
            c,
            "shared",
            &[("shoal-key", &format!("key-{i}"))],
            body.clone(),
        )
        .await;
        all.insert(body);
    }
    // Group A: two members, each message to exactly one of them.
    let mut a: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.values().map(Vec::len).sum::<usize>() < n {
        assert!(tokio::time::Instant::now() < deadline, "group A got {a:?}");
        for name in ["a1", "a2"] {
            let got = pull(c, name, 100, "200ms").await;
            if !got.is_empty() {
                ack(c, name, &got.iter().map(ackid).collect::<Vec<_>>()).await;
            }
            a.entry(name).or_default().extend(got.iter().map(text_of));
        }
    }
    let a1: BTreeSet<String> = a["a1"].iter().cloned().collect();
    let a2: BTreeSet<String> = a["a2"].iter().cloned().collect();
    assert_eq!(a1.len(), a["a1"].len(), "a1 got duplicates");
    assert_eq!(a2.len(), a["a2"].len(), "a2 got duplicates");
    assert!(
        a1.is_disjoint(&a2),
        "a message went to both members: {:?}",
        a1.intersection(&a2).collect::<Vec<_>>()
    );
    assert!(
        !a1.is_empty() && !a2.is_empty(),
        "both members share the work: a1 {a1:?} a2 {a2:?}"
    );
    let union: BTreeSet<String> = a1.union(&a2).cloned().collect();
    assert_eq!(union, all, "group A received every message");
    // Group B: its own copy of everything.
    let b: BTreeSet<String> = pull_ack_n(c, "b1", n).await.iter().map(text_of).collect();
    assert_eq!(b, all, "group B received every message");
    assert!(pull(c, "a1", 10, "300ms").await.is_empty());
    assert!(pull(c, "b1", 10, "300ms").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_goes_to_one_partition_in_offset_order() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "o1",
        json!({"topic": "ordered", "start": "earliest", "maxInFlight": 1000}),
    )
    .await;
    let mut partition = None;
    let mut last_offset = 0;
    for i in 0..50 {
        let r = publish(c, "ordered", &[("shoal-key", "same-key")], format!("{i}")).await;
        let p = r["partition"].as_u64().unwrap();
        assert_eq!(*partition.get_or_insert(p), p, "one key, one partition");
        let o = r["offset"].as_u64().unwrap();
        assert!(o > last_offset, "offsets grow: {o} after {last_offset}");
        last_offset = o;
    }
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 50 {
        assert!(tokio::time::Instant::now() < deadline, "got {seen:?}");
        let got = pull(c, "o1", 7, "300ms").await;
        if !got.is_empty() {
            ack(c, "o1", &got.iter().map(ackid).collect::<Vec<_>>()).await;
        }
        for e in &got {
            seen.push((position(e).1, text_of(e).parse::<u32>().unwrap()));
        }
    }
    let payloads: Vec<u32> = seen.iter().map(|s| s.1).collect();
    assert_eq!(
        payloads,
        (0..50).collect::<Vec<_>>(),
        "delivered in publish order"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "offsets ascend: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_push_retries_a_message_before_delivering_the_next() {
    let first_attempts = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = first_attempts.clone();
    // Fails the first attempt of message "1", answers 200 to everything else.
    let app = FakeApp::start(move |p| {
        if p.text() == "1" && seen.lock().unwrap().insert(p.text()) {
            AppReply::status(500)
        } else {
            AppReply::status(200)
        }
    })
    .await;
    let dir = tempdir();
    let agent = start_agent_with_app(dir.path(), app.port, &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "ord",
        json!({"topic": "seq", "pushPath": "/seq", "ordered": true, "start": "earliest",
               "backoff": {"initial": "50ms", "max": "100ms"}}),
    )
    .await;
    for i in 1..=5 {
        publish(c, "seq", &[("shoal-key", "k")], format!("{i}")).await;
    }
    let mut order = Vec::new();
    for _ in 0..6 {
        let p = app.recv("ordered pushes").await;
        order.push((p.text(), p.header("shoal-delivery-attempt").to_string()));
    }
    let expected: Vec<(String, String)> = [
        ("1", "1"),
        ("1", "2"),
        ("2", "1"),
        ("3", "1"),
        ("4", "1"),
        ("5", "1"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(
        order, expected,
        "message 2 must not arrive before message 1 is acked"
    );
    app.expect_quiet(Duration::from_millis(500), "all five were acked")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_timeout_and_nack_redeliver() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "slow",
        json!({"topic": "jobs", "start": "earliest", "ackTimeout": "500ms",
               "backoff": {"initial": "50ms", "max": "100ms"}}),
    )
    .await;
    publish(c, "jobs", &[("content-type", "text/plain")], "job").await;
    let first = pull_n(c, "slow", 1).await.remove(0);
    assert_eq!(first["shoaldeliveryattempt"], 1);
    // Not acked: after the ack timeout the same message comes again.
    let second = pull_n(c, "slow", 1).await.remove(0);
    assert_eq!(
        second["shoaldeliveryattempt"], 2,
        "redelivery after the ack timeout: {second}"
    );
    assert_eq!(second["id"], first["id"]);
    assert_eq!(position(&second), position(&first));
    assert_eq!(text_of(&second), "job");
    // Nack with a delay: not before the delay, then attempt 3.
    let r = c
        .post_json(
            "/v1/subscriptions/slow/acks",
            &json!({"nack": [ackid(&second)], "delay": "3s"}),
        )
        .await
        .unwrap();
    expect_status(&r, 200, "nack");
    assert_eq!(r.json()["nacked"], 1, "{}", r.text());
    assert!(
        pull(c, "slow", 10, "300ms").await.is_empty(),
        "a message nacked with a 3 s delay came back at once"
    );
    let third = pull_n(c, "slow", 1).await.remove(0);
    assert_eq!(third["shoaldeliveryattempt"], 3);
    assert_eq!(position(&third), position(&first));
    // Nack without delay: back at once.
    let r = c
        .post_json(
            "/v1/subscriptions/slow/acks",
            &json!({"nack": [ackid(&third)]}),
        )
        .await
        .unwrap();
    assert_eq!(r.json()["nacked"], 1, "{}", r.text());
    let fourth = pull_n(c, "slow", 1).await.remove(0);
    assert_eq!(fourth["shoaldeliveryattempt"], 4);
    ack(c, "slow", &[ackid(&fourth)]).await;
    assert!(
        pull(c, "slow", 10, "1s").await.is_empty(),
        "acked, yet redelivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliveries_and_422_dead_letter() {
    let app = FakeApp::start(|p| match p.path.as_str() {
        "/reject" => AppReply::status(422),
        _ => AppReply::status(500),
    })
    .await;
    let dir = tempdir();
    let agent = start_agent_with_app(dir.path(), app.port, &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "dlq-reader",
        json!({"topic": "dlq", "start": "earliest"}),
    )
    .await;
    put_sub(
        c,
        "failing",
        json!({"topic": "work", "pushPath": "/fail", "start": "earliest", "maxDeliveries": 2,
               "deadLetterTopic": "dlq", "backoff": {"initial": "50ms", "max": "100ms"}}),
    )
    .await;
    let published = publish(
        c,
        "work",
        &[("content-type", "text/plain"), ("ce-type", "w")],
        "poison",
    )
    .await;
    for attempt in ["1", "2"] {
        let p = app.recv("a failing push").await;
        assert_eq!(p.path, "/fail");
        assert_eq!(p.header("shoal-delivery-attempt"), attempt);
        assert_eq!(p.text(), "poison");
    }
    let dead = pull_n(c, "dlq-reader", 1).await.remove(0);
    assert_eq!(text_of(&dead), "poison");
    assert_eq!(dead["type"], "w", "attributes kept in the dead letter");
    assert_eq!(dead["shoaldlqreason"], "max_deliveries");
    assert_eq!(dead["shoaldlqtopic"], "work");
    // Numbers, like shoalpartition and shoaloffset.
    assert_eq!(dead["shoaldlqpartition"], published["partition"]);
    assert_eq!(dead["shoaldlqoffset"], published["offset"]);
    assert_eq!(dead["shoaldlqattempts"], 2);
    ack(c, "dlq-reader", &[ackid(&dead)]).await;
    app.expect_quiet(
        Duration::from_millis(600),
        "no third attempt after maxDeliveries 2",
    )
    .await;
    let partition = published["partition"].as_u64().unwrap() as usize;
    let next = published["offset"].as_u64().unwrap() + 1;
    wait_until("the dead-lettered message is committed", || async {
        let s = c.get("/v1/subscriptions/failing").await.unwrap().json();
        s["partitions"][partition]["committedOffset"].as_u64() == Some(next)
    })
    .await;

    // 422: dead-lettered after one attempt.
    put_sub(
        c,
        "rejecting",
        json!({"topic": "work2", "pushPath": "/reject", "start": "earliest", "maxDeliveries": 5,
               "deadLetterTopic": "dlq", "backoff": {"initial": "50ms", "max": "100ms"}}),
    )
    .await;
    publish(c, "work2", &[("content-type", "text/plain")], "bad-input").await;
    let p = app.recv("the rejected push").await;
    assert_eq!(p.path, "/reject");
    assert_eq!(p.header("shoal-delivery-attempt"), "1");
    let dead = pull_n(c, "dlq-reader", 1).await.remove(0);
    assert_eq!(text_of(&dead), "bad-input");
    assert_eq!(dead["shoaldlqreason"], "rejected");
    assert_eq!(dead["shoaldlqtopic"], "work2");
    assert_eq!(dead["shoaldlqattempts"], 1);
    app.expect_quiet(Duration::from_millis(600), "422 is final: no retry")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_not_delivered_and_delayed_ones_wait() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    publish(
        c,
        "ttl",
        &[("shoal-ttl", "1"), ("content-type", "text/plain")],
        "short-lived",
    )
    .await;
    publish(c, "ttl", &[("content-type", "text/plain")], "keeper").await;
    publish(
        c,
        "ttl",
        &[("shoal-ttl", "1m"), ("content-type", "text/plain")],
        "long-lived",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    put_sub(c, "ttl-sub", json!({"topic": "ttl", "start": "earliest"})).await;
    let mut got: Vec<String> = pull_ack_n(c, "ttl-sub", 2)
        .await
        .iter()
        .map(text_of)
        .collect();
    got.sort();
    assert_eq!(got, ["keeper", "long-lived"]);
    let more = pull(c, "ttl-sub", 10, "500ms").await;
    assert!(
        more.is_empty(),
        "an expired message was delivered: {more:?}"
    );

    put_sub(
        c,
        "delay-sub",
        json!({"topic": "later", "start": "earliest"}),
    )
    .await;
    let started = tokio::time::Instant::now();
    publish(
        c,
        "later",
        &[("shoal-delay", "2s"), ("content-type", "text/plain")],
        "delayed",
    )
    .await;
    publish(c, "later", &[("content-type", "text/plain")], "now").await;
    let first = pull_ack_n(c, "delay-sub", 1).await;
    assert_eq!(
        text_of(&first[0]),
        "now",
        "the undelayed message comes first"
    );
    let early = pull(c, "delay-sub", 10, "300ms").await;
    assert!(
        early.is_empty(),
        "a message delayed 2 s was delivered at once: {early:?}"
    );
    let late = pull_ack_n(c, "delay-sub", 1).await;
    assert_eq!(text_of(&late[0]), "delayed");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "delivered before its Shoal-Delay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_at_an_offset_or_a_time() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    expect_status(
        &put_topic(c, "starts", json!({"partitions": 1})).await,
        201,
        "create topic",
    );
    for i in 1..=5 {
        publish(
            c,
            "starts",
            &[("content-type", "text/plain")],
            format!("old{i}"),
        )
        .await;
    }
    // Publish times are in whole milliseconds: step past the last old one.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let boundary = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 1..=3 {
        publish(
            c,
            "starts",
            &[("content-type", "text/plain")],
            format!("new{i}"),
        )
        .await;
    }
    put_sub(
        c,
        "from-offset",
        json!({"topic": "starts", "start": {"offset": 3}}),
    )
    .await;
    let got: Vec<String> = pull_ack_n(c, "from-offset", 6)
        .await
        .iter()
        .map(text_of)
        .collect();
    assert_eq!(got, ["old3", "old4", "old5", "new1", "new2", "new3"]);
    put_sub(
        c,
        "from-time",
        json!({"topic": "starts", "start": {"time": boundary}}),
    )
    .await;
    let got: Vec<String> = pull_ack_n(c, "from-time", 3)
        .await
        .iter()
        .map(text_of)
        .collect();
    assert_eq!(got, ["new1", "new2", "new3"]);
    assert!(pull(c, "from-time", 10, "300ms").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_respects_max_and_max_in_flight() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "limited",
        json!({"topic": "many", "start": "earliest", "maxInFlight": 4}),
    )
    .await;
    for i in 0..10 {
        publish(c, "many", &[], format!("{i}")).await;
    }
    let first = pull(c, "limited", 3, "2s").await;
    assert!(
        !first.is_empty() && first.len() <= 3,
        "max=3 gave {}",
        first.len()
    );
    let mut held = first;
    while held.len() < 4 {
        let more = pull(c, "limited", 10, "1s").await;
        assert!(
            !more.is_empty(),
            "only {} of maxInFlight 4 handed out",
            held.len()
        );
        held.extend(more);
    }
    assert_eq!(held.len(), 4, "more than maxInFlight unacknowledged");
    let blocked = pull(c, "limited", 10, "300ms").await;
    assert!(
        blocked.is_empty(),
        "maxInFlight 4 exceeded: {} more",
        blocked.len()
    );
    ack(c, "limited", &[ackid(&held[0])]).await;
    let next = pull(c, "limited", 10, "2s").await;
    assert_eq!(next.len(), 1, "one ack frees one slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_on_partitions_added_later_are_delivered() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    expect_status(
        &put_topic(c, "growing", json!({"partitions": 1})).await,
        201,
        "create topic",
    );
    put_sub(c, "grow-latest", json!({"topic": "growing"})).await;
    put_sub(
        c,
        "grow-earliest",
        json!({"topic": "growing", "start": "earliest"}),
    )
    .await;
    // Both groups are live before the topic grows.
    publish(c, "growing", &[("content-type", "text/plain")], "warmup").await;
    for sub in ["grow-latest", "grow-earliest"] {
        let got: Vec<String> = pull_ack_n(c, sub, 1).await.iter().map(text_of).collect();
        assert_eq!(got, ["warmup"], "{sub}");
    }
    expect_status(
        &put_topic(c, "growing", json!({"partitions": 4})).await,
        200,
        "grow to 4",
    );
    let mut sent = BTreeSet::new();
    let mut partitions = BTreeSet::new();
    for i in 0..8 {
        let r = publish(
            c,
            "growing",
            &[("content-type", "text/plain")],
            format!("g{i}"),
        )
        .await;
        partitions.insert(r["partition"].as_u64().unwrap());
        sent.insert(format!("g{i}"));
    }
    assert_eq!(
        partitions.len(),
        4,
        "round robin reaches the new partitions"
    );
    for sub in ["grow-earliest", "grow-latest"] {
        let mut got = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.len() < sent.len() && tokio::time::Instant::now() < deadline {
            let batch = pull(c, sub, 100, "500ms").await;
            if !batch.is_empty() {
                ack(c, sub, &batch.iter().map(ackid).collect::<Vec<_>>()).await;
            }
            got.extend(batch.iter().map(text_of));
        }
        let state = c
            .get(&format!("/v1/subscriptions/{sub}"))
            .await
            .unwrap()
            .text();
        assert_eq!(
            got,
            sent,
            "{sub}: messages published to partitions added after the group started are lost; state {state}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_passing_after_the_subscription_fetched_the_message_still_drops_it() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    // The subscription exists first: the group fetches each message as it is stored.
    put_sub(c, "live", json!({"topic": "ttl-live", "start": "earliest"})).await;
    publish(
        c,
        "ttl-live",
        &[("shoal-ttl", "300ms"), ("content-type", "text/plain")],
        "short",
    )
    .await;
    publish(
        c,
        "ttl-live",
        &[
            ("shoal-ttl", "300ms"),
            ("shoal-delay", "1s"),
            ("content-type", "text/plain"),
        ],
        "delayed-past-its-ttl",
    )
    .await;
    publish(c, "ttl-live", &[("content-type", "text/plain")], "keeper").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got: Vec<String> = pull_ack_n(c, "live", 1).await.iter().map(text_of).collect();
    assert_eq!(got, ["keeper"]);
    let more = pull(c, "live", 10, "1500ms").await;
    assert!(
        more.is_empty(),
        "an expired message was delivered: {more:?}"
    );
    let metrics = agent.admin.get("/metrics").await.unwrap().text();
    assert!(
        metrics.contains("shoal_messages_expired_total{topic=\"ttl-live\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publishers_trace_context_reaches_the_subscriber() {
    let app = FakeApp::ok().await;
    let dir = tempdir();
    let agent = start_agent_with_app(dir.path(), app.port, &[]).await;
    let c = &agent.client;
    put_sub(
        c,
        "traced",
        json!({"topic": "orders", "pushPath": "/orders", "start": "earliest"}),
    )
    .await;
    put_sub(c, "pulled", json!({"topic": "orders", "start": "earliest"})).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    publish(
        c,
        "orders",
        &[("traceparent", parent), ("tracestate", "vendor=1")],
        "hello",
    )
    .await;
    let p = app.recv("the push").await;
    assert_eq!(
        p.header("traceparent"),
        parent,
        "W3C header for tracing middleware"
    );
    assert_eq!(p.header("tracestate"), "vendor=1");
    assert_eq!(
        p.header("ce-traceparent"),
        parent,
        "CloudEvents distributed tracing extension"
    );
    let got = pull_ack_n(c, "pulled", 1).await;
    assert_eq!(
        got[0]["traceparent"], parent,
        "pulled events carry it too: {}",
        got[0]
    );
    // Batches carry the request's trace context on every entry.
    let r = c
        .call(
            http::Method::POST,
            "/v1/topics/orders/messages/batch",
            &[
                ("content-type", "application/x-ndjson"),
                ("traceparent", parent),
            ],
            "{\"a\":1}\n{\"b\":2}\n",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..2 {
        assert_eq!(app.recv("a batch push").await.header("traceparent"), parent);
    }
    let bad = c
        .publish("orders", &[("traceparent", "00-zz-11-01")], "x")
        .await
        .unwrap();
    expect_error(&bad, 400, "invalid_header", "a malformed traceparent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_is_exported_per_group_and_partition() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    expect_status(
        &put_topic(c, "work", json!({"partitions": 2})).await,
        201,
        "create",
    );
    put_sub(c, "slow", json!({"topic": "work", "start": "earliest"})).await;
    for i in 0..6 {
        publish(c, "work", &[], format!("m{i}")).await;
    }
    let lag = |m: &str| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("shoal_consumer_lag_messages{") && l.contains("group=\"slow\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let m = metrics(&agent.admin).await;
    assert!(
        m.contains("shoal_consumer_lag_messages{topic=\"work\",group=\"slow\",partition=\"0\"} 3"),
        "{m}"
    );
    assert_eq!(lag(&m), 6.0);
    pull_ack_n(c, "slow", 6).await;
    wait_until(
        "the lag falls to zero once everything is acknowledged",
        || async { lag(&metrics(&agent.admin).await) == 0.0 },
    )
    .await;
}
