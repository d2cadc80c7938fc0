#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

fn pod(v: serde_json::Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

fn enabled() -> BTreeMap<String, String> {
    BTreeMap::from([(ann::INJECT.to_owned(), ann::ENABLED.to_owned())])
}

fn run(p: &Pod, ns: &BTreeMap<String, String>, config: &InjectConfig) -> Outcome {
    inject(
        p,
        PodContext {
            namespace: "apps",
            namespace_info: NamespaceInfo::Known(ns),
            owner_kind: owner_kind(p),
        },
        config,
    )
}

fn apply(p: &Pod, out: &Outcome) -> Value {
    let mut v = serde_json::to_value(p).unwrap();
    json_patch::patch(&mut v, &out.patch).unwrap();
    v
}

#[test]
fn keys_with_slashes_are_escaped() {
    let p = pod(
        json!({"metadata": {"name": "a", "labels": {"x": "y"}, "annotations": {"z": "w"}},
        "spec": {"containers": [{"name": "app", "image": "i"}]}}),
    );
    let out = run(&p, &enabled(), &InjectConfig::default());
    let paths: Vec<String> = out.patch.iter().map(|op| op.path().to_string()).collect();
    assert!(
        paths.contains(&"/metadata/labels/shoal.io~1injected".to_owned()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/metadata/annotations/prometheus.io~1scrape".to_owned()),
        "{paths:?}"
    );
    let v = apply(&p, &out);
    assert_eq!(v["metadata"]["labels"]["shoal.io/injected"], "true");
    assert_eq!(v["metadata"]["labels"]["x"], "y");
}

#[test]
fn empty_lists_and_maps_are_extended_absent_ones_created() {
    let p = pod(
        json!({"metadata": {"name": "a", "labels": {}, "annotations": {}},
        "spec": {"containers": [{"name": "app", "image": "i", "env": []}], "initContainers": [], "volumes": []}}),
    );
    let v = apply(&p, &run(&p, &enabled(), &InjectConfig::default()));
    assert_eq!(
        v["spec"]["initContainers"][0]["name"],
        cfg::AGENT_CONTAINER_NAME
    );
    assert_eq!(v["spec"]["volumes"].as_array().unwrap().len(), 2);
    assert_eq!(v["spec"]["containers"][0]["env"][0]["name"], "SHOAL_URL");

    let bare = pod(
        json!({"metadata": {"name": "b"}, "spec": {"containers": [{"name": "app", "image": "i"}]}}),
    );
    let v = apply(&bare, &run(&bare, &enabled(), &InjectConfig::default()));
    assert_eq!(v["spec"]["initContainers"].as_array().unwrap().len(), 1);
    assert_eq!(v["metadata"]["annotations"]["prometheus.io/port"], "4702");
}

#[test]
fn native_sidecar_goes_first_classic_last() {
    let p = pod(json!({"metadata": {"name": "a"}, "spec": {
        "initContainers": [{"name": "migrate", "image": "m"}],
        "containers": [{"name": "app", "image": "i"}]}}));
    let v = apply(&p, &run(&p, &enabled(), &InjectConfig::default()));
    assert_eq!(v["spec"]["initContainers"][0]["name"], "shoal-agent");
    assert_eq!(v["spec"]["initContainers"][0]["restartPolicy"], "Always");
    assert_eq!(v["spec"]["initContainers"][1]["name"], "migrate");

    let config = InjectConfig {
        sidecar_mode: SidecarMode::Classic,
        ..InjectConfig::default()
    };
    let v = apply(&p, &run(&p, &enabled(), &config));
    assert_eq!(v["spec"]["containers"][1]["name"], "shoal-agent");
    assert!(v["spec"]["containers"][1].get("restartPolicy").is_none());
    assert_eq!(
        v["spec"]["containers"][1]["lifecycle"]["preStop"]["sleep"]["seconds"],
        cfg::DEFAULT_DRAIN_SECONDS
    );
    // SHOAL_URL goes to the app, not to the agent.
    assert!(v["spec"]["containers"][1]["env"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["name"] != "SHOAL_URL"));
}

#[test]
fn agent_container_is_locked_down() {
    let p = pod(
        json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "app", "image": "i"}]}}),
    );
    let v = apply(&p, &run(&p, &enabled(), &InjectConfig::default()));
    let c = &v["spec"]["initContainers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["ports"][0]["containerPort"], 4701);
    assert_eq!(c["ports"][0]["protocol"], "UDP");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let token = &v["spec"]["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "shoal");
}

#[test]
fn identity_off_means_no_token_and_no_token_check() {
    let config = InjectConfig {
        identity: false,
        ..InjectConfig::default()
    };
    let p = pod(
        json!({"metadata": {"name": "a"}, "spec": {"automountServiceAccountToken": false,
        "containers": [{"name": "app", "image": "i"}]}}),
    );
    let out = run(&p, &enabled(), &config);
    assert_eq!(out.reason, Reason::Injected);
    let v = apply(&p, &out);
    assert_eq!(v["spec"]["volumes"].as_array().unwrap().len(), 1);
}

#[test]
fn extra_env_and_join_reach_the_agent() {
    let config = InjectConfig {
        join: vec!["seed-a:4701".to_owned(), "seed-b:4701".to_owned()],
        extra_env: BTreeMap::from([
            ("SHOAL_DEV".to_owned(), "true".to_owned()),
            ("SHOAL_DATA_DIR".to_owned(), "/x".to_owned()),
        ]),
        ..InjectConfig::default()
    };
    let p = pod(
        json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "app", "image": "i"}]}}),
    );
    let v = apply(&p, &run(&p, &enabled(), &config));
    let env = v["spec"]["initContainers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    let get = |n: &str| {
        env.iter()
            .find(|e| e["name"] == n)
            .map(|e| e["value"].clone())
    };
    assert_eq!(get("SHOAL_JOIN"), Some(json!("seed-a:4701,seed-b:4701")));
    assert_eq!(get("SHOAL_DEV"), Some(json!("true")));
    // Built-in settings win over extra env of the same name.
    assert_eq!(get("SHOAL_DATA_DIR"), Some(json!(cfg::DATA_DIR)));
}

