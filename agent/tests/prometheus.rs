//! Observability proven by a real Prometheus. Three agents (real processes,
//! a `--dev` mesh on loopback) are scraped every second by a `prometheus`
//! process (Debian's package) that also evaluates Shoal's alert rules; after
//! a short load, Prometheus's HTTP API must show every target up, every
//! metric of docs/metrics.md known, the load in the rates, every dashboard
//! and rule expression running, and the alerts the load and a crash cause.
//! `promtool` checks each agent's scrape and the rules, and runs the rules'
//! unit tests.
//!
//! Without `prometheus` and `promtool` on the PATH the tests that need them
//! skip with a message, unless SHOAL_REQUIRE_PROMETHEUS=1 (set by .ci/run,
//! which installs them), which makes that a failure. The file checks
//! (dashboard JSON, docs/metrics.md against dashboard and rules) always run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use shoal_agent::client::AgentClient;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set to 1 to fail instead of skipping when the binaries are missing.
const REQUIRE_ENV: &str = "SHOAL_REQUIRE_PROMETHEUS";

/// Longest any wait on Prometheus in these tests may take.
const PROM_WAIT: Duration = Duration::from_secs(45);

/// Metrics no local run produces (the injector needs a Kubernetes API
/// server; the others count failures this test does not cause). Dashboard
/// expressions over only these may return no data; everything else must.
const NOT_PRODUCED_LOCALLY: &[&str] = &[
    "shoal_injector_",
    "shoal_storage_errors_total",
    "shoal_mesh_bad_frames_total",
    "shoal_mesh_invalid_messages_total",
    "shoal_handoffs_total",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---------------------------------------------------------------------------
// The binaries
// ---------------------------------------------------------------------------

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// (prometheus, promtool), or None after printing why this test skips.
fn tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    if let (Some(p), Some(t)) = (on_path("prometheus"), on_path("promtool")) {
        return Some((p, t));
    }
    let why = "`prometheus` and `promtool` are not on the PATH \
               (Debian: apt-get install --no-install-recommends prometheus; CI: bash .ci/prometheus.sh)";
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but {why}");
    }
    eprintln!("SKIPPED {test}: {why}. Set {REQUIRE_ENV}=1 to make this a failure.");
    None
}

/// Runs promtool with `args` (and `stdin`); returns (success, stdout + stderr).
fn promtool(bin: &Path, args: &[&str], dir: &Path, stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A child process killed (and reaped) on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// The files: docs/metrics.md, the dashboard, the rules
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct DocMetric {
    name: String,
    /// `counter`, `gauge`, `histogram` or `info`.
    kind: String,
    /// `always`, `per topic` or `on event`.
    appears: String,
    injector: bool,
    /// Panel titles named in "used by".
    panels: Vec<String>,
    /// Alert names named in "used by".
    alerts: Vec<String>,
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

fn unquote_all(text: &str, quote: char) -> Vec<String> {
    text.split(quote)
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

/// Every row of the metric tables of docs/metrics.md.
fn documented_metrics() -> Vec<DocMetric> {
    let doc = read("docs/metrics.md");
    let mut section = "";
    let mut out = Vec::new();
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = match h.trim() {
                "Agent metrics" => "agent",
                "Injector metrics" => "injector",
                _ => "",
            };
            continue;
        }
        if section.is_empty() || !line.starts_with("| `") {
            continue;
        }
        let c = cells(line);
        assert_eq!(
            c.len(),
            7,
            "docs/metrics.md: a metric row has 7 cells: {line}"
        );
        let name = c[0].trim_matches('`').to_string();
        assert!(
            name.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'),
            "docs/metrics.md: bad metric name {name:?}"
        );
        let kind = c[1].split_whitespace().next().unwrap_or("").to_string();
        assert!(
            ["counter", "gauge", "histogram", "info"].contains(&kind.as_str()),
            "docs/metrics.md: {name}: unknown type {:?}",
            c[1]
        );
        assert!(
            ["always", "per topic", "on event"].contains(&c[4].as_str()),
            "docs/metrics.md: {name}: appears is {:?}",
            c[4]
        );
        let alerts = unquote_all(&c[6], '`')
            .into_iter()
            .filter(|a| a.starts_with("Shoal"))
            .collect();
        out.push(DocMetric {
            name,
            kind,
            appears: c[4].clone(),
            injector: section == "injector",
            panels: unquote_all(&c[6], '"'),
            alerts,
        });
    }
    assert!(
        out.len() > 40,
        "docs/metrics.md lists {} metrics",
        out.len()
    );
    out
}

/// Alert names of the "## Alerts" table of docs/metrics.md.
fn documented_alerts() -> BTreeSet<String> {
    let doc = read("docs/metrics.md");
    let mut inside = false;
    let mut out = BTreeSet::new();
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            inside = h.trim() == "Alerts";
            continue;
        }
        if inside && line.starts_with("| `Shoal") {
            out.insert(cells(line)[0].trim_matches('`').to_string());
        }
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read("manifests/grafana/shoal-dashboard.json"))
        .expect("the dashboard is JSON")
}

