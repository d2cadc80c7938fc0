//! Helpers shared by the injector's integration tests.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::Value;
use shoal_injector::admission::{StaticNamespaces, Webhook};
use shoal_injector::metrics::Metrics;
use shoal_injector::InjectConfig;

/// Serves `handler` over plain HTTP/1.1 on a loopback port (an API-server
/// stand-in); returns its address. Runs until the test's runtime ends.
pub async fn serve_http<F, Fut>(handler: F) -> std::net::SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<http_body_util::Full<bytes::Bytes>>>
        + Send
        + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let reply = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(reply.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Kubernetes version schemas are checked against (the oldest supported).
pub const KUBERNETES_VERSION: &str = "1.30.0";
/// Env var that makes golden tests rewrite their expected files.
pub const REGENERATE_ENV: &str = "SHOAL_REGENERATE_GOLDEN";
/// Image used in tests, fixed so golden files do not change with the crate version.
pub const TEST_IMAGE: &str = "shoal-agent:test";

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn repo_dir() -> PathBuf {
    crate_dir().parent().unwrap().to_path_buf()
}

pub fn test_config() -> InjectConfig {
    InjectConfig {
        image: TEST_IMAGE.to_owned(),
        ..InjectConfig::default()
    }
}

/// Namespaces of the fixtures: `shoal-demo` opted in, `plain` not.
pub fn namespaces() -> StaticNamespaces {
    let mut m = BTreeMap::new();
    m.insert(
        "shoal-demo".to_owned(),
        BTreeMap::from([("shoal.io/inject".to_owned(), "enabled".to_owned())]),
    );
    m.insert("plain".to_owned(), BTreeMap::new());
    m.insert(
        "kube-system".to_owned(),
        BTreeMap::from([("shoal.io/inject".to_owned(), "enabled".to_owned())]),
    );
    StaticNamespaces(m)
}

pub fn webhook() -> Webhook {
    Webhook::new(
        test_config(),
        Arc::new(namespaces()),
        Arc::new(Metrics::new()),
    )
}

/// The response of an AdmissionReview with its patch decoded into JSON, for
/// readable golden files compared by value.
pub fn normalize(review: &Value) -> Value {
    let mut resp = review
        .get("response")
        .cloned()
        .expect("review has a response");
    if let Some(p) = shoal_injector::admission::decode_patch(&resp) {
        resp["patch"] = p.expect("patch decodes");
    }
    resp
}

/// Applies the (decoded) patch of a normalized response to `pod`.
pub fn apply(pod: &Value, normalized: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(p) = normalized.get("patch") {
        let patch: json_patch::Patch = serde_json::from_value(p.clone()).expect("patch parses");
        json_patch::patch(&mut pod, &patch).expect("patch applies");
    }
    pod
}

fn find_tool(env: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    PathBuf::from(name)
}

fn install_hint() -> &'static str {
    "install the test tools with `bash .ci/injector.sh` (kubernetes-validate from PyPI, kubectl)"
}

/// Validates files against the Kubernetes schemas with `kubernetes-validate
/// --strict`; panics (fails the test) with its output, or when it is missing.
pub fn kubernetes_validate(files: &[PathBuf]) {
    kubernetes_validate_at(KUBERNETES_VERSION, files);
}

/// [`kubernetes_validate`] against the schemas of Kubernetes `version`.
pub fn kubernetes_validate_at(version: &str, files: &[PathBuf]) {
    let tool = find_tool("SHOAL_KUBERNETES_VALIDATE", "kubernetes-validate");
    let out = Command::new(&tool)
        .arg("--strict")
        .arg("--no-warn")
        .arg("-k")
        .arg(version)
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {}", tool.display(), install_hint()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate {version} failed:\n{text}"
    );
    assert!(
        !text.contains("ERROR") && !text.contains("FAILED"),
        "kubernetes-validate reported problems:\n{text}"
    );
}

/// Runs `kubectl kustomize DIR` and returns the rendered YAML.
pub fn kustomize(dir: &Path) -> String {
    let tool = find_tool("SHOAL_KUBECTL", "kubectl");
    let out = Command::new(&tool)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {}", tool.display(), install_hint()));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Writes `value` as JSON to `dir/name` and returns the path.
pub fn write_json(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path
}

/// Compares `actual` with the golden file, or rewrites it when regenerating.
pub fn check_golden(path: &Path, actual: &Value) {
    if std::env::var(REGENERATE_ENV).is_ok_and(|v| v == "1") {
        let mut text = serde_json::to_string_pretty(actual).unwrap();
        text.push('\n');
        std::fs::write(path, text).unwrap();
        return;
    }
    let expected: Value = serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with {REGENERATE_ENV}=1 to create it",
            path.display()
        )
    }))
    .unwrap();
    assert_eq!(
        &expected,
        actual,
        "{} differs (compare by value); if the change is intended, rerun with {REGENERATE_ENV}=1\nactual:\n{}",
        path.display(),
        serde_json::to_string_pretty(actual).unwrap()
    );
}
