#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

use clap::Parser as _;

#[test]
fn identity_flags_default_to_port_4711_a_day_and_cluster_local() {
    let args = Args::try_parse_from(["shoal-injector"]).unwrap();
    assert_eq!(args.identity_addr.port(), 4711);
    assert_eq!(args.mesh_ca_secret, "shoal-mesh-ca");
    let config = identity_config(&args).unwrap();
    assert_eq!(config.cert_lifetime, Duration::from_secs(24 * 3600));
    assert_eq!(config.policy.trust_domain, "cluster.local");
    assert_eq!(config.policy.audience, "shoal");
}

#[test]
fn identity_flags_are_checked() {
    let args = Args::try_parse_from([
        "shoal-injector",
        "--identity-cert-lifetime",
        "12h",
        "--trust-domain",
        "prod.example",
        "--identity-addr",
        "127.0.0.1:5711",
    ])
    .unwrap();
    let config = identity_config(&args).unwrap();
    assert_eq!(config.cert_lifetime, Duration::from_secs(12 * 3600));
    assert_eq!(config.policy.trust_domain, "prod.example");
    for bad in [
        ["--trust-domain", "Prod/Example"],
        ["--identity-cert-lifetime", "30s"],
    ] {
        let args = Args::try_parse_from(["shoal-injector", bad[0], bad[1]]).unwrap();
        assert!(identity_config(&args).is_err(), "{bad:?}");
    }
    assert!(Args::try_parse_from(["shoal-injector", "--identity-cert-lifetime", "1d"]).is_err());
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
    assert!(parse_duration("1w").is_err());
    assert!(parse_duration("h").is_err());
}
