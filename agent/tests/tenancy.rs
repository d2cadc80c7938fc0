//! Namespaces as tenants, on a real agent process: topics belong to the
//! namespace of the app that names them, another namespace uses them only
//! where the owner granted it, and a peer is judged by the namespace of its
//! certificate, never by a name inside its messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;
use shoal_cluster::membership::{self, AgentId, Membership};
use shoal_proto::{Message, PublishEntry, PublishResult, SubscriberRef};

fn encoded(text: &str) -> Vec<u8> {
    shoal_agent::message::Message {
        id: format!("id-{text}"),
        client_id: false,
        key: None,
        content_type: None,
        expires_at_ms: None,
        deliver_at_ms: None,
        attributes: Vec::new(),
        payload: bytes::Bytes::from(text.to_owned()),
    }
    .encode()
    .unwrap()
    .to_vec()
}

fn publish_frame(req: u64, topic: &str, text: &str) -> Message {
    Message::Publish {
        req,
        topic: topic.into(),
        entries: vec![PublishEntry {
            partition: 0,
            message: encoded(text),
        }],
    }
}

fn fetch_frame(req: u64, topic: &str, group: &str) -> Message {
    Message::Fetch {
        req,
        topic: topic.into(),
        partition: 0,
        group: group.into(),
        start: "\"earliest\"".into(),
        from: Some(1),
        max: 10,
        wait_ms: 0,
    }
}

fn stats_frame(req: u64, topic: &str) -> Message {
    Message::Stats {
        req,
        topic: topic.into(),
        partitions: vec![0],
    }
}

async fn ask(conn: &shoal_mesh::quinn::Connection, m: Message) -> Message {
    let mut frames = bytes::BytesMut::new();
    shoal_proto::encode(&m, &mut frames).unwrap();
    let mut answers = exchange_frames(conn, &frames).await;
    assert_eq!(answers.len(), 1, "one answer to {m:?}: {answers:?}");
    answers.remove(0)
}

async fn tell(conn: &shoal_mesh::quinn::Connection, m: Message) {
    let mut frames = bytes::BytesMut::new();
    shoal_proto::encode(&m, &mut frames).unwrap();
    let answers = exchange_frames(conn, &frames).await;
    assert!(
        answers.is_empty(),
        "a one-way message has no answer: {answers:?}"
    );
}

fn stored(answer: &Message) -> bool {
    matches!(answer, Message::Published { results, .. } if matches!(results[..], [PublishResult::Stored { .. }]))
}

fn refused(answer: &Message) -> bool {
    match answer {
        Message::Published { results, .. } => {
            matches!(&results[..], [PublishResult::Failed(e)] if e.status == 403 && e.code == "forbidden")
        }
        Message::Fetched { result: Err(e), .. } | Message::Reply { result: Err(e), .. } => {
            e.status == 403 && e.code == "forbidden"
        }
        _ => false,
    }
}

