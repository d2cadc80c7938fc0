use super::*;

#[test]
fn percent_decoding() {
    assert_eq!(percent_decode("a%20b"), "a b");
    assert_eq!(
        percent_decode("2026-11-24T10%3A00%3A00Z"),
        "2026-11-24T10:00:00Z"
    );
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%zz"), "%zz");
}

#[test]
fn query_rules() {
    let q = Query::parse(Some("max=5&wait=2s"));
    assert!(q.only(&["max", "wait"]).is_ok());
    assert_eq!(q.only(&["max"]).unwrap_err().code, "unknown_parameter");
    assert_eq!(q.usize("max", 1, 10).unwrap(), 5);
    assert_eq!(
        q.duration("wait", Duration::ZERO, Duration::from_secs(60))
            .unwrap(),
        Duration::from_secs(2)
    );
    let bad = Query::parse(Some("max=0&wait=forever"));
    assert!(bad.usize("max", 1, 10).is_err());
    assert!(bad
        .duration("wait", Duration::ZERO, Duration::from_secs(60))
        .is_err());
}
