//! `shoal`: the command line tool for people. Publishes, subscribes and
//! inspects a Shoal agent over its localhost API.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::Method;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use shoal_agent::client::{AgentClient, ClientError, Reply, DEFAULT_URL};
use std::future::Future;
use std::io::{Read, Write};
use std::process::ExitCode;

mod dev;
mod inject;

/// Talk to a Shoal agent: publish, subscribe, list topics.
#[derive(Parser, Debug)]
#[command(name = "shoal", version, about)]
struct Cli {
    /// The agent's app API.
    #[arg(long, global = true, env = "SHOAL_URL", default_value = DEFAULT_URL)]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish a message (the argument, or standard input).
    Pub(PubArgs),
    /// Subscribe to a topic and print messages as they come (Ctrl-C to stop).
    Sub(SubArgs),
    /// List topics, or create and delete them.
    Topics(TopicsArgs),
    /// Show the mesh: members, their state, and the partitions each is home to.
    Status,
    /// Add the agent sidecar to Kubernetes YAML or JSON, offline (as the webhook would).
    Inject(inject::InjectArgs),
    /// Start a local mesh of agents on loopback (three by default), each its own process; Ctrl-C stops them.
    Dev(dev::DevArgs),
    /// Run one agent, as `shoal-agent` does (the agents of `shoal dev`).
    #[command(hide = true)]
    Agent(dev::AgentArgs),
}

#[derive(Args, Debug)]
struct PubArgs {
    /// Topic.
    topic: String,
    /// The payload; without it, standard input is read.
    message: Option<String>,
    /// With standard input: publish each line as its own message (in batches).
    #[arg(long)]
    lines: bool,
    /// Partition key: messages with one key keep their order.
    #[arg(long, short)]
    key: Option<String>,
    /// Message id: a repeat within the dedupe window is stored once.
    #[arg(long)]
    id: Option<String>,
    /// Content type of the payload.
    #[arg(long, short = 't', default_value = "text/plain")]
    content_type: String,
    /// Expire undelivered after this long (like 30s, 5m).
    #[arg(long)]
    ttl: Option<String>,
    /// Deliver no sooner than this from now.
    #[arg(long)]
    delay: Option<String>,
}

#[derive(Args, Debug)]
struct SubArgs {
    /// Topic.
    topic: String,
    /// Consumer group: subscribers in one group share the messages.
    #[arg(long, short)]
    group: Option<String>,
    /// Subscription name; with one, the subscription stays after exit and resumes where it stopped.
    #[arg(long)]
    name: Option<String>,
    /// Where a new group starts: earliest or latest.
    #[arg(long, default_value = "latest")]
    from: String,
    /// Stop after this many messages.
    #[arg(long, short = 'n')]
    count: Option<u64>,
    /// Print each message as its CloudEvents JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct TopicsArgs {
    #[command(subcommand)]
    action: Option<TopicsAction>,
}

#[derive(Subcommand, Debug)]
enum TopicsAction {
    /// Create or reconfigure a topic.
    Create {
        /// Topic.
        name: String,
        /// Partitions.
        #[arg(long, short)]
        partitions: Option<u32>,
        /// Replicas of each partition.
        #[arg(long)]
        replicas: Option<u32>,
        /// Keep nothing: fan out to current subscribers only.
        #[arg(long)]
        ephemeral: bool,
        /// Delete messages older than this (like 7d, 12h).
        #[arg(long)]
        retention_age: Option<String>,
        /// fsync policy: always, interval or never.
        #[arg(long)]
        fsync: Option<String>,
    },
    /// Delete a topic and its messages.
    Delete {
        /// Topic.
        name: String,
    },
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("shoal: {message}");
    ExitCode::FAILURE
}

