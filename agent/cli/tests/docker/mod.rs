//! Helpers of the tests that play pods with Docker: containers on a network
//! of the test's own, removed by id when the test ends.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The agent image `.ci/injector.sh images` builds.
pub const AGENT_IMAGE: &str = "shoal-agent:dev";
/// The injector image `.ci/injector.sh images` builds.
pub const INJECTOR_IMAGE: &str = "shoal-injector:dev";
/// App containers: sh, curl and a few tools (`.ci/injector.sh app-image`).
pub const APP_IMAGE: &str = "shoal-test-app:dev";

/// `curl` inside `container` to its pod's app API: (status, body); status 0
/// when it could not connect.
pub fn app_curl(
    container: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> (u16, String) {
    let url = format!("http://127.0.0.1:4700{path}");
    let mut args = vec![
        "exec",
        container,
        "curl",
        "-sS",
        "-m",
        "30",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    if let Some(b) = body {
        args.extend(["-H", "content-type: application/json", "--data", b]);
    }
    args.push(&url);
    let out = docker(&args).unwrap_or_else(|e| format!("{e}\n0"));
    let (text, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().parse().unwrap_or(0), text.to_owned())
}

/// Runs `docker ARGS`; its trimmed standard output, or what it said.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {}: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn must(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
}

pub fn image_present(image: &str) -> bool {
    docker(&["image", "inspect", "-f", "{{.Id}}", image]).is_ok()
}

pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// Whether Docker and `images` are here (and, built when missing,
/// [`APP_IMAGE`]); panics when they must be (`SHOAL_REQUIRE_DOCKER=1`).
pub fn docker_ready(test: &str, images: &[&str]) -> bool {
    let required = std::env::var("SHOAL_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
    // Root: the test writes files owned by the containers' users, and cuts
    // networks with iptables inside a container's network namespace.
    let missing: Vec<&str> = if !rustix::process::geteuid().is_root() {
        vec!["root"]
    } else if docker(&["version", "-f", "{{.Server.Version}}"]).is_err() {
        vec!["a running Docker engine"]
    } else {
        images
            .iter()
            .copied()
            .filter(|i| !image_present(i))
            .collect()
    };
    if !missing.is_empty() {
        let msg = format!(
            "{test} needs {} (bash .ci/injector.sh images)",
            missing.join(", ")
        );
        assert!(!required, "{msg}");
        eprintln!("skipped: {msg}");
        return false;
    }
    if !image_present(APP_IMAGE) {
        let status = Command::new("bash")
            .arg(repo_dir().join(".ci/injector.sh"))
            .arg("app-image")
            .status()
            .unwrap();
        assert!(status.success(), "building {APP_IMAGE} failed");
    }
    true
}

/// Everything the test started, removed by id when it ends; the logs of
/// every container are printed when it failed.
pub struct Lab {
    /// The Docker network the test made.
    pub network: String,
    containers: Mutex<Vec<(String, String)>>,
    /// Host files of the test (tokens, volumes).
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// Makes a network of its own.
    pub fn new() -> Lab {
        let network = format!("shoal-it-{}-{}", std::process::id(), fastrand::u32(..));
        must(&["network", "create", &network]);
        Lab {
            network,
            containers: Mutex::new(Vec::new()),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The host's address on the network.
    pub fn gateway(&self) -> IpAddr {
        must(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            &self.network,
        ])
        .parse()
        .unwrap()
    }

    /// `docker run -d ARGS`, remembered as `label`; its id.
    pub fn run(&self, label: &str, args: &[String]) -> String {
        // Labelled too, so a container that was made but failed to start
        // (no id printed) is still found and removed.
        let mut all = vec![
            "run".to_owned(),
            "-d".to_owned(),
            format!("--label=shoal-it={}", self.network),
        ];
        all.extend_from_slice(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let id = must(&refs);
        self.containers
            .lock()
            .unwrap()
            .push((label.to_owned(), id.clone()));
        id
    }

    /// A container's address on the network.
    pub fn ip_of(&self, id: &str) -> IpAddr {
        must(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            id,
        ])
        .parse()
        .unwrap()
    }

    /// What a container printed.
    pub fn logs(id: &str) -> String {
        let out = Command::new("docker")
            .args(["logs", id])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default();
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let containers = std::mem::take(&mut *self.containers.lock().unwrap());
        if std::thread::panicking() {
            for (label, id) in &containers {
                let logs = Lab::logs(id);
                let tail: Vec<&str> = logs.lines().rev().take(30).collect();
                eprintln!("----- {label} ({id:.12}), last lines:");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for (_, id) in containers.iter().rev() {
            let _ = docker(&["rm", "-f", id]);
        }
        let label = format!("label=shoal-it={}", self.network);
        if let Ok(left) = docker(&["ps", "-aq", "--filter", &label]) {
            for id in left.split_whitespace() {
                let _ = docker(&["rm", "-f", id]);
            }
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

/// The node names of the alive members the agent in `container`'s pod sees,
/// itself included; `None` while it answers no mesh view.
pub fn alive_nodes(container: &str) -> Option<std::collections::BTreeSet<String>> {
    let (code, body) = app_curl(container, "GET", "/v1/cluster", &[], None);
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    (code == 200 && v["mesh"] == true).then_some(())?;
    Some(
        v["members"]
            .as_array()?
            .iter()
            .filter(|m| m["state"] == "alive")
            .filter_map(|m| m["node"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// Pulls a batch of `subscription` in `container`'s pod (up to 200, waiting
/// up to 2 s) and acks it: the text data of the messages read.
pub fn pull_ack(container: &str, subscription: &str) -> Vec<String> {
    let (code, body) = app_curl(
        container,
        "GET",
        &format!("/v1/subscriptions/{subscription}/messages?max=200&wait=2s"),
        &[],
        None,
    );
    if code != 200 {
        return Vec::new();
    }
    let events: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
    let ackids: Vec<serde_json::Value> = events
        .iter()
        .filter_map(|e| e.get("ackid").cloned())
        .collect();
    if !ackids.is_empty() {
        let body = serde_json::json!({ "ack": ackids }).to_string();
        app_curl(
            container,
            "POST",
            &format!("/v1/subscriptions/{subscription}/acks"),
            &[],
            Some(&body),
        );
    }
    events
        .iter()
        .filter_map(|e| e.get("data")?.as_str().map(str::to_owned))
        .collect()
}

/// `curl URL` from the host: (status, body); status 0 when unreachable.
pub fn host_curl(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-m", "5", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    let (text, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().parse().unwrap_or(0), text.to_owned())
}

/// The value of `name{labels...}` in a Prometheus exposition (0 if absent).
pub fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Waits up to `limit` for `f` to give a value; panics saying `what`.
pub async fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "gave up after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
