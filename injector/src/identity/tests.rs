#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::UserInfo;
use rcgen::{CertificateParams, KeyPair, SanType};

const TD: &str = "cluster.local";

fn policy() -> Policy {
    Policy {
        trust_domain: TD.to_owned(),
        audience: "shoal".to_owned(),
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}").parse().unwrap()
}

/// What an audience-aware API server answers for a pod-bound token of
/// `ns`/`sa` in pod `web-0`.
fn good(ns: &str, sa: &str) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(vec!["shoal".to_owned()]),
        error: None,
        user: Some(UserInfo {
            username: Some(format!("system:serviceaccount:{ns}:{sa}")),
            uid: Some("6a1d6a0e".to_owned()),
            groups: Some(vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".to_owned(),
            ]),
            extra: Some(BTreeMap::from([
                (EXTRA_POD_NAME.to_owned(), vec!["web-0".to_owned()]),
                (EXTRA_POD_UID.to_owned(), vec!["1f2e".to_owned()]),
            ])),
        }),
    }
}

fn unauthenticated_with(error: Option<&str>) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(false),
        error: error.map(str::to_owned),
        ..TokenReviewStatus::default()
    }
}

fn with_user(f: impl FnOnce(&mut UserInfo)) -> TokenReviewStatus {
    let mut s = good("orders", "api");
    f(s.user.as_mut().unwrap());
    s
}

#[test]
fn decision_table() {
    let wanted = id("orders", "api");
    let cases: Vec<(&str, TokenReviewStatus, SpiffeId, Option<Outcome>)> = vec![
        ("pod-bound token of the asked service account", good("orders", "api"), wanted.clone(), None),
        (
            "expired",
            unauthenticated_with(Some("[invalid bearer token, service account token has expired]")),
            wanted.clone(),
            Some(Outcome::TokenExpired),
        ),
        (
            "other audience, audience-aware server",
            unauthenticated_with(Some(
                "[invalid bearer token, token audiences [\"https://kubernetes.default.svc\"] is invalid for the target audiences [\"shoal\"]]",
            )),
            wanted.clone(),
            Some(Outcome::TokenAudience),
        ),
        (
            "bad signature",
            unauthenticated_with(Some("[invalid bearer token, square/go-jose: error in cryptographic primitive]")),
            wanted.clone(),
            Some(Outcome::TokenInvalid),
        ),
        ("unauthenticated without a reason", unauthenticated_with(None), wanted.clone(), Some(Outcome::TokenInvalid)),
        (
            "no authenticated field",
            TokenReviewStatus::default(),
            wanted.clone(),
            Some(Outcome::TokenInvalid),
        ),
        (
            "authenticated, audiences not said (audience-unaware authenticator)",
            TokenReviewStatus { audiences: None, ..good("orders", "api") },
            wanted.clone(),
            Some(Outcome::TokenAudience),
        ),
        (
            "authenticated for another audience",
            TokenReviewStatus {
                audiences: Some(vec!["https://kubernetes.default.svc".to_owned()]),
                ..good("orders", "api")
            },
            wanted.clone(),
            Some(Outcome::TokenAudience),
        ),
        (
            "a user, not a service account",
            with_user(|u| u.username = Some("alice@example.com".to_owned())),
            wanted.clone(),
            Some(Outcome::IdentityMismatch),
        ),
        (
            "malformed service-account username",
            with_user(|u| u.username = Some("system:serviceaccount:orders".to_owned())),
            wanted.clone(),
            Some(Outcome::IdentityMismatch),
        ),
        (
            "no username",
            with_user(|u| u.username = None),
            wanted.clone(),
            Some(Outcome::IdentityMismatch),
        ),
        (
            "not bound to a pod (a Secret-based token)",
            with_user(|u| u.extra = None),
            wanted.clone(),
            Some(Outcome::IdentityMismatch),
        ),
        (
            "two pod names",
            with_user(|u| {
                u.extra = Some(BTreeMap::from([(
                    EXTRA_POD_NAME.to_owned(),
                    vec!["a".to_owned(), "b".to_owned()],
                )]))
            }),
            wanted.clone(),
            Some(Outcome::IdentityMismatch),
        ),
        (
            "another service account",
            good("orders", "billing"),
            wanted.clone(),
            Some(Outcome::IdentityMismatch),
        ),
        (
            "same service account name, another namespace",
            good("payments", "api"),
            wanted.clone(),
            Some(Outcome::IdentityMismatch),
        ),
        (
            "CSR for another trust domain",
            good("orders", "api"),
            "spiffe://other.mesh/ns/orders/sa/api".parse().unwrap(),
            Some(Outcome::IdentityMismatch),
        ),
    ];
    for (name, status, wanted, expected) in cases {
        let got = decide(&status, &wanted, &policy());
        match (expected, &got) {
            (None, Ok(a)) => {
                assert_eq!(a.pod, "web-0", "{name}");
                assert_eq!(a.pod_uid.as_deref(), Some("1f2e"), "{name}");
            }
            (Some(o), Err(d)) => {
                assert_eq!(d.outcome, o, "{name}: {}", d.message);
                assert!(!d.message.is_empty(), "{name}");
            }
            _ => panic!("{name}: expected {expected:?}, got {got:?}"),
        }
    }
}

