//! Golden files: each fixture AdmissionReview gives the expected
//! AdmissionResponse (patch decoded, compared by value). Rerun with
//! `SHOAL_REGENERATE_GOLDEN=1` to rewrite them after an intended change.
//!
//! Also: every patch applies to its pod, the result is a valid Pod (typed and
//! against the Kubernetes schema), and injecting the result again adds nothing.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

fn fixtures() -> Vec<(String, Value)> {
    let dir = common::crate_dir().join("tests/fixtures/admission");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 11, "fixtures missing in {}", dir.display());
    out
}

async fn answer(review: &Value) -> Value {
    let body = serde_json::to_vec(review).unwrap();
    let resp = common::webhook()
        .review(&body)
        .await
        .expect("review answered");
    serde_json::from_slice(&resp).unwrap()
}

fn agents(pod: &Pod) -> usize {
    let spec = pod.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| c.name == "shoal-agent")
        .count()
}

#[tokio::test]
async fn golden_admission_responses() {
    for (name, review) in fixtures() {
        let answer = answer(&review).await;
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{name}");
        assert_eq!(answer["kind"], "AdmissionReview", "{name}");
        let normalized = common::normalize(&answer);
        assert_eq!(normalized["allowed"], true, "{name}: always fail-open");
        assert_eq!(
            normalized["uid"], review["request"]["uid"],
            "{name}: uid echoed"
        );
        let path = common::crate_dir().join(format!("tests/golden/{name}.json"));
        common::check_golden(&path, &normalized);
    }
}

#[tokio::test]
async fn patched_pods_are_valid_pods_and_inject_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, review) in fixtures() {
        if review["request"]["operation"] != "CREATE" {
            continue;
        }
        let pod = review["request"]["object"].clone();
        let normalized = common::normalize(&answer(&review).await);
        let decision = normalized["auditAnnotations"]["decision"]
            .as_str()
            .unwrap()
            .to_owned();
        let patched = common::apply(&pod, &normalized);
        let typed: Pod = serde_json::from_value(patched.clone())
            .unwrap_or_else(|e| panic!("{name}: patched pod is not a Pod: {e}"));
        let expect_agents = usize::from(decision == "injected" || decision == "already_injected");
        assert_eq!(agents(&typed), expect_agents, "{name}: agent containers");
        if decision == "injected" {
            let labels = typed.metadata.labels.as_ref().unwrap();
            assert_eq!(
                labels.get("shoal.io/injected").map(String::as_str),
                Some("true"),
                "{name}"
            );
            for c in &typed.spec.as_ref().unwrap().containers {
                if c.name != "shoal-agent" {
                    assert!(
                        c.env.iter().flatten().any(|e| e.name == "SHOAL_URL"),
                        "{name}: {} has SHOAL_URL",
                        c.name
                    );
                }
            }
        }

        // Inject twice: the second round adds nothing.
        let mut again = review.clone();
        again["request"]["object"] = patched.clone();
        let second = common::normalize(&answer(&again).await);
        let twice = common::apply(&patched, &second);
        assert_eq!(twice, patched, "{name}: second injection changed the pod");
        let typed_twice: Pod = serde_json::from_value(twice).unwrap();
        assert_eq!(
            agents(&typed_twice),
            expect_agents,
            "{name}: second sidecar"
        );

        // The API server names generateName pods after admission; the schema tool needs a name.
        let mut named = patched.clone();
        if named["metadata"].get("name").is_none() {
            let generated = format!(
                "{}x7k2p",
                named["metadata"]["generateName"].as_str().unwrap_or("pod-")
            );
            named["metadata"]["name"] = Value::String(generated);
        }
        files.push(common::write_json(
            dir.path(),
            &format!("{name}.json"),
            &named,
        ));
    }
    // The patched pods are valid against the Kubernetes schema.
    common::kubernetes_validate(&files);
}