/// Starts an agent (`start_mesh_agent`'s arguments) and waits until it is ready.
async fn start_ready(
    root: &std::path::Path,
    ca: &str,
    name: &str,
    port: u16,
    join: Option<u16>,
    extra: &[&str],
) -> MeshAgent {
    let agent = start_mesh_agent(root, ca, name, port, join, extra);
    wait_until("the agent is ready", || async {
        agent
            .admin
            .get("/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    agent
}

async fn denials(a: &MeshAgent, side: &str, action: &str) -> f64 {
    let m = metrics(&a.admin).await;
    series_value(
        &m,
        &format!("shoal_authorization_denials_total{{side=\"{side}\",action=\"{action}\"}}"),
    )
    .unwrap_or_else(|| panic!("no denial series {side}/{action}: {m}"))
}

#[tokio::test]
async fn a_peer_is_judged_by_its_certificates_namespace_and_the_owners_grants() {
    let root = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let agent = start_ready(
        root.path(),
        "ca",
        "shop-0",
        port,
        None,
        &["--namespace", "shop"],
    )
    .await;

    // The app's plain name is its own namespace's topic.
    let created = put_topic(
        &agent.client,
        "orders",
        json!({"partitions": 1, "replicas": 1}),
    )
    .await;
    expect_status(&created, 201, "create orders");
    assert_eq!(created.json()["name"], "shop:orders", "{}", created.text());
    let v = publish(&agent.client, "orders", &[], "from the owner").await;
    assert_eq!(
        (v["topic"].as_str(), v["offset"].as_u64()),
        (Some("shop:orders"), Some(1)),
        "{v}"
    );
    assert_eq!(
        agent
            .client
            .get("/v1/topics/shop:orders")
            .await
            .unwrap()
            .json()["name"],
        "shop:orders",
        "the full name names the same topic"
    );

    let connect = |ns: &'static str| {
        let root = root.path().to_owned();
        async move {
            raw_mesh_peer(&root, "ca", ns)
                .await
                .connect(format!("127.0.0.1:{port}").parse().unwrap())
                .await
                .unwrap()
                .connection
        }
    };
    let billing = connect("billing").await;
    let shop = connect("shop").await;

    // A billing agent may not publish, read, request, configure or speak for
    // shop's groups, whatever names its messages carry.
    assert!(refused(
        &ask(&billing, publish_frame(1, "shop:orders", "forged")).await
    ));
    assert!(refused(
        &ask(&billing, fetch_frame(2, "shop:orders", "billing:audit")).await
    ));
    match ask(&billing, stats_frame(20, "shop:orders")).await {
        Message::StatsAnswer { result: Err(e), .. } => assert_eq!(e.code, "forbidden"),
        other => panic!("a topic's figures are not for a namespace granted nothing: {other:?}"),
    }
    assert!(refused(
        &ask(
            &billing,
            Message::Request {
                req: 3,
                topic: "shop:orders".into(),
                message: encoded("ping"),
                timeout_ms: 100,
            }
        )
        .await
    ));
    let granted_to_billing = json!({
        "partitions": 4, "replicas": 1, "kind": "durable",
        "retention": {"maxAge": "7d"}, "fsync": "interval", "dedupeWindow": "2m",
        "grants": {"publish": ["billing"], "subscribe": ["billing"]}
    });
    tell(
        &billing,
        Message::Topic {
            name: "shop:orders".into(),
            config: granted_to_billing.to_string(),
            version: u64::MAX / 2,
        },
    )
    .await;
    tell(
        &billing,
        Message::Subscribers {
            node: "tester".into(), // the name its certificate is bound to
            subs: vec![
                SubscriberRef {
                    topic: "shop:orders".into(),
                    group: "shop:workers".into(),
                    push: true,
                },
                // billing's own group, on a topic billing may not read: a
                // request to shop:orders must never be pushed to billing.
                SubscriberRef {
                    topic: "shop:orders".into(),
                    group: "billing:rpc".into(),
                    push: true,
                },
            ],
        },
    )
    .await;
    // A topic this agent does not know is passed on as what it is: learnt,
    // with every grant dropped (only shop's agents grant), at version 0.
    tell(
        &billing,
        Message::Topic {
            name: "shop:fresh".into(),
            config: granted_to_billing.to_string(),
            version: 7,
        },
    )
    .await;
    wait_until("the relayed topic is known", || async {
        agent
            .client
            .get("/v1/topics/fresh")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let fresh = agent.client.get("/v1/topics/fresh").await.unwrap().json();
    assert_eq!(fresh["partitions"], 4, "{fresh}");
    assert!(
        fresh.get("grants").is_none(),
        "a relay grants nothing: {fresh}"
    );
    assert!(refused(
        &ask(&billing, publish_frame(11, "shop:fresh", "forged grant")).await
    ));
    // The owner's word replaces a relayed copy, even at version 0 (a topic
    // its app never configured explicitly).
    let from_owner = json!({
        "partitions": 4, "replicas": 1, "kind": "durable",
        "retention": {"maxAge": "1d"}, "fsync": "interval", "dedupeWindow": "2m",
        "grants": {"publish": ["billing"]}
    });
    tell(
        &shop,
        Message::Topic {
            name: "shop:fresh".into(),
            config: from_owner.to_string(),
            version: 0,
        },
    )
    .await;
    let fresh = agent.client.get("/v1/topics/fresh").await.unwrap().json();
    assert_eq!(fresh["grants"], json!({"publish": ["billing"]}), "{fresh}");
    assert!(stored(
        &ask(
            &billing,
            publish_frame(13, "shop:fresh", "granted by the owner")
        )
        .await
    ));
    // A topic unknown here: nothing to serve, and the answer is retryable.
    match ask(&billing, publish_frame(12, "shop:unknown", "x")).await {
        Message::Published { results, .. } => assert!(
            matches!(&results[..], [PublishResult::Failed(e)] if e.code == "topic_unknown" && e.status == 503),
            "{results:?}"
        ),
        other => panic!("{other:?}"),
    }
    // Only shop's own agents move shop's groups; one of billing's is not shop's.
    assert!(refused(
        &ask(&shop, fetch_frame(4, "shop:orders", "billing:audit")).await
    ));
    tell(
        &billing,
        Message::Commit {
            topic: "shop:orders".into(),
            partition: 0,
            group: "shop:workers".into(),
            next: 99,
        },
    )
    .await;

    wait_until("every refusal is counted", || async {
        denials(&agent, "mesh", "publish").await >= 3.0
            && denials(&agent, "mesh", "subscribe").await >= 2.0
            && denials(&agent, "mesh", "group").await >= 3.0
    })
    .await;
    let topic = agent.client.get("/v1/topics/orders").await.unwrap().json();
    assert_eq!(
        topic["partitions"], 1,
        "billing's configuration was not applied: {topic}"
    );
    assert!(topic.get("grants").is_none(), "{topic}");
    // Passing on a topic the receiver knows is what every agent does when it
    // meets another; it changes nothing and is no refusal.
    assert_eq!(denials(&agent, "mesh", "configure").await, 0.0);

    // A shop agent is the owner: it publishes and reads.
    assert!(stored(
        &ask(&shop, publish_frame(5, "shop:orders", "from a shop peer")).await
    ));
    match ask(&shop, fetch_frame(6, "shop:orders", "shop:workers")).await {
        Message::Fetched { result: Ok(b), .. } => assert_eq!(b.entries.len(), 2, "{b:?}"),
        other => panic!("the owner reads: {other:?}"),
    }

    // The owner grants billing publishing (not reading): billing's publish
    // is stored, its fetch still refused.
    let r = put_topic(
        &agent.client,
        "orders",
        json!({"grants": {"publish": ["billing"]}}),
    )
    .await;
    expect_status(&r, 200, "grant publish to billing");
    assert_eq!(r.json()["grants"], json!({"publish": ["billing"]}));
    assert!(stored(
        &ask(&billing, publish_frame(7, "shop:orders", "granted")).await
    ));
    match ask(&billing, stats_frame(21, "shop:orders")).await {
        Message::StatsAnswer {
            result: Ok(figures),
            ..
        } => {
            assert_eq!(
                figures.len(),
                1,
                "a granted namespace reads the figures: {figures:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(refused(
        &ask(&billing, fetch_frame(8, "shop:orders", "billing:audit")).await
    ));
    // Then reading, for billing's own groups only.
    put_topic(
        &agent.client,
        "orders",
        json!({"grants": {"publish": ["billing"], "subscribe": ["*"]}}),
    )
    .await;
    match ask(&billing, fetch_frame(9, "shop:orders", "billing:audit")).await {
        Message::Fetched { result: Ok(b), .. } => assert_eq!(b.entries.len(), 3, "{b:?}"),
        other => panic!("granted reading: {other:?}"),
    }
    assert!(refused(
        &ask(&billing, fetch_frame(10, "shop:orders", "shop:workers")).await
    ));
}

#[tokio::test]
async fn an_app_names_its_own_topics_plainly_and_uses_others_only_as_granted() {
    let root = tempfile::tempdir().unwrap();
    let agent = start_ready(
        root.path(),
        "ca",
        "shop-0",
        free_udp_port(),
        None,
        &["--namespace", "shop"],
    )
    .await;
    // Another namespace's topic is created only by that namespace.
    let r = put_topic(&agent.client, "billing:invoices", json!({})).await;
    expect_error(&r, 403, "forbidden", "configure another namespace's topic");
    assert!(r.text().contains("only namespace billing"), "{}", r.text());
    let r = agent
        .client
        .publish("billing:invoices", &[], "x")
        .await
        .unwrap();
    expect_error(
        &r,
        404,
        "topic_not_found",
        "publish to an unknown topic of another namespace",
    );
    let r = agent
        .client
        .put_json(
            "/v1/subscriptions/audit",
            &json!({"topic": "billing:invoices"}),
        )
        .await
        .unwrap();
    expect_error(
        &r,
        404,
        "topic_not_found",
        "subscribe to an unknown topic of another namespace",
    );
    // Names: a namespace is a DNS label; the default namespace's full names are plain.
    let r = put_topic(&agent.client, "Billing:invoices", json!({})).await;
    expect_error(&r, 400, "invalid_name", "an upper-case namespace");
    let r = put_topic(&agent.client, "default:orders", json!({})).await;
    expect_error(&r, 403, "forbidden", "the default namespace's topic");
    // A subscription's group is its namespace's, and may not be another's.
    put_topic(&agent.client, "orders", json!({"replicas": 1})).await;
    let v = put_sub(&agent.client, "workers", json!({"topic": "orders"})).await;
    assert_eq!(
        (v["topic"].as_str(), v["group"].as_str()),
        (Some("shop:orders"), Some("shop:workers")),
        "{v}"
    );
    let r = agent
        .client
        .put_json(
            "/v1/subscriptions/spy",
            &json!({"topic": "orders", "group": "billing:audit"}),
        )
        .await
        .unwrap();
    expect_error(&r, 403, "forbidden", "another namespace's group");
    // Deleting another namespace's topic is refused as well.
    let r = agent
        .client
        .call(
            http::Method::DELETE,
            "/v1/topics/billing:invoices",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    expect_error(&r, 403, "forbidden", "delete another namespace's topic");
    assert!(denials(&agent, "app", "configure").await >= 3.0);
    assert!(denials(&agent, "app", "group").await >= 1.0);
    // Not knowing another namespace's topic is not a refusal.
    assert_eq!(denials(&agent, "app", "publish").await, 0.0);
    assert_eq!(denials(&agent, "app", "subscribe").await, 0.0);
}

#[tokio::test]
async fn a_peer_speaks_only_for_the_node_its_certificate_names() {
    let root = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let agent = start_ready(root.path(), "ca", "shop-0", port, None, &[]).await;
    // The dev CA binds the raw peer's certificate to the node name "tester".
    let endpoint = raw_mesh_peer(root.path(), "ca", "default").await;
    let peer = endpoint
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap()
        .connection;
    let refused_senders = || async {
        series_value(
            &metrics(&agent.admin).await,
            "shoal_mesh_invalid_messages_total{reason=\"unknown_sender\"}",
        )
        .unwrap()
    };
    let before = refused_senders().await;
    let list = |node: &str| Message::Subscribers {
        node: node.into(),
        subs: vec![SubscriberRef {
            topic: "orders".into(),
            group: "workers".into(),
            push: true,
        }],
    };
    // Its own list is taken; another node's list is refused, and so is a
    // leave notice for another node.
    tell(&peer, list("tester")).await;
    tell(&peer, list("shop-1")).await;
    tell(
        &peer,
        Message::Leaving {
            node: "shop-1".into(),
        },
    )
    .await;
    wait_until("both claims for another node are refused", || async {
        refused_senders().await == before + 2.0
    })
    .await;
    // Each frame was handled before its stream closed: the own list too.
    assert_eq!(
        refused_senders().await,
        before + 2.0,
        "its own list was taken"
    );

    // Gossip too: an announcement in another node's name is dropped and
    // counted; one in its own name is taken (the agent lists it).
    let members = || async {
        let cluster = agent.client.get("/v1/cluster").await.unwrap().json();
        cluster["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["node"].as_str().unwrap().to_owned())
            .collect::<Vec<String>>()
    };
    let announce = |node: &str| {
        let me = AgentId {
            addr: peer
                .local_ip()
                .map_or("127.0.0.1:1".parse().unwrap(), |ip| {
                    std::net::SocketAddr::new(ip, 1)
                }),
            node: node.into(),
            incarnation: 1,
            broker: true,
        };
        let mut m = Membership::new(me, membership::config(2), 7);
        let to = AgentId::seed(format!("127.0.0.1:{port}").parse().unwrap());
        m.join(to).unwrap().send
    };
    for (_, data) in announce("shop-1") {
        peer.send_datagram(data).unwrap();
    }
    wait_until("gossip in another node's name is refused", || async {
        refused_senders().await == before + 3.0
    })
    .await;
    assert!(!members().await.contains(&"shop-1".to_owned()));
    for (_, data) in announce("tester") {
        peer.send_datagram(data).unwrap();
    }
    wait_until("gossip in its own name is taken", || async {
        members().await.contains(&"tester".to_owned())
    })
    .await;
    assert_eq!(refused_senders().await, before + 3.0);

    // A rumour: the peer gossips, in its own name, that a member called
    // "shop-0" (this agent's name) has been at another address since long
    // ago. The agent hears it but keeps its name: the holder never spoke
    // for itself over a certificate bound to that name.
    let unused = std::net::SocketAddr::new([127, 0, 0, 1].into(), free_udp_port());
    let fake = AgentId {
        addr: unused,
        node: "shop-0".into(),
        incarnation: 1,
        broker: true,
    };
    let tester = AgentId {
        addr: endpoint.local_addr().unwrap(),
        node: "tester".into(),
        incarnation: 2,
        broker: true,
    };
    let mut rumour = Membership::new(tester.clone(), membership::config(3), 11);
    let mut liar = Membership::new(fake, membership::config(3), 12);
    for (_, data) in liar.join(AgentId::seed(tester.addr)).unwrap().send {
        rumour.handle_data(&data).unwrap();
    }
    let agent_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut outgoing = rumour.join(AgentId::seed(agent_addr)).unwrap().send;
    let heard = || async {
        let cluster = agent.client.get("/v1/cluster").await.unwrap().json();
        cluster["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["node"] == "shop-0" && m["self"] == false)
    };
    // Gossip back and forth until the agent has taken the rumour in.
    let mut rounds = 0;
    while !heard().await {
        rounds += 1;
        assert!(rounds < 200, "the agent never heard the rumour");
        for (to, data) in outgoing.drain(..) {
            if to.addr == agent_addr {
                peer.send_datagram(data).unwrap();
            }
        }
        if let Ok(Ok(d)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), peer.read_datagram()).await
        {
            if let Ok(fx) = rumour.handle_data(&d) {
                outgoing.extend(fx.send);
            }
        }
    }
    let ready = agent.admin.get("/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(
        series_value(
            &metrics(&agent.admin).await,
            "shoal_mesh_name_conflicts_total"
        )
        .unwrap_or(0.0),
        0.0,
        "a rumour is no name conflict"
    );
}

#[tokio::test]
async fn an_agent_whose_certificate_is_bound_to_another_node_refuses_to_start() {
    let root = tempfile::tempdir().unwrap();
    let ca = shoal_mesh::identity::Ca::generate(std::time::Duration::from_secs(3600)).unwrap();
    let id = shoal_mesh::SpiffeId::new("cluster.local", "shop", "api").unwrap();
    let issued = ca
        .issue(
            &id,
            &shoal_mesh::certs::node_san("shop-api-0"),
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let dir = root.path().join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), &issued.chain_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &issued.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-agent"))
        .env_remove("SHOAL_NODE_NAME")
        .env_remove("POD_NAMESPACE")
        .arg("--cert-dir")
        .arg(&dir)
        .args(["--node-name", "shop-api-1", "--namespace", "shop"])
        .arg("--data-dir")
        .arg(root.path().join("data"))
        .args(["--app-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--mesh-addr", &format!("127.0.0.1:{}", free_udp_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bound to node \"shop-api-0\"") && err.contains("\"shop-api-1\""),
        "{err}"
    );
}

#[tokio::test]
async fn a_subscription_given_at_start_waits_for_another_namespaces_topic_and_its_grant() {
    let root = tempfile::tempdir().unwrap();
    let seed = free_udp_port();
    let shop = start_ready(
        root.path(),
        "ca",
        "shop-0",
        seed,
        None,
        &["--namespace", "shop"],
    )
    .await;
    // billing's agent starts with a subscription to a topic nobody declared yet.
    let subscriptions = r#"[{"name": "audit", "topic": "shop:orders", "start": "earliest"}]"#;
    let billing = start_ready(
        root.path(),
        "ca",
        "billing-0",
        free_udp_port(),
        Some(seed),
        &["--namespace", "billing", "--subscriptions", subscriptions],
    )
    .await;
    let declared = || async {
        billing
            .client
            .get("/v1/subscriptions/audit")
            .await
            .is_ok_and(|r| r.status == 200)
    };
    assert!(!declared().await, "not before the topic exists");
    // shop declares the topic and grants billing reading; the waiting
    // subscription is then declared, and reads what shop publishes.
    expect_status(
        &put_topic(
            &shop.client,
            "orders",
            json!({"replicas": 1, "partitions": 1, "grants": {"subscribe": ["billing"]}}),
        )
        .await,
        201,
        "declare with a grant",
    );
    wait_until("the waiting subscription is declared", declared).await;
    publish(&shop.client, "orders", &[], "for billing").await;
    let got = pull_ack_n(&billing.client, "audit", 1).await;
    assert_eq!(text_of(&got[0]), "for billing");
}

#[tokio::test]
async fn a_peer_that_does_not_read_its_answers_gets_peer_busy_not_the_agents_memory() {
    let root = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let agent = start_ready(root.path(), "ca", "shop-0", port, None, &[]).await;
    let r = put_topic(
        &agent.client,
        "bulk",
        json!({"partitions": 1, "replicas": 1}),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.text());
    for i in 0..3u8 {
        publish(&agent.client, "bulk", &[], vec![b'a' + i; 900 * 1024]).await;
    }
    let conn = raw_mesh_peer(root.path(), "ca", "default")
        .await
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap()
        .connection;
    // 200 reads of about 900 KiB each, 25 on each of the 8 streams a peer
    // may open, sent at once, answers left unread. A stream is read until
    // it has 16 MiB unread, so together they reach the connection's 64 MiB.
    const STREAMS: u64 = 8;
    const FETCHES: u64 = 200;
    let mut streams = Vec::new();
    for s in 0..STREAMS {
        let mut frames = bytes::BytesMut::new();
        for req in (s * FETCHES / STREAMS)..((s + 1) * FETCHES / STREAMS) {
            shoal_proto::encode(&fetch_frame(req, "bulk", "readers"), &mut frames).unwrap();
        }
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&frames).await.unwrap();
        send.finish().unwrap();
        streams.push(recv);
    }
    let shed = || async {
        series_value(
            &metrics(&agent.admin).await,
            "shoal_mesh_answers_shed_total",
        )
        .unwrap_or(0.0)
    };
    wait_until("answers to a peer that does not read are shed", || async {
        shed().await > 0.0
    })
    .await;
    // Now read: every request has its answer, a batch or peer_busy.
    let (mut batches, mut busy) = (0u64, 0u64);
    for mut recv in streams {
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            recv.read_to_end(512 << 20),
        )
        .await
        .unwrap()
        .unwrap();
        let mut buf = bytes::BytesMut::from(&got[..]);
        while let Some(m) = shoal_proto::decode::<Message>(&mut buf).unwrap() {
            match m {
                Message::Fetched { result: Ok(b), .. } => {
                    assert!(!b.entries.is_empty());
                    batches += 1;
                }
                Message::Fetched { result: Err(e), .. } | Message::Failed { error: e, .. }
                    if e.code == "peer_busy" =>
                {
                    busy += 1
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    assert_eq!(batches + busy, FETCHES, "every request is answered");
    assert!(busy >= 1 && batches >= 1, "{batches} batches, {busy} shed");
    assert_eq!(shed().await, busy as f64);
    // Once read, nothing counts against the peer: a new read gets its batch.
    match ask(&conn, fetch_frame(FETCHES, "bulk", "readers")).await {
        Message::Fetched { result: Ok(b), .. } => assert!(!b.entries.is_empty()),
        other => panic!("a read after the peer caught up: {other:?}"),
    }
}

#[tokio::test]
async fn a_peer_may_hold_only_a_few_connections_each_with_its_own_budget() {
    let root = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let agent = start_ready(root.path(), "ca", "shop-0", port, None, &[]).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let peer = raw_mesh_peer(root.path(), "ca", "default").await;
    let max = shoal_agent::mesh::MAX_CONNECTIONS_PER_PEER;
    let mut conns = Vec::new();
    for _ in 0..max + 2 {
        conns.push(peer.connect(addr).await.unwrap().connection);
    }
    // Past the limit the agent closes the peer's oldest, saying why: a
    // legitimate agent uses its newest.
    let closed_by_agent = |c: &shoal_mesh::quinn::Connection| {
        matches!(
            c.close_reason(),
            Some(shoal_mesh::quinn::ConnectionError::ApplicationClosed(ref a))
                if a.error_code == shoal_agent::mesh::TOO_MANY_CONNECTIONS.into()
        )
    };
    wait_until("the two oldest connections are closed", || async {
        closed_by_agent(&conns[0]) && closed_by_agent(&conns[1])
    })
    .await;
    let over_limit = series_value(
        &metrics(&agent.admin).await,
        "shoal_mesh_connections_over_limit_total",
    );
    assert_eq!(over_limit, Some(2.0));
    // The newest work: each answers a request.
    let open = &conns[2..];
    for c in open {
        assert!(c.close_reason().is_none());
        ask(c, stats_frame(1, "nothing-here")).await;
    }
    // A connection the peer closes frees its place: one more leaves the
    // others open.
    open[0].close(0u32.into(), b"done");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let newest = peer.connect(addr).await.unwrap().connection;
    ask(&newest, stats_frame(2, "nothing-here")).await;
    for c in open[1..].iter().chain([&newest]) {
        assert!(c.close_reason().is_none(), "{:?}", c.close_reason());
    }
}
