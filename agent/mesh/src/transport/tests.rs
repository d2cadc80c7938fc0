//! Real QUIC with real certificates on loopback.

use super::*;
use crate::certs::{CertSource, FileCertSource};
use crate::identity::{Ca, IssuedCert, DEV_CA_LIFETIME};
use crate::tls::Refusal;
use std::path::Path;
use std::sync::Mutex;

struct Agent {
    endpoint: Endpoint,
    store: Arc<CertStore>,
    refusals: Arc<Mutex<Vec<Refusal>>>,
    _dir: tempfile::TempDir,
}

fn write(dir: &Path, ca: &Ca, cert: &IssuedCert) -> FileCertSource {
    std::fs::write(dir.join("cert.pem"), &cert.chain_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &cert.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    FileCertSource::in_dir(dir)
}

fn id(ns: &str) -> SpiffeId {
    SpiffeId::new("shoal.local", ns, "default").unwrap()
}

/// An agent presenting `cert` and trusting `trust`. Built by hand rather than
/// through a `CertSource`, so certificates a source would reject can be presented.
fn agent_with(cert: IssuedCert, trust: &Ca) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let chain = crate::certs::parse_certs(Path::new("cert"), cert.chain_pem.as_bytes()).unwrap();
    let identity = crate::certs::Identity {
        id: crate::certs::spiffe_id_of(&chain[0]).unwrap_or_else(|_| id("unnamed")),
        key: rustls::pki_types::pem::PemObject::from_pem_slice(cert.key_pem.as_bytes()).unwrap(),
        roots: crate::certs::parse_certs(Path::new("ca"), trust.cert_pem().as_bytes()).unwrap(),
        chain,
        not_after: std::time::SystemTime::now(),
        not_before: std::time::SystemTime::now(),
        loaded_at: std::time::SystemTime::now(),
    };
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let r = refusals.clone();
    let store = CertStore::new(
        &identity,
        Arc::new(move |why, _| r.lock().unwrap().push(why)),
    )
    .unwrap();
    let endpoint = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &store).unwrap();
    Agent {
        endpoint,
        store,
        refusals,
        _dir: dir,
    }
}

fn agent(ca: &Ca, ns: &str) -> Agent {
    let cert = ca
        .issue(&id(ns), "agent", Duration::from_secs(3600))
        .unwrap();
    agent_with(cert, ca)
}

async fn accept_one(server: &Endpoint) -> Result<Peer, MeshError> {
    tokio::time::timeout(Duration::from_secs(10), server.accept())
        .await
        .expect("accept timed out")
        .expect("endpoint closed")
}