/// (panel title, expression) of every query in the dashboard, template
/// variable queries included.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap_or("").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((title.clone(), t["expr"].as_str().unwrap().to_string()));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            // label_values(SELECTOR, label): Prometheus can run the selector.
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map_or(q, |(sel, _)| sel);
            out.push((format!("variable {}", v["name"]), inner.to_string()));
        }
    }
    out
}

fn panel_titles(d: &Value) -> BTreeSet<String> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .map(|p| p["title"].as_str().unwrap().to_string())
        .collect()
}

/// Grafana's variables as Prometheus needs them: every template variable
/// selects all values, the interval variables get fixed windows.
fn substitute(expr: &str) -> String {
    let mut e = expr.to_string();
    for (from, to) in [
        ("$__rate_interval", "2m"),
        ("$__interval", "15s"),
        ("$__range_s", "600"),
        ("$__range", "10m"),
    ] {
        e = e.replace(from, to);
    }
    for var in ["job", "namespace", "instance"] {
        e = e
            .replace(&format!("${{{var}}}"), ".*")
            .replace(&format!("${var}"), ".*");
    }
    assert!(!e.contains('$'), "unknown Grafana variable in {expr}");
    e
}

/// (alert, expression) of every rule in a rules file (the plain file's
/// layout: `- alert:` then `expr:` inline or as a `|` block).
fn rule_exprs(yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if let Some(a) = t.strip_prefix("- alert:") {
            alert = a.trim().to_string();
        } else if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            if e == "|" || e == ">" {
                let indent = line.len() - t.len();
                let mut block = Vec::new();
                while let Some(next) = lines.peek() {
                    let n = next.trim_start();
                    if !n.is_empty() && next.len() - n.len() <= indent {
                        break;
                    }
                    block.push(n.to_string());
                    lines.next();
                }
                out.push((alert.clone(), block.join("\n").trim().to_string()));
            } else {
                out.push((alert.clone(), e.to_string()));
            }
        }
    }
    out
}

/// The metric names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    let mut in_string = false;
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch == '"' {
            in_string = !in_string;
            word.clear();
            continue;
        }
        if in_string {
            continue;
        }
        if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
            word.push(ch);
        } else {
            if word.starts_with("shoal_") || word.starts_with("process_") {
                out.insert(word.clone());
            }
            word.clear();
        }
    }
    out
}

/// Whether a series name belongs to a documented metric.
fn is_documented(series: &str, docs: &[DocMetric]) -> bool {
    docs.iter().any(|m| {
        series == m.name
            || (m.kind == "histogram"
                && ["_bucket", "_count", "_sum"]
                    .iter()
                    .any(|s| series == format!("{}{s}", m.name)))
    })
}

#[test]
fn the_dashboard_is_importable_and_uses_only_documented_metrics() {
    let d = dashboard();
    let docs = documented_metrics();
    let vars: Vec<&Value> = d["templating"]["list"].as_array().unwrap().iter().collect();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    let name = ds["name"].as_str().unwrap();
    let uid = format!("${{{name}}}");
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        assert!(p["gridPos"]["w"].as_u64().unwrap() <= 24);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], uid.as_str(), "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], uid.as_str(), "{}", p["title"]);
        }
    }
    for v in &vars {
        if v["type"] == "query" {
            assert_eq!(
                v["datasource"]["uid"],
                uid.as_str(),
                "variable {}",
                v["name"]
            );
        }
    }
    for (title, expr) in dashboard_exprs(&d) {
        for m in metric_names(&expr) {
            assert!(
                is_documented(&m, &docs),
                "dashboard panel {title:?} uses {m}, which docs/metrics.md does not list"
            );
        }
    }
}

