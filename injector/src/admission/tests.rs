#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

#[test]
fn patch_is_base64_on_the_wire_and_decodes_back() {
    let ops: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "add", "path": "/metadata/labels/a~1b", "value": "c"}
    ]))
    .unwrap();
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(serde_json::json!({
        "apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND,
        "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "userInfo": {}, "object": null}
    }))
    .unwrap();
    let req: AdmissionRequest<DynamicObject> = review.try_into().unwrap();
    let resp = AdmissionResponse::from(&req).with_patch(ops).unwrap();
    let bytes = encode_review(resp).unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["apiVersion"], ADMISSION_API_VERSION);
    assert_eq!(v["response"]["uid"], "u1");
    assert!(v["response"]["patch"].is_string());
    let decoded = decode_patch(&v["response"]).unwrap().unwrap();
    assert_eq!(decoded[0]["path"], "/metadata/labels/a~1b");
    // A byte-array patch decodes too.
    let arr = serde_json::json!({"patch": [91, 93]});
    assert_eq!(decode_patch(&arr).unwrap().unwrap(), serde_json::json!([]));
    assert!(decode_patch(&serde_json::json!({})).is_none());
    assert!(decode_patch(&serde_json::json!({"patch": "!!"}))
        .unwrap()
        .is_err());
}

#[tokio::test]
async fn invalid_inject_annotation_is_counted_like_the_others() {
    let namespaces = BTreeMap::from([
        (
            "on".to_owned(),
            BTreeMap::from([("shoal.io/inject".to_owned(), "enabled".to_owned())]),
        ),
        ("off".to_owned(), BTreeMap::new()),
    ]);
    let webhook = Webhook::new(
        crate::InjectConfig::default(),
        Arc::new(StaticNamespaces(namespaces)),
        Arc::new(Metrics::new()),
    );
    for (namespace, annotations) in [
        // Injected anyway (the namespace opts in), tuning annotation also bad.
        (
            "on",
            serde_json::json!({"shoal.io/inject": "yes", "shoal.io/broker": "maybe"}),
        ),
        // Not injected (namespace not opted in): still counted.
        ("off", serde_json::json!({"shoal.io/inject": "sure"})),
    ] {
        let review = serde_json::json!({
            "apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND,
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace, "operation": "CREATE", "userInfo": {},
                "object": {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "p", "annotations": annotations},
                    "spec": {"containers": [{"name": "app", "image": "i"}]}}}
        });
        let resp = webhook
            .review(&serde_json::to_vec(&review).unwrap())
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&resp).unwrap();
        assert!(
            v["response"]["warnings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w.as_str().unwrap().contains("shoal.io/inject")),
            "{v}"
        );
    }
    let text = webhook.metrics().encode(shoal_exposition::Format::Text);
    assert!(
        text.contains("shoal_injector_invalid_annotations_total{annotation=\"shoal.io/inject\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("shoal_injector_invalid_annotations_total{annotation=\"shoal.io/broker\"} 1"),
        "{text}"
    );
}

/// The agent container's environment in a review's patch.
fn agent_env(response: &Value) -> BTreeMap<String, String> {
    let patch = decode_patch(response).unwrap().unwrap();
    let mut env = BTreeMap::new();
    for op in patch.as_array().unwrap() {
        let v = &op["value"];
        let containers: Vec<&Value> = if v.is_array() {
            v.as_array().unwrap().iter().collect()
        } else {
            vec![v]
        };
        for c in containers {
            if c["name"] == crate::config::AGENT_CONTAINER_NAME {
                for e in c["env"].as_array().unwrap() {
                    if let Some(value) = e["value"].as_str() {
                        env.insert(e["name"].as_str().unwrap().to_owned(), value.to_owned());
                    }
                }
            }
        }
    }
    env
}

#[tokio::test]
async fn injected_pods_get_the_identity_service_and_its_trust_anchors_once_known() {
    let namespaces = BTreeMap::from([(
        "on".to_owned(),
        BTreeMap::from([("shoal.io/inject".to_owned(), "enabled".to_owned())]),
    )]);
    let anchors: TrustAnchors = Arc::default();
    let config = crate::InjectConfig {
        identity_addr: "shoal-injector.shoal-system.svc:4711".to_owned(),
        ..crate::InjectConfig::default()
    };
    let webhook = Webhook::new(
        config,
        Arc::new(StaticNamespaces(namespaces)),
        Arc::new(Metrics::new()),
    )
    .with_trust_anchors(anchors.clone());
    let review = serde_json::to_vec(&serde_json::json!({
        "apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND,
        "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "on", "operation": "CREATE", "userInfo": {},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "app", "image": "i"}]}}}
    }))
    .unwrap();

    // The mesh CA is not loaded yet: injected, told so, no identity settings
    // (an agent given an address it cannot verify would not start).
    let v: Value = serde_json::from_slice(&webhook.review(&review).await.unwrap()).unwrap();
    let env = agent_env(&v["response"]);
    assert!(env.contains_key("SHOAL_TOKEN_FILE"), "{env:?}");
    assert!(!env.contains_key("SHOAL_IDENTITY_ADDR"), "{env:?}");
    assert!(
        v["response"]["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("runs alone")),
        "{v}"
    );

    // Once loaded: the service's address and the bundle to verify it by.
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    *anchors.write().unwrap() = Some(pem.to_owned());
    let v: Value = serde_json::from_slice(&webhook.review(&review).await.unwrap()).unwrap();
    let env = agent_env(&v["response"]);
    assert_eq!(
        env.get("SHOAL_IDENTITY_ADDR").map(String::as_str),
        Some("shoal-injector.shoal-system.svc:4711")
    );
    assert_eq!(
        env.get("SHOAL_IDENTITY_TRUST_ANCHORS").map(String::as_str),
        Some(pem)
    );
    assert!(
        v["response"]["warnings"].is_null() || v["response"]["warnings"] == serde_json::json!([])
    );
}
