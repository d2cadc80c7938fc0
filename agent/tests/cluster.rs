//! Agents as a cluster runs them: no `--dev`, no seeds. Each real
//! `shoal-agent` process gets its mesh certificate from the injector's
//! identity service (the real `shoal_injector` code, run in this test
//! against an API-server stand-in that answers TokenReviews, keeps the mesh
//! CA Secret and lists the injected pods), with the settings the injector
//! writes into a pod (`SHOAL_IDENTITY_ADDR`, `SHOAL_IDENTITY_TRUST_ANCHORS`,
//! `SHOAL_TOKEN_FILE`, `POD_IP`). The identity answers name other agents,
//! so the agents find each other and form one mesh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt as _, Full};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde_json::{json, Value};
use shoal_agent::client::AgentClient;
use shoal_injector::identity::{IdentityConfig, IdentityService};
use shoal_injector::meshca::{self, CaStore};
use shoal_injector::metrics::Metrics;
use shoal_injector::peers::PeerBook;
use shoal_injector::{bootstrap, server, tls};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

const SYSTEM_NS: &str = "shoal-system";
const CA_SECRET: &str = "shoal-mesh-ca";
const SERVER_NAME: &str = "shoal-injector.shoal-system.svc";
const INJECTED: &str = "shoal.io/injected";

/// What the API-server stand-in holds.
#[derive(Default)]
struct Cluster {
    /// token -> (namespace, service account, pod name, audience)
    tokens: BTreeMap<String, (String, String, String, String)>,
    secrets: BTreeMap<String, Secret>,
    pods: Vec<Pod>,
    reviews: usize,
}

type State = Arc<Mutex<Cluster>>;

fn respond(status: u16, body: Value) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn review(cluster: &Cluster, mut r: TokenReview) -> TokenReview {
    let token = r.spec.token.clone();
    let wanted = r.spec.audiences.clone().unwrap_or_default();
    r.status = Some(match cluster.tokens.get(&token) {
        Some((ns, sa, pod, aud)) if wanted.contains(aud) => TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![aud.clone()]),
            user: Some(UserInfo {
                username: Some(format!("system:serviceaccount:{ns}:{sa}")),
                extra: Some(BTreeMap::from([(
                    "authentication.kubernetes.io/pod-name".to_owned(),
                    vec![pod.clone()],
                )])),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        },
        Some(_) => TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token audiences are not acceptable".to_owned()),
            ..TokenReviewStatus::default()
        },
        None => TokenReviewStatus {
            authenticated: Some(false),
            error: Some("invalid bearer token".to_owned()),
            ..TokenReviewStatus::default()
        },
    });
    r
}

async fn api(
    state: State,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let secrets = format!("/api/v1/namespaces/{SYSTEM_NS}/secrets");
    match (method.as_str(), path.as_str()) {
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let r: TokenReview = serde_json::from_slice(&body).unwrap();
            let mut cluster = state.lock().unwrap();
            cluster.reviews += 1;
            respond(201, serde_json::to_value(review(&cluster, r)).unwrap())
        }
        ("POST", p) if p == secrets => {
            let mut s: Secret = serde_json::from_slice(&body).unwrap();
            s.metadata.resource_version = Some("1".to_owned());
            let name = s.metadata.name.clone().unwrap();
            state.lock().unwrap().secrets.insert(name, s.clone());
            respond(201, serde_json::to_value(s).unwrap())
        }
        ("GET", p) if p.starts_with(&format!("{secrets}/")) => {
            match state.lock().unwrap().secrets.get(&p[secrets.len() + 1..]) {
                Some(s) => respond(200, serde_json::to_value(s).unwrap()),
                None => respond(
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
            }
        }
        ("GET", "/api/v1/pods") if query.contains("watch=true") => {
            // No changes to report: the watch ends after a while and is
            // made again, as an API server's would.
            tokio::time::sleep(Duration::from_secs(1)).await;
            respond(200, json!(null)).map(|_| Full::new(Bytes::new()))
        }
        ("GET", "/api/v1/pods") => {
            let cluster = state.lock().unwrap();
            let selected: Vec<&Pod> = cluster
                .pods
                .iter()
                .filter(|p| {
                    !query.contains("labelSelector")
                        || p.metadata
                            .labels
                            .as_ref()
                            .is_some_and(|l| l.get(INJECTED).map(String::as_str) == Some("true"))
                })
                .collect();
            respond(
                200,
                json!({"apiVersion": "v1", "kind": "PodList",
                       "metadata": {"resourceVersion": "7"}, "items": selected}),
            )
        }
        _ => respond(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "NotFound", "code": 404, "message": path}),
        ),
    }
}

