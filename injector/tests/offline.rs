//! `shoal inject` (offline injection): the library function the CLI calls
//! gives the same pod specs as the webhook, its output is valid against the
//! Kubernetes schemas, and injecting twice changes nothing.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use serde_json::{json, Value};
use shoal_injector::offline::{self, Format, OfflineOptions};

fn options() -> OfflineOptions {
    OfflineOptions {
        config: common::test_config(),
        namespace_annotations: BTreeMap::from([(
            "shoal.io/inject".to_owned(),
            "enabled".to_owned(),
        )]),
        default_namespace: "shoal-demo".to_owned(),
    }
}

fn input() -> String {
    std::fs::read_to_string(common::crate_dir().join("tests/fixtures/offline/workloads.yaml"))
        .unwrap()
}

/// Every (object, template pointer, controller kind) in the documents.
fn templates(docs: &[Value]) -> Vec<(String, Value, Option<&'static str>)> {
    let mut out = Vec::new();
    let mut all: Vec<Value> = Vec::new();
    for d in docs {
        if d["kind"] == "List" {
            all.extend(d["items"].as_array().unwrap().iter().cloned());
        } else {
            all.push(d.clone());
        }
    }
    for d in all {
        let name = format!(
            "{}/{}",
            d["kind"].as_str().unwrap(),
            d["metadata"]["name"].as_str().unwrap()
        );
        let (ptr, owner) = match d["kind"].as_str().unwrap() {
            "Pod" => ("", None),
            "Deployment" => ("/spec/template", Some("ReplicaSet")),
            "StatefulSet" => ("/spec/template", Some("StatefulSet")),
            "DaemonSet" => ("/spec/template", Some("DaemonSet")),
            "Job" => ("/spec/template", Some("Job")),
            "CronJob" => ("/spec/jobTemplate/spec/template", Some("Job")),
            _ => continue,
        };
        let mut t = d.pointer(ptr).unwrap().clone();
        if ptr.is_empty() {
            t = json!({"metadata": t["metadata"], "spec": t["spec"]});
        }
        if let Some(ns) = d["metadata"].get("namespace") {
            t["metadata"]["namespace"] = ns.clone();
        }
        out.push((name, t, owner));
    }
    out
}

/// The pod the webhook would see for a template, and what it makes of it.
async fn webhook_pod(template: &Value, owner: Option<&str>) -> Value {
    let namespace = template["metadata"]["namespace"]
        .as_str()
        .unwrap_or("shoal-demo")
        .to_owned();
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"].clone(), "spec": template["spec"].clone()});
    if pod["metadata"].is_null() {
        pod["metadata"] = json!({});
    }
    pod["metadata"]["namespace"] = json!(namespace);
    if let Some(kind) = owner {
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind, "name": "owner", "uid": "u", "controller": true}]);
    }
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "offline", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE", "userInfo": {"username": "test"}, "object": pod}
    });
    // The namespace every object is in is opted in, like `options()` says.
    let mut namespaces = common::namespaces();
    namespaces.0.insert(
        namespace.clone(),
        BTreeMap::from([("shoal.io/inject".to_owned(), "enabled".to_owned())]),
    );
    let webhook = shoal_injector::admission::Webhook::new(
        common::test_config(),
        std::sync::Arc::new(namespaces),
        std::sync::Arc::new(shoal_injector::metrics::Metrics::new()),
    );
    let resp = webhook
        .review(&serde_json::to_vec(&review).unwrap())
        .await
        .unwrap();
    let normalized = common::normalize(&serde_json::from_slice(&resp).unwrap());
    common::apply(&pod, &normalized)
}

#[tokio::test]
async fn offline_injection_equals_the_webhook() {
    let (out, report) = offline::inject_text(&input(), &options()).unwrap();
    let before = offline::parse_documents(&input(), Format::Yaml).unwrap();
    let after = offline::parse_documents(&out, Format::Yaml).unwrap();
    assert_eq!(before.len(), after.len(), "documents kept");
    assert_eq!(before[0], after[0], "ConfigMap untouched");
    assert_eq!(
        before[7]["items"][1], after[7]["items"][1],
        "Service untouched"
    );

    let reasons: BTreeMap<String, &str> = report
        .iter()
        .map(|e| (e.object.clone(), e.reason.as_str()))
        .collect();
    assert_eq!(reasons["Deployment/orders"], "injected");
    assert_eq!(reasons["Deployment/legacy"], "pod_disabled");
    assert_eq!(reasons["CronJob/nightly"], "injected");
    assert_eq!(report.len(), 7, "{report:?}");

    let before_t = templates(&before);
    let after_t = templates(&after);
    assert_eq!(before_t.len(), after_t.len());
    for ((name, original, owner), (_, injected, _)) in before_t.iter().zip(after_t.iter()) {
        let from_webhook = webhook_pod(original, *owner).await;
        assert_eq!(
            injected["spec"], from_webhook["spec"],
            "{name}: spec differs from the webhook's"
        );
        for key in ["labels", "annotations"] {
            assert_eq!(
                injected["metadata"][key], from_webhook["metadata"][key],
                "{name}: {key} differ"
            );
        }
    }
    // The Job's agent is client-only.
    let job = &after_t.iter().find(|t| t.0 == "Job/import").unwrap().1;
    let env = &job["spec"]["initContainers"][0]["env"];
    assert!(env
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "SHOAL_BROKER" && e["value"] == "false"));
    // The CronJob asked for a classic sidecar.
    let cron = &after_t.iter().find(|t| t.0 == "CronJob/nightly").unwrap().1;
    assert_eq!(cron["spec"]["containers"][1]["name"], "shoal-agent");

    // Schema-valid, and idempotent.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("injected.yaml");
    std::fs::write(&path, &out).unwrap();
    common::kubernetes_validate(&[path]);
    let (twice, _) = offline::inject_text(&out, &options()).unwrap();
    assert_eq!(
        offline::parse_documents(&twice, Format::Yaml).unwrap(),
        after,
        "second injection changed something"
    );
}

