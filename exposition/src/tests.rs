use super::*;
use prometheus_client::metrics::counter::Counter;

fn registry() -> Registry {
    let mut r = Registry::default();
    let c = Counter::<u64>::default();
    c.inc_by(3);
    r.register("demo_events", "Events", c);
    register_build_info(&mut r, "demo_build_info", "1.2.3");
    r.register_collector(Box::new(ProcessCollector));
    r
}

#[test]
fn prometheus_gets_openmetrics_and_everyone_else_classic_text() {
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    assert_eq!(Format::negotiate(Some(accept)), Format::OpenMetrics);
    assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
    assert_eq!(Format::negotiate(None), Format::Text);
    assert!(Format::Text.content_type().contains("version=0.0.4"));
}

#[test]
fn classic_text_names_counters_with_total_and_drops_openmetrics_lines() {
    let r = registry();
    let text = Format::Text.encode(&r);
    assert!(
        text.contains("# TYPE demo_events_total counter\n"),
        "{text}"
    );
    assert!(text.contains("demo_events_total 3\n"), "{text}");
    assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
    assert!(text.contains("demo_build_info{version=\"1.2.3\"} 1\n"));
    assert!(!text.contains("# UNIT ") && !text.contains("# EOF"));
    let om = Format::OpenMetrics.encode(&r);
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE demo_events counter\n"));
}

#[test]
fn process_metrics_read_this_process() {
    mark_process_start();
    let text = Format::Text.encode(&registry());
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(value("process_resident_memory_bytes") > 0.0, "{text}");
    assert!(value("process_open_fds") > 0.0);
    assert!(value("process_threads") >= 1.0);
    assert!(value("process_start_time_seconds") > 1.0e9);
}
