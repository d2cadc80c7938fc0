//! Durability with real files and the real binary: kill -9 under load,
//! damaged segment files, graceful stop by SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use shoal_agent::client::AgentClient;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// (partition, offset) -> payload, as read back.
type Stored = BTreeMap<(u64, u64), String>;

/// Next offset of every partition of `topic`, from the topics API.
async fn next_offsets(c: &AgentClient, topic: &str) -> BTreeMap<u64, (u64, u64)> {
    let r = c.get(&format!("/v1/topics/{topic}")).await.unwrap();
    expect_status(&r, 200, "GET topic");
    r.json()["stats"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_u64().unwrap(),
                (
                    p["firstOffset"].as_u64().unwrap(),
                    p["nextOffset"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// Reads a subscription until every partition reached its end, given as
/// partition -> (first offset to expect, next offset), acking as it goes;
/// fails on a repeated position or a partition delivered out of order.
async fn read_all(c: &AgentClient, sub: &str, ends: &BTreeMap<u64, (u64, u64)>) -> Stored {
    let mut stored = Stored::new();
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    // Done once every partition's last offset arrived (order is checked below).
    let done = |stored: &Stored| {
        ends.iter()
            .all(|(p, (from, next))| from >= next || stored.contains_key(&(*p, *next - 1)))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(&stored) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sub}: read {} messages, not up to the ends {ends:?}; last per partition {last:?}",
            stored.len()
        );
        let got = pull(c, sub, 1000, "500ms").await;
        if got.is_empty() {
            continue;
        }
        ack(c, sub, &got.iter().map(ackid).collect::<Vec<_>>()).await;
        for e in &got {
            let (p, o) = position(e);
            if let Some(prev) = last.get(&p) {
                assert!(
                    o > *prev,
                    "{sub}: partition {p} delivered offset {o} after {prev}"
                );
            }
            last.insert(p, o);
            let before = stored.insert((p, o), text_of(e));
            assert!(
                before.is_none(),
                "{sub}: partition {p} offset {o} delivered twice"
            );
        }
    }
    let extra = pull(c, sub, 1000, "300ms").await;
    assert!(extra.is_empty(), "{sub}: messages past the end: {extra:?}");
    stored
}

fn read_offsets_file(dir: &Path, topic: &str, partition: u64) -> BTreeMap<String, u64> {
    let file = dir.join(format!("topics/{topic}/{partition}/offsets.json"));
    match std::fs::read(&file) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_message() {
    let dir = tempdir();
    let mut agent = spawn_agent(dir.path(), &[]).await;
    let c = agent.client.clone();
    expect_status(
        &put_topic(&c, "crash", json!({"partitions": 4})).await,
        201,
        "create topic",
    );
    put_sub(
        &c,
        "cg",
        json!({"topic": "crash", "start": "earliest", "maxInFlight": 1000}),
    )
    .await;

    // Phase 1: a consumer group acks part of what was published.
    let mut recorded: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for i in 0..200 {
        let body = format!("pre-{i}");
        let r = publish(
            &c,
            "crash",
            &[("shoal-key", &format!("key-{}", i % 37))],
            body.clone(),
        )
        .await;
        recorded.insert(
            (
                r["partition"].as_u64().unwrap(),
                r["offset"].as_u64().unwrap(),
            ),
            body,
        );
    }
    let mut group_acked = 0;
    while group_acked < 100 {
        let got = pull(&c, "cg", 50, "1s").await;
        if !got.is_empty() {
            ack(&c, "cg", &got.iter().map(ackid).collect::<Vec<_>>()).await;
        }
        group_acked += got.len();
    }
    // Wait until the group's commits are checkpointed (every --fsync-interval);
    // after that nothing is acked, so the checkpoint is the exact resume point.
    let sub = c.get("/v1/subscriptions/cg").await.unwrap().json();
    let committed: BTreeMap<u64, u64> = sub["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_u64().unwrap(),
                p["committedOffset"].as_u64().unwrap(),
            )
        })
        .collect();
    let data_dir = dir.path().to_path_buf();
    wait_until("the group's committed offsets are checkpointed", || {
        let committed = committed.clone();
        let data_dir = data_dir.clone();
        async move {
            committed
                .iter()
                .all(|(p, o)| read_offsets_file(&data_dir, "crash", *p).get("cg") == Some(o))
        }
    })
    .await;

    // Phase 2: concurrent publishers; kill -9 after about 1,000 acknowledgements.
    let total = 2000;
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(Mutex::new(Vec::<(u64, u64, String)>::new()));
    let unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, next, acked, answers, unexpected) = (
            c.clone(),
            next.clone(),
            acked.clone(),
            answers.clone(),
            unexpected.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let body = format!("load-{i}");
                let key = format!("key-{}", i % 53);
                match c
                    .publish("crash", &[("shoal-key", &key)], body.clone())
                    .await
                {
                    Ok(r) if r.status.as_u16() == 201 => {
                        let v = r.json();
                        answers.lock().unwrap().push((
                            v["partition"].as_u64().unwrap(),
                            v["offset"].as_u64().unwrap(),
                            body,
                        ));
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => unexpected
                        .lock()
                        .unwrap()
                        .push(format!("{} {}", r.status, r.text())),
                    // The agent is gone: the outcome of this publish is unknown.
                    Err(_) => break,
                }
            }
        }));
    }
    wait_until("about 1,000 publishes are acknowledged", || {
        let acked = acked.clone();
        async move { acked.load(Ordering::SeqCst) >= 1000 }
    })
    .await;
    agent.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let unexpected = unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "publishes answered other than 201 before the kill: {unexpected:?}"
    );
    let answers = answers.lock().unwrap().clone();
    assert!(answers.len() >= 1000, "only {} acknowledged", answers.len());
    eprintln!(
        "kill -9 after {} acknowledged publishes of {total} attempted",
        answers.len()
    );
    for (p, o, body) in &answers {
        let before = recorded.insert((*p, *o), body.clone());
        assert!(
            before.is_none(),
            "two publishes were acknowledged at partition {p} offset {o}"
        );
    }

    // Restart on the same data directory and read everything back.
    let agent = spawn_agent(dir.path(), &[]).await;
    let c = agent.client.clone();
    let ends = next_offsets(&c, "crash").await;
    put_sub(
        &c,
        "reader",
        json!({"topic": "crash", "start": "earliest", "maxInFlight": 10000}),
    )
    .await;
    let stored = read_all(&c, "reader", &ends).await;
    for ((p, o), body) in &recorded {
        match stored.get(&(*p, *o)) {
            Some(b) if b == body => {}
            other => {
                panic!("acknowledged {body:?} at partition {p} offset {o} reads back as {other:?}")
            }
        }
    }
    let mut payloads = BTreeSet::new();
    for body in stored.values() {
        assert!(
            body.starts_with("pre-") || body.starts_with("load-"),
            "a message nobody published: {body:?}"
        );
        assert!(payloads.insert(body.clone()), "{body:?} is stored twice");
    }
    for (p, (first, next)) in &ends {
        let offsets: Vec<u64> = stored
            .keys()
            .filter(|(q, _)| q == p)
            .map(|(_, o)| *o)
            .collect();
        let expected: Vec<u64> = (*first..*next).collect();
        assert_eq!(
            offsets, expected,
            "partition {p} has a gap or extra offsets"
        );
    }

    // The consumer group resumes at its checkpoint: no skipped message, and
    // nothing below the checkpoint again.
    let cg_ends: BTreeMap<u64, (u64, u64)> = ends
        .iter()
        .map(|(p, (_, next))| (*p, (committed[p], *next)))
        .collect();
    let resumed = read_all(&c, "cg", &cg_ends).await;
    for (p, (_, next)) in &ends {
        let from = committed[p];
        let got: Vec<u64> = resumed
            .keys()
            .filter(|(q, _)| q == p)
            .map(|(_, o)| *o)
            .collect();
        let expected: Vec<u64> = (from..*next).collect();
        assert_eq!(
            got, expected,
            "partition {p}: the group committed up to {from} before the crash and must resume exactly there"
        );
    }
}

