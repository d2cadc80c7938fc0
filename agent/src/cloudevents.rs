//! CloudEvents 1.0 mapping: binary-mode HTTP headers (publish and push) and
//! the JSON format (pull, streams, structured and batch publishes).

use crate::error::ApiError;
use crate::group::Delivery;
use crate::message::Message;
use base64_lite as b64;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

/// CloudEvents spec version written on every event.
pub const SPEC_VERSION: &str = "1.0";
/// `type` of events published without one.
pub const DEFAULT_TYPE: &str = "io.shoal.message";
/// Extension attribute carrying the ack id in pulled and streamed events.
pub const ACK_ID_ATTRIBUTE: &str = "ackid";
/// CloudEvents partitioning extension: the partition key.
pub const PARTITION_KEY_ATTRIBUTE: &str = "partitionkey";

/// The source of events published without one.
pub fn default_source(topic: &str) -> String {
    format!("/topics/{topic}")
}

/// The `ce-id` of a binary-mode request, and its other attributes by name.
pub type BinaryAttributes = (Option<String>, Vec<(String, String)>);

/// Reads `ce-*` headers: returns the `ce-id` value and the other attributes.
/// `ce-specversion` must be 1.0 when present.
pub fn from_binary_headers(headers: &HeaderMap) -> Result<BinaryAttributes, ApiError> {
    let mut id = None;
    let mut attrs = Vec::new();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let value = value.to_str().map_err(|_| {
            ApiError::bad_request(
                "invalid_header",
                format!("header {name} must be printable ASCII"),
            )
        })?;
        match attr {
            "id" => {
                if value.is_empty() || value.len() > crate::api::MAX_ID_LEN {
                    return Err(ApiError::bad_request(
                        "invalid_header",
                        format!("ce-id must be 1 to {} characters", crate::api::MAX_ID_LEN),
                    ));
                }
                id = Some(value.to_string());
            }
            "specversion" => {
                if value != SPEC_VERSION {
                    return Err(ApiError::bad_request(
                        "invalid_header",
                        format!("ce-specversion {value:?} is not supported (use 1.0)"),
                    ));
                }
            }
            _ => {
                if attr.is_empty()
                    || !attr
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                {
                    return Err(ApiError::bad_request(
                        "invalid_header",
                        format!(
                            "{name}: CloudEvents attribute names are lowercase letters and digits"
                        ),
                    ));
                }
                attrs.push((attr.to_string(), value.to_string()));
            }
        }
    }
    for (k, v) in trace_context(headers)? {
        if !attrs.iter().any(|(a, _)| *a == k) {
            attrs.push((k, v));
        }
    }
    Ok((id, attrs))
}

/// Binary-mode headers for a message: `ce-*` and `content-type`.
pub fn binary_headers(
    m: &Message,
    topic: &str,
    timestamp_ms: u64,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(6 + m.attributes.len());
    let mut push = |name: String, value: &str| {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_str(value)) {
            out.push((n, v));
        }
    };
    push("ce-specversion".into(), SPEC_VERSION);
    push("ce-id".into(), &m.id);
    if m.attribute("source").is_none() {
        push("ce-source".into(), &default_source(topic));
    }
    if m.attribute("type").is_none() {
        push("ce-type".into(), DEFAULT_TYPE);
    }
    if m.attribute("time").is_none() {
        push("ce-time".into(), &crate::time::rfc3339_ms(timestamp_ms));
    }
    for (k, v) in &m.attributes {
        push(format!("ce-{k}"), v);
    }
    if let Some(ct) = &m.content_type {
        push("content-type".into(), ct);
    }
    out
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let base = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        base == "application/json" || base.ends_with("+json")
    })
}

fn is_text(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| ct.trim().to_ascii_lowercase().starts_with("text/"))
}

