//! The `shoal` command line as people type it, through the real binary: URLs
//! without a scheme, names checked before sending, answers that are not
//! Shoal's, precise connection errors, start positions, `-n 0`, options
//! only where they work, `inject -f DIR`, and a subscriber that outlives a
//! restart of its agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_agent::client::AgentClient;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env_remove("SHOAL_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A standalone agent (`shoal agent`), killed when dropped.
struct Agent {
    child: Child,
    app: u16,
}

impl Agent {
    async fn start(dir: &Path, app: u16) -> Agent {
        let admin = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("agent")
            .arg("--data-dir")
            .arg(dir)
            .arg("--app-addr")
            .arg(format!("127.0.0.1:{app}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let client = AgentClient::new(&format!("http://127.0.0.1:{admin}"));
        let deadline = Instant::now() + WAIT;
        loop {
            if client.get("/readyz").await.is_ok_and(|r| r.status == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "the agent did not get ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Agent { child, app }
    }

    fn url(&self) -> String {
        format!("127.0.0.1:{}", self.app)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn urls_without_a_scheme_work_and_bad_names_and_urls_are_refused_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), free_port()).await;
    let url = agent.url();
    let o = shoal(&["pub", "--url", &url, "orders", "hello"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("published to orders/"), "{out}");
    let localhost = format!("localhost:{}", agent.app);
    assert!(shoal(&["pub", "--url", &localhost, "orders", "again"])
        .status
        .success());

    for bad in ["has space", "a/b", "", "_under", "caf\u{e9}"] {
        let o = shoal(&["pub", "--url", &url, bad, "x"]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "a bad name is a bad argument");
        assert!(err.contains("invalid topic name"), "{bad:?}: {err}");
    }
    let o = shoal(&["sub", "--url", &url, "orders", "--group", "no/slash"]);
    assert!(text(&o).1.contains("invalid group name"), "{}", text(&o).1);

    let https = format!("https://{url}");
    let o = shoal(&["status", "--url", &https]);
    assert!(text(&o).1.contains("plain http"), "{}", text(&o).1);
    let path = format!("http://{url}/v1");
    let o = shoal(&["status", "--url", &path]);
    assert!(text(&o).1.contains("not a path"), "{}", text(&o).1);
}

#[test]
fn an_answer_that_is_not_shoals_is_an_error_not_a_success() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
        }
    });
    let url = format!("127.0.0.1:{port}");
    let o = shoal(&["pub", "--url", &url, "orders", "x"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(err.contains("not as a Shoal agent does"), "{err}");
}

#[test]
fn connection_errors_say_what_went_wrong() {
    let refused = format!("127.0.0.1:{}", free_port());
    let o = shoal(&["status", "--url", &refused]);
    let err = text(&o).1;
    assert!(!o.status.success());
    assert!(err.contains("no Shoal agent is listening"), "{err}");
    assert!(err.contains("shoal dev"), "{err}");

    let o = shoal(&["status", "--url", "http://no-such-host.invalid:4700"]);
    let err = text(&o).1;
    assert!(err.contains("cannot find the host"), "{err}");
}

#[test]
fn options_are_checked_where_they_are_given() {
    let o = shoal(&["sub", "orders", "-n", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("'0'"), "{}", text(&o).1);
    let o = shoal(&["sub", "orders", "--from", "yesterday"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).1.contains("not a start position"),
        "{}",
        text(&o).1
    );
    for cmd in [
        &["dev", "--url", "x"][..],
        &["inject", "-f", "-", "--url", "x"][..],
    ] {
        let o = shoal(cmd);
        assert_eq!(o.status.code(), Some(2), "{cmd:?}");
        assert!(text(&o).1.contains("--url"), "{}", text(&o).1);
    }
}

#[test]
fn inject_reads_the_yaml_files_of_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a-pod.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: one\nspec:\n  containers:\n  - name: app\n    image: app:1\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b-deploy.json"),
        r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"two"},"spec":{"selector":{"matchLabels":{"app":"two"}},"template":{"metadata":{"labels":{"app":"two"}},"spec":{"containers":[{"name":"app","image":"app:2"}]}}}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [a-pod.yaml]\n",
    )
    .unwrap();
    let o = shoal(&["inject", "-f", dir.path().to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.matches("name: shoal-agent").count(), 2, "{out}");
    assert!(
        out.contains("name: one") && out.contains("name: two"),
        "{out}"
    );
    assert!(
        !out.contains("Kustomization"),
        "a kustomization is no manifest: {out}"
    );
    assert!(err.contains("kustomization.yaml: skipped"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let o = shoal(&["inject", "-f", empty.path().to_str().unwrap()]);
    assert!(text(&o).1.contains("no .yaml"), "{}", text(&o).1);
}

#[test]
fn inject_hands_agents_the_trust_anchors_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let pod = dir.path().join("pod.yaml");
    std::fs::write(
        &pod,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: one\nspec:\n  containers:\n  - name: app\n    image: app:1\n",
    )
    .unwrap();
    let pod = pod.to_str().unwrap();

    // Without a bundle the agent gets no identity settings, and a warning says so.
    let o = shoal(&["inject", "-f", pod]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(!out.contains("SHOAL_IDENTITY_ADDR"), "{out}");
    assert!(err.contains("run alone"), "{err}");

    let bundle = dir.path().join("ca.crt");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&bundle, ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let o = shoal(&[
        "inject",
        "-f",
        pod,
        "--trust-anchors-file",
        bundle.to_str().unwrap(),
        "--identity-service",
        "identity.example:4711",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("run alone"), "{err}");
    assert!(out.contains("SHOAL_IDENTITY_TRUST_ANCHORS"), "{out}");
    assert!(out.contains("identity.example:4711"), "{out}");

    // Pod certificates: the volume and SHOAL_CERT_DIR with the bundle; and
    // without it, an error rather than pods that wait for a certificate
    // their agents could not use.
    let o = shoal(&[
        "inject",
        "-f",
        pod,
        "--pod-certificates",
        "--trust-anchors-file",
        bundle.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("podCertificate"), "{out}");
    assert!(out.contains("SHOAL_CERT_DIR"), "{out}");
    let o = shoal(&["inject", "-f", pod, "--pod-certificates"]);
    assert_eq!(o.status.code(), Some(2), "bad arguments");
    assert!(
        text(&o).1.contains("--trust-anchors-file"),
        "{}",
        text(&o).1
    );
    assert!(text(&o).1.contains("shoal-mesh-ca"), "where the bundle is");
    let o = shoal(&[
        "inject",
        "-f",
        pod,
        "--pod-certificates",
        "--identity=false",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("--identity=true"), "{}", text(&o).1);

    // Not a bundle: no certificate, a broken one, a leaf that is no CA.
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["agent.example".to_owned()])
        .unwrap()
        .self_signed(&leaf_key)
        .unwrap()
        .pem();
    for (bad, says) in [
        ("hello", "no PEM certificate"),
        (
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "trust bundle",
        ),
        (leaf.as_str(), "not a CA certificate"),
    ] {
        let not_a_bundle = dir.path().join("not.pem");
        std::fs::write(&not_a_bundle, bad).unwrap();
        let o = shoal(&[
            "inject",
            "-f",
            pod,
            "--trust-anchors-file",
            not_a_bundle.to_str().unwrap(),
        ]);
        assert!(!o.status.success(), "{bad}");
        assert!(text(&o).1.contains(says), "{}", text(&o).1);
    }
}

#[tokio::test]
async fn sub_starts_at_an_offset_and_outlives_a_restart_of_its_agent() {
    let dir = tempfile::tempdir().unwrap();
    let app = free_port();
    let agent = Agent::start(dir.path(), app).await;
    let url = agent.url();
    assert!(shoal(&["topics", "--url", &url, "create", "t1", "-p", "1"])
        .status
        .success());
    for m in ["m1", "m2", "m3"] {
        assert!(shoal(&["pub", "--url", &url, "t1", m]).status.success());
    }
    // A time with an offset, as RFC 3339 allows: from before the first.
    let o = shoal(&[
        "sub",
        "--url",
        &url,
        "t1",
        "--from",
        "2020-01-01T02:00:00+02:00",
        "-n",
        "1",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("m1"), "{out}");
    let o = shoal(&["sub", "--url", &url, "t1", "--from", "2", "-n", "2"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        !out.contains("m1") && out.contains("m2") && out.contains("m3"),
        "{out}"
    );

    // A named subscriber reading two messages; its agent restarts between them.
    let mut sub = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "sub", "--url", &url, "t1", "--name", "keeper", "--from", "latest", "-n", "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = |r: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    };
    let out = lines(Box::new(sub.stdout.take().unwrap()));
    let err = lines(Box::new(sub.stderr.take().unwrap()));
    let expect = |rx: &mpsc::Receiver<String>, what: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line with {what:?}"),
            }
        }
    };
    expect(&err, "subscribed to t1");
    assert!(shoal(&["pub", "--url", &url, "t1", "before"])
        .status
        .success());
    expect(&out, "before");
    drop(agent);
    expect(&err, "reconnecting");
    let agent = Agent::start(dir.path(), app).await;
    assert!(shoal(&["pub", "--url", &agent.url(), "t1", "after"])
        .status
        .success());
    expect(&out, "after");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = sub.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "sub did not exit after its count"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
}

/// `shoal status | head -1`: the reader goes away before the CLI prints.
/// It exits with 141, as a tool killed by SIGPIPE does, and prints no panic.
#[tokio::test]
async fn a_reader_that_closes_the_pipe_early_ends_the_cli_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let app = free_port();
    let _agent = Agent::start(dir.path(), app).await;
    let url = format!("127.0.0.1:{app}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["status", "--url", &url])
        .env_remove("SHOAL_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the CLI has its answer from the agent to print.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(141), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}
