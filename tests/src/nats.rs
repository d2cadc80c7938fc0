//! The NATS server the comparison runs against: Debian's `nats-server`,
//! found (or installed with `.ci/nats.sh`), started on a free loopback port,
//! plain or with JetStream in a temporary directory, and stopped by pid
//! whatever happens.

use crate::agent::{free_port, stop_child, ProcStats};
use crate::BoxError;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian puts the binary (`/usr/sbin` is not on every user's PATH).
const KNOWN_PATHS: [&str; 3] = [
    "/usr/sbin/nats-server",
    "/usr/bin/nats-server",
    "/usr/local/bin/nats-server",
];

/// The `nats-server` binary: `$SHOAL_NATS_SERVER`, else on `PATH`, else in
/// Debian's location; `None` if there is none.
pub fn find_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHOAL_NATS_SERVER") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| KNOWN_PATHS.iter().map(PathBuf::from).find(|p| p.is_file()))
}

/// Finds `nats-server`, installing Debian's package with `.ci/nats.sh` when
/// it is missing and `install` is set.
pub fn ensure_server(workspace: &Path, install: bool) -> Result<PathBuf, BoxError> {
    if let Some(p) = find_server() {
        return Ok(p);
    }
    if !install {
        return Err(
            "no nats-server found (PATH, /usr/sbin; or set SHOAL_NATS_SERVER); \
                    run .ci/nats.sh or apt-get install nats-server"
                .into(),
        );
    }
    let script = workspace.join(".ci/nats.sh");
    println!("==> nats-server is missing; running {}", script.display());
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} failed ({status})", script.display()).into());
    }
    find_server().ok_or_else(|| "nats-server still missing after .ci/nats.sh".into())
}

/// `nats-server --version`, e.g. `nats-server: v2.9.10`.
pub fn server_version(bin: &Path) -> Result<String, BoxError> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || text.is_empty() {
        return Err(format!("{} --version failed ({})", bin.display(), out.status).into());
    }
    Ok(text)
}

/// A running `nats-server`. Dropping it stops the process (SIGTERM, then
/// SIGKILL) before its directory is removed.
pub struct NatsServer {
    child: Child,
    /// Client address.
    pub addr: SocketAddr,
    /// "nats-server" or "nats-server (JetStream)".
    pub name: String,
    log_path: PathBuf,
    // Dropped after `Drop::drop` has stopped the process.
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `bin` on a free loopback port; with `jetstream`, JetStream
    /// stores in a fresh temporary directory (file storage).
    pub fn start(bin: &Path, jetstream: bool) -> Result<NatsServer, BoxError> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-bench-nats-")
            .tempdir()?;
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log_path = dir.path().join("nats-server.log");
        let log = File::create(&log_path)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(addr.port().to_string())
            .arg("-n")
            .arg(if jetstream { "bench-js" } else { "bench" });
        if jetstream {
            cmd.arg("-js").arg("-sd").arg(dir.path().join("jetstream"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let name = if jetstream {
            "nats-server (JetStream)"
        } else {
            "nats-server"
        };
        println!(
            "==> {name} pid {} (client {addr}, dir {})",
            child.id(),
            dir.path().display()
        );
        Ok(NatsServer {
            child,
            addr,
            name: name.to_string(),
            log_path,
            _dir: dir,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The `nats://` URL of the client port.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                Err(format!(
                    "{} exited ({status}); its log ends with:\n{}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
                .into())
            }
        }
    }

    /// Waits until a client can connect, at most `limit`.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<Duration, BoxError> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            if let Ok(c) = async_nats::connect(self.url()).await {
                if c.flush().await.is_ok() {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > limit {
                return Err(format!("{} was not ready within {limit:?}", self.name).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Warning and error lines of the server's log so far (slow consumers among them).
    pub fn log_warnings(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("[WRN]") || l.contains("[ERR]") || l.contains("Slow Consumer"))
            .map(str::to_string)
            .collect()
    }

    /// Resident memory and CPU time now.
    pub fn stats(&self) -> Result<ProcStats, BoxError> {
        ProcStats::read(self.pid())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        stop_child(&mut self.child, &self.name);
    }
}
