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
    #[command(subcommand)]
    command: Command,
}

/// Where the agent is: only on the commands that talk to one.
#[derive(Args, Debug)]
struct Conn {
    /// The agent's app API, such as http://127.0.0.1:4700 or localhost:4700.
    #[arg(long, env = "SHOAL_URL", default_value = DEFAULT_URL)]
    url: String,
}

impl Conn {
    /// A client for the agent, after checking the URL.
    fn client(&self) -> Result<AgentClient, String> {
        agent_url(&self.url).map(|u| AgentClient::new(&u))
    }
}

/// The agent's base URL from what a person typed: `localhost:4700` and
/// `127.0.0.1:4700` mean `http://...`; the app API is plain HTTP on
/// loopback, so `https://` and paths are refused with a reason.
fn agent_url(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e| format!("--url {raw:?} is not a URL ({e}); try http://127.0.0.1:4700"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "--url {raw:?}: the agent's app API speaks plain http on loopback, not {other}"
            ))
        }
        None => return Err(format!("--url {raw:?} has no scheme; try http://{raw}")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!(
            "--url {raw:?} names no host; try http://127.0.0.1:4700"
        ));
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "--url {raw:?}: give the agent's address only (http://host:port), not a path"
        ));
    }
    Ok(format!("http://{authority}"))
}

/// Checks a topic, subscription or group name with the agent's own rule,
/// before anything is sent (a name with `/` or a space would otherwise
/// become another path or a bad request line). Topics and groups may be
/// another namespace's full name (`shop:orders`); the agent decides whose
/// a plain name is.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let checked = if what == "subscription" {
        shoal_agent::names::validate(what, name)
    } else {
        shoal_agent::names::qualify(what, shoal_agent::names::DEFAULT_NAMESPACE, name).map(drop)
    };
    checked.map_err(|e| e.message)
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
    Status(StatusArgs),
    /// Add the agent sidecar to Kubernetes YAML or JSON, offline (as the webhook would).
    Inject(inject::InjectArgs),
    /// Start a local mesh of agents on loopback (three by default), each its own process; Ctrl-C stops them.
    Dev(dev::DevArgs),
    /// Run one agent, as `shoal-agent` does (the agents of `shoal dev`).
    #[command(hide = true)]
    Agent(Box<dev::AgentArgs>),
}

#[derive(Args, Debug)]
struct PubArgs {
    #[command(flatten)]
    conn: Conn,
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
    #[command(flatten)]
    conn: Conn,
    /// Topic.
    topic: String,
    /// Consumer group: subscribers in one group share the messages.
    #[arg(long, short)]
    group: Option<String>,
    /// Subscription name; with one, the subscription stays after exit and resumes where it stopped.
    #[arg(long)]
    name: Option<String>,
    /// Where a new group starts: earliest, latest, an offset (like 42) or a
    /// time (RFC 3339, like 2026-12-06T10:00:00Z: the first message at or
    /// after it). A group with committed offsets resumes from them.
    #[arg(long, default_value = "latest", value_parser = parse_start)]
    from: Value,
    /// Stop after this many messages (at least 1; without it, run until Ctrl-C).
    #[arg(long, short = 'n', value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Print each message as its CloudEvents JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct TopicsArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    action: Option<TopicsAction>,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
}

/// `--from` as the subscription's `start`.
fn parse_start(s: &str) -> Result<Value, String> {
    match s {
        "earliest" | "latest" => Ok(json!(s)),
        _ if s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<u64>()
            .map(|n| json!({ "offset": n }))
            .map_err(|e| format!("offset {s:?}: {e}")),
        _ => shoal_agent::time::parse_rfc3339_ms(s)
            .map(|_| json!({ "time": s }))
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a start position: earliest, latest, an offset (42) or an RFC 3339 time (2026-12-06T10:00:00Z, 2026-12-06T12:00:00+02:00)"
                )
            }),
    }
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
        /// Replicas of each partition: 2 or more make each partition a Raft group of that many agents (in a mesh).
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

/// Bad arguments found before anything was sent (a name, a URL): exit 2,
/// as for the arguments the parser refuses.
fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("shoal: {message}");
    ExitCode::from(2)
}

