//! `shoal dev`: a local mesh of agents on loopback, each its own child process,
//! started together and stopped together; and the hidden `shoal agent`, which
//! runs one agent exactly as the `shoal-agent` binary does, so that one binary
//! is all a developer needs (`cargo run -p shoal-cli -- dev`).
//!
//! Agent `i` (from 0) listens on `P + 10 i` (app API), `P + 10 i + 1` (mesh,
//! UDP) and `P + 10 i + 2` (admin), where `P` is `--base-port`; it keeps its
//! data in `DIR/agent-{i+1}` and every agent shares the development CA in
//! `DIR/ca`. Agents 2.. join agent 1's mesh address.

use clap::Args;
use http::StatusCode;
use shoal_agent::client::{AgentClient, DEFAULT_URL};
use shoal_agent::Config;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Agents `shoal dev` starts without `--agents`.
pub const DEFAULT_AGENTS: u8 = 3;
/// Most agents `shoal dev` starts (their ports are `--base-port` + 0..=82).
pub const MAX_AGENTS: u8 = 9;
/// First port without `--base-port`: agent 1's app API, as a lone agent's.
pub const DEFAULT_BASE_PORT: u16 = 4700;
/// Distance between the ports of two consecutive agents.
pub const PORT_STRIDE: u16 = 10;
/// Offset of an agent's mesh port (UDP) from its app API port.
pub const MESH_PORT_OFFSET: u16 = 1;
/// Offset of an agent's admin port from its app API port.
pub const ADMIN_PORT_OFFSET: u16 = 2;
/// Data directory without `--data-dir`.
pub const DEFAULT_DATA_DIR: &str = "./shoal-dev";
/// How long `shoal dev` waits for every agent to be ready, without `--ready-timeout`.
pub const DEFAULT_READY_TIMEOUT: &str = "60s";
/// How long stopping agents may take after SIGTERM before they are killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The agents' own `--shutdown-timeout`: well inside [`STOP_TIMEOUT`].
pub const AGENT_SHUTDOWN_TIMEOUT: &str = "10s";
/// How long killed agents may take to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often `/readyz` is asked while waiting.
const READY_POLL: Duration = Duration::from_millis(200);
/// Longest single `/readyz` call.
const READY_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a child's output after it exited (its pipes close with it).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// How far the suggested `--base-port` moves when a port is taken.
const HINT_PORT_STEP: u16 = 1000;
/// The hidden flag of `shoal agent` that `shoal dev` passes: stop when stdin closes.
const STOP_ON_STDIN_CLOSE: &str = "--stop-on-stdin-close";

/// Arguments of `shoal dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// How many agents to start, 1 to 9.
    #[arg(
        long,
        env = "SHOAL_DEV_AGENTS",
        default_value_t = DEFAULT_AGENTS,
        value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_AGENTS))
    )]
    pub agents: u8,

    /// First port. Agent i (from 0) serves its app API on P+10i, the mesh on
    /// P+10i+1 (UDP) and admin on P+10i+2, all on 127.0.0.1.
    #[arg(
        long,
        value_name = "P",
        env = "SHOAL_DEV_BASE_PORT",
        default_value_t = DEFAULT_BASE_PORT,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub base_port: u16,

    /// Directory of the agents' data (DIR/agent-1, DIR/agent-2, ...) and of
    /// their shared development CA (DIR/ca). Kept between runs.
    #[arg(long, value_name = "DIR", env = "SHOAL_DEV_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Port of your app on localhost, where every agent delivers push subscriptions.
    #[arg(long, value_name = "PORT", env = "SHOAL_DEV_APP_PORT")]
    pub app_port: Option<u16>,

    /// The agents' log filter (their --log-level): error, warn, info, debug,
    /// trace or tracing directives. Default: the agents' own (info, or $SHOAL_LOG_LEVEL).
    #[arg(long, value_name = "FILTER", env = "SHOAL_DEV_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// How long to wait for every agent to be ready (joined) before giving up.
    #[arg(
        long,
        value_name = "DURATION",
        env = "SHOAL_DEV_READY_TIMEOUT",
        default_value = DEFAULT_READY_TIMEOUT,
        value_parser = parse_duration_arg
    )]
    pub ready_timeout: Duration,
}