#[test]
fn the_doc_names_only_panels_and_alerts_that_exist() {
    let docs = documented_metrics();
    let titles = panel_titles(&dashboard());
    let rules = rule_exprs(&read("manifests/prometheus/shoal-rules.yml"));
    let alerts: BTreeSet<String> = rules.iter().map(|(a, _)| a.clone()).collect();
    for m in &docs {
        for p in &m.panels {
            assert!(
                titles.contains(p),
                "docs/metrics.md: {} names panel {p:?}, not in the dashboard: {titles:?}",
                m.name
            );
        }
        for a in &m.alerts {
            assert!(
                alerts.contains(a),
                "docs/metrics.md: {} names alert {a}, not in the rules",
                m.name
            );
        }
    }
    assert_eq!(
        documented_alerts(),
        alerts,
        "the Alerts table of docs/metrics.md and shoal-rules.yml"
    );
    for (alert, expr) in &rules {
        for m in metric_names(expr) {
            assert!(
                is_documented(&m, &docs),
                "alert {alert} uses {m}, which docs/metrics.md does not list"
            );
        }
    }
}

/// The PrometheusRule manifest (`.yml` keeps it out of the kustomize
/// builds and schema checks of manifests/; `.yaml` once it is in them).
fn prometheusrule_path() -> String {
    ["yaml", "yml"]
        .iter()
        .map(|ext| format!("manifests/prometheus-operator/prometheusrule.{ext}"))
        .find(|p| repo().join(p).is_file())
        .expect("manifests/prometheus-operator/prometheusrule.y(a)ml")
}

/// The PrometheusRule's spec, de-indented: it must be the plain rules file
/// (without its comments).
fn prometheusrule_spec() -> String {
    let text = read(&prometheusrule_path());
    let mut lines = text.lines();
    for l in lines.by_ref() {
        if l == "spec:" {
            break;
        }
    }
    let mut out = String::new();
    for l in lines {
        assert!(
            l.is_empty() || l.starts_with("  "),
            "the PrometheusRule's spec must come last: {l}"
        );
        out.push_str(l.get(2..).unwrap_or(""));
        out.push('\n');
    }
    out
}

