#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

const NOW: i64 = 1_700_000_000;

fn names() -> Vec<String> {
    service_dns_names("shoal-injector", "shoal-system")
}

/// Checks that `cert` chains to one of the CAs in `bundle` for `name` at `now`.
fn verify(bundle: &str, cert: &str, name: &str, now: i64) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        crate::tls::provider(),
    )
    .build()
    .unwrap();
    let leaf = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let when =
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(u64::try_from(now).unwrap()));
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            when,
        )
        .map(|_| ())
}

use std::sync::Arc;

#[test]
fn generated_chain_verifies() {
    let m = generate_all(NOW, &names(), None).unwrap();
    assert_eq!(m.ca_bundle, m.ca_cert);
    assert_eq!(m.cert_not_after, NOW + SERVING_VALIDITY_SECONDS);
    verify(
        &m.ca_bundle,
        &m.cert,
        "shoal-injector.shoal-system.svc",
        NOW + 60,
    )
    .unwrap();
    assert!(verify(&m.ca_bundle, &m.cert, "elsewhere.example", NOW + 60).is_err());
    assert!(verify(
        &m.ca_bundle,
        &m.cert,
        "shoal-injector.shoal-system.svc",
        m.cert_not_after + 10
    )
    .is_err());
}

#[test]
fn renewed_serving_cert_chains_to_the_stored_ca() {
    let m = generate_all(NOW, &names(), None).unwrap();
    let later = NOW + 70 * 24 * 3600;
    let (cert, _key, not_after) =
        issue_serving(&m.ca_key, m.ca_not_after, later, &names()).unwrap();
    assert!(not_after > m.cert_not_after);
    verify(
        &m.ca_cert,
        &cert,
        "shoal-injector.shoal-system.svc",
        later + 60,
    )
    .unwrap();
}

#[test]
fn new_ca_keeps_the_previous_one_in_the_bundle() {
    let old = generate_all(NOW, &names(), None).unwrap();
    let new = generate_all(NOW + 10, &names(), Some(&old.ca_cert)).unwrap();
    assert!(new.ca_bundle.starts_with(&new.ca_cert));
    assert!(new.ca_bundle.ends_with(&old.ca_cert));
    // Both the old and the new serving certificates verify against the bundle.
    verify(&new.ca_bundle, &new.cert, "shoal-injector", NOW + 60).unwrap();
    verify(&new.ca_bundle, &old.cert, "shoal-injector", NOW + 60).unwrap();
}

#[test]
fn rotation_plan() {
    let m = generate_all(NOW, &names(), None).unwrap();
    assert_eq!(plan(NOW, None, &names()), Plan::RenewAll);
    assert_eq!(plan(NOW, Some(&m), &names()), Plan::Keep);
    assert_eq!(plan(NOW + 59 * 24 * 3600, Some(&m), &names()), Plan::Keep);
    assert_eq!(
        plan(NOW + 61 * 24 * 3600, Some(&m), &names()),
        Plan::RenewServing
    );
    assert_eq!(
        plan(NOW, Some(&m), &["other".to_owned()]),
        Plan::RenewServing
    );
    let ca_old = TlsMaterial {
        ca_not_after: NOW + CA_VALIDITY_SECONDS / 3 - 1,
        ..m.clone()
    };
    assert_eq!(plan(NOW, Some(&ca_old), &names()), Plan::RenewAll);
    let expired = TlsMaterial {
        cert_not_after: NOW - 1,
        ..m
    };
    assert_eq!(plan(NOW, Some(&expired), &names()), Plan::RenewServing);
}

#[test]
fn secret_round_trip() {
    let m = generate_all(NOW, &names(), None).unwrap();
    let s = to_secret(
        "shoal-injector-tls",
        "shoal-system",
        &m,
        Some("42".to_owned()),
    );
    assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(s.metadata.resource_version.as_deref(), Some("42"));
    assert_eq!(from_secret(&s), Some(m.clone()));
    // Through JSON, as the API server stores it (data base64-encoded).
    let back: Secret = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
    assert_eq!(from_secret(&back), Some(m));
    let mut partial = s.clone();
    partial.data.as_mut().unwrap().remove(KEY_TLS_KEY);
    assert_eq!(from_secret(&partial), None);
    assert_eq!(from_secret(&Secret::default()), None);
}

#[test]
fn ca_bundle_patch_only_when_needed() {
    let hook = |bundle: Option<&str>| MutatingWebhook {
        name: "sidecar.shoal.io".to_owned(),
        client_config: WebhookClientConfig {
            ca_bundle: bundle.map(|b| ByteString(b.as_bytes().to_vec())),
            ..WebhookClientConfig::default()
        },
        ..MutatingWebhook::default()
    };
    let config = MutatingWebhookConfiguration {
        webhooks: Some(vec![hook(Some("PEM")), hook(None)]),
        ..MutatingWebhookConfiguration::default()
    };
    let ops = ca_bundle_patch(&config, "PEM").unwrap();
    assert_eq!(ops.len(), 1);
    let v = serde_json::to_value(&ops).unwrap();
    assert_eq!(v[0]["path"], "/webhooks/1/clientConfig/caBundle");
    assert_eq!(
        v[0]["value"],
        base64::engine::general_purpose::STANDARD.encode("PEM")
    );
    let done = MutatingWebhookConfiguration {
        webhooks: Some(vec![hook(Some("PEM"))]),
        ..MutatingWebhookConfiguration::default()
    };
    assert!(ca_bundle_patch(&done, "PEM").is_none());
}
