//! The annotations and labels Shoal reads and writes, and the parsing of the
//! pod annotations that tune the agent.
//!
//! An invalid value never blocks a pod: it is ignored, named in
//! [`Overrides::invalid`], and turned into an admission warning and a metric.

use std::collections::BTreeMap;

use crate::config::SidecarMode;

/// Namespace or pod annotation: `enabled` or `disabled`.
pub const INJECT: &str = "shoal.io/inject";
/// Pod annotation: `native` or `classic` sidecar.
pub const SIDECAR: &str = "shoal.io/sidecar";
/// Pod annotation: the app's port, where the agent pushes messages.
pub const APP_PORT: &str = "shoal.io/app-port";
/// Pod annotation: declared subscriptions, JSON.
pub const SUBSCRIPTIONS: &str = "shoal.io/subscriptions";
/// Pod annotation: `false` for client-only agents.
pub const BROKER: &str = "shoal.io/broker";
/// Pod annotation: agent log level.
pub const LOG_LEVEL: &str = "shoal.io/log-level";
/// Pod annotation: agent CPU request.
pub const CPU_REQUEST: &str = "shoal.io/cpu-request";
/// Pod annotation: agent CPU limit.
pub const CPU_LIMIT: &str = "shoal.io/cpu-limit";
/// Pod annotation: agent memory request.
pub const MEMORY_REQUEST: &str = "shoal.io/memory-request";
/// Pod annotation: agent memory limit.
pub const MEMORY_LIMIT: &str = "shoal.io/memory-limit";
/// Pod label set on injected pods.
pub const INJECTED_LABEL: &str = "shoal.io/injected";
/// Prometheus scrape annotation.
pub const PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
/// Prometheus port annotation.
pub const PROMETHEUS_PORT: &str = "prometheus.io/port";
/// Prometheus path annotation.
pub const PROMETHEUS_PATH: &str = "prometheus.io/path";
/// Value of [`INJECT`] that opts in.
pub const ENABLED: &str = "enabled";
/// Value of [`INJECT`] that opts out.
pub const DISABLED: &str = "disabled";
/// Log levels the agent understands.
pub const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// Every tuning annotation, for docs and tests.
pub const TUNING: [&str; 9] = [
    SIDECAR,
    APP_PORT,
    SUBSCRIPTIONS,
    BROKER,
    LOG_LEVEL,
    CPU_REQUEST,
    CPU_LIMIT,
    MEMORY_REQUEST,
    MEMORY_LIMIT,
];

/// A pod's or namespace's answer to "inject?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectChoice {
    /// `shoal.io/inject: enabled`.
    Enabled,
    /// `shoal.io/inject: disabled`.
    Disabled,
    /// Any other value: ignored, with a warning.
    Invalid,
}

/// Reads `shoal.io/inject`: `None` when absent.
pub fn inject_choice(annotations: &BTreeMap<String, String>) -> Option<InjectChoice> {
    match annotations.get(INJECT).map(|v| v.trim()) {
        None => None,
        Some(v) if v.eq_ignore_ascii_case(ENABLED) => Some(InjectChoice::Enabled),
        Some(v) if v.eq_ignore_ascii_case(DISABLED) => Some(InjectChoice::Disabled),
        Some(_) => Some(InjectChoice::Invalid),
    }
}

/// The valid tuning annotations of one pod, plus the names of the invalid ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Sidecar mode.
    pub sidecar: Option<SidecarMode>,
    /// App port for pushes.
    pub app_port: Option<u16>,
    /// Subscriptions JSON, as written.
    pub subscriptions: Option<String>,
    /// Broker or client-only.
    pub broker: Option<bool>,
    /// Log level.
    pub log_level: Option<String>,
    /// CPU request.
    pub cpu_request: Option<Quantity>,
    /// CPU limit.
    pub cpu_limit: Option<Quantity>,
    /// Memory request.
    pub memory_request: Option<Quantity>,
    /// Memory limit.
    pub memory_limit: Option<Quantity>,
    /// `(annotation, warning)` for each invalid value that was ignored.
    pub invalid: Vec<(&'static str, String)>,
}

