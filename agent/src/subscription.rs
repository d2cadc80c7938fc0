//! Subscriptions: what an app declares to receive a topic's messages.

use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the `no_app_port` error tells to do instead of the agent's own flags,
/// set once by a program that runs the agent for its user (`shoal dev`
/// names its own `--app-port`).
static NO_APP_PORT_HINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the message of the `no_app_port` error, once, for the whole process.
pub fn set_no_app_port_message(message: String) {
    let _ = NO_APP_PORT_HINT.set(message);
}

/// Default time an app has to acknowledge a delivery.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Default most unacknowledged messages per subscription.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;
/// Largest allowed `maxInFlight`.
pub const MAX_MAX_IN_FLIGHT: u32 = 10_000;
/// Default first retry delay.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Default longest retry delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Longest allowed retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Shortest allowed ack timeout.
pub const MIN_ACK_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest allowed ack timeout.
pub const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where a new consumer group starts reading a partition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartPosition {
    /// The oldest stored message.
    Earliest,
    /// Only messages published after the subscription exists.
    #[default]
    Latest,
    /// A given offset (clamped to what is stored).
    Offset(u64),
    /// The first message published at or after an RFC 3339 time.
    Time(String),
}

/// Retry delays: exponential from `initial` to `max`, with full jitter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// First retry delay.
    #[serde(with = "crate::time::serde_duration")]
    pub initial: Duration,
    /// Longest retry delay.
    #[serde(with = "crate::time::serde_duration")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: DEFAULT_BACKOFF_INITIAL,
            max: DEFAULT_BACKOFF_MAX,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempts + 1`, given a jitter fraction in [0, 1).
    pub fn delay(&self, attempts: u32, jitter: f64) -> Duration {
        let exp = 2u32.saturating_pow(attempts.saturating_sub(1).min(30));
        let ceiling = self.initial.saturating_mul(exp).min(self.max);
        // Half fixed, half jittered: never zero, never in lockstep.
        ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// A subscription as declared (request body of `PUT /v1/subscriptions/{name}`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// Subscription name (only in `--subscriptions`; the API takes it from the path).
    #[serde(default)]
    pub name: Option<String>,
    /// Topic.
    pub topic: String,
    /// Consumer group (default: the subscription's name).
    #[serde(default)]
    pub group: Option<String>,
    /// Push to this path on the app's port; absent for pull and stream.
    #[serde(default)]
    pub push_path: Option<String>,
    /// Where a new group starts.
    #[serde(default)]
    pub start: Option<StartPosition>,
    /// Time to acknowledge a delivery.
    #[serde(default, with = "crate::time::serde_opt_duration")]
    pub ack_timeout: Option<Duration>,
    /// Deliveries before dead-lettering (0: unlimited).
    #[serde(default)]
    pub max_deliveries: Option<u32>,
    /// Retry delays.
    #[serde(default, deserialize_with = "crate::json_object::optional")]
    pub backoff: Option<Backoff>,
    /// Topic that receives messages that could not be delivered.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Most unacknowledged messages at once.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Strict order per partition: one message of a partition in flight at a time.
    #[serde(default)]
    pub ordered: Option<bool>,
}

/// A subscription as stored and answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    /// Name.
    pub name: String,
    /// Topic.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Push path, or null for pull and stream.
    pub push_path: Option<String>,
    /// Where a new group starts.
    pub start: StartPosition,
    /// Time to acknowledge a delivery.
    #[serde(with = "crate::time::serde_duration")]
    pub ack_timeout: Duration,
    /// Deliveries before dead-lettering (0: unlimited).
    pub max_deliveries: u32,
    /// Retry delays.
    pub backoff: Backoff,
    /// Dead-letter topic.
    pub dead_letter_topic: Option<String>,
    /// Most unacknowledged messages at once.
    pub max_in_flight: u32,
    /// Strict order per partition.
    pub ordered: bool,
}

impl Subscription {
    /// Validates a spec into a subscription; `previous` is the existing one, if any.
    pub fn from_spec(
        name: &str,
        spec: SubscriptionSpec,
        previous: Option<&Subscription>,
        app_port: Option<u16>,
    ) -> Result<Subscription, ApiError> {
        crate::names::validate("subscription", name)?;
        crate::names::validate_full("topic", &spec.topic)?;
        let group = spec.group.unwrap_or_else(|| name.to_string());
        crate::names::validate_full("group", &group)?;
        if let Some(path) = &spec.push_path {
            if !path.starts_with('/') || path.len() > 1024 || !path.bytes().all(push_path_byte) {
                return Err(ApiError::bad_request(
                    "invalid_subscription",
                    "pushPath must be a URL path (and query) starting with /, at most 1024 characters of A-Z a-z 0-9 - . _ ~ ! $ & ' ( ) * + , ; = : @ / % ? (percent-encode others)",
                ));
            }
            if app_port.is_none() {
                return Err(ApiError::bad_request(
                    "no_app_port",
                    NO_APP_PORT_HINT.get().map_or(
                        "push subscriptions need the agent's --app-port (SHOAL_APP_PORT, or the shoal.io/app-port annotation)",
                        String::as_str,
                    ),
                ));
            }
        }
        if let Some(dlq) = &spec.dead_letter_topic {
            crate::names::validate_full("dead-letter topic", dlq)?;
            if dlq == &spec.topic {
                return Err(ApiError::bad_request(
                    "invalid_subscription",
                    "deadLetterTopic must differ from the subscription's topic",
                ));
            }
        }
        let ack_timeout = spec.ack_timeout.unwrap_or(DEFAULT_ACK_TIMEOUT);
        if !(MIN_ACK_TIMEOUT..=MAX_ACK_TIMEOUT).contains(&ack_timeout) {
            return Err(ApiError::bad_request(
                "invalid_subscription",
                "ackTimeout must be between 100ms and 1h",
            ));
        }
        let max_in_flight = spec.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        if max_in_flight == 0 || max_in_flight > MAX_MAX_IN_FLIGHT {
            return Err(ApiError::bad_request(
                "invalid_subscription",
                format!("maxInFlight must be 1..={MAX_MAX_IN_FLIGHT}"),
            ));
        }
        let backoff = spec.backoff.unwrap_or_default();
        if backoff.initial.is_zero() || backoff.max < backoff.initial || backoff.max > MAX_BACKOFF {
            return Err(ApiError::bad_request(
                "invalid_subscription",
                "backoff.initial must be positive and at most backoff.max, which is at most 1h",
            ));
        }
        let start = spec.start.unwrap_or_default();
        if let StartPosition::Time(t) = &start {
            if crate::time::parse_rfc3339_ms(t).is_none() {
                return Err(ApiError::bad_request(
                    "invalid_subscription",
                    format!("start time {t:?} is not an RFC 3339 time"),
                ));
            }
        }
        let sub = Subscription {
            name: name.to_string(),
            topic: spec.topic,
            group,
            push_path: spec.push_path,
            start,
            ack_timeout,
            max_deliveries: spec.max_deliveries.unwrap_or(0),
            backoff,
            dead_letter_topic: spec.dead_letter_topic,
            max_in_flight,
            ordered: spec.ordered.unwrap_or(false),
        };
        if let Some(prev) = previous {
            if prev.topic != sub.topic || prev.group != sub.group {
                return Err(ApiError::conflict(
                    "subscription_exists",
                    format!(
                        "subscription {name:?} exists for topic {:?} group {:?}; its topic and group cannot change (delete it first)",
                        prev.topic, prev.group
                    ),
                ));
            }
        }
        Ok(sub)
    }
}

/// Whether a byte may appear unencoded in a push path: RFC 3986's
/// unreserved and sub-delims characters, `:`, `@`, `/`, `%` and `?` (a
/// query). Anything else would not make a valid request line.
fn push_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%?".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(200));
        assert_eq!(b.delay(2, 1.0), Duration::from_millis(400));
        assert_eq!(b.delay(30, 1.0), Duration::from_secs(60));
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(100));
    }

    #[test]
    fn validation() {
        let spec = |json: &str| serde_json::from_str::<SubscriptionSpec>(json).unwrap();
        let ok = Subscription::from_spec("s", spec(r#"{"topic":"t"}"#), None, None).unwrap();
        assert_eq!(ok.group, "s");
        assert_eq!(ok.start, StartPosition::Latest);
        let push = spec(r#"{"topic":"t","pushPath":"/x"}"#);
        assert_eq!(
            Subscription::from_spec("s", push.clone(), None, None)
                .unwrap_err()
                .code,
            "no_app_port"
        );
        assert!(Subscription::from_spec("s", push, None, Some(8080)).is_ok());
        let other = spec(r#"{"topic":"u"}"#);
        assert_eq!(
            Subscription::from_spec("s", other, Some(&ok), None)
                .unwrap_err()
                .status
                .as_u16(),
            409
        );
        let start = spec(r#"{"topic":"t","start":{"offset":5}}"#);
        assert_eq!(
            Subscription::from_spec("s", start, None, None)
                .unwrap()
                .start,
            StartPosition::Offset(5)
        );
        assert!(serde_json::from_str::<SubscriptionSpec>(r#"{"topic":"t","bogus":1}"#).is_err());
    }
}
