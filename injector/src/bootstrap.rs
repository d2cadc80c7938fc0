//! Self-bootstrapped webhook TLS: a CA and a serving certificate made with
//! rcgen, kept in a Secret shared by the injector's replicas, the CA put into
//! the `caBundle` of the MutatingWebhookConfiguration, and both renewed
//! before they expire.
//!
//! The decisions (what to generate, when to rotate, what to write) are pure
//! functions tested on their own; [`reconcile`] is the thin I/O around them.

use std::collections::BTreeMap;

use base64::Engine as _;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

use crate::error::InjectorError;

/// Lifetime of a generated CA.
pub const CA_VALIDITY_SECONDS: i64 = 5 * 365 * 24 * 3600;
/// Lifetime of a generated serving certificate.
pub const SERVING_VALIDITY_SECONDS: i64 = 90 * 24 * 3600;
/// Backdating of `notBefore`, for clocks a little behind.
pub const CLOCK_SKEW_SECONDS: i64 = 3600;
/// How often the Secret is checked for rotation.
pub const DEFAULT_CHECK_INTERVAL_SECONDS: u64 = 3600;
/// Common name of the generated CA.
pub const CA_COMMON_NAME: &str = "shoal-injector-ca";
/// Secret key: the current CA certificate.
pub const KEY_CA_CERT: &str = "ca.crt";
/// Secret key: the current CA's private key.
pub const KEY_CA_KEY: &str = "ca.key";
/// Secret key: every CA the webhook configuration should trust (current and previous).
pub const KEY_CA_BUNDLE: &str = "ca-bundle.crt";
/// Secret key: the serving certificate.
pub const KEY_TLS_CERT: &str = "tls.crt";
/// Secret key: the serving key.
pub const KEY_TLS_KEY: &str = "tls.key";
/// Secret annotation: when the CA expires (unix seconds).
pub const ANN_CA_NOT_AFTER: &str = "shoal.io/ca-not-after";
/// Secret annotation: when the serving certificate expires (unix seconds).
pub const ANN_CERT_NOT_AFTER: &str = "shoal.io/cert-not-after";
/// Secret annotation: the DNS names in the serving certificate, comma separated.
pub const ANN_DNS_NAMES: &str = "shoal.io/dns-names";

/// The DNS names a webhook Service is reached by.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// PEM material of a CA and a serving certificate, with expiry times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsMaterial {
    /// CA certificate.
    pub ca_cert: String,
    /// CA private key.
    pub ca_key: String,
    /// Every CA to trust (the current one first).
    pub ca_bundle: String,
    /// Serving certificate.
    pub cert: String,
    /// Serving key.
    pub key: String,
    /// CA expiry, unix seconds.
    pub ca_not_after: i64,
    /// Serving certificate expiry, unix seconds.
    pub cert_not_after: i64,
    /// DNS names in the serving certificate.
    pub dns_names: Vec<String>,
}

fn time_at(unix: i64) -> Result<OffsetDateTime, InjectorError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| InjectorError::Config(format!("time out of range: {e}")))
}

fn ca_params(now: i64, not_after: i64) -> Result<CertificateParams, InjectorError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time_at(now - CLOCK_SKEW_SECONDS)?;
    params.not_after = time_at(not_after)?;
    Ok(params)
}

/// Generates a fresh CA and a serving certificate for `dns_names`.
/// `previous_ca` (PEM) stays in the bundle so API servers holding the old
/// `caBundle` still trust the webhook during the switch.
pub fn generate_all(
    now: i64,
    dns_names: &[String],
    previous_ca: Option<&str>,
) -> Result<TlsMaterial, InjectorError> {
    let ca_key = KeyPair::generate()?;
    let ca_not_after = now + CA_VALIDITY_SECONDS;
    let ca = ca_params(now, ca_not_after)?.self_signed(&ca_key)?;
    let ca_cert = ca.pem();
    let mut ca_bundle = ca_cert.clone();
    if let Some(prev) = previous_ca.filter(|p| !p.trim().is_empty() && *p != ca_cert) {
        ca_bundle.push_str(prev);
    }
    let (cert, key, cert_not_after) =
        issue_serving(&ca_key.serialize_pem(), ca_not_after, now, dns_names)?;
    Ok(TlsMaterial {
        ca_cert,
        ca_key: ca_key.serialize_pem(),
        ca_bundle,
        cert,
        key,
        ca_not_after,
        cert_not_after,
        dns_names: dns_names.to_vec(),
    })
}

