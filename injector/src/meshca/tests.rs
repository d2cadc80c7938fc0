#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::{ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

const NOW: i64 = 1_700_000_000;
const DAY: i64 = 24 * 3600;
const ID: &str = "spiffe://cluster.local/ns/orders/sa/api";

fn roots(bundle: &str) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(roots)
}

fn at(unix: i64) -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(u64::try_from(unix).unwrap()))
}

/// Whether the mesh (a rustls client-certificate verifier trusting `bundle`)
/// accepts `cert` at `now`.
fn mesh_accepts(bundle: &str, cert: &str, now: i64) -> Result<(), rustls::Error> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(bundle),
        crate::tls::provider(),
    )
    .build()
    .unwrap();
    let leaf = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    verifier.verify_client_cert(&leaf, &[], at(now)).map(|_| ())
}

fn fresh() -> MeshCa {
    MeshCa::new(generate(NOW).unwrap()).unwrap()
}

#[test]
fn agent_certificates_carry_the_spiffe_id_and_chain_to_the_mesh_ca() {
    let ca = fresh();
    assert_eq!(ca.roots(), 1);
    assert_eq!(ca.not_after(), NOW + CA_VALIDITY_SECONDS);
    let agent_key = KeyPair::generate().unwrap();
    let issued = ca.sign_agent(ID, &agent_key, NOW, DAY).unwrap();
    assert_eq!(issued.not_before, NOW - CLOCK_SKEW_SECONDS);
    assert_eq!(issued.not_after, NOW + DAY);

    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(cert.public_key().raw, agent_key.public_key_der());
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names, vec![GeneralName::URI(ID)]);
    assert!(!cert.is_ca());
    assert_eq!(
        cert.validity().not_before.timestamp(),
        NOW - CLOCK_SKEW_SECONDS
    );
    assert_eq!(cert.validity().not_after.timestamp(), NOW + DAY);

    mesh_accepts(ca.trust_bundle(), &issued.cert_pem, NOW + 60).unwrap();
    assert!(mesh_accepts(ca.trust_bundle(), &issued.cert_pem, NOW + DAY + 60).is_err());
    let stranger = fresh();
    assert!(mesh_accepts(stranger.trust_bundle(), &issued.cert_pem, NOW + 60).is_err());
}

#[test]
fn serials_differ_for_the_same_key() {
    let ca = fresh();
    let key = KeyPair::generate().unwrap();
    let serial = |pem: &str| {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        c.raw_serial().to_vec()
    };
    let a = ca.sign_agent(ID, &key, NOW, DAY).unwrap();
    let b = ca.sign_agent(ID, &key, NOW, DAY).unwrap();
    assert_ne!(serial(&a.cert_pem), serial(&b.cert_pem));
}

#[test]
fn certificates_never_outlive_the_ca_and_an_expired_ca_signs_nothing() {
    let ca = fresh();
    let key = KeyPair::generate().unwrap();
    let near_end = ca.not_after() - 3600;
    let issued = ca.sign_agent(ID, &key, near_end, DAY).unwrap();
    assert_eq!(issued.not_after, ca.not_after());
    assert!(ca.sign_agent(ID, &key, ca.not_after() + 1, DAY).is_err());
}

