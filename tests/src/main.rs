//! `shoal-bench`: benchmarks one release `shoal-agent` (issue 2), then a
//! mesh of three on this machine; on request, compares the mesh side by side
//! with NATS and JetStream (issue 5).
//!
//! ```sh
//! cargo run --release -p shoal-bench -- [--quick] [--only single|mesh|compare] [--out docs/benchmarks.md]
//! ```
//!
//! Builds the release agent, starts it on free loopback ports with a fresh
//! data directory, measures publish throughput (single and batched), open-loop
//! publish latency, publish-to-pull and publish-to-push latency, memory and
//! CPU, stops the agent (also on error and Ctrl-C), and writes its section of
//! `docs/benchmarks.md`. The mesh part ([`mesh`]) then starts three agents
//! (publish on agent 1, partition home on agent 2, subscriber behind agent 3)
//! and writes its own section. The comparison ([`compare`], only with
//! `--only compare`) starts `nats-server` (installing Debian's package when
//! it is missing) and the mesh, runs the same workloads against both,
//! alternating, and writes its section and plots.

mod agent;
mod compare;
mod compare_report;
mod conn;
mod mesh;
mod mesh_report;
mod nats;
mod replication;
mod report;
mod workloads;

use agent::AgentProcess;
use clap::{Parser, ValueEnum};
use report::{Delivery, Machine, Report};
use shoal_agent::client::AgentClient;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use workloads::{ClosedLoop, Ctx, OpenLoopSpec, PushSink, Recorder};

/// The error type of the bench: any error, with a readable message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A part of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    /// One agent.
    Single,
    /// Three agents in a mesh.
    Mesh,
    /// The mesh side by side with NATS and JetStream (not part of the default run).
    Compare,
    /// Replicated partitions (issue 11): durable R=3 vs JetStream R3,
    /// failover after SIGKILL of a leader, idle cost of 1,000 partitions x 3
    /// replicas (not part of the default run).
    Replication,
}

/// Benchmarks one release shoal-agent, then a mesh of three: throughput,
/// latency, memory, CPU. `--only compare` instead runs the mesh side by side
/// with nats-server (core and JetStream) in one run.
#[derive(Debug, Parser)]
#[command(
    name = "shoal-bench",
    about,
    long_about = None,
    after_help = "Examples:\n  cargo run --release -p shoal-bench --                      single agent, then the mesh\n  cargo run --release -p shoal-bench -- --only compare       Shoal vs NATS/JetStream (about 15 min; installs nats-server if missing)\n  cargo run --release -p shoal-bench -- --only compare --quick --no-write   smoke run (under 2 min)"
)]
struct Cli {
    /// Small counts (a smoke run of under about a minute per part); writes no file unless --out is given.
    #[arg(long)]
    quick: bool,
    /// Run only this part (default: single, then mesh; `compare` runs only with --only compare).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Markdown file whose sections ("Single agent (issue 2)", "Mesh of three
    /// agents") are rewritten
    /// (default: docs/benchmarks.md of the workspace; none with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the results only; write no file.
    #[arg(long, conflicts_with = "out")]
    no_write: bool,
    /// Skip `cargo build --release -p shoal-agent` and use the binary as it is.
    #[arg(long)]
    no_build: bool,
    /// Agent binary (default: the static release build, target/<host triple>/release/shoal-agent).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Keep-alive connections of the single-publish run.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Connections of the batched-publish run.
    #[arg(long, default_value_t = 8)]
    batch_connections: usize,
    /// Messages per batched publish.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Keep-alive connections of the mesh's single-publish run.
    #[arg(long, default_value_t = 64)]
    mesh_connections: usize,
    /// Connections of the mesh's batched-publish run.
    #[arg(long, default_value_t = 8)]
    mesh_batch_connections: usize,
    /// Compare: fail when nats-server is missing instead of installing
    /// Debian's package with .ci/nats.sh.
    #[arg(long)]
    no_install: bool,
    /// Compare: run only these workloads (comma-separated keys: latency-1000,
    /// latency-10000, request-reply, pubsub-single, pubsub-batch, fanout-5,
    /// group-3, durable-sync, durable-inflight), e.g. to profile one.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Replication: leader kills of the failover part (0 skips it; default 10, 2 with --quick).
    #[arg(long)]
    kills: Option<usize>,
    /// Replication: Shoal's publishers share one h2c connection (HTTP/2 with prior knowledge, as JetStream's share one connection) instead of one HTTP/1.1 keep-alive connection each.
    #[arg(long)]
    h2: bool,
    /// Replication: leader kills of an idle partition (its group asleep), after the others (0 skips them; default 5, 1 with --quick).
    #[arg(long)]
    idle_kills: Option<usize>,
    /// Replication: partitions (x 3 replicas) of the idle part (0 skips it; default 1000, 50 with --quick).
    #[arg(long)]
    idle_partitions: Option<u32>,
    /// Replication: seconds of the idle window (default 60, 10 with --quick).
    #[arg(long)]
    idle_seconds: Option<u64>,
    /// Replication: skip the replaced pod after the idle part (it waits the
    /// agents' default `--replace-after`, 60 s, and then for the groups).
    #[arg(long)]
    no_replace: bool,
    /// Replication: rounds per system of each throughput mode (0 skips them; default 2, 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
}