#[tokio::test]
async fn agents_of_one_ca_authenticate_each_other_and_talk() {
    let ca = Ca::generate(DEV_CA_LIFETIME).unwrap();
    let a = agent(&ca, "orders");
    let b = agent(&ca, "billing");
    let b_addr = b.endpoint.local_addr().unwrap();
    let server = b.endpoint.clone();
    let accepted = tokio::spawn(async move {
        let peer = accept_one(&server).await.unwrap();
        let (mut send, mut recv) = peer.connection.accept_bi().await.unwrap();
        let got = recv.read_to_end(1024).await.unwrap();
        send.write_all(&got).await.unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
        peer.id
    });
    let peer = a.endpoint.connect(b_addr).await.unwrap();
    assert_eq!(peer.id, id("billing"));
    let (mut send, mut recv) = peer.connection.open_bi().await.unwrap();
    send.write_all(b"hello over mTLS").await.unwrap();
    send.finish().unwrap();
    assert_eq!(recv.read_to_end(1024).await.unwrap(), b"hello over mTLS");
    assert_eq!(accepted.await.unwrap(), id("orders"));
    assert!(a.refusals.lock().unwrap().is_empty());
    assert!(b.refusals.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused() {
    let ours = Ca::generate(DEV_CA_LIFETIME).unwrap();
    let theirs = Ca::generate(DEV_CA_LIFETIME).unwrap();
    let a = agent(&ours, "orders");
    let b = agent(&theirs, "orders");
    let b_addr = b.endpoint.local_addr().unwrap();
    let server = b.endpoint.clone();
    let accepted = tokio::spawn(async move { accept_one(&server).await });
    assert!(a.endpoint.connect(b_addr).await.is_err());
    assert_eq!(*a.refusals.lock().unwrap(), vec![Refusal::UnknownCa]);
    // The refused server learns why: the client's TLS alert.
    let refused = accepted.await.unwrap();
    assert!(
        matches!(refused, Err(MeshError::PeerRefused { .. })),
        "{refused:?}"
    );
    assert!(b.refusals.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused() {
    let ours = Ca::generate(DEV_CA_LIFETIME).unwrap();
    let theirs = Ca::generate(DEV_CA_LIFETIME).unwrap();
    // The intruder trusts our CA (so it accepts our server) but its own certificate is theirs.
    let intruder_cert = theirs
        .issue(&id("orders"), "x", Duration::from_secs(3600))
        .unwrap();
    let intruder = agent_with(intruder_cert, &ours);
    let b = agent(&ours, "billing");
    let b_addr = b.endpoint.local_addr().unwrap();
    let server = b.endpoint.clone();
    let accepted = tokio::spawn(async move { accept_one(&server).await });
    let dialed = intruder.endpoint.connect(b_addr).await;
    if let Ok(peer) = dialed {
        // TLS 1.3 clients finish before the server checks them: the server then closes the connection.
        let closed = tokio::time::timeout(Duration::from_secs(10), peer.connection.closed()).await;
        assert!(closed.is_ok(), "the refused connection is closed");
    }
    assert!(
        accepted.await.unwrap().is_err(),
        "the server refuses the handshake"
    );
    assert_eq!(*b.refusals.lock().unwrap(), vec![Refusal::UnknownCa]);
}

#[tokio::test]
async fn a_certificate_without_a_spiffe_id_is_refused() {
    let ca = Ca::generate(DEV_CA_LIFETIME).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let dns_only = ca
        .issue_with_sans(
            vec![rcgen::SanType::DnsName(
                rcgen::Ia5String::try_from("agent").unwrap(),
            )],
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap();
    let a = agent(&ca, "orders");
    let b = agent_with(dns_only, &ca);
    let b_addr = b.endpoint.local_addr().unwrap();
    let server = b.endpoint.clone();
    tokio::spawn(async move { while server.accept().await.is_some() {} });
    assert!(a.endpoint.connect(b_addr).await.is_err());
    assert_eq!(*a.refusals.lock().unwrap(), vec![Refusal::NoSpiffeId]);
}

#[tokio::test]
async fn a_certificate_that_binds_two_node_names_is_refused() {
    // Bound to two nodes it could speak for either: a CA that signed it
    // made a mistake, and peers take it for neither.
    let ca = Ca::generate(DEV_CA_LIFETIME).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let san = |s: &str| rcgen::SanType::DnsName(rcgen::Ia5String::try_from(s).unwrap());
    let two = ca
        .issue_with_sans(
            vec![
                rcgen::SanType::URI(rcgen::Ia5String::try_from(id("orders").to_string()).unwrap()),
                san("a.node.shoal"),
                san("b.node.shoal"),
            ],
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap();
    let a = agent(&ca, "orders");
    let b = agent_with(two, &ca);
    let b_addr = b.endpoint.local_addr().unwrap();
    let server = b.endpoint.clone();
    tokio::spawn(async move { while server.accept().await.is_some() {} });
    assert!(a.endpoint.connect(b_addr).await.is_err());
    assert_eq!(*a.refusals.lock().unwrap(), vec![Refusal::BadCertificate]);
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = Ca::generate(DEV_CA_LIFETIME).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_between(
            &id("billing"),
            "agent",
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    let a = agent(&ca, "orders");
    let b = agent_with(expired, &ca);
    let b_addr = b.endpoint.local_addr().unwrap();
    let server = b.endpoint.clone();
    tokio::spawn(async move { while server.accept().await.is_some() {} });
    assert!(a.endpoint.connect(b_addr).await.is_err());
    assert_eq!(*a.refusals.lock().unwrap(), vec![Refusal::Expired]);
}

#[tokio::test]
async fn reloaded_certificates_serve_new_connections() {
    let ca = Ca::generate(DEV_CA_LIFETIME).unwrap();
    let a = agent(&ca, "orders");
    let b = agent(&ca, "billing");
    let b_addr = b.endpoint.local_addr().unwrap();
    let server = b.endpoint.clone();
    tokio::spawn(async move {
        while let Some(p) = server.accept().await {
            if let Ok(p) = p {
                tokio::spawn(async move { p.connection.closed().await });
            }
        }
    });
    let first = a.endpoint.connect(b_addr).await.unwrap();
    assert_eq!(first.id, id("billing"));
    // The operator (or the renewal) writes new files; the agent reloads them.
    let dir = tempfile::tempdir().unwrap();
    let renewed = ca
        .issue(&id("payments"), "agent", Duration::from_secs(3600))
        .unwrap();
    let source = write(dir.path(), &ca, &renewed);
    b.store.install(&source.load().unwrap()).unwrap();
    let second = a.endpoint.connect(b_addr).await.unwrap();
    assert_eq!(
        second.id,
        id("payments"),
        "a new connection sees the new certificate"
    );
    assert_eq!(first.id, id("billing"));
    assert!(
        first.connection.close_reason().is_none(),
        "the old connection lives on"
    );
}

#[test]
fn file_sources_notice_changes() {
    let ca = Ca::generate(DEV_CA_LIFETIME).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = write(
        dir.path(),
        &ca,
        &ca.issue(&id("a"), "x", Duration::from_secs(3600)).unwrap(),
    );
    let identity = source.load().unwrap();
    assert!(!source.changed(&identity));
    std::thread::sleep(Duration::from_millis(20));
    write(
        dir.path(),
        &ca,
        &ca.issue(&id("b"), "x", Duration::from_secs(3600)).unwrap(),
    );
    let later = std::time::SystemTime::now() + Duration::from_secs(1);
    let f = std::fs::File::options()
        .write(true)
        .open(dir.path().join("cert.pem"))
        .unwrap();
    f.set_modified(later).unwrap();
    assert!(source.changed(&identity));
    assert_eq!(source.load().unwrap().id, id("b"));
}

#[test]
fn dev_source_issues_once_and_renews_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let source = crate::certs::DevCertSource::new(dir.path(), "agent-1", id("orders"));
    let first = source.load().unwrap();
    assert_eq!(first.id, id("orders"));
    assert!(!source.changed(&first));
    let again = source.load().unwrap();
    assert_eq!(again.chain, first.chain, "a valid certificate is reused");
    assert_eq!(
        again.renew_at(),
        first.renew_at(),
        "reading it again does not push its renewal back"
    );
    // Issued 5 minutes back for clock skew, a one-minute certificate is
    // still not due on arrival (two thirds of its life here is 40 s)...
    let minute = crate::certs::DevCertSource::with_lifetime(
        dir.path(),
        "agent-2",
        id("orders"),
        Duration::from_secs(60),
    );
    let m = minute.load().unwrap();
    assert!(!minute.changed(&m), "not renewed in a loop");
    // ...and one past its life is.
    let short = crate::certs::DevCertSource::with_lifetime(
        dir.path(),
        "agent-3",
        id("orders"),
        Duration::from_millis(200),
    );
    let s = short.load().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(short.changed(&s));
}
