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
