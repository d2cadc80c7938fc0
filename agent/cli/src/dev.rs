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
use tokio::sync::{mpsc, oneshot, watch};
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
/// The hidden flag of `shoal agent` that `shoal dev` passes: name its own flags.
const UNDER_SHOAL_DEV: &str = "--under-shoal-dev";
/// Longest a `shoal dev kill|stop|start|restart` waits for its answer.
const CONTROL_WAIT: Duration = Duration::from_secs(180);

/// Arguments of `shoal dev`.
#[derive(Args, Debug, Clone)]
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

    /// Port of your app on localhost, where push subscriptions deliver: one
    /// port for every agent, or one per agent in order (8080,8081,8082, or
    /// the flag repeated) so each agent pushes to its own app.
    #[arg(
        long,
        value_name = "PORT[,PORT...]",
        env = "SHOAL_DEV_APP_PORT",
        value_delimiter = ',',
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub app_port: Vec<u16>,

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

    /// Acts on one agent of the `shoal dev` running with this data directory.
    #[command(subcommand)]
    pub action: Option<DevAction>,
}

/// Commands for the agents of a running `shoal dev` (sent through
/// `DIR/dev.sock`, where `DIR` is its `--data-dir`).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum DevAction {
    /// Kill agent N with SIGKILL (a crash: watch the others fail over); it stays down.
    Kill(ControlArgs),
    /// Stop agent N gracefully (SIGTERM: it hands off its partitions and leaves).
    Stop(ControlArgs),
    /// Start agent N again after kill or stop, and wait until it is ready.
    Start(ControlArgs),
    /// Kill agent N with SIGKILL if it runs, start it again, and wait until it is ready.
    Restart(ControlArgs),
}

/// Which agent, of which `shoal dev`.
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// The agent's number: 1 for agent-1.
    #[arg(value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_AGENTS)))]
    pub agent: u8,

    /// The data directory of the running `shoal dev` (its --data-dir).
    #[arg(long, value_name = "DIR", env = "SHOAL_DEV_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

impl DevAction {
    fn control(&self) -> (&'static str, &ControlArgs) {
        match self {
            DevAction::Kill(a) => ("kill", a),
            DevAction::Stop(a) => ("stop", a),
            DevAction::Start(a) => ("start", a),
            DevAction::Restart(a) => ("restart", a),
        }
    }
}

/// The control socket of a running `shoal dev`, in its data directory.
pub const CONTROL_SOCKET: &str = "dev.sock";

/// Arguments of the hidden `shoal agent`: the flags of `shoal-agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Stop gracefully when standard input closes. `shoal dev` holds its
    /// agents' standard input, so they stop even when it is killed.
    #[arg(long, hide = true)]
    pub stop_on_stdin_close: bool,

    /// Run by `shoal dev`: errors name `shoal dev`'s flags where they differ.
    #[arg(long, hide = true)]
    pub under_shoal_dev: bool,

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
    if args.under_shoal_dev {
        shoal_agent::subscription::set_no_app_port_message(
            "push subscriptions need an app port: start shoal dev with --app-port PORT \
             (one port for every agent, or one per agent: --app-port 8080,8081,8082)"
                .to_string(),
        );
    }
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
    /// Where its push subscriptions deliver.
    app_port: Option<u16>,
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
    let ports = &args.app_port;
    if ports.len() > 1 && ports.len() != usize::from(args.agents) {
        return Err(format!(
            "--app-port takes one port for every agent or one per agent: {} ports for {} agents",
            ports.len(),
            args.agents
        ));
    }
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
                app_port: match ports.as_slice() {
                    [one] => Some(*one),
                    many => many.get(usize::from(i)).copied(),
                },
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