/// Issues a serving certificate for `dns_names` signed by the CA whose key is
/// `ca_key_pem`; returns (certificate PEM, key PEM, expiry). The certificate
/// never outlives the CA.
pub fn issue_serving(
    ca_key_pem: &str,
    ca_not_after: i64,
    now: i64,
    dns_names: &[String],
) -> Result<(String, String, i64), InjectorError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    // The issuer is identified by its name and key: rebuilding the CA from the
    // same parameters and key signs certificates that chain to the stored CA.
    let issuer = ca_params(now, ca_not_after)?.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let not_after = (now + SERVING_VALIDITY_SECONDS).min(ca_not_after);
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().map_or("shoal-injector", |s| s.as_str()),
    );
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = time_at(now - CLOCK_SKEW_SECONDS)?;
    params.not_after = time_at(not_after)?;
    let cert = params.signed_by(&key, &issuer, &ca_key)?;
    Ok((cert.pem(), key.serialize_pem(), not_after))
}

/// What to do with the stored material.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Use it as it is.
    Keep,
    /// Issue a new serving certificate from the stored CA.
    RenewServing,
    /// Generate a new CA and serving certificate.
    RenewAll,
}

/// Renew when less than this fraction of a lifetime is left.
pub const RENEW_REMAINING_FRACTION: i64 = 3;

/// Decides whether stored material is still good at `now`: renew when less
/// than a third of a lifetime is left, or when the DNS names changed.
pub fn plan(now: i64, stored: Option<&TlsMaterial>, dns_names: &[String]) -> Plan {
    let Some(m) = stored else {
        return Plan::RenewAll;
    };
    if m.ca_not_after - now < CA_VALIDITY_SECONDS / RENEW_REMAINING_FRACTION {
        return Plan::RenewAll;
    }
    if m.cert_not_after - now < SERVING_VALIDITY_SECONDS / RENEW_REMAINING_FRACTION
        || m.dns_names != dns_names
    {
        return Plan::RenewServing;
    }
    Plan::Keep
}

/// Reads material back from a Secret; `None` when anything is missing.
pub fn from_secret(secret: &Secret) -> Option<TlsMaterial> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|s| !s.is_empty())
    };
    let ann = secret.metadata.annotations.as_ref()?;
    let num = |k: &str| ann.get(k).and_then(|v| v.parse::<i64>().ok());
    Some(TlsMaterial {
        ca_cert: text(KEY_CA_CERT)?,
        ca_key: text(KEY_CA_KEY)?,
        ca_bundle: text(KEY_CA_BUNDLE).or_else(|| text(KEY_CA_CERT))?,
        cert: text(KEY_TLS_CERT)?,
        key: text(KEY_TLS_KEY)?,
        ca_not_after: num(ANN_CA_NOT_AFTER)?,
        cert_not_after: num(ANN_CERT_NOT_AFTER)?,
        dns_names: ann
            .get(ANN_DNS_NAMES)
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
    })
}