/// The error an agent answered, for people.
fn api_error(reply: &Reply) -> String {
    let v = reply.json();
    match v.pointer("/error/message").and_then(Value::as_str) {
        Some(m) => format!(
            "{} ({} {})",
            m,
            reply.status.as_u16(),
            v.pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("")
        ),
        None => format!("the agent answered {}: {}", reply.status, reply.text()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let url = cli.url;
    match cli.command {
        Command::Inject(a) => inject::run(a),
        // The agent builds its own runtime, as shoal-agent does.
        Command::Agent(a) => dev::run_agent(a),
        Command::Dev(a) => block_on(dev::run(a)),
        Command::Pub(a) => {
            block_on(async move { outcome(publish(&AgentClient::new(&url), a).await) })
        }
        Command::Sub(a) => {
            block_on(async move { outcome(subscribe(&AgentClient::new(&url), a).await) })
        }
        Command::Topics(a) => {
            block_on(async move { outcome(topics(&AgentClient::new(&url), a).await) })
        }
        Command::Status => block_on(async move { outcome(status(&AgentClient::new(&url)).await) }),
    }
}

/// Runs a command on a single-threaded runtime.
fn block_on(command: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(command),
        Err(e) => fail(format!("cannot start the runtime: {e}")),
    }
}

fn outcome(result: Result<ExitCode, ClientError>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

async fn publish(client: &AgentClient, a: PubArgs) -> Result<ExitCode, ClientError> {
    let mut headers: Vec<(&str, &str)> = vec![("content-type", a.content_type.as_str())];
    if let Some(k) = &a.key {
        headers.push(("shoal-key", k));
    }
    if let Some(id) = &a.id {
        headers.push(("shoal-id", id));
    }
    if let Some(t) = &a.ttl {
        headers.push(("shoal-ttl", t));
    }
    if let Some(d) = &a.delay {
        headers.push(("shoal-delay", d));
    }
    let payload: Vec<u8> = match &a.message {
        Some(m) => m.clone().into_bytes(),
        None => {
            let mut buf = Vec::new();
            if let Err(e) = std::io::stdin().read_to_end(&mut buf) {
                return Ok(fail(format!("reading standard input: {e}")));
            }
            buf
        }
    };
    if a.lines && a.message.is_none() {
        return publish_lines(client, &a, &headers, &payload).await;
    }
    let reply = client.publish(&a.topic, &headers, payload).await?;
    if !reply.status.is_success() {
        return Ok(fail(api_error(&reply)));
    }
    let v = reply.json();
    println!(
        "published to {}/{} at offset {} (id {}){}",
        a.topic,
        v["partition"],
        v["offset"],
        v["id"].as_str().unwrap_or(""),
        if v["duplicate"] == json!(true) {
            ", a duplicate: stored once"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Lines are sent as CloudEvents batches of up to 500, each line's text as a message.
async fn publish_lines(
    client: &AgentClient,
    a: &PubArgs,
    headers: &[(&str, &str)],
    input: &[u8],
) -> Result<ExitCode, ClientError> {
    let text = String::from_utf8_lossy(input);
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let (mut ok, mut failed) = (0usize, 0usize);
    let batch_headers: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(k, _)| *k != "content-type" && *k != "shoal-id")
        .copied()
        .chain([("content-type", "application/cloudevents-batch+json")])
        .collect();
    for chunk in lines.chunks(500) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|l| json!({"specversion": "1.0", "datacontenttype": a.content_type, "data": l}))
            .collect();
        let reply = client
            .call(
                Method::POST,
                &format!("/v1/topics/{}/messages/batch", a.topic),
                &batch_headers,
                Value::Array(events).to_string(),
            )
            .await?;
        if !reply.status.is_success() {
            return Ok(fail(api_error(&reply)));
        }
        let v = reply.json();
        ok += v["published"].as_u64().unwrap_or(0) as usize;
        failed += v["failed"].as_u64().unwrap_or(0) as usize;
        for r in v["results"].as_array().into_iter().flatten() {
            if let Some(m) = r.pointer("/error/message").and_then(Value::as_str) {
                eprintln!("shoal: a line was not published: {m}");
            }
        }
    }
    println!(
        "published {ok} messages to {}{}",
        a.topic,
        if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        }
    );
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn subscribe(client: &AgentClient, a: SubArgs) -> Result<ExitCode, ClientError> {
    let temporary = a.name.is_none();
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("shoal-cli-{:08x}", fastrand_u32()));
    let mut spec = json!({"topic": a.topic, "start": a.from});
    if let Some(g) = &a.group {
        spec["group"] = json!(g);
    }
    let reply = client
        .put_json(&format!("/v1/subscriptions/{name}"), &spec)
        .await?;
    if !reply.status.is_success() {
        return Ok(fail(api_error(&reply)));
    }
    eprintln!(
        "subscribed to {} as {} (group {}); Ctrl-C to stop",
        a.topic,
        name,
        a.group.as_deref().unwrap_or(&name)
    );
    let outcome = tokio::select! {
        r = print_stream(client, &name, &a) => r,
        _ = shoal_agent::run::signal() => Ok(ExitCode::SUCCESS),
    };
    if temporary {
        let _ = client
            .call(
                Method::DELETE,
                &format!("/v1/subscriptions/{name}"),
                &[],
                Bytes::new(),
            )
            .await;
    }
    outcome
}

fn fastrand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16)
}