/// Byte positions of the records of a segment file.
fn record_positions(bytes: &[u8]) -> Vec<usize> {
    assert_eq!(&bytes[..8], b"SHOALLOG", "segment magic");
    let mut out = Vec::new();
    let mut pos = 16;
    while pos + 32 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        out.push(pos);
        pos += 32 + len;
    }
    assert_eq!(pos, bytes.len(), "segment ends at a record boundary");
    out
}

fn quarantine_files(partition_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let q = partition_dir.join("quarantine");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&q) {
        for e in rd {
            let e = e.unwrap();
            out.push((
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_segments_are_cut_quarantined_and_never_served() {
    let dir = tempdir();
    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    expect_status(
        &put_topic(c, "damaged", json!({"partitions": 2})).await,
        201,
        "create topic",
    );
    let key_for = |p: u32| {
        (0..)
            .map(|i| format!("k{i}"))
            .find(|k| shoal_agent::topic::partition_for_key(k, 2) == p)
            .unwrap()
    };
    let mut expected: Stored = Stored::new();
    for p in 0..2u32 {
        let key = key_for(p);
        for i in 1..=20u64 {
            let body = format!("p{p}-m{i}-{}", "z".repeat(40));
            let r = publish(
                c,
                "damaged",
                &[("shoal-key", &key), ("content-type", "text/plain")],
                body.clone(),
            )
            .await;
            assert_eq!(r["partition"], p);
            assert_eq!(r["offset"], i, "offsets of a fresh partition start at 1");
            expected.insert((p as u64, i), body);
        }
    }
    agent.stop().await;

    let seg = |p: u32| {
        dir.path()
            .join(format!("topics/damaged/{p}/00000000000000000001.log"))
    };
    // (a) partition 0: the last record loses its last 5 bytes.
    let p0 = std::fs::read(seg(0)).unwrap();
    let p0_records = record_positions(&p0);
    assert_eq!(p0_records.len(), 20);
    let cut0 = p0_records[19];
    std::fs::write(seg(0), &p0[..p0.len() - 5]).unwrap();
    // (b) partition 1: one byte flipped inside record 11's data.
    let mut p1 = std::fs::read(seg(1)).unwrap();
    let p1_records = record_positions(&p1);
    assert_eq!(p1_records.len(), 20);
    let cut1 = p1_records[10];
    p1[cut1 + 32 + 3] ^= 0x40;
    std::fs::write(seg(1), &p1).unwrap();

    let agent = start_agent(dir.path(), &[]).await;
    let c = &agent.client;
    let ends = next_offsets(c, "damaged").await;
    assert_eq!(ends[&0], (1, 20), "partition 0 keeps records 1..19");
    assert_eq!(ends[&1], (1, 11), "partition 1 keeps records 1..10");
    put_sub(
        c,
        "reader",
        json!({"topic": "damaged", "start": "earliest", "maxInFlight": 1000}),
    )
    .await;
    let stored = read_all(c, "reader", &ends).await;
    let intact: Stored = expected
        .iter()
        .filter(|((p, o), _)| (*p == 0 && *o < 20) || (*p == 1 && *o < 11))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    assert_eq!(
        stored, intact,
        "exactly the records before the damage are served"
    );

    let q0 = quarantine_files(&dir.path().join("topics/damaged/0"));
    assert_eq!(
        q0.len(),
        1,
        "partition 0 quarantine: {:?}",
        q0.iter().map(|q| &q.0).collect::<Vec<_>>()
    );
    assert!(
        q0[0].0.ends_with(&format!(".tail-at-{cut0}")),
        "name {}",
        q0[0].0
    );
    assert_eq!(
        q0[0].1,
        &p0[cut0..p0.len() - 5],
        "partition 0: the cut bytes are kept"
    );
    let q1 = quarantine_files(&dir.path().join("topics/damaged/1"));
    assert_eq!(
        q1.len(),
        1,
        "partition 1 quarantine: {:?}",
        q1.iter().map(|q| &q.0).collect::<Vec<_>>()
    );
    assert!(
        q1[0].0.ends_with(&format!(".tail-at-{cut1}")),
        "name {}",
        q1[0].0
    );
    assert_eq!(q1[0].1, &p1[cut1..], "partition 1: the cut bytes are kept");

    let text = metrics(&agent.admin).await;
    let truncated = metric_value(&text, "shoal_storage_recovery_truncated_bytes_total")
        .expect("shoal_storage_recovery_truncated_bytes_total in /metrics");
    let expected_cut = (p0.len() - 5 - cut0) + (p1.len() - cut1);
    assert_eq!(truncated as usize, expected_cut, "truncated bytes reported");

    // The logs continue after the cut.
    let r = publish(
        c,
        "damaged",
        &[("shoal-key", &key_for(0)), ("content-type", "text/plain")],
        "fresh",
    )
    .await;
    assert_eq!(r["offset"], 20);
    let r = publish(
        c,
        "damaged",
        &[("shoal-key", &key_for(1)), ("content-type", "text/plain")],
        "fresh",
    )
    .await;
    assert_eq!(r["offset"], 11);
    let got: Vec<Value> = pull_ack_n(c, "reader", 2).await;
    assert!(got.iter().all(|e| text_of(e) == "fresh"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_keeps_every_acknowledged_message() {
    let dir = tempdir();
    let mut agent = spawn_agent(dir.path(), &["--shutdown-timeout", "5s"]).await;
    let c = agent.client.clone();
    let r = agent.admin.get("/livez").await.unwrap();
    expect_status(&r, 200, "livez");
    let mut recorded = BTreeMap::new();
    for i in 0..100 {
        let body = format!("m{i}");
        let r = publish(
            &c,
            "graceful",
            &[("content-type", "text/plain")],
            body.clone(),
        )
        .await;
        recorded.insert(
            (
                r["partition"].as_u64().unwrap(),
                r["offset"].as_u64().unwrap(),
            ),
            body,
        );
    }
    // A long poll is waiting when the signal comes.
    put_sub(&c, "waiting", json!({"topic": "idle"})).await;
    let poll = {
        let c = c.clone();
        tokio::spawn(async move { c.get("/v1/subscriptions/waiting/messages?wait=60s").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    agent.sigterm();
    let status = agent.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "SIGTERM exit status: {status}");
    let polled = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long poll ended with the agent")
        .unwrap();
    if let Ok(r) = polled {
        assert!(
            r.status.as_u16() == 200 || r.status.as_u16() == 503,
            "long poll at stop: {} {}",
            r.status,
            r.text()
        );
    }

    let agent = spawn_agent(dir.path(), &[]).await;
    let c = agent.client.clone();
    let ends = next_offsets(&c, "graceful").await;
    put_sub(
        &c,
        "all",
        json!({"topic": "graceful", "start": "earliest", "maxInFlight": 1000}),
    )
    .await;
    let stored = read_all(&c, "all", &ends).await;
    assert_eq!(
        stored, recorded,
        "every acknowledged message is back after a graceful stop"
    );
}