/// The Secret holding `m` (a `kubernetes.io/tls` Secret, so it can be
/// mounted like any other).
pub fn to_secret(
    name: &str,
    namespace: &str,
    m: &TlsMaterial,
    resource_version: Option<String>,
) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        (KEY_CA_CERT, &m.ca_cert),
        (KEY_CA_KEY, &m.ca_key),
        (KEY_CA_BUNDLE, &m.ca_bundle),
        (KEY_TLS_CERT, &m.cert),
        (KEY_TLS_KEY, &m.key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    let annotations: BTreeMap<String, String> = [
        (ANN_CA_NOT_AFTER, m.ca_not_after.to_string()),
        (ANN_CERT_NOT_AFTER, m.cert_not_after.to_string()),
        (ANN_DNS_NAMES, m.dns_names.join(",")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            annotations: Some(annotations),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                "shoal-injector".to_owned(),
            )])),
            resource_version,
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The JSON Patch that sets `caBundle` on every webhook of `config`, or
/// `None` when they all carry it already.
pub fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    bundle_pem: &str,
) -> Option<Vec<PatchOperation>> {
    let wanted = bundle_pem.as_bytes();
    let ops: Vec<PatchOperation> = config
        .webhooks
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, w)| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(wanted))
        .map(|(i, _)| {
            PatchOperation::Add(AddOperation {
                path: PointerBuf::from_tokens([
                    "webhooks",
                    &i.to_string(),
                    "clientConfig",
                    "caBundle",
                ]),
                value: serde_json::Value::String(
                    base64::engine::general_purpose::STANDARD.encode(wanted),
                ),
            })
        })
        .collect();
    (!ops.is_empty()).then_some(ops)
}

/// Where bootstrap keeps and publishes its material.
#[derive(Clone, Debug)]
pub struct BootstrapTarget {
    /// Namespace of the Secret (the injector's own).
    pub namespace: String,
    /// Name of the Secret.
    pub secret: String,
    /// Name of the MutatingWebhookConfiguration whose caBundle is patched.
    pub webhook_configuration: String,
    /// DNS names of the serving certificate.
    pub dns_names: Vec<String>,
}

/// One bootstrap round: read the Secret, renew what is due (losing a race
/// to another replica means using what it wrote), and make sure the webhook
/// configuration trusts the CA. Returns the material to serve.
pub async fn reconcile(
    client: kube::Client,
    target: &BootstrapTarget,
    now: i64,
) -> Result<TlsMaterial, InjectorError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &target.namespace);
    let existing = secrets.get_opt(&target.secret).await?;
    let stored = existing.as_ref().and_then(from_secret);
    let material = match plan(now, stored.as_ref(), &target.dns_names) {
        Plan::Keep => stored,
        p => {
            let new = match (p, stored.as_ref()) {
                (Plan::RenewServing, Some(s)) => {
                    let (cert, key, cert_not_after) =
                        issue_serving(&s.ca_key, s.ca_not_after, now, &target.dns_names)?;
                    TlsMaterial {
                        cert,
                        key,
                        cert_not_after,
                        dns_names: target.dns_names.clone(),
                        ..s.clone()
                    }
                }
                _ => generate_all(
                    now,
                    &target.dns_names,
                    stored.as_ref().map(|s| s.ca_cert.as_str()),
                )?,
            };
            let rv = existing
                .as_ref()
                .and_then(|s| s.metadata.resource_version.clone());
            let body = to_secret(&target.secret, &target.namespace, &new, rv.clone());
            let written = if rv.is_some() {
                secrets
                    .replace(&target.secret, &PostParams::default(), &body)
                    .await
            } else {
                secrets.create(&PostParams::default(), &body).await
            };
            match written {
                Ok(_) => {
                    tracing::info!(secret = %target.secret, plan = ?p, "webhook certificate written");
                    Some(new)
                }
                // Another replica won the race: use what it wrote.
                Err(kube::Error::Api(e)) if e.code == 409 => secrets
                    .get_opt(&target.secret)
                    .await?
                    .as_ref()
                    .and_then(from_secret),
                Err(e) => return Err(e.into()),
            }
        }
    };
    let material =
        material.ok_or_else(|| InjectorError::Tls("webhook Secret is incomplete".to_owned()))?;

    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    match configs.get_opt(&target.webhook_configuration).await? {
        Some(cfg) => {
            if let Some(ops) = ca_bundle_patch(&cfg, &material.ca_bundle) {
                configs
                    .patch(
                        &target.webhook_configuration,
                        &PatchParams::default(),
                        &Patch::Json::<()>(json_patch::Patch(ops)),
                    )
                    .await?;
                tracing::info!(webhook = %target.webhook_configuration, "caBundle updated");
            }
        }
        None => {
            tracing::warn!(webhook = %target.webhook_configuration, "MutatingWebhookConfiguration not found; caBundle not set")
        }
    }
    Ok(material)
}

#[cfg(test)]
mod tests;
