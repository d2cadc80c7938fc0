#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn quantities() {
    for (s, v) in [
        ("100m", 0.1),
        ("1", 1.0),
        ("1.5", 1.5),
        ("64Mi", 67108864.0),
        ("1G", 1e9),
        ("2e3", 2000.0),
        ("1Ki", 1024.0),
    ] {
        let q = Quantity::parse(s).unwrap_or_else(|| panic!("{s}"));
        assert!((q.value - v).abs() < 1e-9, "{s}");
        assert_eq!(q.text, s);
    }
    for s in [
        "",
        "lots",
        "-1",
        "0",
        "1.2.3x",
        "Mi",
        "1Qi",
        "1 Mi",
        "1e3Mi",
        "NaN",
        "inf",
        &"9".repeat(40),
    ] {
        assert!(Quantity::parse(s).is_none(), "{s:?} accepted");
    }
}

#[test]
fn inject_choice_values() {
    assert_eq!(inject_choice(&map(&[])), None);
    assert_eq!(
        inject_choice(&map(&[(INJECT, "enabled")])),
        Some(InjectChoice::Enabled)
    );
    assert_eq!(
        inject_choice(&map(&[(INJECT, " Disabled ")])),
        Some(InjectChoice::Disabled)
    );
    assert_eq!(
        inject_choice(&map(&[(INJECT, "yes")])),
        Some(InjectChoice::Invalid)
    );
}

#[test]
fn valid_overrides() {
    let o = Overrides::parse(&map(&[
        (SIDECAR, "classic"),
        (APP_PORT, "8080"),
        (SUBSCRIPTIONS, r#"[{"topic":"t"}]"#),
        (BROKER, "FALSE"),
        (LOG_LEVEL, "Debug"),
        (CPU_LIMIT, "1"),
        (MEMORY_REQUEST, "64Mi"),
    ]));
    assert!(o.invalid.is_empty(), "{:?}", o.invalid);
    assert_eq!(o.sidecar, Some(SidecarMode::Classic));
    assert_eq!(o.app_port, Some(8080));
    assert_eq!(o.broker, Some(false));
    assert_eq!(o.log_level.as_deref(), Some("debug"));
    assert_eq!(o.cpu_limit.unwrap().text, "1");
}

#[test]
fn invalid_overrides_are_named_and_ignored() {
    let o = Overrides::parse(&map(&[
        (APP_PORT, "0"),
        (SUBSCRIPTIONS, "\"a string\""),
        (MEMORY_LIMIT, "big"),
    ]));
    let names: Vec<&str> = o.invalid.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, [APP_PORT, SUBSCRIPTIONS, MEMORY_LIMIT]);
    assert_eq!(o.app_port, None);
    assert_eq!(o.subscriptions, None);
    assert_eq!(o.memory_limit, None);
    assert!(o.invalid[0].1.contains("shoal.io/app-port=\"0\""));
}