/// Arguments of the hidden `shoal agent`: the flags of `shoal-agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Stop gracefully when standard input closes. `shoal dev` holds its
    /// agents' standard input, so they stop even when it is killed.
    #[arg(long, hide = true)]
    pub stop_on_stdin_close: bool,

    /// The agent's configuration, as `shoal-agent` reads it.
    #[command(flatten)]
    pub config: Config,
}

fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    shoal_agent::time::parse_duration(text)
        .ok_or_else(|| format!("invalid duration {text:?}: use forms like 500ms, 30s, 2m"))
}

// ---------------------------------------------------------------------------
// `shoal agent`
// ---------------------------------------------------------------------------

/// Runs `shoal agent`: one agent until SIGTERM or SIGINT, as `shoal-agent` does.
pub fn run_agent(args: AgentArgs) -> ExitCode {
    let options = shoal_agent::entry::Options {
        program: "shoal agent",
        outlive_stderr: args.stop_on_stdin_close,
    };
    shoal_agent::entry::run(args.config, options, |stopper| {
        if args.stop_on_stdin_close {
            stop_on_stdin_close(stopper);
        }
    })
}

/// Stops the agent once standard input reaches its end. A plain thread: a
/// blocking read cannot be cancelled, and the process exits without joining it.
fn stop_on_stdin_close(stopper: watch::Sender<bool>) {
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut sink = [0u8; 256];
            loop {
                match stdin.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            // Stop first: with shoal dev gone, a log line may go nowhere.
            if !stopper.send_replace(true) {
                tracing::warn!("standard input closed (shoal dev is gone): stopping");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch standard input: {e}");
    }
}

// ---------------------------------------------------------------------------
// `shoal dev`
// ---------------------------------------------------------------------------

/// One agent of the local mesh: its name, addresses and data directory.
#[derive(Clone, Debug)]
struct Plan {
    name: String,
    app: SocketAddr,
    mesh: SocketAddr,
    admin: SocketAddr,
    data_dir: PathBuf,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// The app API port of agent `index` (from 0), if it and the agent's other ports fit.
fn app_port_of(base: u16, index: u8) -> Option<u16> {
    let app = base.checked_add(PORT_STRIDE.checked_mul(u16::from(index))?)?;
    app.checked_add(ADMIN_PORT_OFFSET.max(MESH_PORT_OFFSET))?;
    Some(app)
}

/// A `--base-port` worth trying when a port of `base` is taken.
fn base_port_hint(base: u16, agents: u8) -> u16 {
    let fits = |b: u16| agents == 0 || app_port_of(b, agents - 1).is_some();
    match base.checked_add(HINT_PORT_STEP) {
        Some(b) if fits(b) => b,
        _ => DEFAULT_BASE_PORT + HINT_PORT_STEP,
    }
}

fn plan(args: &DevArgs) -> Result<Vec<Plan>, String> {
    (0..args.agents)
        .map(|i| {
            let app = app_port_of(args.base_port, i).ok_or_else(|| {
                format!(
                    "--base-port {} is too high for {} agents: their ports would pass 65535",
                    args.base_port, args.agents
                )
            })?;
            let name = format!("agent-{}", u16::from(i) + 1);
            Ok(Plan {
                data_dir: args.data_dir.join(&name),
                name,
                app: loopback(app),
                mesh: loopback(app + MESH_PORT_OFFSET),
                admin: loopback(app + ADMIN_PORT_OFFSET),
            })
        })
        .collect()
}

/// Fails early, with a hint, when a port of the plan is taken.
fn check_ports(plans: &[Plan], hint: u16) -> Result<(), String> {
    let mut held = Vec::new();
    for p in plans {
        for (what, addr, udp) in [
            ("app API", p.app, false),
            ("mesh", p.mesh, true),
            ("admin", p.admin, false),
        ] {
            let bound = if udp {
                std::net::UdpSocket::bind(addr).map(|_| ())
            } else {
                std::net::TcpListener::bind(addr).map(|l| held.push(l))
            };
            if let Err(e) = bound {
                let advice = if e.kind() == std::io::ErrorKind::AddrInUse {
                    format!(" (another shoal dev or agent?); try --base-port {hint}")
                } else {
                    String::new()
                };
                return Err(format!(
                    "cannot use {addr}{} for {}'s {what}: {e}{advice}",
                    if udp { "/udp" } else { "" },
                    p.name
                ));
            }
        }
    }
    Ok(())
}

fn agent_command(exe: &Path, p: &Plan, args: &DevArgs, seed: Option<SocketAddr>) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg(STOP_ON_STDIN_CLOSE)
        .arg("--dev")
        .arg("--node-name")
        .arg(&p.name)
        .arg("--app-addr")
        .arg(p.app.to_string())
        .arg("--mesh-addr")
        .arg(p.mesh.to_string())
        .arg("--admin-addr")
        .arg(p.admin.to_string())
        .arg("--data-dir")
        .arg(&p.data_dir)
        .arg("--ca-dir")
        .arg(args.data_dir.join("ca"))
        .arg("--shutdown-timeout")
        .arg(AGENT_SHUTDOWN_TIMEOUT);
    if let Some(seed) = seed {
        cmd.arg("--join").arg(seed.to_string());
    }
    if let Some(port) = args.app_port {
        cmd.arg("--app-port").arg(port.to_string());
    }
    if let Some(level) = &args.log_level {
        cmd.arg("--log-level").arg(level);
    }
    // shoal dev decides these; other SHOAL_* variables reach every agent.
    cmd.env_remove("SHOAL_JOIN")
        .env_remove("SHOAL_APP_PORT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// What `shoal dev` asks of an agent's supervisor.
#[derive(Clone, Copy, Debug)]
enum Control {
    /// SIGTERM: a graceful stop (hand off, leave, flush).
    Term,
    /// SIGKILL.
    Kill,
}

/// An agent process ended.
#[derive(Debug)]
struct Exit {
    index: usize,
    status: std::io::Result<ExitStatus>,
    /// Its last error line on stderr, else its last line.
    last_line: Option<String>,
}

impl Exit {
    fn success(&self) -> bool {
        self.status.as_ref().is_ok_and(ExitStatus::success)
    }

    /// Ended by SIGTERM or SIGINT before it could handle them (while starting):
    /// a stop that was asked for.
    fn stopped_by_signal(&self) -> bool {
        use std::os::unix::process::ExitStatusExt as _;
        let signal = self.status.as_ref().ok().and_then(|s| s.signal());
        [rustix::process::Signal::TERM, rustix::process::Signal::INT]
            .iter()
            .any(|s| Some(s.as_raw()) == signal)
    }

    fn describe(&self, name: &str, hint: u16) -> String {
        let status = match &self.status {
            Ok(s) => s.to_string(),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        let mut text = format!("{name} exited ({status})");
        if let Some(line) = &self.last_line {
            let line = without_timestamp(line);
            text.push_str(": ");
            text.push_str(line);
            let lower = line.to_ascii_lowercase();
            if lower.contains("address already in use") || lower.contains("address in use") {
                text.push_str(&format!("; try --base-port {hint}"));
            }
        }
        text
    }
}

/// A log line without its leading timestamp (`2025-01-02T03:04:05.678Z `).
fn without_timestamp(line: &str) -> &str {
    match line.split_once(' ') {
        Some((first, rest))
            if first.starts_with(|c: char| c.is_ascii_digit())
                && first.contains('T')
                && first.contains(':') =>
        {
            rest.trim_start()
        }
        _ => line,
    }
}

/// Sends SIGTERM to a child that has not been reaped yet.
fn terminate(child: &Child) {
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Owns one child: forwards its output with a name prefix, carries out
/// [`Control`]s, and reports its exit.
async fn supervise(
    index: usize,
    name: String,
    mut child: Child,
    mut control: mpsc::UnboundedReceiver<Control>,
    exits: mpsc::UnboundedSender<Exit>,
) {
    // Held until the child is gone: its end of the pipe closing stops it.
    let stdin = child.stdin.take();
    let out = tokio::spawn(forward(name.clone(), child.stdout.take(), false));
    let err = tokio::spawn(forward(name, child.stderr.take(), true));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(c) = control.recv() => match c {
                Control::Term => terminate(&child),
                Control::Kill => {
                    let _ = child.start_kill();
                }
            },
        }
    };
    drop(stdin);
    let _ = tokio::time::timeout(OUTPUT_DRAIN, out).await;
    let last_line = match tokio::time::timeout(OUTPUT_DRAIN, err).await {
        Ok(Ok(line)) => line,
        _ => None,
    };
    let _ = exits.send(Exit {
        index,
        status,
        last_line,
    });
}

/// Copies `reader` line by line to our stdout or stderr as `name | line`.
/// Returns the last line that reads like an error, else the last line.
async fn forward<R: AsyncRead + Unpin>(
    name: String,
    reader: Option<R>,
    to_stderr: bool,
) -> Option<String> {
    let mut reader = BufReader::new(reader?);
    let mut buf = Vec::new();
    let (mut last, mut last_error) = (None, None);
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&buf);
        let line = text.trim_end_matches(['\n', '\r']);
        // A closed terminal or pipe must not stop the agents: ignore write errors.
        let _ = if to_stderr {
            writeln!(std::io::stderr().lock(), "{name} | {line}")
        } else {
            writeln!(std::io::stdout().lock(), "{name} | {line}")
        };
        if line.trim().is_empty() {
            continue;
        }
        if line.contains("ERROR") || line.contains("error:") {
            last_error = Some(line.to_string());
        }
        last = Some(line.to_string());
    }
    last_error.or(last)
}

/// SIGTERM and SIGINT, listened to from the start.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            Some(()) = self.term.recv() => {}
            Some(()) = self.int.recv() => {}
            else => std::future::pending().await,
        }
    }
}