/// A delivery as a CloudEvents JSON event, with Shoal's extensions.
pub fn to_json(d: &Delivery, topic: &str) -> Value {
    let m = &d.message;
    let mut e = Map::new();
    e.insert("specversion".into(), SPEC_VERSION.into());
    e.insert("id".into(), m.id.clone().into());
    e.insert("source".into(), default_source(topic).into());
    e.insert("type".into(), DEFAULT_TYPE.into());
    e.insert(
        "time".into(),
        crate::time::rfc3339_ms(d.timestamp_ms).into(),
    );
    for (k, v) in &m.attributes {
        e.insert(k.clone(), v.clone().into());
    }
    if let Some(ct) = &m.content_type {
        e.insert("datacontenttype".into(), ct.clone().into());
    }
    let ct = m.content_type.as_deref();
    let data = if is_json(ct) {
        serde_json::from_slice::<Value>(&m.payload).ok()
    } else if is_text(ct) {
        std::str::from_utf8(&m.payload)
            .ok()
            .map(|s| Value::String(s.to_string()))
    } else {
        None
    };
    match data {
        Some(v) => {
            e.insert("data".into(), v);
        }
        None => {
            e.insert("data_base64".into(), b64::encode(&m.payload).into());
        }
    }
    e.insert(ACK_ID_ATTRIBUTE.into(), d.ack_id.to_string().into());
    e.insert("shoaltopic".into(), topic.into());
    e.insert("shoalpartition".into(), d.ack_id.partition.into());
    e.insert("shoaloffset".into(), d.ack_id.offset.into());
    e.insert("shoaldeliveryattempt".into(), d.ack_id.attempt.into());
    if let Some(k) = &m.key {
        e.insert(PARTITION_KEY_ATTRIBUTE.into(), k.clone().into());
    }
    Value::Object(e)
}

/// Writes a delivery as compact CloudEvents JSON, the same event as
/// [`to_json`] but without building a JSON tree: the hot path of pull and
/// stream delivery. JSON data without line breaks is copied as it is (once
/// checked to be JSON), so the event stays on one line for server-sent events.
pub fn write_json(d: &Delivery, topic: &str, out: &mut Vec<u8>) {
    let m = &d.message;
    let ct = m.content_type.as_deref();
    let json_data = is_json(ct)
        && !m.payload.contains(&b'\n')
        && !m.payload.contains(&b'\r')
        && serde_json::from_slice::<serde::de::IgnoredAny>(&m.payload).is_ok();
    let text_data = if is_text(ct) {
        std::str::from_utf8(&m.payload).ok()
    } else {
        None
    };
    // A multi-line JSON payload is compacted through a tree, as to_json does.
    let compacted = if is_json(ct) && !json_data {
        serde_json::from_slice::<Value>(&m.payload).ok()
    } else {
        None
    };
    let has_data = json_data || text_data.is_some() || compacted.is_some();
    // Fields written after the attributes replace attributes of the same name,
    // and attributes replace the defaults, as inserting into a map would.
    let written_later = |k: &str| {
        (k == "datacontenttype" && ct.is_some())
            || k == if has_data { "data" } else { "data_base64" }
            || (k == PARTITION_KEY_ATTRIBUTE && m.key.is_some())
            || [
                ACK_ID_ATTRIBUTE,
                "shoaltopic",
                "shoalpartition",
                "shoaloffset",
                "shoaldeliveryattempt",
            ]
            .contains(&k)
    };
    let is_attribute = |k: &str| m.attributes.iter().any(|(a, _)| a == k);
    let mut w = JsonObject::new(out);
    if !is_attribute("specversion") {
        w.string("specversion", SPEC_VERSION);
    }
    if !is_attribute("id") {
        w.string("id", &m.id);
    }
    if !is_attribute("source") {
        w.string("source", &default_source(topic));
    }
    if !is_attribute("type") {
        w.string("type", DEFAULT_TYPE);
    }
    if !is_attribute("time") {
        w.string("time", &crate::time::rfc3339_ms(d.timestamp_ms));
    }
    for (i, (k, v)) in m.attributes.iter().enumerate() {
        let repeated_later = m.attributes[i + 1..].iter().any(|(a, _)| a == k);
        if !repeated_later && !written_later(k) {
            w.string(k, v);
        }
    }
    if let Some(ct) = ct {
        w.string("datacontenttype", ct);
    }
    if json_data {
        w.key("data");
        w.out.extend_from_slice(&m.payload);
    } else if let Some(text) = text_data {
        w.string("data", text);
    } else if let Some(v) = &compacted {
        w.key("data");
        let _ = serde_json::to_writer(&mut *w.out, v);
    } else {
        w.string("data_base64", &b64::encode(&m.payload));
    }
    w.string(ACK_ID_ATTRIBUTE, &d.ack_id.to_string());
    w.string("shoaltopic", topic);
    w.number("shoalpartition", u64::from(d.ack_id.partition));
    w.number("shoaloffset", d.ack_id.offset);
    w.number("shoaldeliveryattempt", u64::from(d.ack_id.attempt));
    if let Some(k) = &m.key {
        w.string(PARTITION_KEY_ATTRIBUTE, k);
    }
    w.end();
}