#[test]
fn the_bundle_holds_next_and_previous_roots_once_each() {
    let old = generate(NOW - 400 * DAY).unwrap();
    let next = generate(NOW).unwrap();
    let current = generate(NOW).unwrap();
    let old_ca = MeshCa::new(old.clone()).unwrap();
    let key = KeyPair::generate().unwrap();
    let from_old = old_ca.sign_agent(ID, &key, NOW, DAY).unwrap();

    let ca = MeshCa::new(CaMaterial {
        next: next.cert.clone(),
        // The current CA repeated in previous-ca.crt is not listed twice.
        previous: format!("{}{}", old.cert, current.cert),
        ..current.clone()
    })
    .unwrap();
    assert_eq!(ca.roots(), 3);
    let bundle: Vec<_> = CertificateDer::pem_slice_iter(ca.trust_bundle().as_bytes())
        .map(Result::unwrap)
        .collect();
    let one = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    assert_eq!(
        bundle,
        vec![one(&current.cert), one(&next.cert), one(&old.cert)]
    );

    // Certificates of the retiring CA stay trusted; new ones come from the current CA.
    mesh_accepts(ca.trust_bundle(), &from_old.cert_pem, NOW + 60).unwrap();
    let fresh_cert = ca.sign_agent(ID, &key, NOW, DAY).unwrap();
    mesh_accepts(ca.trust_bundle(), &fresh_cert.cert_pem, NOW + 60).unwrap();
    assert!(mesh_accepts(old_ca.trust_bundle(), &fresh_cert.cert_pem, NOW + 60).is_err());
}

#[test]
fn unusable_material_is_refused() {
    let a = generate(NOW).unwrap();
    let b = generate(NOW).unwrap();
    let err = |m: CaMaterial| MeshCa::new(m).unwrap_err().to_string();
    assert!(err(CaMaterial {
        key: b.key.clone(),
        ..a.clone()
    })
    .contains("does not match"));
    assert!(err(CaMaterial {
        cert: "nope".to_owned(),
        ..a.clone()
    })
    .contains("exactly one"));
    assert!(err(CaMaterial {
        cert: format!("{}{}", a.cert, b.cert),
        ..a.clone()
    })
    .contains("exactly one"));
    assert!(err(CaMaterial {
        previous: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
        ..a.clone()
    })
    .contains(KEY_PREVIOUS_CA_CERT));
    // A leaf certificate (not a CA) cannot be the mesh CA.
    let ca = MeshCa::new(a.clone()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = ca.sign_agent(ID, &leaf_key, NOW, DAY).unwrap();
    assert!(err(CaMaterial {
        cert: leaf.cert_pem,
        key: leaf_key.serialize_pem(),
        ..a
    })
    .contains("not a CA"));
}

#[test]
fn secrets_round_trip_and_partial_ones_are_errors() {
    let m = CaMaterial {
        previous: generate(NOW).unwrap().cert,
        ..generate(NOW).unwrap()
    };
    let s = to_secret(DEFAULT_SECRET, "shoal-system", &m);
    assert_eq!(s.metadata.name.as_deref(), Some(DEFAULT_SECRET));
    assert_eq!(s.type_.as_deref(), Some("Opaque"));
    let keys: Vec<&str> = s
        .data
        .as_ref()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, [KEY_CA_CERT, KEY_CA_KEY, KEY_PREVIOUS_CA_CERT]);
    assert_eq!(from_secret(&s).unwrap(), Some(m.clone()));

    assert_eq!(from_secret(&Secret::default()).unwrap(), None);
    let mut partial = s.clone();
    partial.data.as_mut().unwrap().remove(KEY_CA_KEY);
    assert!(from_secret(&partial).is_err());
    let mut binary = s;
    binary.data.as_mut().unwrap().insert(
        KEY_PREVIOUS_CA_CERT.to_owned(),
        ByteString(vec![0xff, 0xfe]),
    );
    assert!(from_secret(&binary).is_err());
}

#[test]
fn the_identity_endpoint_serves_a_certificate_of_the_mesh_ca() {
    let ca = fresh();
    let names = crate::bootstrap::service_dns_names("shoal-injector", "shoal-system");
    let (issued, key) = ca.issue_serving(&names, NOW, DAY).unwrap();
    crate::tls::certified_key(issued.cert_pem.as_bytes(), key.as_bytes()).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots(ca.trust_bundle()),
        crate::tls::provider(),
    )
    .build()
    .unwrap();
    let leaf = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from("shoal-injector.shoal-system.svc").unwrap(),
            &[],
            at(NOW + 60),
        )
        .unwrap();
}