/// A started agent as `shoal dev` tracks it.
struct Handle {
    plan: Plan,
    control: mpsc::UnboundedSender<Control>,
    exited: bool,
}

/// The running mesh: its agents and their exits.
struct Mesh {
    agents: Vec<Handle>,
    exits: mpsc::UnboundedReceiver<Exit>,
    hint: u16,
}

impl Mesh {
    fn alive(&self) -> usize {
        self.agents.iter().filter(|a| !a.exited).count()
    }

    fn name(&self, index: usize) -> &str {
        self.agents.get(index).map_or("an agent", |a| &a.plan.name)
    }

    fn mark(&mut self, exit: &Exit) {
        if let Some(a) = self.agents.get_mut(exit.index) {
            a.exited = true;
        }
    }

    fn send_all(&self, c: Control) {
        for a in self.agents.iter().filter(|a| !a.exited) {
            let _ = a.control.send(c);
        }
    }

    /// Stops every agent still running: SIGTERM, then SIGKILL after
    /// [`STOP_TIMEOUT`] or a second Ctrl-C. True when all stopped cleanly.
    async fn stop(&mut self, signals: &mut Signals) -> bool {
        let alive = self.alive();
        if alive == 0 {
            return true;
        }
        say(format_args!(
            "stopping {alive} agent{} (they hand off and leave; Ctrl-C again kills them now)...",
            plural(alive)
        ));
        self.send_all(Control::Term);
        let mut clean = true;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.alive() > 0 {
            tokio::select! {
                exit = self.exits.recv() => match exit {
                    Some(exit) => {
                        self.mark(&exit);
                        if !exit.success() && !exit.stopped_by_signal() {
                            clean = false;
                            say(exit.describe(self.name(exit.index), self.hint));
                        }
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => {
                    say(format_args!("agents still running after {} s: killing them", STOP_TIMEOUT.as_secs()));
                    break;
                }
                () = signals.recv() => {
                    say("killing the agents");
                    break;
                }
            }
        }
        if self.alive() > 0 {
            clean = false;
            self.send_all(Control::Kill);
            let deadline = Instant::now() + KILL_WAIT;
            while self.alive() > 0 {
                match tokio::time::timeout_at(deadline, self.exits.recv()).await {
                    Ok(Some(exit)) => self.mark(&exit),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        match self.alive() {
            0 => say("all agents stopped"),
            n => say(format_args!("{n} agent{} could not be reaped", plural(n))),
        }
        clean
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// A progress line of `shoal dev` itself, on stderr with the agents' logs.
fn say(message: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "shoal dev: {message}");
}

/// Waits until every agent's `/readyz` answers 200, in order.
async fn wait_ready(plans: &[Plan], timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    let deadline = started + timeout;
    for (i, p) in plans.iter().enumerate() {
        let admin = AgentClient::new(&format!("http://{}", p.admin));
        say(format_args!(
            "waiting for {} to {}...",
            p.name,
            if i == 0 { "start" } else { "join" }
        ));
        loop {
            if let Ok(Ok(reply)) =
                tokio::time::timeout(READY_CALL_TIMEOUT, admin.get("/readyz")).await
            {
                if reply.status == StatusCode::OK {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} was not ready within {} (its /readyz at http://{}/readyz); see its log above",
                    p.name,
                    shoal_agent::time::format_duration(timeout),
                    p.admin
                ));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }
    say(format_args!(
        "{} agent{} ready in {:.1} s",
        plans.len(),
        plural(plans.len()),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The block printed once the mesh is ready: addresses and things to try.
fn banner(plans: &[Plan], args: &DevArgs) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let n = plans.len();
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Shoal dev mesh: {n} agent{} on loopback, data in {}",
        plural(n),
        args.data_dir.display()
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:<9} {:<23} {:<38} MESH (QUIC, UDP)",
        "AGENT", "APP API", "ADMIN (/metrics /livez /readyz)"
    );
    for p in plans {
        let _ = writeln!(
            s,
            "  {:<9} {:<23} {:<38} {}",
            p.name,
            format!("http://{}", p.app),
            format!("http://{}", p.admin),
            p.mesh
        );
    }
    if let Some(port) = args.app_port {
        let _ = writeln!(s, "  push subscriptions deliver to localhost:{port}");
    }
    let (Some(first), Some(last)) = (plans.first(), plans.last()) else {
        return s;
    };
    let url_flag = |p: &Plan| {
        let url = format!("http://{}", p.app);
        if url == DEFAULT_URL {
            String::new()
        } else {
            format!("--url {url} ")
        }
    };
    let (a, z) = (first.app.port(), last.app.port());
    let _ = writeln!(s);
    let _ = writeln!(s, "Try it:");
    let _ = writeln!(s, "  # publish to {}", first.name);
    let _ = writeln!(
        s,
        "  curl -X POST localhost:{a}/v1/topics/orders/messages -H 'content-type: text/plain' -d hello"
    );
    let _ = writeln!(
        s,
        "  # a pull subscription on {}, then pull (waits up to 5 s)",
        last.name
    );
    let _ = writeln!(
        s,
        "  curl -X PUT localhost:{z}/v1/subscriptions/billing -d '{{\"topic\":\"orders\",\"start\":\"earliest\"}}'"
    );
    let _ = writeln!(
        s,
        "  curl 'localhost:{z}/v1/subscriptions/billing/messages?wait=5s'"
    );
    let _ = writeln!(
        s,
        "  # follow the topic on {} with the CLI (target/release/shoal after cargo build --release)",
        last.name
    );
    let _ = writeln!(s, "  shoal {}sub orders --from earliest", url_flag(last));
    let _ = writeln!(s, "  # members and the partitions each is home to");
    let _ = writeln!(s, "  shoal {}status", url_flag(first));
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Ctrl-C stops all agents (data is kept in the data directory for the next run)."
    );
    let _ = writeln!(
        s,
        "Stopping one agent stops them all; to stop and restart single agents, start them one by one (docs/configuration.md)."
    );
    s
}

/// The exit code after a requested stop: success when every agent stopped cleanly.
fn stopped(clean: bool) -> ExitCode {
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// How the start ended.
enum Started {
    Ready,
    NotReady(String),
    Exited(Exit),
    Interrupted,
}

/// Runs `shoal dev` until Ctrl-C, SIGTERM, or an agent's unexpected exit.
pub async fn run(args: DevArgs) -> ExitCode {
    match run_mesh(args).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("shoal dev: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run_mesh(args: DevArgs) -> Result<ExitCode, String> {
    let plans = plan(&args)?;
    let hint = base_port_hint(args.base_port, args.agents);
    // Listen first: a signal from here on stops the agents started so far.
    let mut signals = Signals::new().map_err(|e| format!("cannot listen for signals: {e}"))?;
    check_ports(&plans, hint)?;
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this program to start the agents: {e}"))?;
    let (exit_tx, exits) = mpsc::unbounded_channel();
    let mut mesh = Mesh {
        agents: Vec::new(),
        exits,
        hint,
    };
    let seed = plans.first().map(|p| p.mesh);
    for (index, p) in plans.iter().enumerate() {
        let join = if index == 0 { None } else { seed };
        match agent_command(&exe, p, &args, join).spawn() {
            Ok(child) => {
                let (control, control_rx) = mpsc::unbounded_channel();
                tokio::spawn(supervise(
                    index,
                    p.name.clone(),
                    child,
                    control_rx,
                    exit_tx.clone(),
                ));
                mesh.agents.push(Handle {
                    plan: p.clone(),
                    control,
                    exited: false,
                });
            }
            Err(e) => {
                say(format_args!(
                    "cannot start {} ({}): {e}",
                    p.name,
                    exe.display()
                ));
                mesh.stop(&mut signals).await;
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    // Only the supervisors send from here on: a closed channel means all are done.
    drop(exit_tx);
    say(format_args!(
        "started {} agent{} (data in {})",
        plans.len(),
        plural(plans.len()),
        args.data_dir.display()
    ));

    let started = tokio::select! {
        r = wait_ready(&plans, args.ready_timeout) => match r {
            Ok(()) => Started::Ready,
            Err(message) => Started::NotReady(message),
        },
        Some(exit) = mesh.exits.recv() => Started::Exited(exit),
        () = signals.recv() => Started::Interrupted,
    };
    match started {
        Started::Ready => {}
        Started::NotReady(message) => {
            say(message);
            mesh.stop(&mut signals).await;
            return Ok(ExitCode::FAILURE);
        }
        Started::Exited(exit) => {
            mesh.mark(&exit);
            say(exit.describe(mesh.name(exit.index), hint));
            mesh.stop(&mut signals).await;
            return Ok(ExitCode::FAILURE);
        }
        Started::Interrupted => return Ok(stopped(mesh.stop(&mut signals).await)),
    }

    let _ = write!(std::io::stdout().lock(), "{}", banner(&plans, &args));
    let _ = std::io::stdout().flush();

    tokio::select! {
        exit = mesh.exits.recv() => {
            match exit {
                Some(exit) => {
                    mesh.mark(&exit);
                    say(format_args!("{}; stopping the others", exit.describe(mesh.name(exit.index), hint)));
                }
                None => say("the agents are gone"),
            }
            mesh.stop(&mut signals).await;
            Ok(ExitCode::FAILURE)
        }
        () = signals.recv() => Ok(stopped(mesh.stop(&mut signals).await)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        dev: DevArgs,
    }

    fn args(flags: &[&str]) -> Result<DevArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("dev").chain(flags.iter().copied())).map(|c| c.dev)
    }

    #[test]
    fn the_default_plan_is_three_agents_ten_ports_apart() {
        let a = args(&[]).map_err(|e| e.to_string());
        let a = match a {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let p = plan(&a).unwrap_or_default();
        assert_eq!(p.len(), 3);
        assert_eq!(p[2].name, "agent-3");
        assert_eq!(p[2].app, loopback(4720));
        assert_eq!(p[2].mesh, loopback(4721));
        assert_eq!(p[2].admin, loopback(4722));
        assert_eq!(p[1].data_dir, Path::new("./shoal-dev/agent-2"));
        assert!(banner(&p, &a).contains("shoal status"));
        assert!(
            banner(&p, &a).contains("shoal --url http://127.0.0.1:4720 sub orders --from earliest")
        );
    }

    #[test]
    fn flags_are_checked() {
        assert!(args(&["--agents", "0"]).is_err());
        assert!(args(&["--agents", "10"]).is_err());
        assert!(args(&["--base-port", "0"]).is_err());
        assert!(args(&["--ready-timeout", "soon"]).is_err());
        let high = args(&["--agents", "9", "--base-port", "65454"]);
        assert!(high.is_ok_and(|a| plan(&a).is_err()));
        let fits = args(&["--agents", "9", "--base-port", "65453"]);
        assert!(fits.is_ok_and(|a| plan(&a).is_ok()));
    }

    #[test]
    fn the_hint_moves_the_base_port_and_stays_in_range() {
        assert_eq!(base_port_hint(4700, 3), 5700);
        assert_eq!(base_port_hint(65000, 3), 5700);
    }

    #[test]
    fn an_exit_names_the_agent_and_hints_at_a_taken_port() {
        let exit = Exit {
            index: 0,
            status: Err(std::io::Error::other("gone")),
            last_line: Some(
                "2026-11-24T19:41:09.002293Z ERROR shoal_agent: cannot start: cannot listen on 127.0.0.1:4700: Address already in use (os error 98)".into(),
            ),
        };
        let text = exit.describe("agent-1", 5700);
        assert!(text.starts_with("agent-1 exited"), "{text}");
        assert!(text.contains(": ERROR shoal_agent: cannot start"), "{text}");
        assert!(text.ends_with("try --base-port 5700"), "{text}");
    }
}