impl Overrides {
    /// Parses the tuning annotations of a pod.
    pub fn parse(annotations: &BTreeMap<String, String>) -> Overrides {
        let mut o = Overrides::default();
        let bad = |name: &'static str, value: &str, expected: &str| {
            (
                name,
                format!("annotation {name}={value:?} ignored: expected {expected}"),
            )
        };
        let get = |name: &str| annotations.get(name).map(|v| v.trim());

        if let Some(v) = get(SIDECAR) {
            match v.to_ascii_lowercase().as_str() {
                "native" => o.sidecar = Some(SidecarMode::Native),
                "classic" => o.sidecar = Some(SidecarMode::Classic),
                _ => o.invalid.push(bad(SIDECAR, v, "native or classic")),
            }
        }
        if let Some(v) = get(APP_PORT) {
            match v.parse::<u16>() {
                Ok(p) if p != 0 => o.app_port = Some(p),
                _ => o.invalid.push(bad(APP_PORT, v, "a port number 1-65535")),
            }
        }
        if let Some(v) = get(SUBSCRIPTIONS) {
            match serde_json::from_str::<serde_json::Value>(v) {
                Ok(serde_json::Value::Array(_) | serde_json::Value::Object(_)) => {
                    o.subscriptions = Some(v.to_owned())
                }
                _ => o
                    .invalid
                    .push(bad(SUBSCRIPTIONS, v, "a JSON array or object")),
            }
        }
        if let Some(v) = get(BROKER) {
            match v.to_ascii_lowercase().as_str() {
                "true" => o.broker = Some(true),
                "false" => o.broker = Some(false),
                _ => o.invalid.push(bad(BROKER, v, "true or false")),
            }
        }
        if let Some(v) = get(LOG_LEVEL) {
            let lower = v.to_ascii_lowercase();
            if LOG_LEVELS.contains(&lower.as_str()) {
                o.log_level = Some(lower);
            } else {
                o.invalid
                    .push(bad(LOG_LEVEL, v, "one of trace, debug, info, warn, error"));
            }
        }
        for (name, slot) in [
            (CPU_REQUEST, &mut o.cpu_request),
            (CPU_LIMIT, &mut o.cpu_limit),
            (MEMORY_REQUEST, &mut o.memory_request),
            (MEMORY_LIMIT, &mut o.memory_limit),
        ] {
            if let Some(v) = get(name) {
                match Quantity::parse(v) {
                    Some(q) => *slot = Some(q),
                    None => {
                        o.invalid
                            .push(bad(name, v, "a Kubernetes quantity such as 100m or 64Mi"))
                    }
                }
            }
        }
        o
    }
}

/// A Kubernetes resource quantity: its text and its value, for comparisons.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantity {
    /// The quantity as written (canonical enough for Kubernetes).
    pub text: String,
    /// Its value in base units (cores or bytes).
    pub value: f64,
}

impl Eq for Quantity {}

impl Quantity {
    /// Parses `123`, `1.5`, `100m`, `64Mi`, `1G`, `2e3`...; `None` when invalid,
    /// zero or negative.
    pub fn parse(s: &str) -> Option<Quantity> {
        const SUFFIXES: [(&str, f64); 14] = [
            ("Ki", 1024.0),
            ("Mi", 1048576.0),
            ("Gi", 1073741824.0),
            ("Ti", 1099511627776.0),
            ("Pi", 1125899906842624.0),
            ("Ei", 1152921504606846976.0),
            ("m", 1e-3),
            ("k", 1e3),
            ("M", 1e6),
            ("G", 1e9),
            ("T", 1e12),
            ("P", 1e15),
            ("E", 1e18),
            ("", 1.0),
        ];
        let s = s.trim();
        if s.is_empty() || s.len() > 32 {
            return None;
        }
        let (number, mult) = SUFFIXES
            .iter()
            .find_map(|(suf, mult)| s.strip_suffix(suf).map(|n| (n, *mult)))?;
        let number_ok = !number.is_empty()
            && number
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
            && number.starts_with(|c: char| c.is_ascii_digit() || c == '.')
            && (mult == 1.0 || !number.contains(['e', 'E']));
        if !number_ok {
            return None;
        }
        let value = number.parse::<f64>().ok()? * mult;
        (value.is_finite() && value > 0.0).then(|| Quantity {
            text: s.to_owned(),
            value,
        })
    }
}

#[cfg(test)]
mod tests;
