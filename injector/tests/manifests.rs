//! Every manifest under `manifests/`, and every kustomize build of it, is
//! valid against the Kubernetes schemas (kubernetes-validate, strict); the
//! webhook configuration says what the docs promise; the example's pods
//! inject cleanly.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use shoal_injector::offline::{self, Format, OfflineOptions};

/// Custom resources kubernetes-validate has no schema for; checked by shape here.
const CUSTOM_KINDS: [&str; 4] = [
    "cert-manager.io/v1/Issuer",
    "cert-manager.io/v1/Certificate",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
];

fn manifests_dir() -> PathBuf {
    common::repo_dir().join("manifests")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml") {
            out.push(p);
        }
    }
}

fn yaml_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    walk(&manifests_dir(), &mut files);
    files.sort();
    files
}

fn kustomizations() -> Vec<PathBuf> {
    yaml_files()
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .map(|p| p.parent().unwrap().to_path_buf())
        .collect()
}

fn check_custom_resources(docs: &[Value], origin: &str) {
    for d in docs {
        let key = format!(
            "{}/{}",
            d["apiVersion"].as_str().unwrap_or(""),
            d["kind"].as_str().unwrap_or("")
        );
        if d["apiVersion"]
            .as_str()
            .is_some_and(|v| v.contains('.') && !v.contains("k8s.io"))
        {
            assert!(
                CUSTOM_KINDS.contains(&key.as_str()),
                "{origin}: unexpected custom kind {key}"
            );
            assert!(
                d["metadata"]["name"].is_string(),
                "{origin}: {key} without a name"
            );
            assert!(
                d["metadata"]["namespace"].is_string(),
                "{origin}: {key} without a namespace"
            );
            assert!(d["spec"].is_object(), "{origin}: {key} without a spec");
        }
    }
}

#[test]
fn every_manifest_file_is_schema_valid() {
    let files: Vec<PathBuf> = yaml_files()
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            // Kustomizations and strategic-merge patches are not whole objects.
            name != "kustomization.yaml" && !name.ends_with("-patch.yaml")
        })
        .collect();
    assert!(files.len() >= 10, "manifests missing: {files:?}");
    for f in &files {
        let docs =
            offline::parse_documents(&std::fs::read_to_string(f).unwrap(), Format::Yaml).unwrap();
        check_custom_resources(&docs, &f.display().to_string());
    }
    common::kubernetes_validate(&files);
}

#[test]
fn every_kustomize_build_is_schema_valid() {
    let dirs = kustomizations();
    assert!(dirs.len() >= 4, "{dirs:?}");
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let rendered = common::kustomize(dir);
        let docs = offline::parse_documents(&rendered, Format::Yaml).unwrap();
        assert!(!docs.is_empty(), "{}: empty build", dir.display());
        check_custom_resources(&docs, &dir.display().to_string());
        let path = tmp.path().join(format!("build-{i}.yaml"));
        std::fs::write(&path, rendered).unwrap();
        files.push(path);
    }
    common::kubernetes_validate(&files);
}

