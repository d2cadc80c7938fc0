//! End to end over real TLS: the webhook server with a certificate from the
//! bootstrap CA, a real HTTPS client (rustls + hyper) trusting only that CA,
//! TLS 1.3 and 1.2, good reviews, bad input, certificate reload, shutdown.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use shoal_injector::bootstrap;
use shoal_injector::metrics::Metrics;
use shoal_injector::server;
use shoal_injector::tls::{self, CertFiles, CertStore};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

const DNS: &str = "shoal-injector.shoal-system.svc";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Server {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    ca: String,
}

async fn start() -> Server {
    let m = bootstrap::generate_all(
        now(),
        &bootstrap::service_dns_names("shoal-injector", "shoal-system"),
        None,
    )
    .unwrap();
    let store = CertStore::new(tls::certified_key(m.cert.as_bytes(), m.key.as_bytes()).unwrap());
    let config = tls::server_config(store.clone()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(server::serve_webhook(
        listener,
        config,
        common::webhook(),
        rx,
    ));
    Server {
        addr,
        shutdown: tx,
        task,
        ca: m.ca_cert,
    }
}

fn connector(ca_pem: &str, versions: &[&'static rustls::SupportedProtocolVersion]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every request does a full handshake, so each one checks the served certificate.
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// One HTTPS request; returns (status, body, negotiated TLS version).
async fn request(
    addr: SocketAddr,
    connector: &TlsConnector,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>, rustls::ProtocolVersion), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from(DNS).unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let version = tls.get_ref().1.protocol_version().unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", DNS)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes.to_vec(), version))
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(common::crate_dir().join(format!("tests/fixtures/admission/{name}.json")))
        .unwrap()
}

#[tokio::test]
async fn reviews_over_tls13_and_tls12() {
    let s = start().await;
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let c = connector(&s.ca, versions);
        let (status, body, version) =
            request(s.addr, &c, "POST", "/mutate", fixture("deployment-pod"))
                .await
                .unwrap();
        assert_eq!(version, versions[0].version);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let review: Value = serde_json::from_slice(&body).unwrap();
        let resp = common::normalize(&review);
        assert_eq!(resp["allowed"], true);
        assert_eq!(resp["patchType"], "JSONPatch");
        // The wire format carries the patch base64-encoded.
        assert!(review["response"]["patch"].is_string());
        let golden: Value = serde_json::from_slice(
            &std::fs::read(common::crate_dir().join("tests/golden/deployment-pod.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(resp, golden);

        let (status, body, _) = request(s.addr, &c, "POST", "/mutate", fixture("pod-opt-out"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        let resp = common::normalize(&serde_json::from_slice(&body).unwrap());
        assert_eq!(resp["allowed"], true);
        assert!(resp.get("patch").is_none());
    }
    // A client that does not trust this CA is refused.
    let other = bootstrap::generate_all(now(), &[DNS.to_owned()], None).unwrap();
    let c = connector(&other.ca_cert, &[&rustls::version::TLS13]);
    assert!(request(s.addr, &c, "POST", "/mutate", fixture("bare-pod"))
        .await
        .is_err());

    let _ = s.shutdown.send(true);
    tokio::time::timeout(Duration::from_secs(5), s.task)
        .await
        .expect("graceful shutdown")
        .unwrap();
}

#[tokio::test]
async fn bad_input_gets_400_or_allowed_never_a_crash() {
    let s = start().await;
    let c = connector(&s.ca, &[&rustls::version::TLS13]);
    let pod_review = |object: Value| {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-bad", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shoal-demo", "operation": "CREATE",
                "userInfo": {"username": "tester"}, "object": object}
        }))
        .unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("garbage", b"\x00\xffnot json at all{{{".to_vec(), 400),
        ("empty", Vec::new(), 400),
        ("json but not a review", br#"{"hello":"world"}"#.to_vec(), 400),
        ("array", b"[1,2,3]".to_vec(), 400),
        (
            "v1beta1",
            String::from_utf8(fixture("bare-pod")).unwrap().replace("admission.k8s.io/v1", "admission.k8s.io/v1beta1").into_bytes(),
            400,
        ),
        ("no request", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), 400),
        (
            "request without uid",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"operation":"CREATE"}}"#.to_vec(),
            400,
        ),
        ("pod with a broken spec", pod_review(json!({"metadata": {"name": "x"}, "spec": {"containers": "nope"}})), 200),
        ("pod without spec", pod_review(json!({"metadata": {"name": "x"}})), 200),
        ("object is a string", pod_review(json!("a pod")), 400),
        ("deeply nested", format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(), 400),
        ("huge", vec![b' '; server::MAX_BODY_BYTES + 1], 400),
    ];
    for (name, body, want) in cases {
        let (status, resp, _) = tokio::time::timeout(
            Duration::from_secs(10),
            request(s.addr, &c, "POST", "/mutate", body),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: hung"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(status, want, "{name}: {}", String::from_utf8_lossy(&resp));
        let v: Value = serde_json::from_slice(&resp)
            .unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        if want == 400 {
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{name}: {v}"
            );
        } else {
            assert_eq!(v["response"]["allowed"], true, "{name}: {v}");
            assert!(v["response"].get("patch").is_none(), "{name}");
        }
    }
    let (status, _, _) = request(s.addr, &c, "GET", "/mutate", Vec::new())
        .await
        .unwrap();
    assert_eq!(status, 405);
    let (status, _, _) = request(s.addr, &c, "POST", "/elsewhere", Vec::new())
        .await
        .unwrap();
    assert_eq!(status, 404);

    // Plain HTTP and a half-open connection on the TLS port do not disturb it.
    {
        use tokio::io::AsyncWriteExt as _;
        let mut raw = TcpStream::connect(s.addr).await.unwrap();
        raw.write_all(b"POST /mutate HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let _idle = TcpStream::connect(s.addr).await.unwrap();
        let (status, _, _) = request(s.addr, &c, "POST", "/mutate", fixture("bare-pod"))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let _ = s.shutdown.send(true);
    tokio::time::timeout(Duration::from_secs(15), s.task)
        .await
        .expect("shutdown")
        .unwrap();
}

#[tokio::test]
async fn certificate_files_reload_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let files = CertFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    let first = bootstrap::generate_all(now(), &[DNS.to_owned()], None).unwrap();
    std::fs::write(&files.cert, &first.cert).unwrap();
    std::fs::write(&files.key, &first.key).unwrap();

    let store = CertStore::new(files.load().unwrap());
    let metrics = Arc::new(Metrics::new());
    let (tx, rx) = watch::channel(false);
    tokio::spawn(files.clone().watch(
        store.clone(),
        Duration::from_millis(50),
        metrics.clone(),
        rx.clone(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(server::serve_webhook(
        listener,
        tls::server_config(store).unwrap(),
        common::webhook(),
        rx,
    ));

    let c1 = connector(&first.ca_cert, &[&rustls::version::TLS13]);
    assert_eq!(
        request(addr, &c1, "POST", "/mutate", fixture("bare-pod"))
            .await
            .unwrap()
            .0,
        200
    );

    // A half-written update (key missing its certificate) keeps the old certificate.
    let second = bootstrap::generate_all(now(), &[DNS.to_owned()], None).unwrap();
    std::fs::write(&files.key, &second.key).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        request(addr, &c1, "POST", "/mutate", fixture("bare-pod"))
            .await
            .unwrap()
            .0,
        200
    );

    std::fs::write(&files.cert, &second.cert).unwrap();
    let c2 = connector(&second.ca_cert, &[&rustls::version::TLS13]);
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if request(addr, &c2, "POST", "/mutate", fixture("bare-pod"))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
    }
    assert!(ok, "new certificate not served after reload");
    assert!(
        request(addr, &c1, "POST", "/mutate", fixture("bare-pod"))
            .await
            .is_err(),
        "old CA still accepted"
    );
    assert!(metrics
        .encode(shoal_exposition::Format::OpenMetrics)
        .contains("shoal_injector_cert_reloads_total 1"));
    let _ = tx.send(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("shutdown")
        .unwrap();
}

#[tokio::test]
async fn admin_endpoints() {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready.clone();
    let check: server::ReadyCheck =
        Arc::new(move || flag.load(std::sync::atomic::Ordering::SeqCst));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(server::serve_admin(listener, metrics.clone(), check, rx));
    metrics.decision("injected", "injected");

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder()
            .uri(path)
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
    assert_eq!(get(addr, "/livez").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 503);
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains(r#"shoal_injector_admissions_total{result="injected",reason="injected"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("shoal_injector_admission_duration_seconds_bucket"),
        "{text}"
    );
    // curl and promtool get the classic text format: counters named with
    // `_total`, no OpenMetrics-only lines.
    assert!(
        text.contains("# TYPE shoal_injector_admissions_total counter\n"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    let build = format!(
        "shoal_injector_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build), "{text}");
    assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
    // Known label values exist at 0 before their first event, so rate() and
    // the ShoalInjectorErrors alert see the first one.
    assert!(
        text.contains("shoal_injector_bad_requests_total{kind=\"path\"} 0\n"),
        "{text}"
    );
    promtool_check_metrics(&text);
    for name in documented_injector_metrics("always") {
        assert!(
            text.contains(&format!("\n{name}")),
            "{name} is in docs/metrics.md but not in the injector's scrape:\n{text}"
        );
    }
    assert_eq!(get(addr, "/nope").await.0, 404);
    let _ = tx.send(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("shutdown")
        .unwrap();
}

/// Runs `promtool check metrics` on a scrape when promtool is installed
/// (CI installs it and sets SHOAL_REQUIRE_PROMETHEUS=1, which makes it
/// required).
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("SHOAL_REQUIRE_PROMETHEUS").is_none(),
                "promtool is required (SHOAL_REQUIRE_PROMETHEUS is set): {e}"
            );
            eprintln!("skipping promtool check metrics: {e}");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check metrics: {report}");
    assert!(report.trim().is_empty(), "promtool check metrics: {report}");
}

/// The names in the "Injector metrics" table of docs/metrics.md whose
/// "appears" column is `appears`.
fn documented_injector_metrics(appears: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Injector metrics"))
        .expect("docs/metrics.md has an \"Injector metrics\" section");
    let names: Vec<String> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
        .filter(|cells| cells.get(5) == Some(&appears))
        .map(|cells| cells[1].trim_matches('`').to_owned())
        .collect();
    assert!(names.len() >= 5, "{names:?}");
    names
}
