use super::*;

fn grants(publish: &[&str], subscribe: &[&str]) -> Grants {
    Grants {
        publish: publish.iter().map(|s| s.to_string()).collect(),
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn the_decision_table_of_topic_rights() {
    let none = Grants::default();
    let billing_pub = grants(&["billing"], &[]);
    let billing_sub = grants(&[], &["billing"]);
    let everyone = grants(&["*"], &["*"]);
    // (asking namespace, topic, grants, action, allowed)
    let table: &[(&str, &str, Option<&Grants>, Action, bool)] = &[
        // The owner may do anything, granted or not, known or not.
        ("shop", "shop:orders", None, Action::Publish, true),
        ("shop", "shop:orders", Some(&none), Action::Subscribe, true),
        ("default", "orders", None, Action::Publish, true),
        // Another namespace: only what is granted, to it or to everyone.
        ("billing", "shop:orders", None, Action::Publish, false),
        (
            "billing",
            "shop:orders",
            Some(&none),
            Action::Publish,
            false,
        ),
        (
            "billing",
            "shop:orders",
            Some(&billing_pub),
            Action::Publish,
            true,
        ),
        (
            "billing",
            "shop:orders",
            Some(&billing_pub),
            Action::Subscribe,
            false,
        ),
        (
            "billing",
            "shop:orders",
            Some(&billing_sub),
            Action::Subscribe,
            true,
        ),
        (
            "billing",
            "shop:orders",
            Some(&billing_sub),
            Action::Publish,
            false,
        ),
        (
            "audit",
            "shop:orders",
            Some(&billing_pub),
            Action::Publish,
            false,
        ),
        (
            "audit",
            "shop:orders",
            Some(&everyone),
            Action::Publish,
            true,
        ),
        (
            "audit",
            "shop:orders",
            Some(&everyone),
            Action::Subscribe,
            true,
        ),
        // The default namespace is a namespace like any other.
        ("shop", "orders", Some(&none), Action::Publish, false),
        (
            "default",
            "shop:orders",
            Some(&none),
            Action::Subscribe,
            false,
        ),
    ];
    for (ns, topic, g, action, allowed) in table {
        let got = authorize(ns, topic, *g, *action);
        assert_eq!(
            got.is_ok(),
            *allowed,
            "{ns} {action:?} {topic} {g:?}: {got:?}"
        );
        if let Err(e) = got {
            assert_eq!((e.status.as_u16(), e.code), (403, "forbidden"));
            assert!(
                e.message.contains(ns) && e.message.contains(topic),
                "{}",
                e.message
            );
        }
    }
}

#[test]
fn only_the_owner_configures_a_topic_or_uses_a_group() {
    assert!(may_configure("shop", "shop:orders").is_ok());
    assert!(may_configure("default", "orders").is_ok());
    assert_eq!(
        may_configure("billing", "shop:orders").unwrap_err().code,
        "forbidden"
    );
    assert!(may_configure("shop", "orders").is_err());
    assert!(may_use_group("billing", "billing:audit").is_ok());
    assert!(may_use_group("default", "workers").is_ok());
    assert!(may_use_group("billing", "shop:workers").is_err());
    assert!(may_use_group("billing", "workers").is_err());
}

#[test]
fn grants_name_namespaces_or_everyone() {
    assert!(grants(&["billing", "*"], &["a-1"]).validate().is_ok());
    assert!(grants(&["Billing"], &[]).validate().is_err());
    assert!(grants(&[], &["shop:orders"]).validate().is_err());
    let many: Vec<String> = (0..=MAX_GRANTEES).map(|i| format!("n{i}")).collect();
    let too_many = Grants {
        publish: many,
        subscribe: Vec::new(),
    };
    assert!(too_many.validate().is_err());
    let parsed: Grants = serde_json::from_str(r#"{"publish": ["billing"]}"#).unwrap();
    assert_eq!(parsed, grants(&["billing"], &[]));
    assert!(serde_json::from_str::<Grants>(r#"{"read": ["billing"]}"#).is_err());
}