/// Counts and durations of one run.
struct Plan {
    warmup: Duration,
    throughput_time: Duration,
    single_max: u64,
    batch_max: u64,
    latency_time: Duration,
    delivery_time: Duration,
    rate: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                warmup: Duration::from_millis(500),
                throughput_time: Duration::from_secs(2),
                single_max: 200_000,
                batch_max: 2_000_000,
                latency_time: Duration::from_secs(3),
                delivery_time: Duration::from_secs(2),
                rate: 1_000,
            }
        } else {
            Plan {
                warmup: Duration::from_secs(2),
                throughput_time: Duration::from_secs(20),
                single_max: 5_000_000,
                batch_max: 20_000_000,
                latency_time: Duration::from_secs(30),
                delivery_time: Duration::from_secs(20),
                rate: 1_000,
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    cli.workloads.retain(|k| !k.trim().is_empty());
    if let Err(e) = check_workloads(&cli) {
        eprintln!("shoal-bench: {e}");
        return ExitCode::from(2);
    }
    let workspace = workspace_root();
    if !cli.no_build {
        if let Err(e) = agent::build(&workspace) {
            eprintln!("shoal-bench: {e}");
            return ExitCode::FAILURE;
        }
    }
    // One thread for the client: the agent needs the machine's other core(s).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        tokio::select! {
            r = run(&cli, &workspace) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("shoal-bench: {e}");
                    ExitCode::FAILURE
                }
            },
            _ = tokio::signal::ctrl_c() => {
                eprintln!("shoal-bench: interrupted; stopping the agents");
                ExitCode::from(130)
            }
            _ = terminated() => {
                eprintln!("shoal-bench: terminated; stopping the agents");
                ExitCode::from(143)
            }
        }
    });
    // The agent was stopped when `run` was dropped; don't wait for stray tasks.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Resolves on SIGTERM (`kill`, `timeout`, CI), so the servers this run
/// started are stopped as on Ctrl-C.
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

/// The command line as `cargo run` would take it.
fn command_line() -> String {
    let mut command = "cargo run --release -p shoal-bench --".to_string();
    for a in std::env::args().skip(1) {
        command.push(' ');
        command.push_str(&a);
    }
    command
}

/// Where to write the report, if anywhere.
fn out_path(cli: &Cli, workspace: &Path) -> Option<PathBuf> {
    // A run of some workloads only is never written over the full figures
    // unless asked to with --out.
    let partial = !cli.workloads.is_empty();
    match (&cli.out, cli.quick || partial, cli.no_write) {
        (_, _, true) => None,
        (Some(p), _, _) => Some(p.clone()),
        (None, false, _) => Some(workspace.join("docs/benchmarks.md")),
        (None, true, _) => None,
    }
}