/// A JSON object written field by field.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> JsonObject<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        JsonObject { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.out, key);
        self.out.push(b':');
    }

    fn string(&mut self, key: &str, value: &str) {
        self.key(key);
        let _ = serde_json::to_writer(&mut *self.out, value);
    }

    fn number(&mut self, key: &str, value: u64) {
        self.key(key);
        self.out.extend_from_slice(value.to_string().as_bytes());
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// A structured-mode CloudEvent (JSON object) as a message. `id` is optional:
/// with one, the message is deduplicated by it.
pub fn from_json(v: Value) -> Result<Message, String> {
    let Value::Object(mut o) = v else {
        return Err("an event must be a JSON object".into());
    };
    if let Some(sv) = o.remove("specversion") {
        if sv != SPEC_VERSION {
            return Err(format!("specversion {sv} is not supported (use \"1.0\")"));
        }
    }
    let id = match o.remove("id") {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::Null) | None => None,
        Some(_) => return Err("id must be a non-empty string".into()),
    };
    let content_type = match o.remove("datacontenttype") {
        Some(Value::String(s)) => Some(s),
        None | Some(Value::Null) => None,
        Some(_) => return Err("datacontenttype must be a string".into()),
    };
    // Events with `data` and no content type are JSON (CloudEvents JSON format, 3.1).
    let content_type = match (&content_type, o.contains_key("data")) {
        (None, true) => Some("application/json".to_string()),
        _ => content_type,
    };
    let payload: Vec<u8> = match (o.remove("data"), o.remove("data_base64")) {
        (Some(_), Some(_)) => return Err("an event has data or data_base64, not both".into()),
        (Some(Value::String(s)), None) if !is_json(content_type.as_deref()) => s.into_bytes(),
        (Some(v), None) => serde_json::to_vec(&v).map_err(|e| e.to_string())?,
        (None, Some(Value::String(s))) => {
            b64::decode(&s).ok_or("data_base64 is not valid base64")?
        }
        (None, Some(_)) => return Err("data_base64 must be a string".into()),
        (None, None) => Vec::new(),
    };
    let key = match o.remove(PARTITION_KEY_ATTRIBUTE) {
        Some(Value::String(s)) => Some(s),
        None | Some(Value::Null) => None,
        Some(_) => return Err("partitionkey must be a string".into()),
    };
    let mut attributes = Vec::new();
    for (k, v) in o {
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(format!(
                "attribute {k:?}: names are lowercase letters and digits"
            ));
        }
        let text = match v {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => continue,
            _ => {
                return Err(format!(
                    "attribute {k:?} must be a string, number or boolean"
                ))
            }
        };
        attributes.push((k, text));
    }
    Ok(Message {
        client_id: id.is_some(),
        id: id.unwrap_or_else(new_id),
        key,
        content_type,
        expires_at_ms: None,
        deliver_at_ms: None,
        attributes,
        payload: payload.into(),
    })
}

/// A fresh random message id (128 bits, hex).
pub fn new_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// Standard base64 (RFC 4648, with padding), small enough to keep here
/// rather than pull in a crate for two functions.
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(input: &[u8]) -> String {
        let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(input: &str) -> Option<Vec<u8>> {
        let bytes: Vec<u8> = input.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if !bytes.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            let mut pad = 0;
            for (i, &c) in chunk.iter().enumerate() {
                let v = match c {
                    b'A'..=b'Z' => c - b'A',
                    b'a'..=b'z' => c - b'a' + 26,
                    b'0'..=b'9' => c - b'0' + 52,
                    b'+' => 62,
                    b'/' => 63,
                    b'=' if i >= 2 => {
                        pad += 1;
                        0
                    }
                    _ => return None,
                };
                if pad > 0 && c != b'=' {
                    return None;
                }
                n = (n << 6) | u32::from(v);
            }
            out.push((n >> 16) as u8);
            if pad < 2 {
                out.push((n >> 8) as u8);
            }
            if pad < 1 {
                out.push(n as u8);
            }
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trip() {
            for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
                let e = super::encode(s.as_bytes());
                assert_eq!(super::decode(&e).unwrap(), s.as_bytes());
            }
            assert_eq!(super::encode(b"foobar"), "Zm9vYmFy");
            assert_eq!(super::encode(b"fo"), "Zm8=");
            assert!(super::decode("Zm9=v").is_none());
            assert!(super::decode("!!!!").is_none());
        }
    }
}

