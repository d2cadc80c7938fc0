//! The agent under test: building it, starting it on free loopback ports,
//! reading its memory and CPU from `/proc`, and stopping it whatever happens.

use crate::BoxError;
use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Builds the agent as it ships in its image (static, release) with cargo,
/// showing cargo's own progress; [`default_binary`] is its path. The static
/// build is the one measured: a dynamically linked binary also maps glibc,
/// which adds about 2 MB of resident memory the sidecar does not have.
pub fn build(workspace: &Path) -> Result<(), BoxError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let target = host_target()?;
    println!(
        "==> building the agent as shipped: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target {target} -p shoal-agent --bin shoal-agent"
    );
    let status = Command::new(cargo)
        .args(["build", "--release", "--target", &target])
        .args(["-p", "shoal-agent", "--bin", "shoal-agent"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of shoal-agent failed ({status})").into());
    }
    Ok(())
}

/// Where [`build`] puts the agent for `target`: under `CARGO_TARGET_DIR`
/// when it is set (relative to the workspace, as cargo reads it), else
/// under the workspace's `target`.
pub fn shipped_binary(workspace: &Path, target: &str) -> PathBuf {
    target_dir(workspace)
        .join(target)
        .join("release")
        .join("shoal-agent")
}

fn target_dir(workspace: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace.join(dir),
        _ => workspace.join("target"),
    }
}

/// The agent binary the bench runs when `--agent-bin` is not given: the
/// static build of [`build`].
pub fn default_binary(workspace: &Path) -> PathBuf {
    match host_target() {
        Ok(target) => shipped_binary(workspace, &target),
        Err(_) => target_dir(workspace).join("release/shoal-agent"),
    }
}

/// The host's target triple, from `rustc -vV`.
pub fn host_target() -> Result<String, BoxError> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("cannot run rustc -vV: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|t| t.trim().to_string())
        .ok_or_else(|| "rustc -vV printed no host line".into())
}

/// A free port on 127.0.0.1 (bound and released; the agent binds it right after).
pub fn free_port() -> Result<u16, BoxError> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A running agent process. Dropping it stops the process (SIGTERM, then
/// SIGKILL after a grace period) before its data directory is removed.
pub struct AgentProcess {
    child: Child,
    /// App API address.
    pub app_addr: SocketAddr,
    /// Admin address.
    pub admin_addr: SocketAddr,
    /// Mesh (QUIC) address.
    pub mesh_addr: SocketAddr,
    /// Node name.
    pub node_name: String,
    log_path: PathBuf,
    // Dropped after `Drop::drop` has stopped the process.
    _data: tempfile::TempDir,
}

impl AgentProcess {
    /// Starts `bin` on free loopback ports with a fresh data directory; pushes
    /// go to `app_port`.
    pub fn start(bin: &Path, app_port: u16) -> Result<AgentProcess, BoxError> {
        AgentProcess::start_with(
            bin,
            &AgentOptions {
                node_name: "shoal-bench".into(),
                app_port: Some(app_port),
                extra: Vec::new(),
            },
        )
    }

    /// Starts `bin` on free loopback ports with a fresh data directory, the
    /// given node name and app port, and extra arguments (mesh flags).
    pub fn start_with(bin: &Path, opts: &AgentOptions) -> Result<AgentProcess, BoxError> {
        if !bin.is_file() {
            return Err(format!("no agent binary at {}", bin.display()).into());
        }
        let data = tempfile::Builder::new().prefix("shoal-bench-").tempdir()?;
        let app_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let admin_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let mesh_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log_path = data.path().join("agent.log");
        let log = File::create(&log_path)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--app-addr")
            .arg(app_addr.to_string())
            .arg("--admin-addr")
            .arg(admin_addr.to_string())
            .arg("--mesh-addr")
            .arg(mesh_addr.to_string())
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .arg("--node-name")
            .arg(&opts.node_name);
        if let Some(port) = opts.app_port {
            cmd.arg("--app-port").arg(port.to_string());
        }
        let child = cmd
            .args(&opts.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let push = opts.app_port.map_or_else(
            || "no app port".to_string(),
            |p| format!("push to 127.0.0.1:{p}"),
        );
        println!(
            "==> {} pid {} (app {app_addr}, admin {admin_addr}, mesh {mesh_addr}, {push}, data {})",
            opts.node_name,
            child.id(),
            data.path().display()
        );
        Ok(AgentProcess {
            child,
            app_addr,
            admin_addr,
            mesh_addr,
            node_name: opts.node_name.clone(),
            log_path,
            _data: data,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of the agent's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The agent's whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Asks the process to stop (SIGTERM) without waiting; `Drop` waits.
    pub fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(format!(
                "the agent exited ({status}); its log ends with:\n{}",
                self.log_tail()
            )
            .into()),
        }
    }

    /// Waits until `/readyz` answers 200, at most `limit`.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<Duration, BoxError> {
        let started = Instant::now();
        let admin = shoal_agent::client::AgentClient::new(&format!("http://{}", self.admin_addr));
        loop {
            self.check_alive()?;
            if let Ok(r) = admin.get("/readyz").await {
                if r.status.is_success() {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "the agent was not ready within {limit:?}; its log ends with:\n{}",
                    self.log_tail()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident memory and CPU time now.
    pub fn stats(&self) -> Result<ProcStats, BoxError> {
        ProcStats::read(self.pid())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child, &self.node_name);
    }
}

/// Stops a child process by its pid: SIGTERM, up to 5 s to exit, then
/// SIGKILL; prints how it ended. Does nothing if it has already exited.
pub fn stop_child(child: &mut Child, name: &str) {
    let pid = child.id();
    if let Ok(Some(status)) = child.try_wait() {
        // Already gone: a mesh asks all its agents to stop at once.
        println!("==> {name} pid {pid} exited ({status})");
        return;
    }
    // Graceful first (std has no SIGTERM, so ask kill(1)), then by force.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            println!("==> {name} pid {pid} stopped");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    println!("==> {name} pid {pid} killed");
}

/// How to start an agent.
pub struct AgentOptions {
    /// `--node-name`.
    pub node_name: String,
    /// `--app-port` (where pushes and requests go), if any.
    pub app_port: Option<u16>,
    /// More arguments, such as the mesh flags.
    pub extra: Vec<OsString>,
}

/// Memory and CPU of a process from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStats {
    /// Resident set size in KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Its private anonymous part in KiB (`RssAnon`: heap and stacks). The
    /// rest is mostly the binary's pages, page cache that every process
    /// running the same image on a node shares.
    pub anon_kib: u64,
    /// User plus system CPU time in clock ticks.
    pub cpu_ticks: u64,
}

impl ProcStats {
    /// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`.
    pub fn read(pid: u32) -> Result<ProcStats, BoxError> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or("no VmRSS in /proc/<pid>/status")?;
        let anon_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(ProcStats {
            rss_kib,
            anon_kib,
            cpu_ticks: cpu_ticks(&format!("/proc/{pid}/stat"))?,
        })
    }

    /// This process (the bench client).
    pub fn own_cpu_ticks() -> Result<u64, BoxError> {
        cpu_ticks("/proc/self/stat")
    }
}

fn cpu_ticks(path: &str) -> Result<u64, BoxError> {
    let stat = std::fs::read_to_string(path)?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: u64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .ok_or("no utime")?;
    let stime: u64 = fields
        .get(12)
        .and_then(|v| v.parse().ok())
        .ok_or("no stime")?;
    Ok(utime + stime)
}

/// Clock ticks per second for `/proc` CPU times (`getconf CLK_TCK`, else 100).
pub fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}