fn agent_command(exe: &Path, p: &Plan, args: &DevArgs, seeds: &[SocketAddr]) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg(STOP_ON_STDIN_CLOSE)
        .arg(UNDER_SHOAL_DEV)
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
    if !seeds.is_empty() {
        let list: Vec<String> = seeds.iter().map(ToString::to_string).collect();
        cmd.arg("--join").arg(list.join(","));
    }
    if let Some(port) = p.app_port {
        cmd.arg("--app-port").arg(port.to_string());
    }
    if let Some(level) = &args.log_level {
        cmd.arg("--log-level").arg(level);
    }
    // shoal dev decides these (a local mesh of --dev identities on
    // loopback, even when run inside a pod); other SHOAL_* variables reach
    // every agent.
    cmd.env_remove("SHOAL_JOIN")
        .env_remove("SHOAL_APP_PORT")
        .env_remove("SHOAL_ADVERTISE_ADDR")
        .env_remove("SHOAL_IDENTITY_ADDR")
        .env_remove("SHOAL_CERT_DIR")
        .env_remove("POD_IP")
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
    /// Which start of the agent ended (agents can be started again).
    generation: u64,
    status: std::io::Result<ExitStatus>,
    /// Its last WARN or ERROR line on stderr.
    last_warning: Option<String>,
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

    fn status_text(&self) -> String {
        match &self.status {
            Ok(s) => s.to_string(),
            Err(e) => format!("cannot wait for it: {e}"),
        }
    }

    /// `agent-2 exited (signal: 9 (SIGKILL)): <its last warning or error>`.
    fn describe(&self, name: &str, hint: u16) -> String {
        let mut text = format!("{name} exited ({})", self.status_text());
        match &self.last_warning {
            Some(line) => {
                let line = without_timestamp(line);
                text.push_str(": ");
                text.push_str(line);
                let lower = line.to_ascii_lowercase();
                if lower.contains("address already in use") || lower.contains("address in use") {
                    text.push_str(&format!("; try --base-port {hint}"));
                }
            }
            None => text.push_str("; no warning or error in its log"),
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

/// Whether an agent's output line is a warning or an error: a WARN or
/// ERROR log line (plain or JSON), or a line the agent writes outside its
/// log when it cannot start or panics. INFO and lower are not.
fn is_warning(line: &str) -> bool {
    let plain = strip_ansi(line);
    let rest = without_timestamp(&plain).trim_start();
    rest.starts_with("WARN ")
        || rest.starts_with("ERROR ")
        || line.contains("\"level\":\"WARN\"")
        || line.contains("\"level\":\"ERROR\"")
        || rest.to_ascii_lowercase().starts_with("error")
        || rest.contains("panicked at")
}

/// `line` without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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
    (index, generation): (usize, u64),
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
    let last_warning = match tokio::time::timeout(OUTPUT_DRAIN, err).await {
        Ok(Ok(line)) => line,
        _ => None,
    };
    let _ = exits.send(Exit {
        index,
        generation,
        status,
        last_warning,
    });
}

/// Copies `reader` line by line to our stdout or stderr as `name | line`.
/// Returns the last line that is a warning or an error ([`is_warning`]).
async fn forward<R: AsyncRead + Unpin>(
    name: String,
    reader: Option<R>,
    to_stderr: bool,
) -> Option<String> {
    let mut reader = BufReader::new(reader?);
    let mut buf = Vec::new();
    let mut last_warning = None;
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
        if is_warning(line) {
            last_warning = Some(strip_ansi(line));
        }
    }
    last_warning
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

/// A command from `shoal dev kill|stop|start|restart N`, and where its answer goes.
struct Request {
    verb: String,
    agent: u8,
    reply: oneshot::Sender<String>,
}

/// What is owed when an agent exits after a command.
enum Asked {
    /// `kill` or `stop`: answer once it has exited.
    Stop(&'static str, oneshot::Sender<String>),
    /// `restart`: start it again once it has exited, then answer.
    Restart(oneshot::Sender<String>),
}

/// A started agent as `shoal dev` tracks it.
struct Handle {
    plan: Plan,
    control: mpsc::UnboundedSender<Control>,
    running: bool,
    generation: u64,
    pid: Option<u32>,
    asked: Option<Asked>,
}

/// The running mesh: its agents and their exits.
struct Mesh {
    agents: Vec<Handle>,
    exits: mpsc::UnboundedReceiver<Exit>,
    exit_tx: mpsc::UnboundedSender<Exit>,
    hint: u16,
    exe: PathBuf,
    args: DevArgs,
}

impl Mesh {
    fn alive(&self) -> usize {
        self.agents.iter().filter(|a| a.running).count()
    }

    fn name(&self, index: usize) -> &str {
        self.agents.get(index).map_or("an agent", |a| &a.plan.name)
    }

    /// Marks the agent of `exit` as ended; false for the exit of an earlier
    /// start of an agent that runs again.
    fn mark(&mut self, exit: &Exit) -> bool {
        match self.agents.get_mut(exit.index) {
            Some(a) if a.generation == exit.generation && a.running => {
                a.running = false;
                a.pid = None;
                true
            }
            _ => false,
        }
    }

    fn send_all(&self, c: Control) {
        for a in self.agents.iter().filter(|a| a.running) {
            let _ = a.control.send(c);
        }
    }

    /// Starts agent `index` (again) joining `seeds`; its pid.
    fn spawn(&mut self, index: usize, seeds: &[SocketAddr]) -> Result<Option<u32>, String> {
        let Some(plan) = self.agents.get(index).map(|a| a.plan.clone()) else {
            return Err(format!("no agent {}", index + 1));
        };
        let child = agent_command(&self.exe, &plan, &self.args, seeds)
            .spawn()
            .map_err(|e| format!("cannot start {} ({}): {e}", plan.name, self.exe.display()))?;
        let pid = child.id();
        let (control, control_rx) = mpsc::unbounded_channel();
        let generation = self.agents.get(index).map_or(0, |a| a.generation + 1);
        tokio::spawn(supervise(
            (index, generation),
            plan.name.clone(),
            child,
            control_rx,
            self.exit_tx.clone(),
        ));
        if let Some(a) = self.agents.get_mut(index) {
            a.control = control;
            a.running = true;
            a.generation = generation;
            a.pid = pid;
        }
        Ok(pid)
    }

    /// The command that brings agent `index` back, with this run's data directory.
    fn start_hint(&self, index: usize) -> String {
        let dir = if self.args.data_dir == Path::new(DEFAULT_DATA_DIR) {
            String::new()
        } else {
            format!(" --data-dir {}", self.args.data_dir.display())
        };
        format!("shoal dev start {}{dir}", index + 1)
    }

    /// Reports an agent's exit: answers the command that asked for it, or
    /// says why it ended while the others keep running.
    fn on_exit(&mut self, exit: &Exit) {
        if !self.mark(exit) {
            return;
        }
        let name = self.name(exit.index).to_string();
        let asked = self.agents.get_mut(exit.index).and_then(|a| a.asked.take());
        match asked {
            Some(Asked::Stop(verb, reply)) => {
                let text = format!("{name} {verb} ({})", exit.status_text());
                say(&text);
                let _ = reply.send(format!("ok {text}"));
            }
            Some(Asked::Restart(reply)) => {
                say(format_args!(
                    "{name} killed ({}); starting it again",
                    exit.status_text()
                ));
                self.start_again(exit.index, reply);
            }
            None => say(format_args!(
                "{}; the other agents keep running (bring it back with: {})",
                exit.describe(&name, self.hint),
                self.start_hint(exit.index)
            )),
        }
        if self.alive() == 0 {
            say("no agent is running now: start them with shoal dev start N, or Ctrl-C to quit");
        }
    }

    /// Starts agent `index` again, joining every other agent, and answers
    /// `reply` once it is ready (or not within `--ready-timeout`).
    fn start_again(&mut self, index: usize, reply: oneshot::Sender<String>) {
        let seeds: Vec<SocketAddr> = self
            .agents
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, a)| a.plan.mesh)
            .collect();
        match self.spawn(index, &seeds) {
            Ok(pid) => {
                let Some(plan) = self.agents.get(index).map(|a| a.plan.clone()) else {
                    return;
                };
                let pid = pid.map_or_else(String::new, |p| format!(" (pid {p})"));
                say(format_args!("{} started again{pid}", plan.name));
                let timeout = self.args.ready_timeout;
                tokio::spawn(async move {
                    let answer = match wait_ready(std::slice::from_ref(&plan), timeout).await {
                        Ok(()) => format!("ok {} is ready{pid}", plan.name),
                        Err(e) => format!("error {e}"),
                    };
                    let _ = reply.send(answer);
                });
            }
            Err(e) => {
                say(&e);
                let _ = reply.send(format!("error {e}"));
            }
        }
    }

    /// Carries out `shoal dev kill|stop|start|restart N`.
    fn command(&mut self, req: Request) {
        let count = self.agents.len();
        let index = usize::from(req.agent).wrapping_sub(1);
        let Some(a) = self.agents.get_mut(index) else {
            let _ = req.reply.send(format!(
                "error there is no agent-{}: this shoal dev runs agent-1 to agent-{count}",
                req.agent
            ));
            return;
        };
        let name = a.plan.name.clone();
        if a.asked.is_some() {
            let _ = req
                .reply
                .send(format!("error {name} is busy with an earlier command"));
            return;
        }
        match (req.verb.as_str(), a.running) {
            ("kill", true) => {
                a.asked = Some(Asked::Stop("killed", req.reply));
                let _ = a.control.send(Control::Kill);
            }
            ("stop", true) => {
                a.asked = Some(Asked::Stop("stopped", req.reply));
                let _ = a.control.send(Control::Term);
            }
            ("restart", true) => {
                a.asked = Some(Asked::Restart(req.reply));
                let _ = a.control.send(Control::Kill);
            }
            ("kill" | "stop", false) => {
                let hint = self.start_hint(index);
                let _ = req.reply.send(format!(
                    "error {name} is not running (start it with: {hint})"
                ));
            }
            ("start" | "restart", false) => self.start_again(index, req.reply),
            ("start", true) => {
                let pid = a.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
                let _ = req.reply.send(format!(
                    "error {name} is running{pid}; to crash and start it again: shoal dev restart {}",
                    req.agent
                ));
            }
            (other, _) => {
                let _ = req.reply.send(format!(
                    "error unknown command {other:?}: kill, stop, start or restart"
                ));
            }
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
                        if self.mark(&exit) && !exit.success() && !exit.stopped_by_signal() {
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
                    Ok(Some(exit)) => {
                        self.mark(&exit);
                    }
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

/// The control socket of this run, removed when `shoal dev` ends.
struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `DIR/dev.sock` for `shoal dev kill|stop|start|restart N`.
/// Refuses to run when another `shoal dev` answers there; a socket left by
/// one that was killed is replaced. Without a socket (a path too long, say)
/// `shoal dev` runs on, without commands.
fn listen_for_commands(
    dir: &Path,
    requests: mpsc::UnboundedSender<Request>,
) -> Result<Option<ControlSocket>, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
    let path = dir.join(CONTROL_SOCKET);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(format!(
            "another shoal dev runs with the data directory {} (it answers on {}): stop it first, or give another --data-dir",
            dir.display(),
            path.display()
        ));
    }
    if std::fs::symlink_metadata(&path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    {
        let _ = std::fs::remove_file(&path);
    }
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            say(format_args!(
                "cannot listen for commands on {}: {e}; shoal dev kill|stop|start|restart will not reach this run",
                path.display()
            ));
            return Ok(None);
        }
    };
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_command(stream, requests.clone()));
                }
                Err(_) => tokio::time::sleep(READY_POLL).await,
            }
        }
    });
    Ok(Some(ControlSocket { path }))
}

