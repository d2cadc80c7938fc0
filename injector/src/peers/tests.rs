use super::*;
use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

fn pod(ns: &str, name: &str, ip: Option<&str>, mesh_port: Option<i32>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![
                Container {
                    name: "app".to_owned(),
                    ..Container::default()
                },
                Container {
                    name: AGENT_CONTAINER_NAME.to_owned(),
                    env: Some(vec![k8s_openapi::api::core::v1::EnvVar {
                        name: IDENTITY_ADDR_ENV.to_owned(),
                        value: Some("shoal-injector.shoal-system.svc:4711".to_owned()),
                        ..Default::default()
                    }]),
                    ports: mesh_port.map(|p| {
                        vec![ContainerPort {
                            name: Some(MESH_PORT_NAME.to_owned()),
                            container_port: p,
                            ..ContainerPort::default()
                        }]
                    }),
                    ..Container::default()
                },
            ],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            pod_ip: ip.map(str::to_owned),
            phase: Some("Running".to_owned()),
            ..PodStatus::default()
        }),
    }
}

#[test]
fn a_pod_with_an_ip_and_the_agent_has_a_mesh_address() {
    let p = pod("a", "p", Some("10.1.2.3"), Some(4801));
    assert_eq!(mesh_address(&p), Some("10.1.2.3:4801".parse().unwrap()));
    // No named port: the default.
    let p = pod("a", "p", Some("fd00::7"), None);
    assert_eq!(mesh_address(&p), Some("[fd00::7]:4701".parse().unwrap()));
}

#[test]
fn pods_without_ip_agent_or_future_have_none() {
    assert_eq!(mesh_address(&pod("a", "p", None, Some(4701))), None);
    assert_eq!(mesh_address(&pod("a", "p", Some("not an ip"), None)), None);

    let mut deleting = pod("a", "p", Some("10.0.0.1"), None);
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    assert_eq!(mesh_address(&deleting), None);

    let mut done = pod("a", "p", Some("10.0.0.1"), None);
    if let Some(s) = done.status.as_mut() {
        s.phase = Some("Succeeded".to_owned());
    }
    assert_eq!(mesh_address(&done), None);

    // Injected without identity settings: its agent never joins.
    let mut no_identity = pod("a", "p", Some("10.0.0.1"), None);
    if let Some(spec) = no_identity.spec.as_mut() {
        for c in &mut spec.containers {
            c.env = None;
        }
    }
    assert_eq!(mesh_address(&no_identity), None);

    let mut no_agent = pod("a", "p", Some("10.0.0.1"), None);
    if let Some(spec) = no_agent.spec.as_mut() {
        spec.containers.retain(|c| c.name != AGENT_CONTAINER_NAME);
    }
    assert_eq!(mesh_address(&no_agent), None);

    // A native sidecar is an init container.
    let mut native = pod("a", "p", Some("10.0.0.9"), None);
    if let Some(spec) = native.spec.as_mut() {
        let agent: Vec<Container> = spec
            .containers
            .drain(..)
            .filter(|c| c.name == AGENT_CONTAINER_NAME)
            .collect();
        spec.init_containers = Some(agent);
    }
    assert_eq!(
        mesh_address(&native),
        Some("10.0.0.9:4701".parse().unwrap())
    );
}

#[test]
fn the_asker_is_left_out_and_answers_are_bounded() {
    let pods: Vec<Arc<Pod>> = (0..20)
        .map(|i| {
            Arc::new(pod(
                if i % 2 == 0 { "a" } else { "b" },
                &format!("p{i}"),
                Some(&format!("10.0.0.{}", i + 1)),
                None,
            ))
        })
        .collect();
    // Same name in another namespace is another pod.
    let few = &pods[..3];
    let got = choose(few, ("a", "p0"), 1);
    assert_eq!(
        got,
        vec![
            "10.0.0.2:4701".parse::<SocketAddr>().unwrap(),
            "10.0.0.3:4701".parse().unwrap()
        ]
    );
    let got = choose(few, ("b", "p0"), 1);
    assert_eq!(got.len(), 3, "p0 of namespace a is not the asker");

    let got = choose(&pods, ("a", "p0"), 7);
    assert_eq!(got.len(), MAX_PEERS);
    assert!(!got.contains(&"10.0.0.1:4701".parse().unwrap()));
    // Another seed, another choice; the same seed, the same one.
    assert_eq!(got, choose(&pods, ("a", "p0"), 7));
    assert_ne!(got, choose(&pods, ("a", "p0"), 8));
}

#[test]
fn the_first_agent_hears_of_nobody() {
    let alone = vec![Arc::new(pod("a", "p0", Some("10.0.0.1"), None))];
    assert!(choose(&alone, ("a", "p0"), 1).is_empty());
    assert!(choose(&[], ("a", "p0"), 1).is_empty());
}

fn created(mut p: Pod, s: i64) -> Pod {
    p.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).unwrap(),
    ));
    p
}

#[test]
fn only_the_oldest_listed_pod_founds_the_mesh() {
    let pods: Vec<Arc<Pod>> = vec![
        Arc::new(created(pod("b", "p1", Some("10.0.0.1"), None), 5)),
        Arc::new(created(pod("a", "p2", Some("10.0.0.2"), None), 3)),
        Arc::new(created(pod("c", "p3", Some("10.0.0.3"), None), 9)),
    ];
    let founders: Vec<&str> = [("b", "p1"), ("a", "p2"), ("c", "p3")]
        .into_iter()
        .filter(|asker| is_oldest(&pods, *asker))
        .map(|(_, name)| name)
        .collect();
    assert_eq!(founders, ["p2"], "exactly one founder: the oldest");

    // Same creation time: namespace, then name, break the tie.
    let tied: Vec<Arc<Pod>> = vec![
        Arc::new(created(pod("b", "p1", Some("10.0.0.1"), None), 1)),
        Arc::new(created(pod("a", "p9", Some("10.0.0.2"), None), 1)),
    ];
    assert!(is_oldest(&tied, ("a", "p9")));
    assert!(!is_oldest(&tied, ("b", "p1")));

    // A pod the watch has not shown yet never founds: it is asked to retry.
    assert!(!is_oldest(&pods, ("d", "p4")));
    assert!(!is_oldest(&[], ("d", "p4")));
    let alone = vec![Arc::new(created(pod("d", "p4", Some("10.0.0.4"), None), 0))];
    assert!(is_oldest(&alone, ("d", "p4")), "the only pod founds");
    let mut gone = alone.clone();
    gone.push(Arc::new(created(pod("a", "old", None, None), -5)));
    assert!(
        is_oldest(&gone, ("d", "p4")),
        "a pod without an IP runs no agent"
    );
    // An older pod that has no IP (not running) does not count either.
    let mut with_gone = pods.clone();
    with_gone.push(gone[1].clone());
    assert!(is_oldest(&with_gone, ("a", "p2")));
}