/// A success that is not what a Shoal agent answers: something else listens there.
fn not_shoal(client: &AgentClient, reply: &Reply) -> String {
    let mut body = reply.text();
    body.truncate(200);
    format!(
        "{} answered {} but not as a Shoal agent does (body: {body:?}); is --url the agent's app API?",
        client.base(),
        reply.status
    )
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

/// `shoal status | head` closes the pipe early: `println!` then panics
/// with "failed printing to stdout". Like a C tool killed by SIGPIPE, the
/// CLI exits quietly instead (status 141), without a backtrace.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    match cli.command {
        Command::Inject(a) => inject::run(a),
        // The agent builds its own runtime, as shoal-agent does.
        Command::Agent(a) => dev::run_agent(*a),
        Command::Dev(a) => block_on(dev::run(a)),
        Command::Pub(a) => with_client(a.conn.client(), |c| async move {
            if let Err(e) = check_name("topic", &a.topic) {
                return Ok(usage(e));
            }
            publish(&c, a).await
        }),
        Command::Sub(a) => with_client(a.conn.client(), |c| async move {
            for (what, name) in [
                ("topic", Some(&a.topic)),
                ("group", a.group.as_ref()),
                ("subscription", a.name.as_ref()),
            ] {
                if let Some(Err(e)) = name.map(|n| check_name(what, n)) {
                    return Ok(usage(e));
                }
            }
            subscribe(&c, a).await
        }),
        Command::Topics(a) => with_client(a.conn.client(), |c| async move {
            let name = match &a.action {
                Some(TopicsAction::Create { name, .. } | TopicsAction::Delete { name }) => {
                    Some(name)
                }
                None => None,
            };
            if let Some(Err(e)) = name.map(|n| check_name("topic", n)) {
                return Ok(usage(e));
            }
            topics(&c, a).await
        }),
        Command::Status(a) => with_client(a.conn.client(), |c| async move { status(&c).await }),
    }
}

/// Runs a command that talks to the agent at `conn`.
fn with_client<F, Fut>(conn: Result<AgentClient, String>, command: F) -> ExitCode
where
    F: FnOnce(AgentClient) -> Fut,
    Fut: Future<Output = Result<ExitCode, ClientError>>,
{
    match conn {
        Ok(client) => block_on(async move { outcome(command(client).await) }),
        Err(e) => usage(e),
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
    let (Some(partition), Some(offset)) = (v["partition"].as_u64(), v["offset"].as_u64()) else {
        return Ok(fail(not_shoal(client, &reply)));
    };
    println!(
        "published to {}/{} at offset {} (id {}){}",
        v["topic"].as_str().unwrap_or(&a.topic),
        partition,
        offset,
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
    let path = format!("/v1/subscriptions/{name}");
    let reply = client.put_json(&path, &spec).await?;
    if !reply.status.is_success() {
        return Ok(fail(api_error(&reply)));
    }
    // The agent's answer has the full names (`shop:orders`, `shop:workers`).
    let declared = reply.json();
    eprintln!(
        "subscribed to {} as {} (group {}); Ctrl-C to stop",
        declared["topic"].as_str().unwrap_or(&a.topic),
        name,
        declared["group"]
            .as_str()
            .unwrap_or(a.group.as_deref().unwrap_or(&name))
    );
    let outcome = tokio::select! {
        r = follow(client, &path, &spec, &a) => r,
        _ = shoal_agent::run::signal() => Ok(ExitCode::SUCCESS),
    };
    if temporary {
        let _ = client.call(Method::DELETE, &path, &[], Bytes::new()).await;
    }
    outcome
}

/// First wait before reconnecting to an agent that went away.
const RECONNECT_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
/// Longest wait between reconnection attempts.
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// How one stream ended.
enum StreamEnd {
    /// Done: the count was reached, or the agent refused for good.
    Done(ExitCode),
    /// The agent went away (restarted, stopped, not ready): try again.
    Lost(String),
}

/// Prints the subscription's stream, reconnecting with backoff when the
/// agent goes away (a restart of the sidecar, say): the subscription is
/// declared again (the same PUT) and delivery resumes from the group's
/// committed offsets, so a message is printed at least once.
async fn follow(
    client: &AgentClient,
    path: &str,
    spec: &Value,
    a: &SubArgs,
) -> Result<ExitCode, ClientError> {
    let mut seen = 0u64;
    let mut wait = RECONNECT_FIRST;
    loop {
        let lost = match print_stream(client, path, a, &mut seen, &mut wait).await {
            Ok(StreamEnd::Done(code)) => return Ok(code),
            Ok(StreamEnd::Lost(why)) => why,
            Err(e) => e.to_string(),
        };
        eprintln!(
            "shoal: {lost}; reconnecting in {}",
            humantime::format_duration(wait)
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RECONNECT_MAX);
        match client.put_json(path, spec).await {
            Ok(r) if r.status.is_success() => {}
            Ok(r) if r.status.is_client_error() => return Ok(fail(api_error(&r))),
            Ok(_) | Err(_) => {}
        }
    }
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
    path: &str,
    a: &SubArgs,
    seen: &mut u64,
    wait: &mut std::time::Duration,
) -> Result<StreamEnd, ClientError> {
    let resp = client
        .send(Method::GET, &format!("{path}/events"), &[], Bytes::new())
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let reply = Reply {
            status,
            headers: Default::default(),
            body,
        };
        return Ok(if status.is_server_error() {
            StreamEnd::Lost(api_error(&reply))
        } else {
            StreamEnd::Done(fail(api_error(&reply)))
        });
    }
    *wait = RECONNECT_FIRST;
    let mut body = resp.into_body();
    let mut buf = String::new();
    let stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Ok(StreamEnd::Lost("the stream broke".into()));
        };
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
                return Ok(StreamEnd::Done(fail(
                    v.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("stream error"),
                )));
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
            // Printed is seen, whatever happens to the ack: a lost ack means
            // the message comes again (at least once), not that `sub` stops
            // counting or gives up the stream.
            *seen += 1;
            if let Some(ack) = v["ackid"].as_str() {
                match client
                    .post_json(&format!("{path}/acks"), &json!({"ack": [ack]}))
                    .await
                {
                    Ok(reply) if reply.status.is_success() => {}
                    Ok(reply) => eprintln!("shoal: ack failed: {}", api_error(&reply)),
                    Err(e) => eprintln!("shoal: ack failed: {e}"),
                }
            }
            if a.count.is_some_and(|n| *seen >= n) {
                return Ok(StreamEnd::Done(ExitCode::SUCCESS));
            }
        }
    }
    Ok(StreamEnd::Lost("the agent closed the stream".into()))
}