/// Refuses `--workloads` keys the comparison does not know, and
/// `--workloads` without `--only compare`, before anything starts.
fn check_workloads(cli: &Cli) -> Result<(), String> {
    if cli.workloads.is_empty() {
        return Ok(());
    }
    if cli.only != Some(Part::Compare) {
        return Err("--workloads selects workloads of the comparison: add --only compare".into());
    }
    let known = compare::workload_keys(&compare::ComparePlan::new(cli.quick));
    let unknown: Vec<&String> = cli
        .workloads
        .iter()
        .filter(|k| !known.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "unknown --workloads {}: the keys are {}",
            unknown
                .iter()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            known.join(", ")
        ));
    }
    Ok(())
}

async fn run(cli: &Cli, workspace: &Path) -> Result<(), BoxError> {
    if cli.only == Some(Part::Compare) {
        return run_compare(cli, workspace).await;
    }
    if cli.only == Some(Part::Replication) {
        return run_replication(cli, workspace).await;
    }
    if cli.only != Some(Part::Mesh) {
        run_single(cli, workspace).await?;
    }
    if cli.only != Some(Part::Single) {
        if cli.only.is_none() {
            settle().await;
        }
        run_mesh(cli, workspace).await?;
    }
    Ok(())
}

/// `/proc/loadavg`'s three load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The first line of `bin --version`.
fn version_of(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

async fn run_compare(cli: &Cli, workspace: &Path) -> Result<(), BoxError> {
    let bin = cli
        .agent_bin
        .clone()
        .unwrap_or_else(|| agent::default_binary(workspace));
    let nats_bin = nats::ensure_server(workspace, !cli.no_install)?;
    let nats_version = nats::server_version(&nats_bin)?;
    println!("==> Shoal vs NATS: {nats_version} ({})", nats_bin.display());
    let mut plan = compare::ComparePlan::new(cli.quick);
    plan.only = cli.workloads.clone();
    let load_before = load_average();
    let started = Instant::now();
    let results = compare::run(&bin, &nats_bin, &plan, agent::clock_ticks_per_sec()).await?;
    let took_s = started.elapsed().as_secs_f64();
    println!("==> compare part took {took_s:.0} s");
    let report = compare_report::CompareReport {
        quick: cli.quick,
        command: command_line(),
        machine: Machine::detect(workspace),
        nats_version,
        shoal_version: version_of(&bin),
        load_before,
        load_after: load_average(),
        took_s,
        plan,
        results,
    };
    let out = out_path(cli, workspace);
    let plots = match &out {
        Some(path) => {
            let dir = path
                .parent()
                .unwrap_or(Path::new("."))
                .join(compare_report::PLOT_DIR);
            report
                .plots(&dir)?
                .into_iter()
                .map(|f| format!("{}/{f}", compare_report::PLOT_DIR))
                .collect()
        }
        None => Vec::new(),
    };
    let md = report.markdown(&plots);
    println!("{md}");
    if let Some(path) = &out {
        report::write_marked(path, compare_report::BEGIN_PREFIX, compare_report::END, &md)?;
        println!("==> wrote {} and {} plots", path.display(), plots.len());
    }
    let (expected, received, dropped, missing, failed, bad) = report.results.accounting();
    let pids: Vec<String> = report
        .results
        .pids
        .iter()
        .map(|(_, p)| p.to_string())
        .collect();
    println!("compare: stopped pids {}", pids.join(" "));
    println!(
        "compare: summary expected={expected} received={received} dropped={dropped} missing={missing} failed={failed} failed_rounds={bad}"
    );
    // A refused send (503 with Retry-After) and a drop the agent counted are
    // accounted for; a message that vanished without either is not.
    if missing > 0 || bad > 0 {
        return Err(format!(
            "compare: not every message was accounted for ({missing} missing, {bad} failed rounds)"
        )
        .into());
    }
    Ok(())
}

async fn run_replication(cli: &Cli, workspace: &Path) -> Result<(), BoxError> {
    let bin = cli
        .agent_bin
        .clone()
        .unwrap_or_else(|| agent::default_binary(workspace));
    let nats_bin = nats::ensure_server(workspace, !cli.no_install)?;
    let nats_version = nats::server_version(&nats_bin)?;
    let mut plan = replication::ReplPlan::new(cli.quick);
    if let Some(k) = cli.kills {
        plan.kills = k;
    }
    plan.h2 = cli.h2;
    if let Some(k) = cli.idle_kills {
        plan.idle_kills = k;
    }
    if let Some(p) = cli.idle_partitions {
        plan.idle_partitions = p;
    }
    if let Some(s) = cli.idle_seconds {
        plan.idle_time = Duration::from_secs(s.max(1));
    }
    if let Some(r) = cli.rounds {
        plan.rounds = r;
    }
    if cli.no_replace {
        plan.replace = false;
    }
    println!("==> replicated partitions: {plan:?}");
    let load_before = load_average();
    let started = Instant::now();
    let results = replication::run(&bin, &nats_bin, &plan, agent::clock_ticks_per_sec()).await?;
    let took_s = started.elapsed().as_secs_f64();
    println!("==> replication part took {took_s:.0} s");
    let report = replication::ReplReport {
        quick: cli.quick,
        command: command_line(),
        machine: Machine::detect(workspace),
        nats_version,
        plan,
        results,
        took_s,
        load: (load_before, load_average()),
    };
    let md = report.markdown();
    println!("{md}");
    if let Some(path) = out_path(cli, workspace) {
        report::write_marked(&path, replication::BEGIN_PREFIX, replication::END, &md)?;
        println!("==> wrote {}", path.display());
    }
    Ok(())
}

async fn run_mesh(cli: &Cli, workspace: &Path) -> Result<(), BoxError> {
    let bin = cli
        .agent_bin
        .clone()
        .unwrap_or_else(|| agent::default_binary(workspace));
    println!("==> mesh of three agents");
    let plan = mesh::MeshPlan::new(cli.quick);
    let opts = mesh::MeshOptions {
        connections: cli.mesh_connections,
        batch_connections: cli.mesh_batch_connections,
        batch_size: cli.batch_size,
    };
    let started = Instant::now();
    let results = mesh::run(&bin, &plan, &opts, agent::clock_ticks_per_sec()).await?;
    println!(
        "==> mesh part took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let report = mesh_report::MeshReport {
        quick: cli.quick,
        command: command_line(),
        machine: Machine::detect(workspace),
        plan,
        opts,
        results,
    };
    let md = report.markdown();
    println!("{md}");
    if let Some(path) = out_path(cli, workspace) {
        report::write_marked(&path, mesh_report::BEGIN_PREFIX, mesh_report::END, &md)?;
        println!("==> wrote {}", path.display());
    }
    if report.results.any_failed() {
        return Err("a mesh workload failed; see its row in the report".into());
    }
    Ok(())
}

/// Lets the disk catch up between phases: `sync(1)` (bounded by 60 s), then a
/// second of rest, so one phase's writeback does not land in the next one.
pub async fn settle() {
    let started = Instant::now();
    let synced = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("sync").status(),
    )
    .await;
    match synced {
        Ok(Ok(s)) if s.success() => {
            println!("==> settle: sync took {} ms", started.elapsed().as_millis())
        }
        _ => println!("==> settle: sync failed or timed out"),
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn setup(
    client: &AgentClient,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, BoxError> {
    let r = client.put_json(path, &body).await?;
    if !r.status.is_success() {
        return Err(format!("PUT {path} answered {}: {}", r.status, r.text()).into());
    }
    Ok(r.json())
}

async fn run_single(cli: &Cli, workspace: &Path) -> Result<(), BoxError> {
    let plan = Plan::new(cli.quick);
    let bin = cli
        .agent_bin
        .clone()
        .unwrap_or_else(|| agent::default_binary(workspace));
    let push_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let push_port = push_listener.local_addr()?.port();
    let mut agent = AgentProcess::start(&bin, push_port)?;
    let ready_in = agent.wait_ready(Duration::from_secs(30)).await?;
    println!("==> agent ready in {} ms", ready_in.as_millis());

    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = agent.stats()?;
    println!("==> idle RSS {} KiB", idle.rss_kib);

    let ctx = Ctx {
        app: agent.app_addr,
        admin: agent.admin_addr,
        pid: agent.pid(),
        epoch: Instant::now(),
        clk_tck: agent::clock_ticks_per_sec(),
        max_rss_kib: Arc::new(AtomicU64::new(idle.rss_kib)),
    };
    workloads::spawn_rss_sampler(&ctx);
    let sink: PushSink = Arc::new(Mutex::new(None));
    tokio::spawn(workloads::serve_push(push_listener, sink.clone()));
    let client = AgentClient::new(&format!("http://{}", agent.app_addr));

    for t in [
        "bench-single",
        "bench-batch",
        "bench-latency",
        "bench-pull",
        "bench-push",
    ] {
        let v = setup(&client, &format!("/v1/topics/{t}"), serde_json::json!({})).await?;
        if t == "bench-single" {
            println!(
                "==> topics: {} partitions, fsync {}",
                v.get("partitions").unwrap_or(&serde_json::Value::Null),
                v.get("fsync").unwrap_or(&serde_json::Value::Null)
            );
        }
    }

    // 1. Single publishes.
    let single = workloads::closed_loop(
        &ctx,
        ClosedLoop {
            name: "single",
            path: "/v1/topics/bench-single/messages".into(),
            content_type: "application/octet-stream",
            body: workloads::binary_payload(),
            per_request: 1,
            connections: cli.connections.max(1),
            warmup: plan.warmup,
            duration: plan.throughput_time,
            max_messages: plan.single_max,
        },
    )
    .await?;
    println!(
        "==> single: {:.0} msg/s, agent CPU {:.1} s per million\n",
        single.rate(),
        single.agent_cpu_per_million()
    );
    agent.check_alive()?;
    settle().await;

    // 2. Batched publishes.
    let batch_size = cli.batch_size.max(1);
    let batch = workloads::closed_loop(
        &ctx,
        ClosedLoop {
            name: "batch",
            path: "/v1/topics/bench-batch/messages/batch".into(),
            content_type: "application/x-ndjson",
            body: workloads::ndjson_batch(batch_size),
            per_request: batch_size as u64,
            connections: cli.batch_connections.max(1),
            warmup: plan.warmup,
            duration: plan.throughput_time,
            max_messages: plan.batch_max,
        },
    )
    .await?;
    println!(
        "==> batch: {:.0} msg/s, agent CPU {:.2} s per million\n",
        batch.rate(),
        batch.agent_cpu_per_million()
    );
    let loaded_rss_kib = single.max_rss_kib.max(batch.max_rss_kib);
    agent.check_alive()?;
    settle().await;

    // 3. Open-loop publish latency.
    let latency = workloads::open_loop(
        &ctx,
        OpenLoopSpec {
            name: "latency",
            path: "/v1/topics/bench-latency/messages".into(),
            content_type: "application/octet-stream",
            rate: plan.rate,
            duration: plan.latency_time,
            max_messages: plan.rate * plan.latency_time.as_secs(),
        },
        |_, _| workloads::binary_payload(),
    )
    .await?;
    println!(
        "==> publish latency p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs\n",
        latency.latency.value_at_quantile(0.5),
        latency.latency.value_at_quantile(0.99),
        latency.latency.value_at_quantile(0.999),
        latency.latency.max()
    );
    agent.check_alive()?;
    settle().await;

    // 4a. Publish → pull.
    let expected = plan.rate * plan.delivery_time.as_secs();
    setup(
        &client,
        "/v1/subscriptions/bench-pull",
        serde_json::json!({"topic": "bench-pull", "start": "latest", "maxInFlight": 1000}),
    )
    .await?;
    let rec = Arc::new(Mutex::new(Recorder::new(ctx.epoch, expected)?));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = tokio::spawn(workloads::pull_consumer(
        ctx.app,
        "bench-pull".into(),
        rec.clone(),
        expected,
        stop.clone(),
        Instant::now() + plan.delivery_time + Duration::from_secs(15),
    ));
    let epoch = ctx.epoch;
    let publish = workloads::open_loop(
        &ctx,
        OpenLoopSpec {
            name: "pull",
            path: "/v1/topics/bench-pull/messages".into(),
            content_type: "application/json",
            rate: plan.rate,
            duration: plan.delivery_time,
            max_messages: expected,
        },
        move |i, at| workloads::timed_payload(epoch, i, at),
    )
    .await?;
    // Let the consumer catch up (bounded), then stop it.
    let waited = Instant::now();
    while rec.lock().unwrap_or_else(|p| p.into_inner()).unique < publish.ok
        && waited.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    match tokio::time::timeout(Duration::from_secs(5), consumer).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(format!("pull consumer: {e}").into()),
        Ok(Err(e)) => return Err(format!("pull consumer task: {e}").into()),
        Err(_) => eprintln!("[pull] the consumer did not stop within 5 s"),
    }
    let received = std::mem::replace(
        &mut *rec.lock().unwrap_or_else(|p| p.into_inner()),
        Recorder::new(ctx.epoch, 0)?,
    );
    println!(
        "==> publish → pull: {} of {} received, p50 {} µs, p99 {} µs, p99.9 {} µs\n",
        received.unique,
        publish.ok,
        received.latency.value_at_quantile(0.5),
        received.latency.value_at_quantile(0.99),
        received.latency.value_at_quantile(0.999)
    );
    let pull = Delivery { publish, received };
    agent.check_alive()?;
    settle().await;

    // 4b. Publish → push.
    *sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(Recorder::new(ctx.epoch, expected)?);
    setup(
        &client,
        "/v1/subscriptions/bench-push",
        serde_json::json!({"topic": "bench-push", "start": "latest", "pushPath": "/push", "maxInFlight": 1000}),
    )
    .await?;
    let publish = workloads::open_loop(
        &ctx,
        OpenLoopSpec {
            name: "push",
            path: "/v1/topics/bench-push/messages".into(),
            content_type: "application/json",
            rate: plan.rate,
            duration: plan.delivery_time,
            max_messages: expected,
        },
        move |i, at| workloads::timed_payload(epoch, i, at),
    )
    .await?;
    let waited = Instant::now();
    let unique = |sink: &PushSink| {
        sink.lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |r| r.unique)
    };
    while unique(&sink) < publish.ok && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = sink
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or("the push recorder vanished")?;
    println!(
        "==> publish → push: {} of {} received, p50 {} µs, p99 {} µs, p99.9 {} µs\n",
        received.unique,
        publish.ok,
        received.latency.value_at_quantile(0.5),
        received.latency.value_at_quantile(0.99),
        received.latency.value_at_quantile(0.999)
    );
    let push = Delivery { publish, received };
    agent.check_alive()?;

    let report = Report {
        quick: cli.quick,
        command: command_line(),
        machine: Machine::detect(workspace),
        idle_rss_kib: idle.rss_kib,
        loaded_rss_kib,
        single,
        batch,
        batch_size,
        latency,
        pull,
        push,
    };
    let md = report.markdown();
    println!("{md}");
    if let Some(path) = out_path(cli, workspace) {
        report::write_section(&path, &md)?;
        println!("==> wrote {}", path.display());
    }
    Ok(())
}
