//! The signer's decision table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use k8s_openapi::api::core::v1::PodSpec;

const NS: &str = "shop";

fn stub_csr(key: &rcgen::KeyPair) -> k8s_openapi::ByteString {
    let csr = rcgen::CertificateParams::default()
        .serialize_request(key)
        .unwrap();
    k8s_openapi::ByteString(csr.der().to_vec())
}

fn request(key: &rcgen::KeyPair) -> PodCertificateRequestSpec {
    PodCertificateRequestSpec {
        signer_name: SIGNER_NAME.to_owned(),
        pod_name: "orders-0".to_owned(),
        pod_uid: "uid-1".to_owned(),
        service_account_name: "orders".to_owned(),
        service_account_uid: "sa-uid".to_owned(),
        node_name: "node-a".to_owned(),
        node_uid: "node-uid".to_owned(),
        max_expiration_seconds: Some(86_400),
        stub_pkc_s10_request: stub_csr(key),
        unverified_user_annotations: None,
    }
}

fn pod() -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("orders-0".to_owned()),
            namespace: Some(NS.to_owned()),
            uid: Some("uid-1".to_owned()),
            labels: Some(
                [(
                    crate::annotations::INJECTED_LABEL.to_owned(),
                    "true".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some("orders".to_owned()),
            node_name: Some("node-a".to_owned()),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

fn p256() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn reason(r: Result<Grant, Refusal>) -> Reason {
    match r {
        Ok(_) => Reason::Issued,
        Err(refusal) => refusal.reason,
    }
}

#[test]
fn an_injected_pods_request_is_granted_its_workload_identity_bound_to_its_node_name() {
    let key = p256();
    let grant = decide(NS, &request(&key), Some(&pod()), "cluster.local", DAY).unwrap();
    assert_eq!(
        grant.id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/orders"
    );
    assert_eq!(grant.node, "orders-0.shop");
    assert_eq!(grant.lifetime, DAY);
    assert_eq!(
        rcgen::PublicKeyData::der_bytes(&grant.public_key),
        rcgen::PublicKeyData::der_bytes(&key)
    );
}

#[test]
fn the_lifetime_is_the_shorter_of_the_signers_and_the_requests_but_never_under_an_hour() {
    let key = p256();
    let mut req = request(&key);
    req.max_expiration_seconds = Some(7200);
    let grant = decide(NS, &req, Some(&pod()), "cluster.local", DAY).unwrap();
    assert_eq!(grant.lifetime, Duration::from_secs(7200));
    req.max_expiration_seconds = None;
    let grant = decide(NS, &req, Some(&pod()), "cluster.local", DAY * 30).unwrap();
    assert_eq!(grant.lifetime, DEFAULT_MAX_EXPIRATION);
    let grant = decide(
        NS,
        &req,
        Some(&pod()),
        "cluster.local",
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(grant.lifetime, MIN_LIFETIME);
}

/// A change to a request and its pod that the signer must notice.
type Change = dyn Fn(&mut PodCertificateRequestSpec, &mut Pod);

#[test]
fn every_mismatch_between_the_request_and_the_pod_is_denied() {
    let key = p256();
    let req = request(&key);
    let cases: Vec<(&str, Box<Change>, Reason)> = vec![
        (
            "another UID",
            Box::new(|_, p| p.metadata.uid = Some("uid-2".into())),
            Reason::PodMismatch,
        ),
        (
            "another service account",
            Box::new(|_, p| p.spec.as_mut().unwrap().service_account_name = Some("billing".into())),
            Reason::PodMismatch,
        ),
        (
            "no service account (default)",
            Box::new(|_, p| p.spec.as_mut().unwrap().service_account_name = None),
            Reason::PodMismatch,
        ),
        (
            "another node",
            Box::new(|_, p| p.spec.as_mut().unwrap().node_name = Some("node-b".into())),
            Reason::PodMismatch,
        ),
        (
            "not injected",
            Box::new(|_, p| p.metadata.labels = None),
            Reason::NotInjected,
        ),
        (
            "injected label false",
            Box::new(|_, p| {
                p.metadata.labels = Some(
                    [(
                        crate::annotations::INJECTED_LABEL.to_owned(),
                        "false".to_owned(),
                    )]
                    .into(),
                )
            }),
            Reason::NotInjected,
        ),
        (
            "a user annotation",
            Box::new(|r, _| {
                r.unverified_user_annotations =
                    Some([("example.com/ttl".to_owned(), "1h".to_owned())].into())
            }),
            Reason::UnsupportedAnnotation,
        ),
        (
            "a stub CSR that is not one",
            Box::new(|r, _| r.stub_pkc_s10_request = k8s_openapi::ByteString(b"garbage".to_vec())),
            Reason::BadRequest,
        ),
        (
            "a service account no SPIFFE ID can name",
            Box::new(|r, p| {
                r.service_account_name = "a/b".into();
                p.spec.as_mut().unwrap().service_account_name = Some("a/b".into());
            }),
            Reason::BadRequest,
        ),
    ];
    for (what, change, want) in cases {
        let mut r = req.clone();
        let mut p = pod();
        change(&mut r, &mut p);
        assert_eq!(
            reason(decide(NS, &r, Some(&p), "cluster.local", DAY)),
            want,
            "{what}"
        );
    }
    assert_eq!(
        reason(decide(NS, &req, None, "cluster.local", DAY)),
        Reason::PodMismatch,
        "a pod that is gone"
    );
}

#[test]
fn keys_the_mesh_tls_cannot_use_are_denied_as_unsupported_key_types() {
    for (alg, want) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, Reason::Issued),
        (&rcgen::PKCS_ECDSA_P384_SHA384, Reason::Issued),
        (&rcgen::PKCS_ED25519, Reason::Issued),
    ] {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        assert_eq!(
            reason(decide(
                NS,
                &request(&key),
                Some(&pod()),
                "cluster.local",
                DAY
            )),
            want,
            "{alg:?}"
        );
    }
    // RSA: ring cannot generate one, so a fixed 2048-bit test key.
    let rsa = rcgen::KeyPair::from_pem(RSA_KEY).unwrap();
    let refusal = decide(NS, &request(&rsa), Some(&pod()), "cluster.local", DAY).unwrap_err();
    assert_eq!(refusal.reason, Reason::UnsupportedKeyType);
    assert!(refusal.message.contains(KEY_TYPE), "{}", refusal.message);
}

#[test]
fn a_decided_request_is_not_answered_again() {
    let now = 1_800_000_000;
    assert!(!decided(None));
    assert!(!decided(Some(&PodCertificateRequestStatus::default())));
    let issued = issued_status("PEM".into(), now - 300, now + 3600, now, Some(1));
    assert!(decided(Some(&issued)));
    let refused = refused_status(&refuse(Reason::NotInjected, "no"), now, None);
    assert!(decided(Some(&refused)));
    let conditions = refused.conditions.unwrap();
    assert_eq!(conditions[0].type_, "Denied");
    assert_eq!(conditions[0].reason, "NotInjected");
    let failed = refused_status(&refuse(Reason::SignerFailed, "CA expired"), now, None);
    assert_eq!(failed.conditions.unwrap()[0].type_, "Failed");
}

#[test]
fn an_issued_status_asks_for_renewal_at_70_percent_and_matches_the_leaf() {
    let now = 1_800_000_000;
    let status = issued_status("PEM".into(), now - 300, now + 1000, now, None);
    assert_eq!(status.begin_refresh_at.unwrap().0.as_second(), now + 700);
    assert_eq!(status.not_before.unwrap().0.as_second(), now - 300);
    assert_eq!(status.not_after.unwrap().0.as_second(), now + 1000);
    assert_eq!(status.conditions.unwrap()[0].type_, "Issued");
}

#[test]
fn the_trust_bundle_is_linked_to_the_signer_and_labelled_for_the_projection() {
    let b = trust_bundle("PEM");
    assert_eq!(b.metadata.name.as_deref(), Some(TRUST_BUNDLE_NAME));
    assert!(TRUST_BUNDLE_NAME.starts_with(&SIGNER_NAME.replace('/', ":")));
    assert_eq!(b.spec.signer_name.as_deref(), Some(SIGNER_NAME));
    assert_eq!(
        b.metadata
            .labels
            .unwrap()
            .get(TRUST_BUNDLE_LABEL)
            .map(String::as_str),
        Some(TRUST_BUNDLE_LABEL_VALUE)
    );
}

const RSA_KEY: &str = include_str!("rsa-test-key.pem");

#[test]
fn an_issued_certificate_lives_exactly_its_granted_lifetime_back_dating_included() {
    let now = 1_800_000_000;
    let ca = crate::meshca::MeshCa::new(crate::meshca::generate(now - 3600).unwrap()).unwrap();
    let key = p256();
    let mut req = request(&key);
    req.max_expiration_seconds = Some(7200);
    let grant = decide(NS, &req, Some(&pod()), "cluster.local", DAY).unwrap();
    let issued = issue(&ca, &grant, now).unwrap();
    assert_eq!(issued.not_after - issued.not_before, 7200);
    assert!(issued.not_before < now, "back-dated for clock skew");
}

#[test]
fn a_ca_that_expires_within_the_hour_fails_instead_of_issuing_too_short() {
    let now = 1_800_000_000;
    // A CA made five years back expires CA_VALIDITY_SECONDS after that.
    let made = now - crate::meshca::CA_VALIDITY_SECONDS + 1800;
    let ca = crate::meshca::MeshCa::new(crate::meshca::generate(made).unwrap()).unwrap();
    let key = p256();
    let grant = decide(NS, &request(&key), Some(&pod()), "cluster.local", DAY).unwrap();
    let refusal = issue(&ca, &grant, now).unwrap_err();
    assert_eq!(refusal.reason, Reason::SignerFailed);
    assert_eq!(refusal.reason.condition_type(), "Failed");
}

#[test]
fn a_key_ring_cannot_verify_is_an_unsupported_key_type_not_a_bad_request() {
    // A stub CSR signed with ECDSA P-521 (made with openssl: ring neither
    // makes nor verifies P-521).
    let der = include_bytes!("p521-stub.csr.der");
    let mut req = request(&p256());
    req.stub_pkc_s10_request = k8s_openapi::ByteString(der.to_vec());
    let refusal = decide(NS, &req, Some(&pod()), "cluster.local", DAY).unwrap_err();
    assert_eq!(
        refusal.reason,
        Reason::UnsupportedKeyType,
        "{}",
        refusal.message
    );
}
