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

/// A base port whose agents' ports (app and admin over TCP, mesh over UDP) are all free now.
fn free_base_port() -> u16 {
    for _ in 0..100 {
        let base = fastrand::u16(20000..40000);
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
    panic!("no free range of ports found in 20000..40000");
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

    /// Waits for a line of standard output containing `text`.
    fn wait_for_stdout(&mut self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.contains(text) => return,
                Ok(_) => {}
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