#[test]
fn json_in_json_out() {
    let docs = offline::parse_documents(&input(), Format::Yaml).unwrap();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
    let text = serde_json::to_string(&list).unwrap();
    let (out, report) = offline::inject_text(&text, &options()).unwrap();
    let v: Value = serde_json::from_str(&out).expect("output is JSON");
    assert_eq!(v["kind"], "List");
    assert_eq!(report.len(), 7);
    assert_eq!(
        v["items"][1]["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "shoal-agent"
    );

    // Several JSON values in a row come back as several values.
    let stream = format!(
        "{}\n{}",
        serde_json::to_string(&docs[1]).unwrap(),
        serde_json::to_string(&docs[2]).unwrap()
    );
    let (out, _) = offline::inject_text(&stream, &options()).unwrap();
    assert_eq!(
        offline::parse_documents(&out, Format::Json).unwrap().len(),
        2
    );
}

#[test]
fn namespace_annotation_stands_in_for_the_namespace() {
    let mut opts = options();
    opts.namespace_annotations = BTreeMap::new();
    let (out, report) = offline::inject_text(&input(), &opts).unwrap();
    // Only the pod-level opt-ins... none here: nothing is injected.
    assert!(
        report.iter().all(|e| e.reason.as_str() != "injected"),
        "{report:?}"
    );
    assert!(!out.contains("shoal-agent"));
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    for bad in [
        "{not json",
        "a: [unclosed",
        "kind: Deployment\nspec:\n  template: 5\n",
    ] {
        let r = offline::inject_text(bad, &options());
        if bad.starts_with("kind") {
            assert!(r.is_err(), "template that is not an object: {r:?}");
        } else {
            assert!(r.is_err(), "{bad:?} accepted");
        }
    }
    // Empty input gives empty output.
    assert_eq!(offline::inject_text("", &options()).unwrap().0, "");
}

#[test]
fn yaml_1_1_ambiguous_strings_stay_strings() {
    let input = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: yaml11
  namespace: shoal-demo
  labels: {canary: "no"}
  annotations: {x: "yes", t: "12:30", o: "off"}
spec:
  selector:
    matchLabels: {app: yaml11, canary: "no"}
  template:
    metadata:
      labels: {app: yaml11, canary: "no"}
      annotations: {x: "yes", t: "12:30", o: "off", n: "~", e: "", h: "0x1F", d: "2024-01-01", "on": "y", m: "<<"}
    spec:
      containers:
        - name: app
          image: "busybox:1.36"
          args: ["NULL", "True", "1e3", ".inf", "-12:30:00", "1_000", "plain words"]
"#;
    let (out, report) = offline::inject_text(input, &options()).unwrap();
    assert_eq!(report[0].reason.as_str(), "injected", "{report:?}");
    for line in [
        "canary: 'no'",
        "x: 'yes'",
        "t: '12:30'",
        "o: 'off'",
        "'on': 'y'",
        "'n': '~'",
        "d: '2024-01-01'",
        "- 'NULL'",
        "- '-12:30:00'",
        "- plain words",
    ] {
        assert!(out.contains(line), "{line:?} not in\n{out}");
    }
    let docs = offline::parse_documents(&out, Format::Yaml).unwrap();
    let before = offline::parse_documents(input, Format::Yaml).unwrap();
    assert_eq!(docs[0]["metadata"], before[0]["metadata"]);
    let t = &docs[0]["spec"]["template"]["metadata"];
    assert_eq!(t["labels"]["canary"], "no");
    for (k, v) in before[0]["spec"]["template"]["metadata"]["annotations"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&t["annotations"][k], v, "{k}");
    }
    assert_eq!(
        docs[0]["spec"]["template"]["spec"]["containers"][0]["args"],
        before[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    );
    // kubernetes-validate reads YAML 1.1 (PyYAML): unquoted `no` would be a bool.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("yaml11.yaml");
    std::fs::write(&path, &out).unwrap();
    common::kubernetes_validate(&[path]);
}
