//! Namespaces as tenants: which namespace may do what with a topic.
//!
//! A topic belongs to the namespace in its full name
//! ([`crate::names::namespace_of`]). Agents of that namespace may do
//! anything with it; another namespace may publish to it (or send requests)
//! and subscribe to it only where the topic's configuration grants it, and
//! may never create, configure or delete it. A consumer group belongs to the
//! namespace of the apps that read with it, and only that namespace's agents
//! read or move its offsets.
//!
//! The namespace asking is the app's own (on the app API) or the one in the
//! peer's certificate (on the mesh), never a name inside a message. Grants
//! come from the topic's configuration, which agents accept only from agents
//! of the topic's own namespace (see [`may_configure`]).

use crate::error::ApiError;
use crate::names::{namespace_of, validate_namespace};
use http::StatusCode;
use serde::{Deserialize, Serialize};

/// The grant entry that stands for every namespace.
pub const EVERY_NAMESPACE: &str = "*";
/// Most namespaces one grant list may name.
pub const MAX_GRANTEES: usize = 256;

/// What other namespaces may do with a topic. Empty: nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grants {
    /// Namespaces whose apps may publish to the topic and send requests on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// Namespaces whose apps may subscribe to the topic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<String>,
}

impl Grants {
    /// Whether nothing is granted.
    pub fn is_empty(&self) -> bool {
        self.publish.is_empty() && self.subscribe.is_empty()
    }

    /// Checks every entry: a namespace or `*`, at most [`MAX_GRANTEES`] each.
    pub fn validate(&self) -> Result<(), ApiError> {
        for (what, list) in [("publish", &self.publish), ("subscribe", &self.subscribe)] {
            if list.len() > MAX_GRANTEES {
                return Err(ApiError::bad_request(
                    "invalid_config",
                    format!("grants.{what} names more than {MAX_GRANTEES} namespaces"),
                ));
            }
            for ns in list {
                if ns != EVERY_NAMESPACE {
                    validate_namespace(ns).map_err(|e| {
                        ApiError::bad_request(
                            "invalid_config",
                            format!("grants.{what}: {}", e.message),
                        )
                    })?;
                }
            }
        }
        Ok(())
    }

    fn list(&self, action: Action) -> &[String] {
        match action {
            Action::Publish => &self.publish,
            Action::Subscribe => &self.subscribe,
        }
    }
}

/// What a namespace asks to do with a topic it may not own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Publish, or send a request.
    Publish,
    /// Subscribe: read partitions and move a consumer group's offsets.
    Subscribe,
}

impl Action {
    /// The word used in grants and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
        }
    }
}

/// 403 `forbidden`.
pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// Whether namespace `ns` may `action` on `topic` (a full name), given the
/// topic's grants (`None`: the topic is not known here, so nothing is granted).
pub fn authorize(
    ns: &str,
    topic: &str,
    grants: Option<&Grants>,
    action: Action,
) -> Result<(), ApiError> {
    let owner = namespace_of(topic);
    if ns == owner {
        return Ok(());
    }
    let list = grants.map_or(&[][..], |g| g.list(action));
    if list.iter().any(|g| g == ns || g == EVERY_NAMESPACE) {
        return Ok(());
    }
    let verb = action.as_str();
    Err(forbidden(format!(
        "namespace {ns} may not {verb} on topic {topic}: it belongs to namespace {owner}, which has not granted it (the owner adds {ns:?} to the topic's grants.{verb})"
    )))
}

/// Whether namespace `ns` may create, configure or delete `topic`: only its own.
pub fn may_configure(ns: &str, topic: &str) -> Result<(), ApiError> {
    let owner = namespace_of(topic);
    if ns == owner {
        Ok(())
    } else {
        Err(forbidden(format!(
            "namespace {ns} may not create, configure or delete topic {topic}: only namespace {owner} may"
        )))
    }
}

/// Whether namespace `ns` may read with or move the offsets of consumer
/// group `group` (a full name): only its own.
pub fn may_use_group(ns: &str, group: &str) -> Result<(), ApiError> {
    let owner = namespace_of(group);
    if ns == owner {
        Ok(())
    } else {
        Err(forbidden(format!(
            "namespace {ns} may not use consumer group {group}: it belongs to namespace {owner}"
        )))
    }
}

#[cfg(test)]
mod tests;