/// The Raft groups this agent holds a replica of (replicated partitions and
/// the mesh's meta group), as `GET /v1/cluster` lists them.
fn print_replicas(v: &Value) {
    let groups: Vec<&Value> = v["replicated"].as_array().into_iter().flatten().collect();
    if groups.is_empty() {
        return;
    }
    let names = |field: &Value| -> String {
        let list: Vec<&str> = field
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if list.is_empty() {
            "-".into()
        } else {
            list.join(",")
        }
    };
    println!(
        "{:<28} {:<16} {:>6} {:>9}  {:<34} state",
        "REPLICA HELD HERE", "LEADER", "TERM", "COMMIT", "VOTERS (LEARNERS)"
    );
    for g in groups {
        let namespace = g["namespace"].as_str().unwrap_or("");
        let name = if namespace == "shoal-system" {
            format!("{namespace}/{}", g["topic"].as_str().unwrap_or(""))
        } else {
            format!(
                "{}/{}",
                g["topic"].as_str().unwrap_or(""),
                g["partition"].as_u64().unwrap_or(0)
            )
        };
        let learners = names(&g["learners"]);
        let voters = if learners == "-" {
            names(&g["voters"])
        } else {
            format!("{} ({learners})", names(&g["voters"]))
        };
        let lag: Vec<String> = g["lag"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
            .map(|(node, n)| format!("{node} {n} behind"))
            .collect();
        let mut state = Vec::new();
        if g["leader"].is_null() {
            state.push("NO LEADER".to_string());
        }
        if g["recovering"] == json!(true) {
            state.push("recovering".to_string());
        }
        if g["hibernating"] == json!(true) {
            state.push("idle".to_string());
        }
        state.extend(lag);
        println!(
            "{:<28} {:<16} {:>6} {:>9}  {:<34} {}",
            name,
            g["leader"].as_str().unwrap_or("-"),
            g["term"].as_u64().unwrap_or(0),
            g["commitIndex"].as_u64().unwrap_or(0),
            voters,
            if state.is_empty() {
                "ok".to_string()
            } else {
                state.join(", ")
            }
        );
    }
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
        if !v["name_conflict"].is_null() {
            "refused: its node name is taken"
        } else if v["joined"] == json!(true) {
            "joined"
        } else {
            "not joined yet"
        }
    );
    let refused = v["name_conflict"]["message"].as_str().map(str::to_owned);
    if let Some(message) = &refused {
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
            "unavailable now (home or leader down, or no leader yet): {}",
            unavailable.join(" ")
        );
    }
    print_replicas(&v);
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
    // A refused agent serves nothing: a script checking `shoal status` sees it.
    Ok(if refused.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
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
            let mut not_from_home = 0usize;
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
                // In a mesh each partition's figures are its home's; "local"
                // ones are this agent's copy, its home could not be asked.
                let local = parts.iter().filter(|p| p["source"] == "local").count();
                not_from_home += local;
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
                    format!("{messages}{}", if local > 0 { "*" } else { "" }),
                    bytes,
                    subs.join(",")
                );
            }
            if not_from_home > 0 {
                println!(
                    "* {not_from_home} partition{} counted from this agent's copy: {} home could not be asked (down or not answering; see shoal status)",
                    if not_from_home == 1 { "" } else { "s" },
                    if not_from_home == 1 { "its" } else { "their" }
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
            let replicas = v["replicas"].as_u64().unwrap_or(0);
            println!(
                "topic {name} {}: {} partitions, {}{}",
                if reply.status.as_u16() == 201 {
                    "created"
                } else {
                    "updated"
                },
                v["partitions"],
                v["kind"].as_str().unwrap_or(""),
                if replicas >= 2 {
                    format!(", {replicas} replicas each (in a mesh)")
                } else {
                    String::new()
                }
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
