//! Offline injection (`shoal inject`): Kubernetes YAML or JSON in, the same
//! documents out with the agent added to every pod template, by the very
//! [`inject`](crate::inject::inject) the webhook uses.
//!
//! Understands Pods, Deployments, ReplicaSets, ReplicationControllers,
//! StatefulSets, DaemonSets, Jobs, CronJobs and Lists of them, in
//! multi-document YAML streams or JSON (one value or several). Other kinds
//! pass through unchanged. Comments and key order of YAML are not kept.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize as _;
use serde_json::{json, Value};

use crate::config::InjectConfig;
use crate::error::InjectorError;
use crate::inject::{self, NamespaceInfo, PodContext, Reason};

/// Namespace assumed for objects that do not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Input and output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// YAML, possibly several `---` separated documents.
    Yaml,
    /// JSON, one value or a stream of them.
    Json,
}

impl Format {
    /// JSON when the text starts with `{` or `[`, else YAML.
    pub fn detect(text: &str) -> Format {
        match text.trim_start().chars().next() {
            Some('{') | Some('[') => Format::Json,
            _ => Format::Yaml,
        }
    }
}

/// Offline injection settings.
#[derive(Clone, Debug)]
pub struct OfflineOptions {
    /// What the webhook would inject.
    pub config: InjectConfig,
    /// Stand-in for the annotations of every object's namespace.
    pub namespace_annotations: BTreeMap<String, String>,
    /// Namespace of objects that do not name one.
    pub default_namespace: String,
}

/// What happened to one pod template.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportEntry {
    /// `Kind/name` of the object holding the template.
    pub object: String,
    /// Decision.
    pub reason: Reason,
    /// Warnings, as the webhook would return them.
    pub warnings: Vec<String>,
}

/// Injects every document of `input`; returns the output text (same format)
/// and one report entry per pod template seen.
pub fn inject_text(
    input: &str,
    options: &OfflineOptions,
) -> Result<(String, Vec<ReportEntry>), InjectorError> {
    let format = Format::detect(input);
    let docs = parse_documents(input, format)?;
    let mut report = Vec::new();
    let mut out_docs = Vec::with_capacity(docs.len());
    for mut doc in docs {
        inject_object(&mut doc, options, &mut report)?;
        out_docs.push(doc);
    }
    Ok((render_documents(&out_docs, format)?, report))
}

/// Splits `input` into documents (empty YAML documents are dropped).
pub fn parse_documents(input: &str, format: Format) -> Result<Vec<Value>, InjectorError> {
    match format {
        Format::Json => serde_json::Deserializer::from_str(input)
            .into_iter::<Value>()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| InjectorError::Input(format!("invalid JSON: {e}"))),
        Format::Yaml => {
            let mut docs = Vec::new();
            for de in serde_norway::Deserializer::from_str(input) {
                let v = Value::deserialize(de)
                    .map_err(|e| InjectorError::Input(format!("invalid YAML: {e}")))?;
                if !v.is_null() {
                    docs.push(v);
                }
            }
            Ok(docs)
        }
    }
}

/// Writes documents back in `format`.
pub fn render_documents(docs: &[Value], format: Format) -> Result<String, InjectorError> {
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        match format {
            Format::Json => {
                out.push_str(
                    &serde_json::to_string_pretty(doc)
                        .map_err(|e| InjectorError::Output(e.to_string()))?,
                );
                out.push('\n');
            }
            Format::Yaml => {
                if i > 0 {
                    out.push_str("---\n");
                }
                out.push_str(&to_yaml(doc)?);
            }
        }
    }
    Ok(out)
}

