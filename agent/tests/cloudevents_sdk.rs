//! CloudEvents conformance with the CNCF CloudEvents Python SDK (`cloudevents`
//! from PyPI, pinned in .ci/python-requirements.txt): events made by the SDK
//! are published to a real agent in binary and structured mode and received
//! by push and by pull, parsed by the SDK on both sides, with non-ASCII and
//! `%` in string attributes, typed extensions, no data and binary data; and
//! invalid events must be refused naming the attribute. The checks live in
//! `cloudevents_sdk.py` next to this file; this test starts the agent, runs
//! the script and fails with its report.
//!
//! Skips with a message when `python3` or the SDK is missing, unless
//! SHOAL_REQUIRE_CLOUDEVENTS=1 (set by .ci/run), which makes that a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// Set to 1 to fail instead of skipping when Python or the SDK is missing.
const REQUIRE_ENV: &str = "SHOAL_REQUIRE_CLOUDEVENTS";

/// Whether `python3` can import the SDK (the 2.x `cloudevents.core` API);
/// otherwise false after printing why this test skips (or a panic if required).
fn sdk_available() -> bool {
    let probe = Command::new("python3")
        .args([
            "-c",
            "import cloudevents.core.bindings.http, importlib.metadata as m; print(m.version('cloudevents'))",
        ])
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => {
            eprintln!(
                "CloudEvents SDK {}",
                String::from_utf8_lossy(&o.stdout).trim()
            );
            return true;
        }
        Ok(o) => format!(
            "the CloudEvents Python SDK 2.x is not installed ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("`python3` cannot be run ({e})"),
    };
    let how = "install it with: python3 -m pip install -r .ci/python-requirements.txt";
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but {why}; {how}");
    }
    eprintln!("SKIPPED cloudevents_sdk: {why}; {how}. Set {REQUIRE_ENV}=1 to make this a failure.");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cncf_sdk_round_trips_events_both_modes_both_directions() {
    if !sdk_available() {
        return;
    }
    let dir = tempdir();
    let app_port = free_port();
    let agent = start_agent_with_app(dir.path(), app_port, &[]).await;
    let url = agent.client.base().to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cloudevents_sdk.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(&script)
            .arg(&url)
            .arg(app_port.to_string())
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("running python3 cloudevents_sdk.py: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the CloudEvents SDK checks failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or("");
    let checks: usize = last
        .strip_prefix("PASS ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no PASS line from the script:\n{stdout}\n{stderr}"));
    // Every case was compared: 20 events, each on 2 to 4 paths, many checks each.
    assert!(checks > 500, "only {checks} checks ran:\n{stdout}");
    agent.stop().await;
}