fn build(dir: &str) -> Vec<Value> {
    offline::parse_documents(&common::kustomize(&manifests_dir().join(dir)), Format::Yaml).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

#[test]
fn base_installs_what_the_docs_promise() {
    let docs = build("base");
    let hook = &find(&docs, "MutatingWebhookConfiguration", "shoal-injector")["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["reinvocationPolicy"], "IfNeeded");
    assert!(hook["timeoutSeconds"].as_i64().is_some_and(|t| t <= 10));
    assert_eq!(
        hook["rules"][0]["operations"],
        serde_json::json!(["CREATE"])
    );
    assert_eq!(hook["rules"][0]["resources"], serde_json::json!(["pods"]));
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate");
    let excluded = &hook["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(excluded["operator"], "NotIn");
    assert_eq!(
        excluded["values"],
        serde_json::json!(["kube-system", "shoal-system"])
    );

    let deploy = find(&docs, "Deployment", "shoal-injector");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert!(pod["topologySpreadConstraints"].is_array());
    let c = &pod["containers"][0];
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert!(c[probe].is_object(), "{probe}");
    }
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    find(&docs, "PodDisruptionBudget", "shoal-injector");
    find(&docs, "Service", "shoal-injector");
    find(&docs, "Namespace", "shoal-system");

    // RBAC: namespaces and pods read-only, nothing cluster-wide beyond the one webhook configuration.
    let role = find(&docs, "ClusterRole", "shoal-injector");
    for rule in role["rules"].as_array().unwrap() {
        let verbs: Vec<&str> = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        if rule["resources"][0] == "namespaces" {
            assert_eq!(verbs, ["get", "list", "watch"]);
        } else if rule["resources"][0] == "tokenreviews" {
            assert_eq!(
                rule["apiGroups"],
                serde_json::json!(["authentication.k8s.io"])
            );
            assert_eq!(verbs, ["create"]);
        } else if rule["resources"][0] == "pods" {
            // Discovery reads injected pods; it never changes them.
            assert_eq!(verbs, ["list", "watch"]);
        } else {
            assert_eq!(rule["resourceNames"], serde_json::json!(["shoal-injector"]));
        }
    }
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"][0] == "tokenreviews"),
        "the identity service needs to create TokenReviews"
    );
    // The mesh CA Secret is readable (and creatable) in shoal-system.
    let ns_role = find(&docs, "Role", "shoal-injector");
    let rules = ns_role["rules"].as_array().unwrap();
    assert!(rules.iter().any(|r| r["resources"][0] == "secrets"
        && r["resourceNames"] == serde_json::json!(["shoal-mesh-ca"])
        && r["verbs"] == serde_json::json!(["get"])));
    assert!(rules.iter().any(|r| r["resources"][0] == "secrets"
        && r["resourceNames"].is_null()
        && r["verbs"] == serde_json::json!(["create"])));
    // The identity port: named in the container, exposed by the Service.
    let ports = deploy["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap();
    assert!(ports
        .iter()
        .any(|p| p["name"] == "identity" && p["containerPort"] == 4711));
    let svc = find(&docs, "Service", "shoal-injector");
    assert!(svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "identity" && p["port"] == 4711 && p["targetPort"] == "identity"));

    // The cert-manager overlay switches bootstrap off and mounts the certificate.
    let cm = build("cert-manager");
    let d = find(&cm, "Deployment", "shoal-injector");
    let env = d["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"] == "SHOAL_INJECTOR_BOOTSTRAP_TLS" && e["value"] == "false"));
    // The mounted certificate is readable by the container's user: either
    // world-readable or group-readable with the pod's fsGroup.
    let pod = &d["spec"]["template"]["spec"];
    let tls = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tls")
        .unwrap();
    let mode = tls["secret"]["defaultMode"].as_i64().unwrap_or(0o644);
    let user = pod["securityContext"]["runAsUser"].as_i64().unwrap();
    assert!(
        mode & 0o004 != 0
            || (mode & 0o040 != 0 && pod["securityContext"]["fsGroup"].as_i64() == Some(user)),
        "uid {user} cannot read the TLS Secret (mode {mode:o}, securityContext {})",
        pod["securityContext"]
    );
    let hook = find(&cm, "MutatingWebhookConfiguration", "shoal-injector");
    assert_eq!(
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "shoal-system/shoal-injector-serving"
    );
}

#[test]
fn example_apps_use_only_shoal_url_and_inject_cleanly() {
    let docs = build("examples/hello");
    let ns = find(&docs, "Namespace", "shoal-demo");
    assert_eq!(ns["metadata"]["annotations"]["shoal.io/inject"], "enabled");
    let text = serde_json::to_string(&docs).unwrap();
    assert!(text.contains("$SHOAL_URL"));
    assert!(
        !text.contains("4700") && !text.contains("localhost"),
        "examples must use only $SHOAL_URL"
    );

    let yaml = offline::render_documents(&docs, Format::Yaml).unwrap();
    let options = OfflineOptions {
        config: common::test_config(),
        namespace_annotations: ns["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect::<BTreeMap<_, _>>(),
        default_namespace: "shoal-demo".to_owned(),
    };
    let (out, report) = offline::inject_text(&yaml, &options).unwrap();
    assert_eq!(report.len(), 2);
    assert!(
        report
            .iter()
            .all(|e| e.reason.as_str() == "injected" && e.warnings.is_empty()),
        "{report:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("hello-injected.yaml");
    std::fs::write(&path, out).unwrap();
    common::kubernetes_validate(&[path]);
}

#[test]
fn the_pod_certificates_overlay_turns_the_signer_on_with_just_its_rights() {
    let docs = build("pod-certificates");
    let deployment = find(&docs, "Deployment", "shoal-injector");
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "SHOAL_POD_CERTIFICATES" && e["value"] == "true"),
        "{env:?}"
    );
    let role = find(&docs, "ClusterRole", "shoal-injector-pod-certificates");
    let rules = role["rules"].as_array().unwrap();
    let signer = rules
        .iter()
        .find(|r| r["resources"][0] == "signers")
        .unwrap();
    assert_eq!(
        signer["resourceNames"],
        serde_json::json!([shoal_injector::podcert::SIGNER_NAME])
    );
    let bundle = rules
        .iter()
        .find(|r| r["resources"][0] == "clustertrustbundles" && r.get("resourceNames").is_some())
        .unwrap();
    assert_eq!(
        bundle["resourceNames"],
        serde_json::json!([shoal_injector::podcert::TRUST_BUNDLE_NAME])
    );
    find(
        &docs,
        "ClusterRoleBinding",
        "shoal-injector-pod-certificates",
    );
    // Everything of the base is still there.
    find(&docs, "MutatingWebhookConfiguration", "shoal-injector");
}