#[test]
fn denials_say_what_was_wrong() {
    let d = decide(&good("orders", "billing"), &id("orders", "api"), &policy()).unwrap_err();
    assert!(d.message.contains("orders/billing"), "{}", d.message);
    assert!(
        d.message
            .contains("spiffe://cluster.local/ns/orders/sa/api"),
        "{}",
        d.message
    );
    let d = decide(
        &unauthenticated_with(Some("Token has expired.")),
        &id("orders", "api"),
        &policy(),
    )
    .unwrap_err();
    assert!(d.message.contains("Token has expired."), "{}", d.message);
}

#[test]
fn outcomes_have_distinct_codes_and_fitting_statuses() {
    let codes: std::collections::BTreeSet<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(codes.len(), Outcome::ALL.len());
    assert_eq!(Outcome::Issued.status(), StatusCode::OK);
    assert_eq!(Outcome::BadCsr.status(), StatusCode::BAD_REQUEST);
    assert_eq!(Outcome::TokenExpired.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(Outcome::IdentityMismatch.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        Outcome::ApiUnavailable.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

fn csr_with(sans: Vec<SanType>) -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (csr, key)
}

fn uri(s: &str) -> SanType {
    SanType::URI(rcgen::Ia5String::try_from(s.to_owned()).unwrap())
}

#[test]
fn a_good_csr_gives_its_spiffe_id_and_key() {
    let (pem, key) = csr_with(vec![uri("spiffe://cluster.local/ns/orders/sa/api")]);
    let csr = parse_csr(&pem).unwrap();
    assert_eq!(csr.id, id("orders", "api"));
    assert_eq!(
        rcgen::PublicKeyData::der_bytes(&csr.public_key),
        key.public_key_raw()
    );
}

#[test]
fn bad_csrs_are_refused() {
    let dns = SanType::DnsName(rcgen::Ia5String::try_from("web-0".to_owned()).unwrap());
    let cases = [
        ("no SAN", csr_with(vec![]).0, "exactly one"),
        (
            "only a DNS name",
            csr_with(vec![dns.clone()]).0,
            "exactly one",
        ),
        (
            "a SPIFFE ID and a DNS name",
            csr_with(vec![uri("spiffe://cluster.local/ns/a/sa/b"), dns]).0,
            "exactly one",
        ),
        (
            "two SPIFFE IDs",
            csr_with(vec![
                uri("spiffe://cluster.local/ns/a/sa/b"),
                uri("spiffe://cluster.local/ns/a/sa/c"),
            ])
            .0,
            "exactly one",
        ),
        (
            "not a SPIFFE URI",
            csr_with(vec![uri("https://example.com/x")]).0,
            "not a SPIFFE ID",
        ),
        (
            "a SPIFFE ID of another shape",
            csr_with(vec![uri("spiffe://cluster.local/workload/x")]).0,
            "spiffe://<trust-domain>",
        ),
        ("not PEM", "hello".to_owned(), "PEM"),
        (
            "a certificate, not a CSR",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
            "PEM",
        ),
        (
            "garbage inside the PEM",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .to_owned(),
            "cannot parse",
        ),
    ];
    for (name, pem, says) in cases {
        let d = parse_csr(&pem).unwrap_err();
        assert_eq!(d.outcome, Outcome::BadCsr, "{name}");
        assert!(d.message.contains(says), "{name}: {}", d.message);
    }
}

#[test]
fn a_csr_whose_signature_does_not_verify_is_refused() {
    use base64::Engine as _;
    let (pem, _) = csr_with(vec![uri("spiffe://cluster.local/ns/orders/sa/api")]);
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    // The signature is the last bytes of the DER: flip one bit of it.
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let tampered = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    );
    let d = parse_csr(&tampered).unwrap_err();
    assert_eq!(d.outcome, Outcome::BadCsr);
    assert!(d.message.contains("signature"), "{}", d.message);
}

#[test]
fn spiffe_ids_parse_and_print() {
    let s = "spiffe://cluster.local/ns/orders/sa/default";
    assert_eq!(s.parse::<SpiffeId>().unwrap().to_string(), s);
    for bad in [
        "https://x/ns/a/sa/b",
        "spiffe://x/ns/a",
        "spiffe://x/ns//sa/b",
        "spiffe://x/ns/A/sa/b",
        "spiffe://x/ns/a/sa/b/extra",
        "spiffe:///ns/a/sa/b",
    ] {
        assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
    }
}
