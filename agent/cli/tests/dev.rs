//! `shoal dev` as a user runs it: the real binary starts three agents as child
//! processes on loopback, they form one mesh, and SIGTERM stops them all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use shoal_agent::client::AgentClient;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How long `shoal dev` may take to print its "Ctrl-C" line.
const READY_WAIT: Duration = Duration::from_secs(120);
/// How long `shoal dev` may take to exit after SIGTERM (it allows its agents 15 s).
const EXIT_WAIT: Duration = Duration::from_secs(40);
/// Agents of the mesh under test.
const AGENTS: u16 = 3;

/// A base port whose agents' ports (app and admin over TCP, mesh over UDP)
/// are all free now, below Linux's ephemeral range (32768 and up): there, a
/// port an agent frees when it is killed can be taken at once by any socket
/// of another test bound to port 0, and the agent's peers then talk to a
/// stranger at its address.
fn free_base_port() -> u16 {
    for _ in 0..100 {
        let base = fastrand::u16(20000..32000);
        let free = (0..AGENTS).all(|i| {
            let app = base + 10 * i;
            std::net::TcpListener::bind(("127.0.0.1", app)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", app + 1)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", app + 2)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free range of ports found in 20000..32000");
}

fn admin(base: u16, i: u16) -> AgentClient {
    AgentClient::new(&format!("http://127.0.0.1:{}", base + 10 * i + 2))
}

fn app(base: u16, i: u16) -> AgentClient {
    AgentClient::new(&format!("http://127.0.0.1:{}", base + 10 * i))
}

/// `shoal dev` running as a child; stopped (SIGTERM, then SIGKILL) on drop.
struct Dev {
    child: Option<Child>,
    stdout: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Dev {
    fn start(data_dir: &Path, base: u16) -> Dev {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
        cmd.arg("dev")
            .arg("--agents")
            .arg(AGENTS.to_string())
            .arg("--base-port")
            .arg(base.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("SHOAL_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("spawning shoal dev");
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("{line}");
                if tx.send(line).is_err() {
                    // Keep draining so shoal dev never blocks on a full pipe.
                    continue;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let lines = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("{line}");
                lines.lock().unwrap().push(line);
            }
        });
        Dev {
            child: Some(child),
            stdout,
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// Waits for a line of standard output containing `text`; the lines
    /// read until then, that one included.
    fn wait_for_stdout(&mut self, text: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.contains(text) => {
                    lines.push(line);
                    return lines;
                }
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("shoal dev printed no {text:?} within {within:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.wait(Duration::from_secs(5));
                    panic!("shoal dev exited ({status:?}) before printing {text:?}")
                }
            }
        }
    }

    fn sigterm(&self) {
        let id = self.child.as_ref().expect("shoal dev already reaped").id();
        let pid = rustix::process::Pid::from_raw(id as i32).expect("a child pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    }

    /// Waits for the exit, polling; None when it is still running after `within`.
    fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for shoal dev") {
                self.child = None;
                // Its stderr closed with it: read to the end.
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until standard error has a line containing `text`.
    fn wait_for_stderr(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr_text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "shoal dev printed no {text:?} within {within:?}:\n{}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.sigterm();
        if self.wait(EXIT_WAIT).is_none() {
            if let Some(mut c) = self.child.take() {
                // Its agents stop by themselves once their standard input closes.
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

async fn ready(client: &AgentClient) -> Option<u16> {
    client.get("/readyz").await.ok().map(|r| r.status.as_u16())
}

#[tokio::test]
async fn dev_starts_a_joined_mesh_and_sigterm_stops_every_agent() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let mut dev = Dev::start(dir.path(), base);
    dev.wait_for_stdout("Ctrl-C", READY_WAIT);

    for i in 0..AGENTS {
        assert_eq!(
            ready(&admin(base, i)).await,
            Some(200),
            "agent-{} is not ready",
            i + 1
        );
    }
    // Agent 1 is the seed: every other agent joined through it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let nodes = loop {
        let v: Value = app(base, 0).get("/v1/cluster").await.unwrap().json();
        let mut nodes: Vec<String> = v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["node"].as_str().map(str::to_string))
            .collect();
        nodes.sort();
        if nodes.len() == usize::from(AGENTS) || Instant::now() > deadline {
            break nodes;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        nodes,
        ["agent-1", "agent-2", "agent-3"],
        "members seen by agent-1"
    );
    for i in 1..=AGENTS {
        assert!(
            dir.path().join(format!("agent-{i}")).is_dir(),
            "agent-{i} keeps its data in DIR/agent-{i}"
        );
    }
    assert!(dir.path().join("ca").is_dir(), "the agents share DIR/ca");

    dev.sigterm();
    let status = dev
        .wait(EXIT_WAIT)
        .unwrap_or_else(|| panic!("shoal dev did not exit within {EXIT_WAIT:?} of SIGTERM"));
    assert!(
        status.success(),
        "shoal dev exited with {status}:\n{}",
        dev.stderr_text()
    );
    // shoal dev waits for its agents: once it has exited, none answers.
    for i in 0..AGENTS {
        assert_eq!(
            ready(&admin(base, i)).await,
            None,
            "agent-{} still answers after shoal dev exited",
            i + 1
        );
    }
    assert!(dev.stderr_text().contains("all agents stopped"));
}

#[tokio::test]
async fn an_agent_that_cannot_start_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    // agent-2's data directory cannot be created: a file is in the way.
    std::fs::write(dir.path().join("agent-2"), b"in the way").unwrap();
    let base = free_base_port();
    let mut dev = Dev::start(dir.path(), base);
    let status = dev
        .wait(READY_WAIT)
        .unwrap_or_else(|| panic!("shoal dev did not give up within {READY_WAIT:?}"));
    let stderr = dev.stderr_text();
    assert!(!status.success(), "shoal dev exited with {status}");
    assert!(
        stderr.contains("shoal dev: agent-2 exited (exit status: 1)"),
        "the failed agent is named:\n{stderr}"
    );
    for i in 0..AGENTS {
        assert_eq!(
            ready(&admin(base, i)).await,
            None,
            "agent-{} still runs",
            i + 1
        );
    }
}

#[test]
fn a_taken_port_is_reported_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let _taken = std::net::TcpListener::bind(("127.0.0.1", base + 12)).unwrap();
    let mut dev = Dev::start(dir.path(), base);
    let status = dev
        .wait(EXIT_WAIT)
        .unwrap_or_else(|| panic!("shoal dev did not exit within {EXIT_WAIT:?}"));
    assert!(!status.success(), "shoal dev exited with {status}");
    let stderr = dev.stderr_text();
    assert!(
        stderr.contains(&format!("127.0.0.1:{} for agent-2's admin", base + 12))
            && stderr.contains("try --base-port"),
        "the taken port and a way out are named:\n{stderr}"
    );
}

/// `shoal dev kill|stop|start|restart N` against the running one: its status and output.
fn control(dir: &Path, verb: &str, agent: u16) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["dev", verb, &agent.to_string(), "--data-dir"])
        .arg(dir)
        .env_remove("SHOAL_DEV_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The pid of `agent` in the banner's table.
fn pid_in_banner(lines: &[String], agent: &str) -> i32 {
    let row = lines
        .iter()
        .find(|l| l.trim_start().starts_with(&format!("{agent} ")) && l.contains("http://"))
        .unwrap_or_else(|| panic!("no row for {agent} in the banner: {lines:#?}"));
    row.split_whitespace().last().unwrap().parse().unwrap()
}

/// The pid in `agent-2 is ready (pid 4242)`.
fn text_pid(text: &str) -> i32 {
    let (_, rest) = text
        .split_once("(pid ")
        .unwrap_or_else(|| panic!("no pid in {text:?}"));
    rest.trim_end()
        .trim_end_matches(')')
        .parse()
        .unwrap_or_else(|_| panic!("no pid in {text:?}"))
}

fn sigkill(pid: i32) {
    let pid = rustix::process::Pid::from_raw(pid).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("SIGKILL");
}

/// Publishes `body` (no key: the agent picks a partition whose home is up),
/// trying again while the mesh notices a change; the answer's status.
async fn publish_until_stored(client: &AgentClient, topic: &str, body: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = client
            .call(
                http::Method::POST,
                &format!("/v1/topics/{topic}/messages"),
                &[("content-type", "text/plain")],
                bytes::Bytes::from(body.to_string()),
            )
            .await;
        let status = answer.as_ref().map_or(0, |r| r.status.as_u16());
        if status == 201 {
            return status;
        }
        if Instant::now() > deadline {
            // On stdout, which a test runner shows whole: the last answer
            // and this agent's view of the groups, to tell why it failed.
            match &answer {
                Ok(r) => println!("last answer to the publish: {status} {}", r.text()),
                Err(e) => println!("last publish failed: {e}"),
            }
            print_groups(client).await;
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints the members and replicated groups as the agent `client` talks to
/// sees them (within 10 s: it may be the agent that does not answer).
async fn print_groups(client: &AgentClient) {
    let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(10), client.get("/v1/cluster")).await
    else {
        println!("no /v1/cluster answer");
        return;
    };
    let v: Value = r.json();
    for m in v["members"].as_array().into_iter().flatten() {
        println!(
            "member {} {} incarnation {}",
            m["node"], m["state"], m["incarnation"]
        );
    }
    for g in v["replicated"].as_array().into_iter().flatten() {
        println!(
            "group {}/{} leader {} term {} commit {} last {} voters {} learners {} lag {} recovering {}",
            g["topic"], g["partition"], g["leader"], g["term"], g["commitIndex"], g["lastIndex"],
            g["voters"], g["learners"], g["lag"], g["recovering"]
        );
    }
}

/// Pulls and acknowledges messages of a new pull subscription on `client`
/// until `want` distinct ones arrived (or a minute passed); their bodies.
async fn read_all(client: &AgentClient, topic: &str, name: &str, want: usize) -> Vec<String> {
    let spec = serde_json::json!({"topic": topic, "start": "earliest"});
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client
            .put_json(&format!("/v1/subscriptions/{name}"), &spec)
            .await;
        if r.as_ref().is_ok_and(|r| r.status.is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "cannot subscribe on the agent");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut got = std::collections::BTreeSet::new();
    while got.len() < want && Instant::now() < deadline {
        let Ok(r) = client
            .get(&format!(
                "/v1/subscriptions/{name}/messages?max=100&wait=1s"
            ))
            .await
        else {
            continue;
        };
        if r.status != 200 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let v: Value = r.json();
        let mut ids = Vec::new();
        for m in v.as_array().into_iter().flatten() {
            if let Some(body) = m["data"].as_str() {
                got.insert(body.to_string());
            }
            if let Some(id) = m["ackid"].as_str() {
                ids.push(id.to_string());
            }
        }
        if !ids.is_empty() {
            let _ = client
                .post_json(
                    &format!("/v1/subscriptions/{name}/acks"),
                    &serde_json::json!({"ack": ids}),
                )
                .await;
        }
    }
    got.into_iter().collect()
}

/// Lines of agent logs at WARN or ERROR.
fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

#[tokio::test]
async fn a_killed_agent_is_reported_the_others_keep_serving_and_restart_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let mut dev = Dev::start(dir.path(), base);
    let banner = dev.wait_for_stdout("Ctrl-C", READY_WAIT);
    let pid2 = pid_in_banner(&banner, "agent-2");

    sigkill(pid2);
    dev.wait_for_stderr(
        "shoal dev: agent-2 exited (signal: 9 (SIGKILL))",
        Duration::from_secs(30),
    );
    let stderr = dev.stderr_text();
    let report = stderr
        .lines()
        .find(|l| l.starts_with("shoal dev: agent-2 exited"))
        .unwrap();
    assert!(
        report.contains("the other agents keep running") && report.contains("shoal dev start 2"),
        "the report says the others run on and how to bring it back: {report}"
    );
    assert!(
        !report.contains(" INFO "),
        "an INFO line is not an agent's last words: {report}"
    );

    // agent-1 and agent-3 keep serving: publish on both, read on agent-3.
    for (i, body) in [(0, "one"), (2, "three")] {
        let status = publish_until_stored(&app(base, i), "orders", body).await;
        if status != 201 {
            let other = 2 - i;
            println!("agent-{}'s view:", other + 1);
            print_groups(&app(base, other)).await;
        }
        assert_eq!(
            status,
            201,
            "agent-{} stores a publish while agent-2 is down",
            i + 1
        );
    }
    let got = read_all(&app(base, 2), "orders", "while-down", 2).await;
    assert_eq!(
        got,
        ["one", "three"],
        "read on agent-3 while agent-2 is down"
    );

    // A second command names its error; then agent-2 comes back.
    let (ok, text) = control(dir.path(), "kill", 2);
    assert!(!ok && text.contains("agent-2 is not running"), "{text}");
    let (ok, restarted2) = control(dir.path(), "restart", 2);
    assert!(ok, "restart 2: {restarted2}");
    assert!(restarted2.contains("agent-2 is ready"), "{restarted2}");
    assert_eq!(ready(&admin(base, 1)).await, Some(200));
    assert_eq!(
        publish_until_stored(&app(base, 1), "orders", "two").await,
        201,
        "agent-2 serves again"
    );

    // restart of a running agent: SIGKILL, then start.
    let (ok, text) = control(dir.path(), "restart", 3);
    assert!(ok && text.contains("agent-3 is ready"), "restart 3: {text}");
    dev.wait_for_stderr("agent-3 killed (signal: 9 (SIGKILL))", EXIT_WAIT);
    let got = read_all(&app(base, 2), "orders", "after-restart", 3).await;
    assert_eq!(
        got,
        ["one", "three", "two"],
        "nothing acknowledged was lost"
    );

    // A dead agent's last warning is its last words: agent-2 warns that
    // agent-3 is down, then is killed.
    let pid2 = text_pid(&restarted2);
    let (ok, text) = control(dir.path(), "kill", 3);
    assert!(ok && text.contains("agent-3 killed"), "kill 3: {text}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = app(base, 1).get("/v1/cluster").await.unwrap().json();
        let down = v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["node"] == "agent-3" && m["state"] == "down");
        if down {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent-2 never saw agent-3 down: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sigkill(pid2);
    dev.wait_for_stderr(
        "shoal dev: agent-2 exited (signal: 9 (SIGKILL)): ",
        Duration::from_secs(30),
    );
    let stderr = dev.stderr_text();
    let report = stderr
        .lines()
        .rfind(|l| l.starts_with("shoal dev: agent-2 exited (signal: 9 (SIGKILL)): "))
        .unwrap();
    assert!(
        report.contains(" WARN ") && report.contains("agent-3"),
        "agent-2's last warning (agent-3 is down) is its last words: {report}"
    );

    dev.sigterm();
    let status = dev.wait(EXIT_WAIT).expect("shoal dev exits after SIGTERM");
    assert!(status.success(), "shoal dev exited with {status}");
    for i in 0..AGENTS {
        assert_eq!(
            ready(&admin(base, i)).await,
            None,
            "agent-{} runs on",
            i + 1
        );
    }
}

#[tokio::test]
async fn topics_counts_at_the_homes_and_a_clean_restart_prints_no_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let mut dev = Dev::start(dir.path(), base);
    dev.wait_for_stdout("Ctrl-C", READY_WAIT);
    let put = app(base, 0)
        .put_json(
            "/v1/topics/orders",
            &serde_json::json!({"partitions": 6, "replicas": 1}),
        )
        .await
        .unwrap();
    assert!(put.status.is_success(), "create orders: {}", put.status);
    let published = 30;
    for n in 0..published {
        let status = publish_until_stored(&app(base, 0), "orders", &format!("m{n}")).await;
        assert_eq!(status, 201, "publish m{n}");
    }
    // Every agent reports the homes' figures: all 30, whichever agent is asked.
    for i in 0..AGENTS {
        let url = format!("127.0.0.1:{}", base + 10 * i);
        let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["topics", "--url", &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let row = text
            .lines()
            .find(|l| l.starts_with("orders "))
            .unwrap_or_else(|| {
                panic!(
                    "no orders row: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols.get(3).copied(),
            Some("30"),
            "shoal topics on agent-{} counts every message at its home: {text}",
            i + 1
        );
        let v: Value = app(base, i).get("/v1/topics/orders").await.unwrap().json();
        let parts = v["stats"]["partitions"].as_array().unwrap();
        assert!(
            parts.iter().all(|p| p["source"] == "home"),
            "figures from the homes: {v}"
        );
        let homes: std::collections::BTreeSet<&str> =
            parts.iter().filter_map(|p| p["home"].as_str()).collect();
        assert!(homes.len() > 1, "partitions homed on several agents: {v}");
    }
    // A clean stop: no warnings.
    dev.sigterm();
    let status = dev.wait(EXIT_WAIT).expect("shoal dev exits after SIGTERM");
    assert!(status.success(), "shoal dev exited with {status}");
    let first = dev.stderr_text();
    assert_eq!(
        warnings(&first),
        Vec::<&str>::new(),
        "a clean stop warns of nothing"
    );
    drop(dev);

    // A clean start on the same data: no warnings, every message readable.
    let mut dev = Dev::start(dir.path(), base);
    dev.wait_for_stdout("Ctrl-C", READY_WAIT);
    let got = read_all(&app(base, 1), "orders", "after-restart", published).await;
    assert_eq!(
        got.len(),
        published,
        "every message is there after the restart"
    );
    dev.sigterm();
    let status = dev.wait(EXIT_WAIT).expect("shoal dev exits after SIGTERM");
    assert!(status.success(), "shoal dev exited with {status}");
    let second = dev.stderr_text();
    assert_eq!(
        warnings(&second),
        Vec::<&str>::new(),
        "a clean start and stop warn of nothing"
    );
}

#[tokio::test]
async fn a_replicated_topic_shows_its_groups_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let mut dev = Dev::start(dir.path(), base);
    dev.wait_for_stdout("Ctrl-C", READY_WAIT);
    let url = |i: u16| format!("127.0.0.1:{}", base + 10 * i);
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["topics", "--url", &url(0), "create", "pay", "-p", "2"])
        .args(["--replicas", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("2 partitions, durable, 3 replicas each"),
        "shoal topics create: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in 0..10 {
        let status = publish_until_stored(&app(base, 1), "pay", &format!("m{n}")).await;
        assert_eq!(status, 201, "publish m{n}");
    }
    // Every agent holds a replica of both partitions, with one leader and
    // the three agents as voters.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["status", "--url", &url(2)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let settled = ["pay/0 ", "pay/1 "].iter().all(|p| {
            text.lines().any(|l| {
                l.starts_with(p)
                    && l.contains("agent-1,")
                    && l.contains("agent-2")
                    && l.contains("agent-3")
                    && !l.contains("NO LEADER")
                    && !l.contains('(')
            })
        });
        if settled || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        text.contains("REPLICA HELD HERE"),
        "shoal status lists the replicas held: {text}"
    );
    for p in ["pay/0 ", "pay/1 "] {
        let row = text
            .lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p}row in shoal status: {text}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert!(
            cols.get(1).is_some_and(|l| l.starts_with("agent-")),
            "{p}has a leader: {row}"
        );
    }
    let got = read_all(&app(base, 2), "pay", "reader", 10).await;
    assert_eq!(got.len(), 10, "every message is read back");
    dev.sigterm();
    let status = dev.wait(EXIT_WAIT).expect("shoal dev exits after SIGTERM");
    assert!(status.success(), "shoal dev exited with {status}");
}
