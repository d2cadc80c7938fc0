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