/// The W3C trace context of a request (`traceparent`, `tracestate`), as the
/// CloudEvents distributed-tracing extension attributes of the same names: it
/// travels with the message and reaches the subscriber, so the app's own
/// tracing links publish and delivery.
pub fn trace_context(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    if let Some(v) = headers.get("traceparent") {
        let v = v
            .to_str()
            .ok()
            .filter(|v| valid_traceparent(v))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_header",
                    "traceparent must be a W3C trace context: 00-<32 hex>-<16 hex>-<2 hex>",
                )
            })?;
        out.push(("traceparent".to_string(), v.to_string()));
        if let Some(state) = headers.get("tracestate").and_then(|s| s.to_str().ok()) {
            if state.len() <= 512 {
                out.push(("tracestate".to_string(), state.to_string()));
            }
        }
    }
    Ok(out)
}

/// `version-traceid-parentid-flags`, lowercase hex, ids not all zero.
pub fn valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
        && (parts[0] != "00" || parts.len() == 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;

    fn delivery(m: Message) -> Delivery {
        Delivery {
            ack_id: crate::group::AckId {
                partition: 2,
                offset: 41,
                attempt: 3,
            },
            timestamp_ms: 1_700_000_000_123,
            message: std::sync::Arc::new(m),
        }
    }

    #[test]
    fn written_json_is_the_same_event_as_the_json_tree() {
        let base = Message {
            id: "m-1".into(),
            payload: Bytes::from_static(b"{\"n\": [1, 2.5, \"x\"]}"),
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        let with = |f: &dyn Fn(&mut Message)| {
            let mut m = base.clone();
            f(&mut m);
            m
        };
        let cases = [
            base.clone(),
            with(&|m| m.payload = Bytes::from_static(b"{\n  \"multi\": \"line\"\n}")),
            with(&|m| m.payload = Bytes::from_static(b"not json")),
            with(&|m| m.content_type = Some("text/plain; charset=utf-8".into())),
            with(&|m| {
                m.content_type = None;
                m.payload = Bytes::from_static(&[0, 159, 146, 150]);
            }),
            with(&|m| m.key = Some("customer \"7\"".into())),
            with(&|m| {
                m.attributes = vec![
                    ("source".into(), "/app".into()),
                    ("type".into(), "order.created".into()),
                    (
                        "traceparent".into(),
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                    ),
                    ("note".into(), "first".into()),
                    ("note".into(), "second \u{2028} \n".into()),
                    ("shoaltopic".into(), "forged".into()),
                    ("data".into(), "shadowed".into()),
                ]
            }),
        ];
        for m in cases {
            let d = delivery(m);
            let tree = to_json(&d, "orders/eu");
            let mut written = Vec::new();
            write_json(&d, "orders/eu", &mut written);
            assert!(
                !written.contains(&b'\n'),
                "one line: {}",
                String::from_utf8_lossy(&written)
            );
            let parsed: Value = serde_json::from_slice(&written)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&written)));
            assert_eq!(parsed, tree);
        }
    }

    #[test]
    fn structured_event_to_message() {
        let m = from_json(serde_json::json!({
            "specversion": "1.0", "id": "e1", "source": "/app", "type": "order.created",
            "datacontenttype": "application/json", "data": {"n": 1}, "partitionkey": "k"
        }))
        .unwrap();
        assert_eq!(m.id, "e1");
        assert!(m.client_id);
        assert_eq!(m.key.as_deref(), Some("k"));
        assert_eq!(&m.payload[..], br#"{"n":1}"#);
        assert_eq!(m.attribute("type"), Some("order.created"));
        assert!(from_json(serde_json::json!({"specversion": "0.3"})).is_err());
        assert!(from_json(serde_json::json!([1])).is_err());
        assert!(from_json(serde_json::json!({"data": 1, "data_base64": "AA=="})).is_err());
        let b = from_json(serde_json::json!({"data_base64": "AAE="})).unwrap();
        assert_eq!(&b.payload[..], &[0, 1]);
        assert!(!b.client_id);
    }
}
