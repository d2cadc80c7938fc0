#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

#[test]
fn format_detection() {
    assert_eq!(Format::detect("  {\"kind\":1}"), Format::Json);
    assert_eq!(Format::detect("\n[1]"), Format::Json);
    assert_eq!(Format::detect("kind: Pod"), Format::Yaml);
    assert_eq!(Format::detect("---\nkind: Pod"), Format::Yaml);
    assert_eq!(Format::detect(""), Format::Yaml);
}

#[test]
fn kinds_and_their_templates() {
    assert_eq!(
        template_location("CronJob"),
        Some(("/spec/jobTemplate/spec/template", Some("Job")))
    );
    assert_eq!(
        template_location("Deployment"),
        Some(("/spec/template", Some("ReplicaSet")))
    );
    assert_eq!(template_location("Service"), None);
}

#[test]
fn yaml_documents_round_trip_and_empty_ones_drop() {
    let docs = parse_documents("---\na: 1\n---\n---\nb: [x]\n", Format::Yaml).unwrap();
    assert_eq!(docs, vec![json!({"a": 1}), json!({"b": ["x"]})]);
    let text = render_documents(&docs, Format::Yaml).unwrap();
    assert_eq!(parse_documents(&text, Format::Yaml).unwrap(), docs);
}

#[test]
fn yaml_1_1_ambiguity() {
    for s in [
        "no",
        "No",
        "NO",
        "yes",
        "y",
        "N",
        "on",
        "OFF",
        "true",
        "False",
        "null",
        "~",
        "",
        "=",
        "<<",
        ".inf",
        "-.Inf",
        ".NaN",
        "12:30",
        "-1:20:30",
        "190:20:30.15",
        "0x1F",
        "0b101",
        "017",
        "0o17",
        "1_000",
        "1e3",
        "6.8523015e+5",
        "+12",
        ".5",
        "2001-12-14",
        "2001-12-14t21:59:43.10-05:00",
        "2001-12-14 21:59:43.10 -5",
    ] {
        assert!(yaml11_ambiguous(s), "{s:?}");
    }
    for s in [
        "nope",
        "enabled",
        "plain words",
        "busybox:1.36",
        "a12:30",
        "/metrics",
        "n o",
    ] {
        assert!(!yaml11_ambiguous(s), "{s:?}");
    }
}

#[test]
fn quoting_survives_marker_lookalikes_in_the_input() {
    let doc = json!({
        "a": "no",
        "shoalyamlq0n0z": "shoalyamlq0n0z",
        "b": ["off", "it's", "12:30"],
        "on": "shoalyamlq1n",
    });
    let yaml = render_documents(std::slice::from_ref(&doc), Format::Yaml).unwrap();
    assert!(yaml.contains("a: 'no'"), "{yaml}");
    assert!(yaml.contains("'on': shoalyamlq1n"), "{yaml}");
    let back = parse_documents(&yaml, Format::Yaml).unwrap();
    assert_eq!(back, [doc]);
}
