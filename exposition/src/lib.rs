//! Prometheus exposition shared by `shoal-agent` and `shoal-injector`.
//!
//! - [`ProcessCollector`]: the standard `process_*` metrics, read from
//!   `/proc/self` at each scrape.
//! - [`register_build_info`]: a `<prefix>_build_info{version}` gauge fixed at 1.
//! - [`Format`]: OpenMetrics text for scrapers that ask for it (Prometheus
//!   does), the classic text format (`text/plain; version=0.0.4`) for the
//!   others (curl, `promtool check metrics`).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Content type of the classic Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Kernel clock ticks per second for /proc CPU times (USER_HZ, fixed at 100 on Linux).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// Which text format a scrape gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4.
    Text,
}

impl Format {
    /// The format a scraper asked for with its `Accept` header.
    pub fn negotiate(accept: Option<&str>) -> Format {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    /// The `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Text => TEXT_CONTENT_TYPE,
        }
    }

    /// Encodes `registry` in this format.
    pub fn encode(self, registry: &Registry) -> String {
        let mut om = String::new();
        if prometheus_client::encoding::text::encode(&mut om, registry).is_err() {
            om.clear();
        }
        match self {
            Format::OpenMetrics => om,
            Format::Text => openmetrics_to_text(&om),
        }
    }
}

/// Rewrites OpenMetrics text as the classic Prometheus text format: a
/// counter family `x` becomes `x_total` in its HELP and TYPE lines (its
/// samples already carry the suffix), and `# UNIT` and `# EOF` lines go.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 16 * counters.len());
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        if let Some(prefix) = meta {
            let rest = &line[prefix.len()..];
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Registers `<name>{version="<version>"} 1`.
///
/// A gauge rather than an OpenMetrics `info`: the classic text format (and
/// `promtool check metrics`) has no info type.
pub fn register_build_info(registry: &mut Registry, name: &str, version: &'static str) {
    let build = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    build.get_or_create(&vec![("version", version)]).set(1);
    registry.register(
        name,
        "Build information: the version label; always 1",
        build,
    );
}

static PROCESS_START_MS: AtomicU64 = AtomicU64::new(0);

/// Remembers when the process started, for `process_start_time_seconds`.
/// Call it first thing in `main`.
pub fn mark_process_start() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    PROCESS_START_MS.store(now, Ordering::Relaxed);
}

/// The standard `process_*` metrics, read from `/proc/self` at each scrape:
/// CPU seconds, resident and virtual memory, open and maximum file
/// descriptors, threads, start time. Register it with
/// [`Registry::register_collector`].
#[derive(Debug, Default)]
pub struct ProcessCollector;

#[derive(Default)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    open_fds: i64,
    max_fds: i64,
    threads: i64,
}

fn read_process_stats() -> ProcessStats {
    let mut s = ProcessStats::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            s.cpu_seconds = (num(11) + num(12)) / CLOCK_TICKS_PER_SECOND;
            s.threads = num(17) as i64;
            s.virtual_bytes = num(20) as i64;
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("VmRSS:") {
                let kb: i64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                s.resident_bytes = kb * 1024;
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        s.open_fds = dir.count() as i64;
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
            s.max_fds = line
                .split_whitespace()
                .nth(3)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    s
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = read_process_stats();
        let start = PROCESS_START_MS.load(Ordering::Relaxed) as f64 / 1000.0;
        let counter = ConstCounter::new(s.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "CPU time used by the process",
            None,
            counter.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 6] = [
            (
                "process_resident_memory_bytes",
                "Resident memory",
                s.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory",
                s.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                s.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Limit of open file descriptors",
                s.max_fds as f64,
            ),
            ("process_threads", "OS threads", s.threads as f64),
            (
                "process_start_time_seconds",
                "Start time since the Unix epoch",
                start,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