#[test]
fn decisions() {
    let plain = BTreeMap::new();
    let p = pod(
        json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "app", "image": "i"}]}}),
    );
    assert_eq!(
        run(&p, &plain, &InjectConfig::default()).reason,
        Reason::NamespaceNotEnabled
    );
    let unknown = inject(
        &p,
        PodContext {
            namespace: "apps",
            namespace_info: NamespaceInfo::Unknown,
            owner_kind: None,
        },
        &InjectConfig::default(),
    );
    assert_eq!(unknown.reason, Reason::NamespaceUnknown);
    assert!(unknown.patch.is_empty());
    let excluded = inject(
        &p,
        PodContext {
            namespace: "kube-system",
            namespace_info: NamespaceInfo::Known(&enabled()),
            owner_kind: None,
        },
        &InjectConfig::default(),
    );
    assert_eq!(excluded.reason, Reason::ExcludedNamespace);

    let bad_choice = pod(
        json!({"metadata": {"name": "a", "annotations": {"shoal.io/inject": "sure"}}, "spec": {"containers": [{"name": "app", "image": "i"}]}}),
    );
    let out = run(&bad_choice, &enabled(), &InjectConfig::default());
    assert_eq!(
        out.reason,
        Reason::Injected,
        "invalid pod choice falls back to the namespace"
    );
    assert_eq!(out.warnings.len(), 1);
    assert_eq!(out.invalid_annotations, [ann::INJECT]);
    let skipped = run(&bad_choice, &plain, &InjectConfig::default());
    assert_eq!(skipped.reason, Reason::NamespaceNotEnabled);
    assert_eq!(skipped.invalid_annotations, [ann::INJECT]);
    assert_eq!(skipped.warnings.len(), 1);
}

#[test]
fn owners() {
    let p = pod(
        json!({"metadata": {"generateName": "web-7d9f-", "ownerReferences": [
        {"apiVersion": "v1", "kind": "Other", "name": "x", "uid": "1"},
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f", "uid": "2", "controller": true}]}}),
    );
    assert_eq!(owner_of(&p), "ReplicaSet/web-7d9f");
    assert_eq!(owner_kind(&p), Some("ReplicaSet"));
    let q = pod(json!({"metadata": {"generateName": "job-"}}));
    assert_eq!(owner_of(&q), "Pod/job-");
    assert_eq!(owner_kind(&q), None);
}