/// One document as YAML that YAML 1.1 readers (kubectl, sigs.k8s.io/yaml,
/// kubernetes-validate) read back exactly: every string they could take for
/// a bool, null, number, timestamp or merge key (`no`, `on`, `~`, `12:30`,
/// `0x1f`, `2024-01-01`, `<<`...) is single-quoted. serde_norway only quotes
/// what is ambiguous in YAML 1.2, so such strings (keys and values) are first
/// swapped for unique plain markers, then the markers for the quoted strings.
fn to_yaml(doc: &Value) -> Result<String, InjectorError> {
    // A marker prefix that occurs nowhere in the document.
    let text = serde_json::to_string(doc).map_err(|e| InjectorError::Output(e.to_string()))?;
    let prefix = (0u64..)
        .map(|n| format!("shoalyamlq{n}n"))
        .find(|p| !text.contains(p.as_str()))
        .unwrap_or_default();
    let mut quoted: Vec<String> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut mark = |s: &str| -> String {
        let i = *index.entry(s.to_owned()).or_insert_with(|| {
            quoted.push(format!("'{}'", s.replace('\'', "''")));
            quoted.len() - 1
        });
        format!("{prefix}{i}z")
    };
    let marked = mark_ambiguous(doc, &mut mark);
    let yaml =
        serde_norway::to_string(&marked).map_err(|e| InjectorError::Output(e.to_string()))?;
    if quoted.is_empty() {
        return Ok(yaml);
    }
    let mut out = String::with_capacity(yaml.len());
    let mut rest = yaml.as_str();
    while let Some(at) = rest.find(prefix.as_str()) {
        out.push_str(&rest[..at]);
        let after = &rest[at + prefix.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match (
            after[..digits].parse::<usize>(),
            after[digits..].starts_with('z'),
        ) {
            (Ok(i), true) if i < quoted.len() => {
                out.push_str(&quoted[i]);
                rest = &after[digits + 1..];
            }
            _ => {
                out.push_str(&prefix);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `v` with every [`yaml11_ambiguous`] string (and key) replaced by `mark`.
fn mark_ambiguous(v: &Value, mark: &mut impl FnMut(&str) -> String) -> Value {
    match v {
        Value::String(s) if yaml11_ambiguous(s) => Value::String(mark(s)),
        Value::Array(a) => Value::Array(a.iter().map(|x| mark_ambiguous(x, mark)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| {
                    let k = if yaml11_ambiguous(k) {
                        mark(k)
                    } else {
                        k.clone()
                    };
                    (k, mark_ambiguous(x, mark))
                })
                .collect(),
        ),
        _ => v.clone(),
    }
}

/// Whether a YAML 1.1 (or 1.2) reader could read the plain scalar `s` as
/// something other than the string `s`. Errs on the side of quoting: a quoted
/// string is always read back as itself.
pub fn yaml11_ambiguous(s: &str) -> bool {
    const WORDS: [&str; 17] = [
        "y", "n", "yes", "no", "true", "false", "on", "off", "null", "~", "=", "<<", ".inf",
        "-.inf", "+.inf", ".nan", "",
    ];
    if WORDS.iter().any(|w| s.eq_ignore_ascii_case(w)) {
        return true;
    }
    // Numbers of every base, floats, sexagesimals (`12:30`), timestamps
    // (`2024-01-01 10:00:00`): they all start with a digit or a dot, after an
    // optional sign, and use nothing but these characters.
    let unsigned = s.strip_prefix(['-', '+']).unwrap_or(s);
    unsigned
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '.')
        && unsigned
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:+- ".contains(c))
}

/// Where a kind keeps its pod template, and the kind of the pods' controller.
fn template_location(kind: &str) -> Option<(&'static str, Option<&'static str>)> {
    Some(match kind {
        "Pod" => ("", None),
        "Deployment" | "ReplicaSet" => ("/spec/template", Some("ReplicaSet")),
        "ReplicationController" => ("/spec/template", Some("ReplicationController")),
        "StatefulSet" => ("/spec/template", Some("StatefulSet")),
        "DaemonSet" => ("/spec/template", Some("DaemonSet")),
        "Job" => ("/spec/template", Some("Job")),
        "CronJob" => ("/spec/jobTemplate/spec/template", Some("Job")),
        _ => return None,
    })
}

/// Injects one object (recursing into Lists) in place.
pub fn inject_object(
    obj: &mut Value,
    options: &OfflineOptions,
    report: &mut Vec<ReportEntry>,
) -> Result<(), InjectorError> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if kind == "List" || (kind.ends_with("List") && obj.get("items").is_some()) {
        if let Some(Value::Array(items)) = obj.get_mut("items") {
            for item in items {
                inject_object(item, options, report)?;
            }
        }
        return Ok(());
    }
    let Some((template_path, owner_kind)) = template_location(&kind) else {
        return Ok(());
    };
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let namespace = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or(&options.default_namespace)
        .to_owned();
    let object = format!("{kind}/{name}");
    let Some(template) = obj.pointer_mut(template_path) else {
        return Ok(());
    };
    let (reason, warnings) = inject_template(template, &namespace, owner_kind, options)
        .map_err(|e| InjectorError::Input(format!("{object}: {e}")))?;
    report.push(ReportEntry {
        object,
        reason,
        warnings,
    });
    Ok(())
}

/// Injects a pod or pod template (`metadata` + `spec`) in place.
pub fn inject_template(
    template: &mut Value,
    namespace: &str,
    owner_kind: Option<&str>,
    options: &OfflineOptions,
) -> Result<(Reason, Vec<String>), String> {
    if !template.is_object() {
        return Err("pod template is not an object".to_owned());
    }
    let pod_value = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
        "spec": template.get("spec").cloned().unwrap_or(Value::Null),
    });
    let pod: Pod =
        serde_json::from_value(pod_value).map_err(|e| format!("not a valid pod: {e}"))?;
    let outcome = inject::inject(
        &pod,
        PodContext {
            namespace,
            namespace_info: NamespaceInfo::Known(&options.namespace_annotations),
            owner_kind,
        },
        &options.config,
    );
    if !outcome.patch.is_empty() {
        if let Some(map) = template.as_object_mut() {
            if !map.get("metadata").is_some_and(Value::is_object) {
                map.insert("metadata".to_owned(), json!({}));
            }
        }
        json_patch::patch(template, &outcome.patch).map_err(|e| format!("patch failed: {e}"))?;
    }
    Ok((outcome.reason, outcome.warnings))
}

#[cfg(test)]
mod tests;