/// With `--pod-certificates`, the agent gets a pod-certificate volume for
/// signer `shoal.io/mesh` with the mesh roots beside it, and reads its
/// certificate there (`SHOAL_CERT_DIR`); the identity service only names
/// peers. Valid against the Kubernetes 1.37 schema (the API is stable
/// there).
#[tokio::test]
async fn golden_pod_certificates() {
    let config = shoal_injector::InjectConfig {
        pod_certificates: true,
        trust_anchors: Some(
            "-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n".to_owned(),
        ),
        ..common::test_config()
    };
    let webhook = shoal_injector::admission::Webhook::new(
        config,
        std::sync::Arc::new(common::namespaces()),
        std::sync::Arc::new(shoal_injector::metrics::Metrics::new()),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for name in ["deployment-pod", "classic-sidecar-tuned"] {
        let review = fixtures().into_iter().find(|(n, _)| n == name).unwrap().1;
        let resp = webhook
            .review(&serde_json::to_vec(&review).unwrap())
            .await
            .unwrap();
        let normalized = common::normalize(&serde_json::from_slice(&resp).unwrap());
        let path = common::crate_dir().join(format!("tests/golden/pod-certificates/{name}.json"));
        common::check_golden(&path, &normalized);
        let patched = common::apply(&review["request"]["object"], &normalized);
        let typed: Pod = serde_json::from_value(patched.clone()).unwrap();
        let agent = typed
            .spec
            .iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .find(|c| c.name == "shoal-agent")
            .unwrap()
            .clone();
        let env: std::collections::BTreeMap<String, String> = agent
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            env.get("SHOAL_CERT_DIR").map(String::as_str),
            Some("/var/run/secrets/shoal.io/identity"),
            "{name}"
        );
        assert!(env.contains_key("SHOAL_IDENTITY_ADDR"), "{name}: peers");
        let volume = typed
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "shoal-identity")
            .unwrap()
            .clone();
        let sources = volume.projected.unwrap().sources.unwrap();
        let cert = sources[0].pod_certificate.as_ref().unwrap();
        assert_eq!(cert.signer_name, "shoal.io/mesh");
        assert_eq!(cert.key_path.as_deref(), Some("key.pem"));
        assert_eq!(cert.certificate_chain_path.as_deref(), Some("cert.pem"));
        let roots = sources[1].cluster_trust_bundle.as_ref().unwrap();
        assert_eq!(roots.signer_name.as_deref(), Some("shoal.io/mesh"));
        assert_eq!(roots.path, "ca.pem");
        let mut named = patched;
        if named["metadata"].get("name").is_none() {
            named["metadata"]["name"] = Value::String(format!("{name}-x7k2p"));
        }
        files.push(common::write_json(
            dir.path(),
            &format!("{name}.json"),
            &named,
        ));
    }
    common::kubernetes_validate_at("1.37.0", &files);

    // Before the mesh CA is loaded (no trust anchors yet), a pod gets no
    // certificate volume: it would wait for it, and its agent would have
    // no identity service to find peers by.
    let early = shoal_injector::admission::Webhook::new(
        shoal_injector::InjectConfig {
            pod_certificates: true,
            ..common::test_config()
        },
        std::sync::Arc::new(common::namespaces()),
        std::sync::Arc::new(shoal_injector::metrics::Metrics::new()),
    );
    let review = fixtures()
        .into_iter()
        .find(|(n, _)| n == "deployment-pod")
        .unwrap()
        .1;
    let resp = early
        .review(&serde_json::to_vec(&review).unwrap())
        .await
        .unwrap();
    let patch = common::normalize(&serde_json::from_slice(&resp).unwrap())["patch"].to_string();
    assert!(patch.contains("shoal-token"), "{patch}");
    assert!(!patch.contains("shoal-identity"), "{patch}");
    assert!(!patch.contains("SHOAL_CERT_DIR"), "{patch}");
}
