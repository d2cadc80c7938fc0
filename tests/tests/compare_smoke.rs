//! Smoke test of the comparison with NATS: runs `shoal-bench --only compare
//! --quick --no-write` against the debug `shoal-agent` (the one the test
//! build already made; built here if missing) and Debian's `nats-server`,
//! and checks that it completes, that every message was accounted for, and
//! that every process it started is gone. No figure is asserted.
//!
//! Without `nats-server` the test skips with a message, unless
//! SHOAL_REQUIRE_NATS=1 (set by .ci/run, which installs it with
//! .ci/nats.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Set to 1 to fail instead of skipping when nats-server is missing.
const REQUIRE_ENV: &str = "SHOAL_REQUIRE_NATS";

fn nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHOAL_NATS_SERVER") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()))
}

fn workspace() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The debug agent next to this test's profile directory
/// (`target/debug/deps/compare_smoke-*` → `target/debug/shoal-agent`),
/// built with cargo when this run did not build it.
fn debug_agent() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace().join("target/debug"));
    let agent = profile_dir.join("shoal-agent");
    if !agent.is_file() {
        eprintln!("building {} (cargo build -p shoal-agent)", agent.display());
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "shoal-agent", "--bin", "shoal-agent"])
            .current_dir(workspace())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "cargo build -p shoal-agent failed"
        );
    }
    assert!(agent.is_file(), "no agent binary at {}", agent.display());
    agent
}

/// The value of `key=N` in `line`.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

#[test]
fn quick_compare_accounts_for_every_message_and_stops_every_process() {
    if nats_server().is_none() {
        let why = "no nats-server (run .ci/nats.sh or apt-get install nats-server)";
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!("{REQUIRE_ENV}=1 but {why}");
        }
        eprintln!("SKIPPED compare smoke test: {why}. Set {REQUIRE_ENV}=1 to make this a failure.");
        return;
    }
    let agent = debug_agent();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-bench"))
        .args([
            "--only",
            "compare",
            "--quick",
            "--no-write",
            "--no-build",
            "--no-install",
        ])
        .arg("--agent-bin")
        .arg(&agent)
        .current_dir(workspace())
        .output()
        .expect("cannot run shoal-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let took = started.elapsed();
    eprintln!("shoal-bench took {:.0} s", took.as_secs_f64());
    let show = || format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");

    // Every process it started is gone (checked first: it matters even when the run failed).
    let pids: Vec<u32> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("compare: started pid "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        pids.len() >= 5,
        "expected 5 started processes (2 nats-servers, 3 agents):\n{}",
        show()
    );
    // A process that has exited but not been reaped has no /proc entry left
    // once its parent (shoal-bench) is gone; give the kernel a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let alive = |pid: &u32| Path::new(&format!("/proc/{pid}")).exists();
    while pids.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<&u32> = pids.iter().filter(|p| alive(p)).collect();
    assert!(
        left.is_empty(),
        "processes left behind: {left:?}\n{}",
        show()
    );

    assert!(
        out.status.success(),
        "shoal-bench failed ({}):\n{}",
        out.status,
        show()
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("compare: summary "))
        .unwrap_or_else(|| panic!("no summary line:\n{}", show()));
    let expected = field(summary, "expected").expect("expected=");
    let received = field(summary, "received").expect("received=");
    assert!(expected > 0, "nothing was measured: {summary}");
    assert_eq!(received, expected, "messages missing: {summary}");
    assert_eq!(field(summary, "missing"), Some(0), "{summary}");
    assert_eq!(field(summary, "dropped"), Some(0), "{summary}");
    assert_eq!(field(summary, "failed"), Some(0), "{summary}");
    assert_eq!(field(summary, "failed_rounds"), Some(0), "{summary}");
}
