//! Topics and the mesh: list, read, create or change, delete; `/v1/cluster`.

use super::{
    json_response, no_content, parse_json, read_body, AppBody, AppState, Body, MAX_JSON_BYTES,
};
use crate::error::ApiError;
use crate::topic::TopicSpec;
use http::{Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

/// A topic's configuration, subscriptions and figures. In a mesh the
/// figures of each partition are its home's ([`Router::topics_stats`]), with
/// `home` and `source` (`home`, or `local` when the home could not be asked).
///
/// [`Router::topics_stats`]: crate::router::Router::topics_stats
async fn topics_json(state: &AppState, topics: &[Arc<crate::topic::Topic>]) -> Vec<Value> {
    let figures = match &state.router {
        Some(r) => r.topics_stats(topics).await,
        None => Vec::new(),
    };
    topics
        .iter()
        .enumerate()
        .map(|(i, topic)| {
            let partitions: Vec<Value> = match figures.get(i) {
                Some(f) => f
                    .iter()
                    .map(|f| {
                        let mut p = stats_json(&f.stats);
                        if let Value::Object(o) = &mut p {
                            o.insert("home".into(), f.home.clone().into());
                            o.insert(
                                "source".into(),
                                if f.from_home { "home" } else { "local" }.into(),
                            );
                        }
                        p
                    })
                    .collect(),
                None => topic
                    .partitions()
                    .iter()
                    .map(|p| stats_json(&crate::router::local_stats(p)))
                    .collect(),
            };
            let mut v = serde_json::to_value(topic.config()).unwrap_or_else(|_| json!({}));
            if let Value::Object(o) = &mut v {
                o.insert("name".into(), topic.name.to_string().into());
                o.insert(
                    "subscriptions".into(),
                    state.subs.uses_topic(&topic.name).into(),
                );
                o.insert("stats".into(), json!({"partitions": partitions}));
                // The Raft groups of this topic this agent holds a replica
                // of: leader, term, commit index, voters, followers' lag.
                if let Some(r) = &state.router {
                    let held: Vec<_> = r
                        .replica_view()
                        .into_iter()
                        .filter(|g| {
                            g.topic == *topic.name && g.namespace == crate::topic::TOPIC_NAMESPACE
                        })
                        .collect();
                    if !held.is_empty() {
                        o.insert("replication".into(), json!(held));
                    }
                }
            }
            v
        })
        .collect()
}

async fn topic_json(state: &AppState, topic: &Arc<crate::topic::Topic>) -> Value {
    topics_json(state, std::slice::from_ref(topic))
        .await
        .pop()
        .unwrap_or_else(|| json!({}))
}

fn stats_json(s: &shoal_proto::PartitionStats) -> Value {
    json!({
        "partition": s.partition,
        "firstOffset": s.first_offset,
        "nextOffset": s.next_offset,
        "bytes": s.bytes,
        "segments": s.segments,
    })
}

/// The cluster as this agent sees it, and the partitions each member is home to.
pub(super) fn cluster(state: &AppState) -> Response<Body> {
    let Some(mesh) = &state.mesh else {
        return json_response(
            StatusCode::OK,
            &json!({"mesh": false, "joined": true, "members": [], "note": "mesh off: start the agent with --dev to join other agents"}),
        );
    };
    let view = mesh.view();
    let mut homes: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut unavailable = Vec::new();
    let partitions = state
        .router
        .as_ref()
        .map(|r| r.partition_view())
        .unwrap_or_default();
    for p in &partitions {
        homes
            .entry(p.home.clone())
            .or_default()
            .push(format!("{}/{}", p.topic, p.partition));
        if !p.available {
            unavailable.push(format!("{}/{}", p.topic, p.partition));
        }
    }
    let departed = state
        .router
        .as_ref()
        .map(|r| r.departed())
        .unwrap_or_default();
    let mut local_groups: Vec<(String, String)> = state
        .subs
        .list()
        .into_iter()
        .map(|s| (s.topic, s.group))
        .collect();
    local_groups.sort();
    local_groups.dedup();
    let groups: Vec<Value> = local_groups
        .into_iter()
        .map(|(topic, group)| {
            let count = state
                .broker
                .topic(&topic)
                .map_or(0, |t| t.partition_count());
            let read = state
                .router
                .as_ref()
                .map(|r| r.assigned(&topic, &group, count))
                .unwrap_or_default();
            json!({"topic": topic, "group": group, "partitions": read})
        })
        .collect();
    let describe = |m: &crate::mesh::MemberView, me: bool| {
        let mut v = serde_json::to_value(m).unwrap_or_else(|_| json!({}));
        if let Value::Object(o) = &mut v {
            o.insert("self".into(), me.into());
            o.insert(
                "partitions".into(),
                homes.get(&m.node).cloned().unwrap_or_default().into(),
            );
        }
        v
    };
    let name_conflict = view
        .name_conflict
        .as_ref()
        .map(|c| json!({"node": c.node, "holder": c.holder, "message": c.message()}));
    let members: Vec<Value> = view
        .me
        .iter()
        .map(|m| describe(m, true))
        .chain(view.members.iter().map(|m| describe(m, false)))
        .collect();
    let replicated = state
        .router
        .as_ref()
        .map(|r| r.replica_view())
        .unwrap_or_default();
    json_response(
        StatusCode::OK,
        &json!({"mesh": true, "id": mesh.id.to_string(), "addr": mesh.advertised, "bound": mesh.local_addr, "joined": view.joined, "members": members, "departed": departed, "unavailable": unavailable, "groups": groups, "name_conflict": name_conflict, "replicated": replicated}),
    )
}

pub(super) async fn list_topics(state: &AppState) -> Response<Body> {
    // Every topic's homes are asked at once: one slow home delays the answer
    // by at most one call's timeout, not one per topic.
    let topics = topics_json(state, &state.broker.topics()).await;
    json_response(StatusCode::OK, &json!({"topics": topics}))
}

pub(super) async fn get_topic(state: &AppState, name: &str) -> Result<Response<Body>, ApiError> {
    let name = &state.broker.full_topic_name(name)?;
    let topic = state
        .broker
        .topic(name)
        .ok_or_else(|| ApiError::not_found("topic_not_found", format!("no topic {name:?}")))?;
    Ok(json_response(
        StatusCode::OK,
        &topic_json(state, &topic).await,
    ))
}

pub(super) async fn put_topic<B: AppBody>(
    state: &AppState,
    name: &str,
    req: Request<B>,
) -> Result<Response<Body>, ApiError> {
    let name = &state.broker.full_topic_name(name)?;
    state.broker.may_configure(name)?;
    let (parts, body) = read_body(req, MAX_JSON_BYTES).await?;
    let spec: TopicSpec = parse_json(&parts.headers, &body, true)?;
    let (topic, created) = state.broker.put_topic(name, &spec)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(status, &topic_json(state, &topic).await))
}

pub(super) fn delete_topic(state: &AppState, name: &str) -> Result<Response<Body>, ApiError> {
    let name = &state.broker.full_topic_name(name)?;
    state.broker.may_configure(name)?;
    let users = state.subs.uses_topic(name);
    if !users.is_empty() {
        return Err(ApiError::conflict(
            "topic_in_use",
            format!("topic {name:?} has subscriptions {users:?}; delete them first"),
        ));
    }
    state.broker.delete_topic(name)?;
    Ok(no_content())
}