fn without_comments(yaml: &str) -> Vec<&str> {
    yaml.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect()
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let Some((_, promtool_bin)) = tools("promtool_checks_and_unit_tests_the_rules") else {
        return;
    };
    let dir = repo().join("manifests/prometheus");
    let (ok, out) = promtool(
        &promtool_bin,
        &["check", "rules", "shoal-rules.yml"],
        &dir,
        None,
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(
        &promtool_bin,
        &["test", "rules", "shoal-rules.test.yml"],
        &dir,
        None,
    );
    assert!(ok, "promtool test rules:\n{out}");

    let spec = prometheusrule_spec();
    let plain = read("manifests/prometheus/shoal-rules.yml");
    assert_eq!(
        without_comments(&spec),
        without_comments(&plain),
        "{}'s spec differs from manifests/prometheus/shoal-rules.yml",
        prometheusrule_path()
    );
    let tmp = tempdir();
    std::fs::write(tmp.path().join("spec.yml"), &spec).unwrap();
    let (ok, out) = promtool(
        &promtool_bin,
        &["check", "rules", "spec.yml"],
        tmp.path(),
        None,
    );
    assert!(
        ok,
        "promtool check rules on the PrometheusRule's spec:\n{out}"
    );
}

// ---------------------------------------------------------------------------
// The mesh (as in tests/mesh.rs)
// ---------------------------------------------------------------------------

async fn cluster(a: &MeshAgent) -> Option<Value> {
    let r = a.client.get("/v1/cluster").await.ok()?;
    (r.status == 200).then(|| r.json())
}

async fn alive_members(a: &MeshAgent) -> usize {
    cluster(a)
        .await
        .and_then(|v| {
            v["members"]
                .as_array()
                .map(|m| m.iter().filter(|m| m["state"] == "alive").count())
        })
        .unwrap_or(0)
}

/// Waits until every agent knows all `partitions` of `topic` with a home.
async fn settled(agents: &[&MeshAgent], topic: &str, partitions: usize) {
    wait_until(&format!("every agent places {topic}"), || async {
        for a in agents {
            let Some(v) = cluster(a).await else {
                return false;
            };
            let homed: usize = v["members"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|m| m["partitions"].as_array().cloned().unwrap_or_default())
                .filter(|p| {
                    p.as_str()
                        .is_some_and(|p| p.starts_with(&format!("{topic}/")))
                })
                .count();
            if homed != partitions || v["unavailable"].as_array().is_none_or(|u| !u.is_empty()) {
                return false;
            }
        }
        true
    })
    .await;
}

// ---------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------

struct Prometheus {
    _process: Guard,
    api: AgentClient,
    log: PathBuf,
}

/// The topics of the load, each with 4 partitions.
const TOPICS: [&str; 5] = ["orders", "jobs", "lossy", "quotes", "ttl"];

/// Percent-encodes a query parameter.
fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Prometheus {
    /// Starts prometheus on a free loopback port, scraping `targets` (job
    /// `shoal-agent`) every second and evaluating `rules` every second.
    async fn start(bin: &Path, dir: &Path, targets: &[String], rules: &Path) -> Prometheus {
        let config = dir.join("prometheus.yml");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - '{}'\n\
                 scrape_configs:\n  - job_name: shoal-agent\n    static_configs:\n      - targets: [{}]\n",
                rules.display(),
                list.join(", ")
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let mut last = String::new();
        // A free port may be taken between probing and binding: retry.
        for attempt in 0..3 {
            let port = free_port();
            let child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut guard = Guard(child);
            let api = AgentClient::new(&format!("http://127.0.0.1:{port}"));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = guard.0.try_wait().unwrap() {
                    last = format!(
                        "prometheus exited ({status}):\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                if let Ok(r) = api.get("/-/ready").await {
                    if r.status == 200 {
                        return Prometheus {
                            _process: guard,
                            api,
                            log,
                        };
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus was not ready within 30 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("could not start prometheus: {last}");
    }

    async fn get(&self, path: &str) -> Value {
        let r = self.api.get(path).await.unwrap();
        let v = r.json();
        assert!(
            r.status == 200 && v["status"] == "success",
            "GET {path}: {} {}",
            r.status,
            r.text()
        );
        v["data"].clone()
    }

    /// Runs an instant query: Ok(result vector) or Err(Prometheus's error).
    async fn try_query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let r = self
            .api
            .get(&format!("/api/v1/query?query={}", urlencode(expr)))
            .await
            .unwrap();
        let v = r.json();
        if r.status != 200 || v["status"] != "success" {
            return Err(format!("{} {}", r.status, r.text()));
        }
        Ok(match &v["data"]["result"] {
            Value::Array(a) => a.clone(),
            // Scalars and strings: one value.
            other => vec![other.clone()],
        })
    }

    async fn query(&self, expr: &str) -> Vec<Value> {
        self.try_query(expr)
            .await
            .unwrap_or_else(|e| panic!("query {expr}: {e}"))
    }

    /// The query's single value (summed over its series), or None when empty.
    async fn value(&self, expr: &str) -> Option<f64> {
        let r = self.query(expr).await;
        if r.is_empty() {
            return None;
        }
        Some(
            r.iter()
                .map(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(f64::NAN)
                })
                .sum(),
        )
    }

    /// Polls `expr` until it returns a series, failing after [`PROM_WAIT`].
    async fn wait_for(&self, what: &str, expr: &str) {
        let deadline = Instant::now() + PROM_WAIT;
        loop {
            if !self.query(expr).await.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {PROM_WAIT:?} waiting until {what} ({expr})\nprometheus log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn targets(&self) -> Vec<Value> {
        self.get("/api/v1/targets").await["activeTargets"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// (alertname, instance, state) of the active alerts.
    async fn alerts(&self) -> Vec<(String, String, String)> {
        self.get("/api/v1/alerts").await["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                    a["labels"]["instance"].as_str().unwrap_or("").to_string(),
                    a["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Waits until `alert` is pending or firing (for `instance`, if given).
    async fn wait_alert(&self, alert: &str, instance: Option<&str>) {
        let deadline = Instant::now() + PROM_WAIT;
        loop {
            let active = self.alerts().await;
            if active
                .iter()
                .any(|(a, i, _)| a == alert && instance.is_none_or(|want| want == i))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "alert {alert} ({instance:?}) did not become active within {PROM_WAIT:?}; active: {active:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Whether every metric an expression uses is one no local run produces.
fn only_unproduced(expr: &str) -> bool {
    let names = metric_names(expr);
    !names.is_empty()
        && names
            .iter()
            .all(|n| NOT_PRODUCED_LOCALLY.iter().any(|p| n.starts_with(p)))
}

/// The series name that shows a documented metric has data.
fn probe_series(m: &DocMetric) -> String {
    if m.kind == "histogram" {
        format!("{}_count", m.name)
    } else {
        m.name.clone()
    }
}

async fn nack(c: &AgentClient, sub: &str, id: &str) {
    let r = c
        .post_json(
            &format!("/v1/subscriptions/{sub}/acks"),
            &json!({"nack": [id]}),
        )
        .await
        .unwrap();
    expect_status(&r, 200, &format!("nack {sub}"));
    assert_eq!(r.json()["nacked"], 1, "nack {sub}: {}", r.text());
}

/// Pulls `sub` until one message arrives; returns it.
async fn pull_one(c: &AgentClient, sub: &str) -> Value {
    pull_n(c, sub, 1).await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_mesh_and_runs_every_dashboard_and_alert_query() {
    let Some((prometheus_bin, promtool_bin)) =
        tools("a_real_prometheus_scrapes_the_mesh_and_runs_every_dashboard_and_alert_query")
    else {
        return;
    };
    let started = Instant::now();
    let root = tempdir();
    let docs = documented_metrics();

    // An app behind agent-1: answers pushes and requests.
    let app = FakeApp::start(|p| {
        AppReply::status(200)
            .header("content-type", "text/plain")
            .body(format!("quote:{}", String::from_utf8_lossy(&p.body)))
    })
    .await;
    let app_port = app.port.to_string();
    let seed = free_udp_port();
    let a1 = start_mesh_agent(
        root.path(),
        "ca",
        "agent-1",
        seed,
        None,
        &["--app-port", &app_port],
    );
    let a2 = start_mesh_agent(
        root.path(),
        "ca",
        "agent-2",
        free_udp_port(),
        Some(seed),
        &[],
    );
    let mut a3 = start_mesh_agent(
        root.path(),
        "ca",
        "agent-3",
        free_udp_port(),
        Some(seed),
        &[],
    );
    let agents = [&a1, &a2, &a3];
    for a in agents {
        wait_until("every agent sees three alive members", || async {
            alive_members(a).await == 3
        })
        .await;
    }

    // An agent with a certificate from another CA: it and the mesh refuse
    // each other's handshakes; it counts them, so it is scraped too.
    let intruder = start_mesh_agent(
        root.path(),
        "other-ca",
        "intruder",
        free_udp_port(),
        Some(seed),
        &[],
    );

    let prom_dir = root.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let targets: Vec<String> = agents
        .iter()
        .chain([&&intruder])
        .map(|a| a.admin_addr.clone())
        .collect();
    let prom = Prometheus::start(
        &prometheus_bin,
        &prom_dir,
        &targets,
        &repo().join("manifests/prometheus/shoal-rules.yml"),
    )
    .await;

    // Every target up (a scrape Prometheus cannot parse is `down` with the error).
    let deadline = Instant::now() + PROM_WAIT;
    loop {
        let t = prom.targets().await;
        let up = t.iter().filter(|t| t["health"] == "up").count();
        if t.len() == targets.len() && up == targets.len() {
            break;
        }
        let states: Vec<String> = t
            .iter()
            .map(|t| {
                format!(
                    "{} {} {}",
                    t["scrapeUrl"].as_str().unwrap_or(""),
                    t["health"].as_str().unwrap_or(""),
                    t["lastError"].as_str().unwrap_or("")
                )
            })
            .collect();
        assert!(
            Instant::now() < deadline,
            "not every target is up after {PROM_WAIT:?}: {states:#?}\nprometheus log:\n{}",
            std::fs::read_to_string(&prom.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Topics and subscriptions before the load, and a first message that
    // Prometheus scrapes, so that the per-topic series exist before the load
    // counts (increase() ignores a series' first sample).
    for topic in TOPICS {
        expect_status(
            &put_topic(&a1.client, topic, json!({"partitions": 4, "replicas": 1})).await,
            201,
            &format!("create {topic}"),
        );
    }
    for topic in TOPICS {
        settled(&agents, topic, 4).await;
    }
    put_sub(
        &a3.client,
        "billing",
        json!({"topic": "orders", "start": "earliest"}),
    )
    .await;
    put_sub(
        &a2.client,
        "retry",
        json!({"topic": "jobs", "start": "earliest", "maxDeliveries": 2,
               "deadLetterTopic": "jobs-dlq",
               "backoff": {"initial": "100ms", "max": "100ms"}}),
    )
    .await;
    put_sub(
        &a2.client,
        "lossy-reader",
        json!({"topic": "lossy", "start": "earliest", "maxDeliveries": 1}),
    )
    .await;
    put_sub(
        &a1.client,
        "quoter",
        json!({"topic": "quotes", "pushPath": "/quotes"}),
    )
    .await;
    for a in agents {
        publish(&a.client, "orders", &[], "warm-up").await;
    }
    pull_ack_n(&a3.client, "billing", 3).await;
    prom.wait_for(
        "the per-topic series are scraped",
        "count(shoal_messages_published_total{topic=\"orders\"} > 0)",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The load, over about three seconds: publishes on every agent (most go
    // to another home), reads on agent-3, a duplicate, an expired message,
    // request/reply and pushes, a nack that redelivers and then dead-letters,
    // a drop and an API error.
    for round in 0..3 {
        for i in 0..20 {
            let a = agents[i % 3];
            publish(&a.client, "orders", &[], format!("m-{round}-{i}")).await;
        }
        pull_ack_n(&a3.client, "billing", 20).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let first = publish(&a1.client, "orders", &[("shoal-id", "dup-1")], "dup").await;
    let again = a2
        .client
        .publish("orders", &[("shoal-id", "dup-1")], "dup")
        .await
        .unwrap();
    expect_status(&again, 200, "publish a duplicate");
    assert_eq!(again.json()["duplicate"], true, "{}", again.text());
    assert_eq!(first["offset"], again.json()["offset"]);
    pull_ack_n(&a3.client, "billing", 1).await;
    // Expired before any group reads it.
    publish(&a1.client, "ttl", &[("shoal-ttl", "1ms")], "too late").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    put_sub(
        &a3.client,
        "late-reader",
        json!({"topic": "ttl", "start": "earliest"}),
    )
    .await;
    assert!(pull(&a3.client, "late-reader", 10, "1s").await.is_empty());

    wait_until("agent-2 learns agent-1 answers quotes", || async {
        let r = a2
            .client
            .call(
                http::Method::POST,
                "/v1/topics/quotes/requests?timeout=2s",
                &[],
                "q",
            )
            .await
            .unwrap();
        r.status == 200 && r.text() == "quote:q"
    })
    .await;
    for i in 0..5 {
        publish(&a3.client, "quotes", &[], format!("push-{i}")).await;
    }
    for i in 0..6 {
        app.recv(&format!("request or push {i}")).await;
    }

    publish(&a1.client, "jobs", &[], "poison").await;
    let m = pull_one(&a2.client, "retry").await;
    nack(&a2.client, "retry", &ackid(&m)).await;
    let m = pull_one(&a2.client, "retry").await;
    assert_eq!(m["shoaldeliveryattempt"], 2, "redelivered: {m}");
    nack(&a2.client, "retry", &ackid(&m)).await;
    publish(&a3.client, "lossy", &[], "lost").await;
    let m = pull_one(&a2.client, "lossy-reader").await;
    nack(&a2.client, "lossy-reader", &ackid(&m)).await;

    let r = a1.client.get("/v1/no-such-route").await.unwrap();
    expect_status(&r, 404, "unknown route");

    // Prometheus sees all of it.
    for (what, expr) in [
        (
            "the dead letter",
            "sum(shoal_messages_dead_lettered_total{topic=\"jobs\"}) > 0",
        ),
        (
            "the drop",
            "sum(shoal_messages_dropped_total{topic=\"lossy\"}) > 0",
        ),
        (
            "the refused handshakes",
            "sum(shoal_mesh_handshake_failures_total) > 0",
        ),
        (
            "the deduplicated publish",
            "sum(shoal_messages_deduplicated_total) > 0",
        ),
        (
            "the expired message",
            "sum(shoal_messages_expired_total) > 0",
        ),
    ] {
        prom.wait_for(what, expr).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // promtool lints each agent's scrape, as curl gets it, after the load.
    for a in agents.iter().chain([&&intruder]) {
        let text = metrics(&a.admin).await;
        let (ok, out) = promtool(
            &promtool_bin,
            &["check", "metrics"],
            root.path(),
            Some(&text),
        );
        assert!(
            ok && out.trim().is_empty(),
            "promtool check metrics on {}:\n{out}",
            a.admin_addr
        );
    }

    // Every documented agent metric is known to Prometheus with its type;
    // those that exist from start-up or per topic have series.
    let metadata = prom.get("/api/v1/metadata").await;
    let mut missing = Vec::new();
    for m in docs.iter().filter(|m| !m.injector) {
        let family = [
            m.name.clone(),
            m.name.trim_end_matches("_total").to_string(),
            m.name.trim_end_matches("_info").to_string(),
        ];
        let Some(meta) = family.iter().find_map(|f| metadata.get(f)) else {
            missing.push(format!("{} (no metadata)", m.name));
            continue;
        };
        let ty = meta[0]["type"].as_str().unwrap_or("");
        let ok = ty == m.kind || (m.kind == "info" && ty == "gauge");
        assert!(
            ok,
            "{}: documented as {}, Prometheus says {ty}",
            m.name, m.kind
        );
        if m.appears != "on event"
            && prom
                .query(&format!("count({})", probe_series(m)))
                .await
                .is_empty()
        {
            missing.push(format!("{} (no series)", m.name));
        }
    }
    assert!(
        missing.is_empty(),
        "documented metrics Prometheus does not have: {missing:#?}"
    );
    // Nothing undocumented either: every shoal_ and process_ series.
    let names = prom.get("/api/v1/label/__name__/values").await;
    for n in names.as_array().unwrap() {
        let n = n.as_str().unwrap();
        if n.starts_with("shoal_") || n.starts_with("process_") {
            assert!(
                is_documented(n, &docs),
                "the agents export {n}, which docs/metrics.md does not list"
            );
        }
    }

    // The load shows: rates above zero, and the event metrics it caused.
    for expr in [
        "sum(rate(shoal_messages_published_total{topic=\"orders\"}[1m]))",
        "sum(rate(shoal_published_bytes_total[1m]))",
        "sum(rate(shoal_messages_delivered_total{mode=\"pull\"}[1m]))",
        "sum(rate(shoal_messages_delivered_total{mode=\"push\"}[1m]))",
        "sum(rate(shoal_delivered_bytes_total[1m]))",
        "sum(rate(shoal_redeliveries_total{topic=\"jobs\"}[1m]))",
        "sum(rate(shoal_publish_duration_seconds_count[1m]))",
        "sum(rate(shoal_delivery_latency_seconds_count[1m]))",
        "sum(rate(shoal_push_duration_seconds_count[1m]))",
        "sum(rate(shoal_forward_duration_seconds_count[1m]))",
        "sum(rate(shoal_fetches_served_total[1m]))",
        "sum(rate(shoal_http_requests_total[1m]))",
        "sum(rate(shoal_mesh_frames_sent_total[1m]))",
        "sum(rate(shoal_mesh_frames_received_total[1m]))",
        "sum(rate(shoal_mesh_writes_total[1m]))",
        "sum(rate(shoal_mesh_sent_bytes_total[1m]))",
        "sum(rate(shoal_mesh_received_bytes_total[1m]))",
        "sum(rate(shoal_mesh_datagrams_sent_total[1m]))",
        "sum(rate(shoal_mesh_datagrams_received_total[1m]))",
        "sum(rate(process_cpu_seconds_total[1m]))",
        "sum(shoal_forwarded_messages_total{outcome=\"stored\"})",
        "sum(shoal_request_reply_exchanges_total{outcome=\"answered\"})",
        "sum(shoal_api_errors_total{code=\"route_not_found\"})",
        "sum(shoal_messages_dead_lettered_total{reason=\"max_deliveries\"})",
        "sum(shoal_messages_dropped_total{reason=\"max_deliveries\"})",
        "sum(shoal_mesh_handshake_failures_total)",
        "sum(shoal_partitions_homed)",
        "count(shoal_mesh_rtt_seconds)",
        "count(shoal_consumer_lag_messages{group=\"billing\"})",
        "sum(shoal_storage_bytes{topic=\"orders\"})",
        "process_resident_memory_bytes",
    ] {
        let v = prom.value(expr).await;
        assert!(
            v.is_some_and(|v| v > 0.0),
            "{expr} is {v:?}, expected above 0 after the load"
        );
    }
    assert_eq!(
        prom.value("max(shoal_mesh_members{state=\"alive\"})").await,
        Some(3.0)
    );
    assert_eq!(
        prom.value("sum(shoal_partitions_unavailable)").await,
        Some(0.0)
    );
    let p99 = prom
        .value("histogram_quantile(0.99, sum by (le) (rate(shoal_publish_duration_seconds_bucket[1m])))")
        .await
        .unwrap();
    assert!(p99 > 0.0 && p99 < 5.0, "publish p99 {p99}");

    // Every dashboard query runs; all but those over metrics no local run
    // produces return data.
    let d = dashboard();
    let mut empty = Vec::new();
    for (title, expr) in dashboard_exprs(&d) {
        let e = substitute(&expr);
        match prom.try_query(&e).await {
            Err(err) => panic!("dashboard panel {title:?}: {e}: {err}"),
            Ok(r) if r.is_empty() && !only_unproduced(&expr) => {
                empty.push(format!("{title}: {e}"));
            }
            Ok(_) => {}
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data after the load: {empty:#?}"
    );
    // Every rule expression runs, here and in Prometheus's own evaluation.
    let rules = rule_exprs(&read("manifests/prometheus/shoal-rules.yml"));
    assert_eq!(rules.len(), documented_alerts().len());
    for (alert, expr) in &rules {
        if let Err(err) = prom.try_query(expr).await {
            panic!("alert {alert}: {expr}: {err}");
        }
    }
    let groups = prom.get("/api/v1/rules").await;
    let mut evaluated = 0;
    for g in groups["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(
                r["health"], "ok",
                "rule {} evaluates with an error: {}",
                r["name"], r["lastError"]
            );
            evaluated += 1;
        }
    }
    assert_eq!(evaluated, rules.len(), "Prometheus loaded every rule");

    // The alerts the load causes.
    prom.wait_alert("ShoalDeadLetters", None).await;
    prom.wait_alert("ShoalMessagesDropped", None).await;
    prom.wait_alert("ShoalMeshHandshakeFailures", None).await;

    // A crash: agent-3's target goes down, and its partitions lose their home.
    let a3_addr = a3.admin_addr.clone();
    a3.child.kill().unwrap();
    a3.child.wait().unwrap();
    prom.wait_alert("ShoalAgentDown", Some(&a3_addr)).await;
    prom.wait_alert("ShoalPartitionsWithoutHome", None).await;
    assert!(
        prom.value("max(shoal_partitions_unavailable)")
            .await
            .is_some_and(|v| v > 0.0),
        "the others count agent-3's partitions unavailable"
    );
    eprintln!(
        "prometheus test: {} documented metrics, {} dashboard queries, {} rules, {:.1?}",
        docs.len(),
        dashboard_exprs(&d).len(),
        rules.len(),
        started.elapsed()
    );
}