/// One command: a line `VERB N`, answered with a line `ok TEXT` or `error TEXT`.
async fn serve_command(stream: tokio::net::UnixStream, requests: mpsc::UnboundedSender<Request>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        READY_CALL_TIMEOUT,
        BufReader::new(read.take(256)).read_line(&mut line),
    )
    .await;
    let answer = match read {
        Ok(Ok(_)) => {
            let mut words = line.split_whitespace();
            match (
                words.next(),
                words.next().map(str::parse::<u8>),
                words.next(),
            ) {
                (Some(verb), Some(Ok(agent)), None) => {
                    let (reply, answer) = oneshot::channel();
                    let request = Request {
                        verb: verb.to_string(),
                        agent,
                        reply,
                    };
                    if requests.send(request).is_err() {
                        "error shoal dev is stopping".to_string()
                    } else {
                        answer
                            .await
                            .unwrap_or_else(|_| "error shoal dev is stopping".to_string())
                    }
                }
                _ => format!(
                    "error cannot read the command {:?}: want VERB N",
                    line.trim()
                ),
            }
        }
        _ => "error no command received".to_string(),
    };
    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
    let _ = write.shutdown().await;
}

/// Runs `shoal dev kill|stop|start|restart N`: asks the running `shoal dev`
/// through its control socket and prints its answer.
async fn send_command(action: &DevAction) -> ExitCode {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (verb, a) = action.control();
    let path = a.data_dir.join(CONTROL_SOCKET);
    let mut stream = match tokio::net::UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "shoal dev: no shoal dev is running with the data directory {} (cannot connect to {}: {e}); start one with: shoal dev{}",
                a.data_dir.display(),
                path.display(),
                if a.data_dir == Path::new(DEFAULT_DATA_DIR) {
                    String::new()
                } else {
                    format!(" --data-dir {}", a.data_dir.display())
                }
            );
            return ExitCode::FAILURE;
        }
    };
    let exchange = async {
        stream
            .write_all(format!("{verb} {}\n", a.agent).as_bytes())
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(CONTROL_WAIT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            eprintln!("shoal dev: talking to shoal dev at {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!(
                "shoal dev: no answer from shoal dev within {} s",
                CONTROL_WAIT.as_secs()
            );
            return ExitCode::FAILURE;
        }
    };
    let answer = answer.trim();
    if let Some(text) = answer.strip_prefix("ok ") {
        println!("{text}");
        ExitCode::SUCCESS
    } else {
        let text = answer.strip_prefix("error ").unwrap_or(answer);
        eprintln!("shoal dev: {text}");
        ExitCode::FAILURE
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
fn banner(plans: &[Plan], args: &DevArgs, pids: &[Option<u32>]) -> String {
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
        "  {:<9} {:<23} {:<38} {:<17} {:<10} PID",
        "AGENT", "APP API", "ADMIN (/metrics /livez /readyz)", "MESH (QUIC, UDP)", "PUSHES TO"
    );
    for (i, p) in plans.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {:<9} {:<23} {:<38} {:<17} {:<10} {}",
            p.name,
            format!("http://{}", p.app),
            format!("http://{}", p.admin),
            p.mesh.to_string(),
            p.app_port
                .map_or_else(|| "-".to_string(), |port| format!(":{port}")),
            pids.get(i)
                .copied()
                .flatten()
                .map_or_else(|| "-".to_string(), |pid| pid.to_string())
        );
    }
    if args.app_port.is_empty() {
        let _ = writeln!(
            s,
            "  no app port: push subscriptions are refused (start with --app-port PORT, or one per agent)"
        );
    }
    let (Some(first), Some(last)) = (plans.first(), plans.last()) else {
        return s;
    };
    let url_flag = |p: &Plan| {
        let url = format!("http://{}", p.app);
        if url == DEFAULT_URL {
            String::new()
        } else {
            format!(" --url {url}")
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
    let _ = writeln!(s, "  shoal sub orders --from earliest{}", url_flag(last));
    let _ = writeln!(s, "  # members and the partitions each is home to");
    let _ = writeln!(s, "  shoal status{}", url_flag(first));
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Ctrl-C stops all agents (data is kept in the data directory for the next run)."
    );
    let dir = if args.data_dir == Path::new(DEFAULT_DATA_DIR) {
        String::new()
    } else {
        format!(" --data-dir {}", args.data_dir.display())
    };
    let _ = writeln!(
        s,
        "One agent that exits leaves the others running. From another terminal:"
    );
    let _ = writeln!(
        s,
        "  shoal dev kill 2{dir}      # SIGKILL agent-2 (a crash: watch the others fail over)"
    );
    let _ = writeln!(
        s,
        "  shoal dev start 2{dir}     # bring it back (also: stop 2 = graceful, restart 2 = kill + start)"
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

/// Runs `shoal dev` until Ctrl-C or SIGTERM; or, with a command
/// (`shoal dev kill 2`), asks the running one to carry it out.
pub async fn run(args: DevArgs) -> ExitCode {
    if let Some(action) = &args.action {
        return send_command(action).await;
    }
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
    let (request_tx, mut requests) = mpsc::unbounded_channel();
    let socket = listen_for_commands(&args.data_dir, request_tx)?;
    check_ports(&plans, hint)?;
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this program to start the agents: {e}"))?;
    let (exit_tx, exits) = mpsc::unbounded_channel();
    let mut mesh = Mesh {
        agents: plans
            .iter()
            .map(|p| Handle {
                plan: p.clone(),
                control: mpsc::unbounded_channel().0,
                running: false,
                generation: 0,
                pid: None,
                asked: None,
            })
            .collect(),
        exits,
        exit_tx,
        hint,
        exe,
        args: args.clone(),
    };
    let seed: Vec<SocketAddr> = plans.first().map(|p| p.mesh).into_iter().collect();
    for index in 0..plans.len() {
        let join = if index == 0 { &[][..] } else { &seed[..] };
        if let Err(e) = mesh.spawn(index, join) {
            say(e);
            mesh.stop(&mut signals).await;
            return Ok(ExitCode::FAILURE);
        }
    }
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
            // While starting, one agent that cannot start stops them all.
            mesh.mark(&exit);
            say(exit.describe(mesh.name(exit.index), hint));
            mesh.stop(&mut signals).await;
            return Ok(ExitCode::FAILURE);
        }
        Started::Interrupted => return Ok(stopped(mesh.stop(&mut signals).await)),
    }

    let pids: Vec<Option<u32>> = mesh.agents.iter().map(|a| a.pid).collect();
    let _ = write!(std::io::stdout().lock(), "{}", banner(&plans, &args, &pids));
    let _ = std::io::stdout().flush();

    // From here on an agent that exits leaves the others running; commands
    // bring it back; Ctrl-C or SIGTERM stops them all.
    loop {
        tokio::select! {
            Some(exit) = mesh.exits.recv() => {
                mesh.on_exit(&exit);
                if mesh.alive() == 0 && socket.is_none() {
                    say("every agent has exited");
                    return Ok(ExitCode::FAILURE);
                }
            }
            Some(request) = requests.recv() => mesh.command(request),
            () = signals.recv() => return Ok(stopped(mesh.stop(&mut signals).await)),
        }
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
        assert!(banner(&p, &a, &[]).contains("shoal status"));
        assert!(banner(&p, &a, &[])
            .contains("shoal sub orders --from earliest --url http://127.0.0.1:4720"));
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
            generation: 0,
            last_warning: Some(
                "2026-11-24T19:41:09.002293Z ERROR shoal_agent: cannot start: cannot listen on 127.0.0.1:4700: Address already in use (os error 98)".into(),
            ),
        };
        let text = exit.describe("agent-1", 5700);
        assert!(text.starts_with("agent-1 exited"), "{text}");
        assert!(text.contains(": ERROR shoal_agent: cannot start"), "{text}");
        assert!(text.ends_with("try --base-port 5700"), "{text}");
    }

    #[test]
    fn app_ports_are_one_for_all_or_one_per_agent() {
        let ports = |flags: &[&str]| {
            args(flags)
                .map_err(|e| e.to_string())
                .and_then(|a| plan(&a))
                .map(|p| p.iter().map(|p| p.app_port).collect::<Vec<_>>())
        };
        assert_eq!(ports(&[]), Ok(vec![None, None, None]));
        assert_eq!(
            ports(&["--app-port", "8080"]),
            Ok(vec![Some(8080), Some(8080), Some(8080)])
        );
        assert_eq!(
            ports(&["--app-port", "8080,8081,8082"]),
            Ok(vec![Some(8080), Some(8081), Some(8082)])
        );
        assert_eq!(
            ports(&[
                "--app-port",
                "8080",
                "--app-port",
                "8081",
                "--app-port",
                "8082"
            ]),
            Ok(vec![Some(8080), Some(8081), Some(8082)])
        );
        assert!(ports(&["--app-port", "8080,8081"]).is_err_and(|e| e.contains("one per agent")));
        assert!(ports(&["--app-port", "0"]).is_err());
    }

    #[test]
    fn commands_parse_with_their_data_directory() {
        let a = args(&["restart", "2", "--data-dir", "/tmp/x"]).map_err(|e| e.to_string());
        match a.map(|a| a.action) {
            Ok(Some(DevAction::Restart(c))) => {
                assert_eq!(c.agent, 2);
                assert_eq!(c.data_dir, Path::new("/tmp/x"));
            }
            other => panic!("{other:?}"),
        }
        assert!(args(&["kill", "0"]).is_err());
        assert!(args(&["kill"]).is_err());
    }

    #[test]
    fn only_warnings_and_errors_are_last_words() {
        assert!(is_warning(
            "2026-11-24T19:41:09.002293Z  WARN shoal_agent::router: hand-off failed"
        ));
        assert!(is_warning(
            "2026-11-24T19:41:09.002293Z ERROR shoal_agent: cannot start"
        ));
        assert!(is_warning(
            "\u{1b}[2m2026-11-24T19:41:09.002293Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x: y"
        ));
        assert!(is_warning(
            r#"{"timestamp":"t","level":"WARN","fields":{}}"#
        ));
        assert!(is_warning("thread 'main' panicked at src/x.rs:1:1:"));
        assert!(!is_warning(
            "2026-11-24T19:41:09.002293Z  INFO shoal_agent: shoal-agent ready"
        ));
        assert!(!is_warning(
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"error"}}"#
        ));
    }
}