async fn start_api(state: State) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(api(state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An injected pod as the API server lists it: its agent's mesh port named
/// as the injector names it, its IP loopback.
fn injected_pod(ns: &str, name: &str, mesh_port: u16, created_s: i64) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            creation_timestamp: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + created_s).unwrap(),
            )),
            labels: Some(BTreeMap::from([(INJECTED.to_owned(), "true".to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: shoal_injector::config::AGENT_CONTAINER_NAME.to_owned(),
                env: Some(vec![k8s_openapi::api::core::v1::EnvVar {
                    name: "SHOAL_IDENTITY_ADDR".to_owned(),
                    value: Some(format!("{SERVER_NAME}:4711")),
                    ..Default::default()
                }]),
                ports: Some(vec![ContainerPort {
                    name: Some(shoal_injector::config::MESH_PORT_NAME.to_owned()),
                    container_port: i32::from(mesh_port),
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some("127.0.0.1".to_owned()),
            phase: Some("Running".to_owned()),
            ..PodStatus::default()
        }),
    }
}

/// The identity service, as `shoal-injector` runs it.
struct Identity {
    addr: SocketAddr,
    bundle: String,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    /// The CA it signs with (a rotation replaces it, as the injector's
    /// Secret watch does).
    ca: Arc<CaStore>,
    /// Its own serving certificate (re-issued when the CA changes, as the
    /// injector does).
    serving: Arc<tls::CertStore>,
}

impl Identity {
    /// Signs with `material` from now on, and serves a certificate of its CA.
    fn rotate_to(&self, material: meshca::CaMaterial) {
        let ca = meshca::MeshCa::new(material).unwrap();
        let (serving, key) = ca
            .issue_serving(
                &bootstrap::service_dns_names("shoal-injector", SYSTEM_NS),
                unix_now(),
                24 * 3600,
            )
            .unwrap();
        self.serving
            .set(tls::certified_key(serving.cert_pem.as_bytes(), key.as_bytes()).unwrap());
        self.ca.set(ca);
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Drop for Identity {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn start_identity(state: State) -> Identity {
    start_identity_with(state, IdentityConfig::default()).await
}

async fn start_identity_with(state: State, settings: IdentityConfig) -> Identity {
    let api_addr = start_api(state).await;
    let mut config = kube::Config::new(format!("http://{api_addr}").parse().unwrap());
    config.connect_timeout = Some(Duration::from_secs(2));
    let kube = kube::Client::try_from(config).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ca = meshca::reconcile(kube.clone(), SYSTEM_NS, CA_SECRET, now)
        .await
        .unwrap();
    let bundle = ca.trust_bundle().to_owned();
    let (serving, key) = ca
        .issue_serving(
            &bootstrap::service_dns_names("shoal-injector", SYSTEM_NS),
            now,
            24 * 3600,
        )
        .unwrap();
    let store = tls::CertStore::new(
        tls::certified_key(serving.cert_pem.as_bytes(), key.as_bytes()).unwrap(),
    );
    let metrics = Arc::new(Metrics::new());
    let (shutdown, rx) = watch::channel(false);
    let ca_store = CaStore::new(ca);
    let service = IdentityService::new(kube.clone(), ca_store.clone(), settings, metrics.clone())
        .with_peers(PeerBook::start(kube, rx.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve_identity(
        listener,
        tls::server_config(store.clone()).unwrap(),
        service,
        rx,
    ));
    Identity {
        addr,
        bundle,
        metrics,
        shutdown,
        ca: ca_store,
        serving: store,
    }
}

/// A pod's agent: the environment the injector gives it, plus loopback
/// addresses. No `--dev`, no `--join`.
fn start_pod_agent(
    root: &Path,
    identity: &Identity,
    pod: (&str, &str, &str),
    token: &str,
    mesh_port: u16,
) -> MeshAgent {
    start_pod_agent_trusting(root, identity, &identity.bundle, pod, token, mesh_port)
}

/// [`start_pod_agent`] as injected with `--pod-certificates`: its
/// certificate, key and roots in `SHOAL_CERT_DIR` as the kubelet writes
/// them (signed here by the identity service's CA, as the injector's
/// signer does), and the identity service for peers only.
fn start_pod_cert_agent(
    root: &Path,
    identity: &Identity,
    (ns, sa, pod): (&str, &str, &str),
    token: &str,
    mesh_port: u16,
) -> MeshAgent {
    let dir = root.join(pod).join("identity");
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issued = identity
        .ca
        .get()
        .sign_agent_of_node(
            &format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            Some(&format!("{pod}.{ns}")),
            &key,
            unix_now(),
            3600,
        )
        .unwrap();
    std::fs::write(dir.join("cert.pem"), issued.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    // The mesh roots as the signer's ClusterTrustBundle has them now.
    std::fs::write(dir.join("ca.pem"), identity.ca.get().trust_bundle()).unwrap();
    start_pod_agent_with(
        root,
        identity,
        &identity.bundle,
        (ns, sa, pod),
        token,
        mesh_port,
        Some(&dir),
    )
}

/// [`start_pod_agent`] with `anchors` as the trust anchors in its pod spec.
fn start_pod_agent_trusting(
    root: &Path,
    identity: &Identity,
    anchors: &str,
    pod: (&str, &str, &str),
    token: &str,
    mesh_port: u16,
) -> MeshAgent {
    start_pod_agent_with(root, identity, anchors, pod, token, mesh_port, None)
}

/// [`start_pod_agent_trusting`], with `SHOAL_CERT_DIR` when `cert_dir` is set.
fn start_pod_agent_with(
    root: &Path,
    identity: &Identity,
    anchors: &str,
    (ns, sa, pod): (&str, &str, &str),
    token: &str,
    mesh_port: u16,
    cert_dir: Option<&Path>,
) -> MeshAgent {
    use std::process::{Command, Stdio};
    let dir = root.join(pod);
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).unwrap();
    let (app, admin) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal-agent"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SHOAL_") || k.starts_with("POD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SHOAL_IDENTITY_ADDR", identity.addr.to_string())
        .env("SHOAL_IDENTITY_SERVER_NAME", SERVER_NAME)
        .env("SHOAL_IDENTITY_TRUST_ANCHORS", anchors)
        .env("SHOAL_TOKEN_FILE", &token_file)
        .env("POD_NAMESPACE", ns)
        .env("POD_SERVICE_ACCOUNT", sa)
        .env("POD_IP", "127.0.0.1")
        .env("SHOAL_NODE_NAME", format!("{pod}.{ns}"))
        .envs(cert_dir.map(|d| ("SHOAL_CERT_DIR", d)))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--app-addr")
        .arg(format!("127.0.0.1:{app}"))
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--mesh-addr")
        .arg(format!("0.0.0.0:{mesh_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if std::env::var_os("SHOAL_TEST_LOGS").is_some() {
        cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    }
    MeshAgent {
        child: cmd.spawn().unwrap(),
        client: AgentClient::new(&format!("http://127.0.0.1:{app}")),
        admin: AgentClient::new(&format!("http://127.0.0.1:{admin}")),
        admin_addr: format!("127.0.0.1:{admin}"),
    }
}

/// Certificates the identity service issued so far.
fn issued(identity: &Identity) -> u64 {
    identity
        .metrics
        .encode(shoal_exposition::Format::Text)
        .lines()
        .find_map(|l| l.strip_prefix("shoal_injector_identity_certificates_issued_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until every partition of `topic` (its full name) has a leader and
/// three voters, no learner left, as the agents of `pods` see it.
async fn wait_formed(
    agents: &[&MeshAgent],
    pods: &[PodSpecOf<'_>],
    topic: &str,
    partitions: usize,
) {
    wait_until("every partition is formed", || async {
        let mut led = std::collections::BTreeSet::new();
        for (a, (ns, _, name, _)) in agents.iter().zip(pods) {
            let Ok(r) = a.client.get("/v1/cluster").await else {
                continue;
            };
            for g in r.json()["replicated"].as_array().into_iter().flatten() {
                if g["topic"] == topic
                    && g["leader"] == format!("{name}.{ns}")
                    && g["voters"].as_array().is_some_and(|v| v.len() == 3)
                    && g["learners"].as_array().is_some_and(|l| l.is_empty())
                {
                    led.insert(g["partition"].as_u64());
                }
            }
        }
        led.len() == partitions
    })
    .await;
}

/// A pod: (namespace, service account, pod name, its token).
type PodSpecOf<'a> = (&'a str, &'a str, &'a str, &'a str);

/// Puts `pods` in the API-server stand-in, created a second apart in that
/// order, each with a token of audience `shoal`; returns their mesh ports.
fn register_pods(state: &State, pods: &[PodSpecOf<'_>]) -> Vec<u16> {
    let ports: Vec<u16> = pods.iter().map(|_| free_udp_port()).collect();
    let mut cluster = state.lock().unwrap();
    for (i, ((ns, sa, pod, token), port)) in pods.iter().zip(&ports).enumerate() {
        cluster.tokens.insert(
            (*token).to_owned(),
            (
                (*ns).to_owned(),
                (*sa).to_owned(),
                (*pod).to_owned(),
                "shoal".to_owned(),
            ),
        );
        cluster.pods.push(injected_pod(ns, pod, *port, i as i64));
    }
    ports
}

/// Pods of one namespace, for the tests of certificate and CA rotation.
const SHOP_PODS: [PodSpecOf<'static>; 4] = [
    ("shop", "api", "shop-api-0", "tok-0"),
    ("shop", "api", "shop-api-1", "tok-1"),
    ("shop", "worker", "shop-worker-0", "tok-2"),
    ("shop", "api", "shop-api-2", "tok-3"),
];

/// Certificates of six seconds: every agent renews about every four.
fn short_lived() -> IdentityConfig {
    IdentityConfig {
        cert_lifetime: Duration::from_secs(6),
        ..IdentityConfig::default()
    }
}

/// Starts every pod's agent at once and waits until each sees all alive.
async fn start_pods(
    root: &Path,
    identity: &Identity,
    pods: &[PodSpecOf<'_>],
    ports: &[u16],
) -> Vec<MeshAgent> {
    let agents: Vec<MeshAgent> = pods
        .iter()
        .zip(ports)
        .map(|((ns, sa, pod, token), port)| {
            start_pod_agent(root, identity, (ns, sa, pod), token, *port)
        })
        .collect();
    // An injected agent's node name is `<pod>.<namespace>`.
    let mut everyone: Vec<String> = pods.iter().map(|p| format!("{}.{}", p.2, p.0)).collect();
    everyone.sort();
    for a in &agents {
        wait_until(
            "every agent sees all alive, with no seeds given",
            || async { alive(a).await == everyone },
        )
        .await;
    }
    agents
}

/// Names of the alive members `a` sees, itself included.
async fn alive(a: &MeshAgent) -> Vec<String> {
    let Ok(r) = a.client.get("/v1/cluster").await else {
        return Vec::new();
    };
    if r.status != 200 {
        return Vec::new();
    }
    let v = r.json();
    let mut names: Vec<String> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["state"] == "alive")
        .filter_map(|m| m["node"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn injected_agents_get_certificates_find_each_other_and_deliver() {
    let root = tempfile::tempdir().unwrap();
    let state: State = Arc::default();
    let pods = [
        ("orders", "api", "orders-api-0", "tok-orders-0"),
        ("orders", "api", "orders-api-1", "tok-orders-1"),
        ("billing", "worker", "billing-worker-0", "tok-billing-0"),
    ];
    // Created a second apart, all before any agent asks (a cold start):
    // the oldest pod's agent founds the mesh, the others join.
    let ports = register_pods(&state, &pods);
    {
        let mut cluster = state.lock().unwrap();
        // A token the identity service must refuse: another audience.
        cluster.tokens.insert(
            "tok-wrong-audience".to_owned(),
            (
                "orders".to_owned(),
                "api".to_owned(),
                "stray".to_owned(),
                "https://kubernetes.default.svc".to_owned(),
            ),
        );
    }
    let identity = start_identity(state.clone()).await;

    // All start at once; each is told of the others by the identity service.
    let agents = start_pods(root.path(), &identity, &pods, &ports).await;
    for a in &agents {
        let r = a.admin.get("/readyz").await.unwrap();
        assert_eq!(r.status, 200, "ready with a certificate and joined");
        let m = metrics(&a.admin).await;
        let expiry = metric_value(&m, "shoal_mesh_certificate_expiry_timestamp_seconds").unwrap();
        assert!(
            expiry > 1.7e9,
            "a certificate's expiry is exported: {expiry}"
        );
    }
    // Each agent's identity is its pod's service account, from the service.
    let v = agents[2].client.get("/v1/cluster").await.unwrap().json();
    assert_eq!(
        v["id"], "spiffe://cluster.local/ns/billing/sa/worker",
        "the identity the service certified: {v}"
    );
    assert_eq!(issued(&identity), 3, "one certificate per agent");

    // hello across pods and namespaces: the orders namespace owns
    // `greetings`; a billing app may read it and publish to it only once
    // orders grants it, and then receives what apps on other pods publish.
    // Twelve partitions: placement spreads their leaders over the agents of
    // both namespaces, so forwards cross namespaces.
    let topic = json!({"partitions": 12});
    let created = put_topic(&agents[0].client, "greetings", topic).await;
    expect_status(&created, 201, "create topic");
    assert_eq!(
        created.json()["name"],
        "orders:greetings",
        "{}",
        created.text()
    );
    // Its partitions' groups form: a leader, three voters, no learner left.
    // While they form (learners, the joint swap, the hand-over to
    // placement's first choice) a partition can be leaderless for longer
    // than a publish's 5 s retry window, so this waits, as the replication
    // tests do.
    wait_formed(
        &agents.iter().collect::<Vec<_>>(),
        &pods,
        "orders:greetings",
        12,
    )
    .await;
    let billing = &agents[2].client;
    wait_until("billing's agent learnt orders' topic", || async {
        billing
            .get("/v1/topics/orders:greetings")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let subscribe = json!({"topic": "orders:greetings", "start": "earliest"});
    let r = billing
        .put_json("/v1/subscriptions/hello", &subscribe)
        .await
        .unwrap();
    expect_error(
        &r,
        403,
        "forbidden",
        "billing reads orders' topic before a grant",
    );
    assert!(
        r.text().contains("grants.subscribe"),
        "the error says how: {}",
        r.text()
    );
    let r = billing
        .publish("orders:greetings", &[], "early")
        .await
        .unwrap();
    expect_error(
        &r,
        403,
        "forbidden",
        "billing publishes to orders' topic before a grant",
    );
    let r = put_topic(
        billing,
        "orders:greetings",
        json!({"grants": {"subscribe": ["billing"]}}),
    )
    .await;
    expect_error(&r, 403, "forbidden", "billing grants itself");

    // orders grants billing reading and publishing; every agent learns it.
    let grants = json!({"subscribe": ["billing"], "publish": ["billing"]});
    let r = put_topic(&agents[0].client, "greetings", json!({"grants": grants})).await;
    expect_status(&r, 200, "grant");
    for a in &agents {
        wait_until("every agent knows the grant", || async {
            a.client
                .get("/v1/topics/orders:greetings")
                .await
                .is_ok_and(|r| r.json()["grants"] == grants)
        })
        .await;
    }
    let r = billing
        .put_json("/v1/subscriptions/hello", &subscribe)
        .await
        .unwrap();
    expect_status(&r, 201, "billing subscribes once granted");
    assert_eq!(r.json()["group"], "billing:hello", "{}", r.text());
    // Keyed, so every partition gets some, whichever agent leads it.
    for i in 0..120 {
        let key = format!("k{i}");
        publish(
            &agents[1].client,
            "greetings",
            &[("Shoal-Key", key.as_str())],
            format!("hello {i}"),
        )
        .await;
    }
    let v = publish(billing, "orders:greetings", &[], "hello from billing").await;
    assert_eq!(v["topic"], "orders:greetings", "{v}");
    let got = pull_ack_n(billing, "hello", 121).await;
    let partitions: std::collections::BTreeSet<u64> = got.iter().map(|e| position(e).0).collect();
    assert_eq!(partitions.len(), 12, "every partition was published to");
    let mut texts: Vec<String> = got.iter().map(text_of).collect();
    texts.sort();
    let mut want: Vec<String> = (0..120).map(|i| format!("hello {i}")).collect();
    want.push("hello from billing".into());
    want.sort();
    assert_eq!(
        texts, want,
        "every message delivered across pods and namespaces"
    );
    let m = metrics(&agents[2].admin).await;
    for action in ["publish", "subscribe", "configure"] {
        let n = series_value(
            &m,
            &format!("shoal_authorization_denials_total{{side=\"app\",action=\"{action}\"}}"),
        );
        assert_eq!(n, Some(1.0), "{action} refused once on billing's agent");
    }
}

#[tokio::test]
async fn agents_with_pod_certificates_find_each_other_through_discovery_alone() {
    let root = tempdir();
    let state: State = Arc::default();
    let identity = start_identity(state.clone()).await;
    let ports = register_pods(&state, &SHOP_PODS);
    let pods = &SHOP_PODS[..3];
    let mut agents: Vec<MeshAgent> = pods
        .iter()
        .zip(&ports)
        .map(|((ns, sa, pod, token), port)| {
            start_pod_cert_agent(root.path(), &identity, (ns, sa, pod), token, *port)
        })
        .collect();
    let mut everyone: Vec<String> = pods.iter().map(|p| format!("{}.{}", p.2, p.0)).collect();
    everyone.sort();
    for a in &agents {
        wait_until(
            "every agent sees all alive, with no seeds given",
            || async { alive(a).await == everyone },
        )
        .await;
    }
    // Their certificates came from files: the identity service signed
    // nothing, it only named peers.
    assert_eq!(issued(&identity), 0);
    let discovered = identity
        .metrics
        .encode(shoal_exposition::Format::Text)
        .lines()
        .find_map(|l| {
            l.strip_prefix("shoal_injector_identity_requests_total{outcome=\"discovered\"} ")
        })
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(discovered >= 3, "each agent asked for peers: {discovered}");
    // And they carry messages between them.
    let topic = "shop:orders";
    let r = agents[0]
        .client
        .put_json(
            &format!("/v1/topics/{topic}"),
            &json!({"partitions": 2, "replicas": 3}),
        )
        .await
        .unwrap();
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
    wait_formed(&agents.iter().collect::<Vec<_>>(), pods, topic, 2).await;

    // A CA rotation reaches them through their ca.pem, as the kubelet
    // projects the signer's ClusterTrustBundle: first both roots, then the
    // switch. A new agent then gets a certificate of the new CA, while its
    // pod spec's anchors still name only the old one: it must still reach
    // the identity service (which now serves a certificate of the new CA)
    // through the roots of its volume, and join.
    let old = identity.ca.get().material().clone();
    let new = meshca::generate(unix_now()).unwrap();
    let both = format!("{}{}", old.cert, new.cert);
    for (_, _, pod, _) in pods {
        std::fs::write(root.path().join(pod).join("identity/ca.pem"), &both).unwrap();
    }
    for a in &agents {
        wait_until("every agent trusts both roots", || async {
            series_value(&metrics(&a.admin).await, "shoal_mesh_trust_roots") == Some(2.0)
        })
        .await;
    }
    identity.rotate_to(meshca::CaMaterial {
        cert: new.cert.clone(),
        key: new.key.clone(),
        next: String::new(),
        previous: old.cert.clone(),
    });
    let (ns, sa, pod, token) = SHOP_PODS[3];
    agents.push(start_pod_cert_agent(
        root.path(),
        &identity,
        (ns, sa, pod),
        token,
        ports[3],
    ));
    let mut everyone: Vec<String> = SHOP_PODS
        .iter()
        .map(|p| format!("{}.{}", p.2, p.0))
        .collect();
    everyone.sort();
    for a in &agents {
        wait_until(
            "the agent with a certificate of the new CA joins the others",
            || async { alive(a).await == everyone },
        )
        .await;
    }
}

#[tokio::test]
async fn certificates_that_live_seconds_rotate_and_no_message_is_lost() {
    let root = tempfile::tempdir().unwrap();
    let state: State = Arc::default();
    let pods = &SHOP_PODS[..3];
    let ports = register_pods(&state, pods);
    let identity = start_identity_with(state.clone(), short_lived()).await;
    let agents = start_pods(root.path(), &identity, pods, &ports).await;
    expect_status(
        &put_topic(&agents[0].client, "ticks", json!({"partitions": 3})).await,
        201,
        "create topic",
    );
    wait_formed(&agents.iter().collect::<Vec<_>>(), pods, "shop:ticks", 3).await;
    put_sub(
        &agents[2].client,
        "counter",
        json!({"topic": "ticks", "start": "earliest"}),
    )
    .await;
    let first = issued(&identity);
    // Messages published from two agents while certificates come and go,
    // until every agent has renewed at least twice.
    let mut sent = 0u32;
    while issued(&identity) < first + 6 && sent < 400 {
        let key = format!("k{sent}");
        publish(
            &agents[(sent % 2) as usize].client,
            "ticks",
            &[("Shoal-Key", key.as_str())],
            format!("tick {sent}"),
        )
        .await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        issued(&identity) >= first + 6,
        "six renewals (about two per agent) during {sent} publishes"
    );
    let got = pull_ack_n(&agents[2].client, "counter", sent as usize).await;
    let mut texts: Vec<String> = got.iter().map(text_of).collect();
    texts.sort();
    let mut want: Vec<String> = (0..sent).map(|i| format!("tick {i}")).collect();
    want.sort();
    assert_eq!(texts, want, "nothing lost while certificates rotated");
    for a in &agents {
        let r = a.admin.get("/readyz").await.unwrap();
        assert_eq!(r.status, 200, "still ready on a renewed certificate");
    }
}

#[tokio::test]
async fn a_ca_rotation_keeps_the_mesh_connected_and_new_agents_join() {
    let root = tempfile::tempdir().unwrap();
    let state: State = Arc::default();
    // The fourth pod starts once the old root is gone: it trusts only the new one.
    let pods = SHOP_PODS;
    let ports = register_pods(&state, &pods);
    let identity = start_identity_with(state.clone(), short_lived()).await;
    let agents = start_pods(root.path(), &identity, &pods[..3], &ports[..3]).await;
    // Every agent renews about every 4 s; two rounds of renewals make sure
    // each one has what the identity service hands out now.
    let two_rounds = || async {
        let from = issued(&identity);
        wait_until("every agent renewed twice", || async {
            issued(&identity) >= from + 6
        })
        .await;
    };
    let old = identity.ca.get().material().clone();
    let new = meshca::generate(unix_now()).unwrap();
    // 1. Introduce the new root: trusted, not yet signing.
    identity.rotate_to(meshca::CaMaterial {
        next: new.cert.clone(),
        ..old.clone()
    });
    two_rounds().await;
    // 2. Switch: the new CA signs, the old root is still trusted.
    identity.rotate_to(meshca::CaMaterial {
        cert: new.cert.clone(),
        key: new.key.clone(),
        next: String::new(),
        previous: old.cert.clone(),
    });
    two_rounds().await;
    // 3. Retire the old root: every certificate in use is the new CA's.
    identity.rotate_to(meshca::CaMaterial {
        previous: String::new(),
        ..new.clone()
    });
    two_rounds().await;
    // A pod created now is given only the new root in its spec, joins,
    // and every agent delivers to every other over fresh handshakes.
    let anchors = identity.ca.get().trust_bundle().to_owned();
    assert_eq!(identity.ca.get().roots(), 1, "the old root is gone");
    let (ns, sa, pod, token) = pods[3];
    let late = start_pod_agent_trusting(
        root.path(),
        &identity,
        &anchors,
        (ns, sa, pod),
        token,
        ports[3],
    );
    // An injected agent's node name is `<pod>.<namespace>`.
    let mut everyone: Vec<String> = pods.iter().map(|p| format!("{}.{}", p.2, p.0)).collect();
    everyone.sort();
    for a in agents.iter().chain([&late]) {
        wait_until("all four alive after the rotation", || async {
            alive(a).await == everyone
        })
        .await;
        let r = a.admin.get("/readyz").await.unwrap();
        assert_eq!(r.status, 200, "ready on a certificate of the new CA");
    }
    expect_status(
        &put_topic(&late.client, "after", json!({"partitions": 4})).await,
        201,
        "create topic",
    );
    let all = [&agents[0], &agents[1], &agents[2], &late];
    // Formed: a leader, three voters and no learner left in every group,
    // so no publish meets a group still handing leadership over.
    wait_formed(&all, &pods, "shop:after", 4).await;
    put_sub(
        &agents[0].client,
        "reader",
        json!({"topic": "after", "start": "earliest"}),
    )
    .await;
    for (i, a) in all.iter().enumerate() {
        for k in 0..10 {
            let key = format!("k{i}-{k}");
            publish(
                &a.client,
                "after",
                &[("Shoal-Key", key.as_str())],
                key.clone(),
            )
            .await;
        }
    }
    let got = pull_ack_n(&agents[0].client, "reader", 40).await;
    assert_eq!(
        got.len(),
        40,
        "every agent's messages delivered after the rotation"
    );
}

#[tokio::test]
async fn an_agent_whose_token_is_refused_is_not_ready_and_says_why() {
    let root = tempfile::tempdir().unwrap();
    let state: State = Arc::default();
    let port = free_udp_port();
    {
        let mut cluster = state.lock().unwrap();
        cluster.tokens.insert(
            "tok-kube-audience".to_owned(),
            (
                "orders".to_owned(),
                "api".to_owned(),
                "orders-api-0".to_owned(),
                "https://kubernetes.default.svc".to_owned(),
            ),
        );
        cluster
            .pods
            .push(injected_pod("orders", "orders-api-0", port, 0));
    }
    let identity = start_identity(state.clone()).await;
    let a = start_pod_agent(
        root.path(),
        &identity,
        ("orders", "api", "orders-api-0"),
        "tok-kube-audience",
        port,
    );
    wait_until("the agent says why it is not ready", || async {
        match a.admin.get("/readyz").await {
            Ok(r) => r.status == 503 && r.text().contains("token_audience"),
            Err(_) => false,
        }
    })
    .await;
    wait_until("the refusal is counted on both sides", || async {
        let m = metrics(&a.admin).await;
        metric_value(&m, "shoal_mesh_certificate_failures_total").unwrap_or(0.0) >= 1.0
    })
    .await;
    let text = identity.metrics.encode(shoal_exposition::Format::Text);
    assert!(
        text.contains("shoal_injector_identity_requests_total{outcome=\"token_audience\"}"),
        "{text}"
    );
    // It stores nothing and serves no mesh while it waits.
    assert!(
        a.client.get("/v1/cluster").await.is_err() || {
            let r = a.client.get("/v1/cluster").await.unwrap();
            r.status != 200 || r.json()["members"].as_array().is_none_or(|m| m.len() <= 1)
        }
    );
}

#[tokio::test]
async fn a_restarted_agent_rejoins_and_the_mesh_outlives_the_injector() {
    let root = tempfile::tempdir().unwrap();
    let state: State = Arc::default();
    let pods = &SHOP_PODS[..3];
    let ports = register_pods(&state, pods);
    let identity = start_identity(state.clone()).await;
    let mut agents = start_pods(root.path(), &identity, pods, &ports).await;
    expect_status(
        &put_topic(&agents[0].client, "jobs", json!({"partitions": 2})).await,
        201,
        "create topic",
    );
    wait_formed(&agents.iter().collect::<Vec<_>>(), pods, "shop:jobs", 2).await;
    let mut everyone: Vec<String> = pods.iter().map(|p| format!("{}.{}", p.2, p.0)).collect();
    everyone.sort();

    // A pod's agent killed and started again (a container restart): it
    // asks the identity service again, is told of the others, and rejoins.
    let (ns, sa, pod, token) = pods[2];
    agents[2].child.kill().unwrap();
    agents[2].child.wait().unwrap();
    agents[2] = start_pod_agent(root.path(), &identity, (ns, sa, pod), token, ports[2]);
    for a in &agents {
        wait_until("the restarted agent rejoins", || async {
            alive(a).await == everyone
        })
        .await;
    }

    // The injector goes away: the agents keep their certificates (until
    // they expire, a day by default) and their mesh, and messages still
    // cross it.
    let identity_addr = identity.addr;
    drop(identity);
    wait_until("the identity service is gone", || async {
        tokio::net::TcpStream::connect(identity_addr).await.is_err()
    })
    .await;
    put_sub(
        &agents[1].client,
        "workers",
        json!({"topic": "jobs", "start": "earliest"}),
    )
    .await;
    for i in 0..20 {
        let key = format!("k{i}");
        publish(
            &agents[i % 3].client,
            "jobs",
            &[("Shoal-Key", key.as_str())],
            format!("job {i}"),
        )
        .await;
    }
    let got = pull_ack_n(&agents[1].client, "workers", 20).await;
    let mut texts: Vec<String> = got.iter().map(text_of).collect();
    texts.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("job {i}")).collect();
    want.sort();
    assert_eq!(texts, want, "delivered with the injector gone");
    for a in &agents {
        assert_eq!(
            alive(a).await,
            everyone,
            "the mesh is whole without the injector"
        );
        let r = a.admin.get("/readyz").await.unwrap();
        assert_eq!(r.status, 200, "still ready without the injector");
    }
}