async fn print_stream(
    client: &AgentClient,
    name: &str,
    a: &SubArgs,
) -> Result<ExitCode, ClientError> {
    let resp = client
        .send(
            Method::GET,
            &format!("/v1/subscriptions/{name}/events"),
            &[],
            Bytes::new(),
        )
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Ok(fail(api_error(&Reply {
            status,
            headers: Default::default(),
            body,
        })));
    }
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Request(format!("stream ended: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data: String = event
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            if event.lines().any(|l| l == "event: error") {
                return Ok(fail(
                    v.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("stream error"),
                ));
            }
            {
                let mut out = stdout.lock();
                let line = if a.json {
                    v.to_string()
                } else {
                    let payload = match (&v["data"], v["data_base64"].as_str()) {
                        (Value::String(s), _) => s.clone(),
                        (Value::Null, Some(b)) => format!("(binary, base64) {b}"),
                        (other, _) => other.to_string(),
                    };
                    format!(
                        "[{}/{}@{}] {}",
                        a.topic, v["shoalpartition"], v["shoaloffset"], payload
                    )
                };
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            if let Some(ack) = v["ackid"].as_str() {
                let reply = client
                    .post_json(
                        &format!("/v1/subscriptions/{name}/acks"),
                        &json!({"ack": [ack]}),
                    )
                    .await?;
                if !reply.status.is_success() {
                    eprintln!("shoal: ack failed: {}", api_error(&reply));
                }
            }
            seen += 1;
            if a.count.is_some_and(|n| seen >= n) {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    Ok(fail("the agent closed the stream"))
}

async fn status(client: &AgentClient) -> Result<ExitCode, ClientError> {
    let reply = client.get("/v1/cluster").await?;
    if !reply.status.is_success() {
        return Ok(fail(api_error(&reply)));
    }
    let v = reply.json();
    if v["mesh"] != json!(true) {
        println!("mesh off: this agent runs alone (start it with --dev to join other agents)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} at {} ({})",
        v["id"].as_str().unwrap_or(""),
        v["addr"].as_str().unwrap_or(""),
        if v["joined"] == json!(true) {
            "joined"
        } else {
            "not joined yet"
        }
    );
    if let Some(message) = v["name_conflict"]["message"].as_str() {
        println!("REFUSED: {message}");
    }
    println!(
        "{:<24} {:<22} {:<8} {:>7}  partitions",
        "MEMBER", "ADDRESS", "STATE", "BROKER"
    );
    let departed: Vec<&str> = v["departed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for m in v["members"].as_array().into_iter().flatten() {
        let node = m["node"].as_str().unwrap_or("");
        let state = if departed.contains(&node) {
            "left"
        } else {
            m["state"].as_str().unwrap_or("")
        };
        let parts: Vec<&str> = m["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "{:<24} {:<22} {:<8} {:>7}  {}",
            format!(
                "{}{}",
                m["node"].as_str().unwrap_or(""),
                if m["self"] == json!(true) {
                    " (this)"
                } else {
                    ""
                }
            ),
            m["addr"].as_str().unwrap_or(""),
            state,
            if m["broker"] == json!(true) {
                "yes"
            } else {
                "no"
            },
            if parts.is_empty() {
                "-".to_string()
            } else {
                parts.join(" ")
            }
        );
    }
    let unavailable: Vec<&str> = v["unavailable"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !unavailable.is_empty() {
        println!(
            "unavailable until their home returns: {}",
            unavailable.join(" ")
        );
    }
    for g in v["groups"].as_array().into_iter().flatten() {
        let parts: Vec<String> = g["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p.to_string())
            .collect();
        println!(
            "group {} on {}: this agent reads partitions {}",
            g["group"].as_str().unwrap_or(""),
            g["topic"].as_str().unwrap_or(""),
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join(",")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn topics(client: &AgentClient, a: TopicsArgs) -> Result<ExitCode, ClientError> {
    match a.action {
        None => {
            let reply = client.get("/v1/topics").await?;
            if !reply.status.is_success() {
                return Ok(fail(api_error(&reply)));
            }
            let v = reply.json();
            let topics = v["topics"].as_array().cloned().unwrap_or_default();
            if topics.is_empty() {
                println!("no topics yet; publish one with: shoal pub <topic> <message>");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<32} {:>10} {:>10} {:>12} {:>12}  subscriptions",
                "TOPIC", "KIND", "PARTITIONS", "MESSAGES", "BYTES"
            );
            for t in topics {
                let parts = t
                    .pointer("/stats/partitions")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let messages: u64 = parts
                    .iter()
                    .map(|p| {
                        p["nextOffset"]
                            .as_u64()
                            .unwrap_or(1)
                            .saturating_sub(p["firstOffset"].as_u64().unwrap_or(1))
                    })
                    .sum();
                let bytes: u64 = parts.iter().map(|p| p["bytes"].as_u64().unwrap_or(0)).sum();
                let subs: Vec<String> = t["subscriptions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect();
                println!(
                    "{:<32} {:>10} {:>10} {:>12} {:>12}  {}",
                    t["name"].as_str().unwrap_or(""),
                    t["kind"].as_str().unwrap_or(""),
                    t["partitions"],
                    messages,
                    bytes,
                    subs.join(",")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(TopicsAction::Create {
            name,
            partitions,
            replicas,
            ephemeral,
            retention_age,
            fsync,
        }) => {
            let mut spec = json!({});
            if let Some(p) = partitions {
                spec["partitions"] = json!(p);
            }
            if let Some(r) = replicas {
                spec["replicas"] = json!(r);
            }
            if ephemeral {
                spec["kind"] = json!("ephemeral");
            }
            if let Some(age) = retention_age {
                spec["retention"] = json!({"maxAge": age});
            }
            if let Some(f) = fsync {
                spec["fsync"] = json!(f);
            }
            let reply = client
                .put_json(&format!("/v1/topics/{name}"), &spec)
                .await?;
            if !reply.status.is_success() {
                return Ok(fail(api_error(&reply)));
            }
            let v = reply.json();
            println!(
                "topic {name} {}: {} partitions, {}",
                if reply.status.as_u16() == 201 {
                    "created"
                } else {
                    "updated"
                },
                v["partitions"],
                v["kind"].as_str().unwrap_or("")
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(TopicsAction::Delete { name }) => {
            let reply = client
                .call(
                    Method::DELETE,
                    &format!("/v1/topics/{name}"),
                    &[],
                    Bytes::new(),
                )
                .await?;
            if !reply.status.is_success() {
                return Ok(fail(api_error(&reply)));
            }
            println!("topic {name} deleted");
            Ok(ExitCode::SUCCESS)
        }
    }
}
