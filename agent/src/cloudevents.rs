//! CloudEvents 1.0 mapping: binary-mode HTTP headers (publish and push) and
//! the JSON format (pull, streams, structured and batch publishes).

use crate::error::ApiError;
use crate::group::Delivery;
use crate::message::{AttrValue, Message};
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

/// A binary-mode request's event: `ce-id`, `ce-partitionkey` and the other
/// attributes by name, percent-decoded and checked.
#[derive(Debug, Default)]
pub struct BinaryEvent {
    /// `ce-id`.
    pub id: Option<String>,
    /// `ce-partitionkey`, the partition key.
    pub key: Option<String>,
    /// The other attributes (strings: binary mode carries no types).
    pub attributes: Vec<(String, AttrValue)>,
}

/// The largest CloudEvents Integer (32-bit signed, CloudEvents 1.0 type system).
const INTEGER_RANGE: std::ops::RangeInclusive<i64> = (i32::MIN as i64)..=(i32::MAX as i64);

/// CloudEvents attribute naming: lowercase ASCII letters and digits, not
/// empty (the spec recommends at most 20 characters; longer names are
/// allowed). `data` is the event's data in the JSON format, never an attribute.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn name_error(name: &str) -> String {
    if name == "data" {
        "data is the event's data, not an attribute".to_string()
    } else {
        format!(
            "attribute {name:?}: CloudEvents attribute names are lowercase letters (a-z) and digits"
        )
    }
}

/// Percent-encodes a binary-mode header value (CloudEvents HTTP binding
/// 3.1.3.2): the UTF-8 bytes of space, `"`, `%` and of every character
/// outside printable ASCII (U+0021 to U+007E) become `%XX`.
pub fn percent_encode(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}

/// Percent-decodes a binary-mode header value (CloudEvents HTTP binding
/// 3.1.3.2): every `%XX` becomes its byte, and the bytes must be UTF-8.
/// Unencoded UTF-8 (which the binding says to encode) is taken as it is; a
/// `%` not followed by two hex digits is an error.
pub fn percent_decode(value: &[u8]) -> Result<String, &'static str> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        if b == b'%' {
            let hi = value.get(i + 1).copied().and_then(hex);
            let lo = value.get(i + 2).copied().and_then(hex);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push((hi << 4) | lo),
                _ => return Err("a % not followed by two hex digits (write % as %25)"),
            }
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 once percent-decoded")
}

fn is_unreserved_or_sub_delim(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)
}

/// RFC 3986 `URI-reference`: ASCII, characters a URI allows (`%` only as
/// `%XX`), at most one `#`, and a `:` before the first `/`, `?` or `#` only
/// after a scheme. Lenient about `[` and `]` (IP literals are not checked).
pub fn valid_uri_reference(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let mut hashes = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 2;
            }
            b'#' => hashes += 1,
            c if is_unreserved_or_sub_delim(c) || b":/?@[]".contains(&c) => {}
            _ => return false,
        }
        i += 1;
    }
    if hashes > 1 {
        return false;
    }
    let first = s.find(['/', '?', '#']).unwrap_or(s.len());
    match s[..first].find(':') {
        None => true,
        Some(colon) => valid_scheme(&s[..colon]),
    }
}

fn valid_scheme(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

/// RFC 3986 `URI`: a URI-reference with a scheme.
pub fn valid_uri(s: &str) -> bool {
    valid_uri_reference(s)
        && s.find(':')
            .is_some_and(|c| valid_scheme(&s[..c]) && !s[..c].contains(['/', '?', '#']))
}

/// Checks one attribute value against the CloudEvents 1.0 rules for its name
/// (context attributes) or for extensions; the error names the attribute.
/// `specversion`, `id`, `datacontenttype` and `partitionkey` are checked
/// where they are read.
pub fn validate_attribute(name: &str, value: &AttrValue) -> Result<(), String> {
    let string = |what: &str| -> Result<&str, String> {
        value
            .as_str()
            .ok_or_else(|| format!("{name} must be {what}"))
    };
    match name {
        "source" => {
            let s = string("a non-empty URI-reference string")?;
            if s.is_empty() || !valid_uri_reference(s) {
                return Err(format!(
                    "source {s:?} is not a non-empty URI-reference (RFC 3986; percent-encode spaces and non-ASCII)"
                ));
            }
        }
        "type" | "subject" => {
            if string("a non-empty string")?.is_empty() {
                return Err(format!("{name} must be a non-empty string"));
            }
        }
        "time" => {
            let s = string("an RFC 3339 timestamp string")?;
            if !crate::time::is_rfc3339(s) {
                return Err(format!("time {s:?} is not an RFC 3339 timestamp"));
            }
        }
        "dataschema" => {
            let s = string("a non-empty URI string")?;
            if !valid_uri(s) {
                return Err(format!(
                    "dataschema {s:?} is not an absolute URI (RFC 3986)"
                ));
            }
        }
        _ => {
            if !valid_name(name) || name == "data" {
                return Err(name_error(name));
            }
            if let AttrValue::Integer(n) = value {
                if !INTEGER_RANGE.contains(n) {
                    return Err(format!(
                        "{name}: {n} is outside the CloudEvents Integer range (32-bit signed)"
                    ));
                }
            }
        }
    }
    Ok(())
}

fn invalid_event(message: String) -> ApiError {
    ApiError::bad_request("invalid_event", message)
}

/// Reads `ce-*` headers (percent-decoded) into a binary-mode event, with the
/// request's W3C trace context. Errors: 400 `invalid_header` for a header
/// that cannot be read (bad name, bad percent-encoding, not UTF-8, an id
/// over Shoal's limit), 400 `invalid_event` for a value the CloudEvents
/// rules refuse, naming the attribute.
pub fn from_binary_headers(headers: &HeaderMap) -> Result<BinaryEvent, ApiError> {
    let mut event = BinaryEvent::default();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        if !valid_name(attr) || attr == "data" {
            return Err(ApiError::bad_request(
                "invalid_header",
                format!("{name}: {}", name_error(attr)),
            ));
        }
        let value = percent_decode(value.as_bytes())
            .map_err(|e| ApiError::bad_request("invalid_header", format!("{name}: {e}")))?;
        match attr {
            "id" => {
                if value.is_empty() {
                    return Err(invalid_event("ce-id: id must be a non-empty string".into()));
                }
                if value.len() > crate::api::MAX_ID_LEN {
                    return Err(ApiError::bad_request(
                        "invalid_header",
                        format!("ce-id must be 1 to {} characters", crate::api::MAX_ID_LEN),
                    ));
                }
                event.id = Some(value);
            }
            "specversion" => {
                if value != SPEC_VERSION {
                    return Err(invalid_event(format!(
                        "ce-specversion {value:?} is not supported (use 1.0)"
                    )));
                }
            }
            PARTITION_KEY_ATTRIBUTE => {
                if value.is_empty() || value.len() > crate::api::MAX_ID_LEN {
                    return Err(invalid_event(format!(
                        "ce-partitionkey: partitionkey must be 1 to {} characters",
                        crate::api::MAX_ID_LEN
                    )));
                }
                event.key = Some(value);
            }
            _ => {
                let value = AttrValue::String(value);
                validate_attribute(attr, &value).map_err(|e| invalid_event(format!("ce-{e}")))?;
                event.attributes.push((attr.to_string(), value));
            }
        }
    }
    for (k, v) in trace_context(headers)? {
        if !event.attributes.iter().any(|(a, _)| *a == k) {
            event.attributes.push((k, v.into()));
        }
    }
    Ok(event)
}

/// Binary-mode headers for a message: `ce-*` (percent-encoded, CloudEvents
/// HTTP binding 3.1.3.2), `ce-partitionkey` for a keyed message, and
/// `content-type`.
pub fn binary_headers(
    m: &Message,
    topic: &str,
    timestamp_ms: u64,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(7 + m.attributes.len());
    let mut push = |name: String, value: &str| {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(name),
            HeaderValue::from_str(&percent_encode(value)),
        ) {
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
        if k != PARTITION_KEY_ATTRIBUTE && k != "data" {
            push(format!("ce-{k}"), &v.to_text());
        }
    }
    if let Some(k) = &m.key {
        push(format!("ce-{PARTITION_KEY_ATTRIBUTE}"), k);
    }
    if let Some(ct) = &m.content_type {
        if let Ok(v) = HeaderValue::from_str(ct) {
            out.push((http::header::CONTENT_TYPE, v));
        }
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

fn attr_json(v: &AttrValue) -> Value {
    match v {
        AttrValue::String(s) => Value::String(s.clone()),
        AttrValue::Integer(n) => Value::from(*n),
        AttrValue::Boolean(b) => Value::Bool(*b),
    }
}

/// A delivery as a CloudEvents JSON event, with Shoal's extensions. An empty
/// payload is an event without data: neither `data` nor `data_base64`.
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
        if k != "data" {
            e.insert(k.clone(), attr_json(v));
        }
    }
    if let Some(ct) = &m.content_type {
        e.insert("datacontenttype".into(), ct.clone().into());
    }
    let ct = m.content_type.as_deref();
    if !m.payload.is_empty() {
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
    let has_payload = !m.payload.is_empty();
    let json_data = has_payload
        && is_json(ct)
        && !m.payload.contains(&b'\n')
        && !m.payload.contains(&b'\r')
        && serde_json::from_slice::<serde::de::IgnoredAny>(&m.payload).is_ok();
    let text_data = if has_payload && is_text(ct) {
        std::str::from_utf8(&m.payload).ok()
    } else {
        None
    };
    // A multi-line JSON payload is compacted through a tree, as to_json does.
    let compacted = if has_payload && is_json(ct) && !json_data {
        serde_json::from_slice::<Value>(&m.payload).ok()
    } else {
        None
    };
    let has_data = json_data || text_data.is_some() || compacted.is_some();
    // Fields written after the attributes replace attributes of the same name,
    // and attributes replace the defaults, as inserting into a map would.
    let written_later = |k: &str| {
        (k == "datacontenttype" && ct.is_some())
            || k == "data"
            || (k == "data_base64" && has_payload && !has_data)
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
            w.value(k, v);
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
    } else if has_payload {
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

    fn value(&mut self, key: &str, value: &AttrValue) {
        match value {
            AttrValue::String(s) => self.string(key, s),
            AttrValue::Integer(n) => {
                self.key(key);
                self.out.extend_from_slice(n.to_string().as_bytes());
            }
            AttrValue::Boolean(b) => {
                self.key(key);
                self.out
                    .extend_from_slice(if *b { b"true" } else { b"false" });
            }
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// A structured-mode CloudEvent (JSON object) as a message. `id` is optional:
/// with one, the message is deduplicated by it. Attributes are checked with
/// [`validate_attribute`]; extensions keep their JSON type (string, integer,
/// boolean; `null` is an absent attribute). Errors name the attribute.
pub fn from_json(v: Value) -> Result<Message, String> {
    let Value::Object(mut o) = v else {
        return Err("an event must be a JSON object".into());
    };
    match o.remove("specversion") {
        None => {}
        Some(Value::String(s)) if s == SPEC_VERSION => {}
        Some(sv) => return Err(format!("specversion {sv} is not supported (use \"1.0\")")),
    }
    let id = match o.remove("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= crate::api::MAX_ID_LEN => Some(s),
        Some(Value::Null) | None => None,
        Some(_) => {
            return Err(format!(
                "id must be a non-empty string of at most {} bytes",
                crate::api::MAX_ID_LEN
            ))
        }
    };
    let content_type = match o.remove("datacontenttype") {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        None | Some(Value::Null) => None,
        Some(_) => return Err("datacontenttype must be a non-empty string".into()),
    };
    // Events with `data` and no content type are JSON (CloudEvents JSON format, 3.1).
    let content_type = match (&content_type, o.get("data")) {
        (None, Some(d)) if !d.is_null() => Some("application/json".to_string()),
        _ => content_type,
    };
    let data = o.remove("data").filter(|d| !d.is_null());
    let data_base64 = o.remove("data_base64").filter(|d| !d.is_null());
    let payload: Vec<u8> = match (data, data_base64) {
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
        Some(Value::String(s)) if !s.is_empty() && s.len() <= crate::api::MAX_ID_LEN => Some(s),
        None | Some(Value::Null) => None,
        Some(_) => {
            return Err(format!(
                "partitionkey must be a non-empty string of at most {} bytes",
                crate::api::MAX_ID_LEN
            ))
        }
    };
    let mut attributes = Vec::new();
    for (k, v) in o {
        let value = match v {
            Value::Null => continue,
            Value::String(s) => AttrValue::String(s),
            Value::Bool(b) => AttrValue::Boolean(b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => AttrValue::Integer(i),
                None => {
                    return Err(format!(
                        "{k}: {n} is not a CloudEvents Integer (a whole number, 32-bit signed)"
                    ))
                }
            },
            _ => return Err(format!("{k} must be a string, an integer or a boolean")),
        };
        validate_attribute(&k, &value)?;
        attributes.push((k, value));
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
                    ("count".into(), AttrValue::Integer(42)),
                    ("flag".into(), AttrValue::Boolean(false)),
                ]
            }),
            with(&|m| m.payload = Bytes::new()),
            with(&|m| {
                m.content_type = None;
                m.payload = Bytes::new();
                m.attributes = vec![("data_base64".into(), "x".into())];
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
        assert_eq!(m.attribute("type"), Some(&AttrValue::from("order.created")));
        assert!(from_json(serde_json::json!({"specversion": "0.3"})).is_err());
        assert!(from_json(serde_json::json!([1])).is_err());
        assert!(from_json(serde_json::json!({"data": 1, "data_base64": "AA=="})).is_err());
        let b = from_json(serde_json::json!({"data_base64": "AAE="})).unwrap();
        assert_eq!(&b.payload[..], &[0, 1]);
        assert!(!b.client_id);
    }

    #[test]
    fn header_values_are_percent_encoded_per_the_http_binding() {
        assert_eq!(percent_encode("order 7 café"), "order%207%20caf%C3%A9");
        assert_eq!(percent_encode("a%41b"), "a%2541b");
        assert_eq!(percent_encode("say \"hi\""), "say%20%22hi%22");
        assert_eq!(percent_encode("tab\there\u{7f}"), "tab%09here%7F");
        // Printable ASCII other than space, " and % stays as it is.
        let printable: String = (0x21u8..=0x7e)
            .map(char::from)
            .filter(|c| !matches!(c, '"' | '%'))
            .collect();
        assert_eq!(percent_encode(&printable), printable);
        assert_eq!(percent_encode(""), "");
    }

    #[test]
    fn header_values_are_percent_decoded() {
        assert_eq!(
            percent_decode(b"order%207%20caf%C3%A9").unwrap(),
            "order 7 café"
        );
        assert_eq!(percent_decode(b"a%2541b").unwrap(), "a%41b");
        assert_eq!(percent_decode(b"%e2%82%ac").unwrap(), "€");
        assert_eq!(percent_decode("café".as_bytes()).unwrap(), "café");
        assert_eq!(percent_decode(b"plain-value").unwrap(), "plain-value");
        for bad in [&b"100%"[..], b"%4", b"%zz", b"%C3", b"%FF%FE", b"\xff"] {
            assert!(
                percent_decode(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for s in ["order 7 café", "a%41b", "\"q\" \u{1F600} \u{0} ~"] {
            assert_eq!(percent_decode(percent_encode(s).as_bytes()).unwrap(), s);
        }
    }

    #[test]
    fn uri_references_and_uris() {
        for ok in [
            "/shop",
            "https://example.com/a?b=c#d",
            "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
            "shop",
            "./a:b",
            "a/b:c",
            "mailto:x@example.com",
            "/caf%C3%A9",
            "#frag",
            "?q",
        ] {
            assert!(valid_uri_reference(ok), "{ok}");
        }
        for bad in [
            "/order 7", "/café", "1a:b", ":x", "a#b#c", "/100%", "/%zz", "a\"b", "a<b>", "a\\b",
        ] {
            assert!(!valid_uri_reference(bad), "{bad}");
        }
        assert!(valid_uri("https://example.com/schema"));
        assert!(valid_uri("urn:example:schema"));
        assert!(!valid_uri("/schema"));
        assert!(!valid_uri("schema"));
        assert!(!valid_uri("/a:b"));
    }

    #[test]
    fn attributes_are_validated_by_name() {
        let s = |v: &str| AttrValue::from(v);
        let ok = [
            ("source", s("/shop")),
            ("type", s("order.created")),
            ("subject", s("order 7 café")),
            ("time", s("2024-02-29T10:00:00.5+01:00")),
            ("time", s("1985-04-12T23:20:50Z")),
            ("dataschema", s("https://example.com/s.json")),
            ("count", AttrValue::Integer(i64::from(i32::MAX))),
            ("count", AttrValue::Integer(i64::from(i32::MIN))),
            ("flag", AttrValue::Boolean(true)),
            ("averyveryverylongextensionname", s("x")),
        ];
        for (name, value) in ok {
            assert_eq!(validate_attribute(name, &value), Ok(()), "{name} {value:?}");
        }
        let bad = [
            ("source", s("")),
            ("source", s("/order 7")),
            ("source", AttrValue::Integer(1)),
            ("type", s("")),
            ("subject", s("")),
            ("time", s("yesterday")),
            ("time", s("not-a-time")),
            ("time", s("2024-02-30T00:00:00Z")),
            ("time", s("2024-01-01 00:00:00Z")),
            ("time", s("2024-01-01T00:00:00")),
            ("time", AttrValue::Boolean(true)),
            ("dataschema", s("/relative")),
            ("count", AttrValue::Integer(i64::from(i32::MAX) + 1)),
            ("Upper", s("x")),
            ("with_underscore", s("x")),
            ("data", s("x")),
        ];
        for (name, value) in bad {
            let e = validate_attribute(name, &value).unwrap_err();
            let named = if name == "data" { "data" } else { name };
            assert!(e.contains(named), "{name}: error names it: {e}");
        }
    }

    #[test]
    fn structured_events_are_validated_and_keep_extension_types() {
        let m = from_json(serde_json::json!({
            "specversion": "1.0", "id": "e1", "source": "/app", "type": "t",
            "count": 42, "flag": true, "label": "42", "gone": null
        }))
        .unwrap();
        assert_eq!(m.attribute("count"), Some(&AttrValue::Integer(42)));
        assert_eq!(m.attribute("flag"), Some(&AttrValue::Boolean(true)));
        assert_eq!(m.attribute("label"), Some(&AttrValue::from("42")));
        assert_eq!(m.attribute("gone"), None);
        assert!(m.payload.is_empty(), "no data");
        for (event, named) in [
            (serde_json::json!({"time": "not-a-time"}), "time"),
            (serde_json::json!({"source": ""}), "source"),
            (serde_json::json!({"source": "/a b"}), "source"),
            (serde_json::json!({"type": ""}), "type"),
            (serde_json::json!({"id": ""}), "id"),
            (serde_json::json!({"id": 7}), "id"),
            (serde_json::json!({"specversion": 1.0}), "specversion"),
            (serde_json::json!({"specversion": "0.3"}), "specversion"),
            (serde_json::json!({"ratio": 0.5}), "ratio"),
            (serde_json::json!({"big": 4_294_967_296_i64}), "big"),
            (serde_json::json!({"obj": {"a": 1}}), "obj"),
            (serde_json::json!({"Bad": "x"}), "Bad"),
            (serde_json::json!({"partitionkey": ""}), "partitionkey"),
            (serde_json::json!({"subject": ""}), "subject"),
        ] {
            let e = from_json(event.clone()).unwrap_err();
            assert!(e.contains(named), "{event}: {e}");
        }
    }

    #[test]
    fn typed_extensions_and_no_data_come_back_as_they_went_in() {
        let event = serde_json::json!({
            "specversion": "1.0", "id": "e1", "source": "/app", "type": "t",
            "count": 42, "flag": true, "label": "42", "partitionkey": "k"
        });
        let m = from_json(event).unwrap();
        let out = to_json(&delivery(m), "t1");
        assert_eq!(out["count"], 42);
        assert_eq!(out["flag"], true);
        assert_eq!(out["label"], "42");
        assert_eq!(out["partitionkey"], "k");
        assert!(
            out.get("data").is_none() && out.get("data_base64").is_none(),
            "{out}"
        );
        assert_eq!(out["shoalpartition"], 2);
        assert_eq!(out["shoaloffset"], 41);
    }

    #[test]
    fn binary_headers_are_encoded_and_read_back() {
        let m = Message {
            id: "id 1".into(),
            key: Some("cust é".into()),
            content_type: Some("text/plain".into()),
            attributes: vec![
                ("subject".into(), "order 7 café".into()),
                ("pct".into(), "a%41b".into()),
                ("count".into(), AttrValue::Integer(42)),
                ("flag".into(), AttrValue::Boolean(true)),
            ],
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        };
        let headers: HeaderMap = binary_headers(&m, "t", 0).into_iter().collect();
        let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(h("ce-subject").as_deref(), Some("order%207%20caf%C3%A9"));
        assert_eq!(h("ce-pct").as_deref(), Some("a%2541b"));
        assert_eq!(h("ce-count").as_deref(), Some("42"));
        assert_eq!(h("ce-flag").as_deref(), Some("true"));
        assert_eq!(h("ce-id").as_deref(), Some("id%201"));
        assert_eq!(h("ce-partitionkey").as_deref(), Some("cust%20%C3%A9"));
        assert_eq!(h("content-type").as_deref(), Some("text/plain"));
        let back = from_binary_headers(&headers).unwrap();
        assert_eq!(back.id.as_deref(), Some("id 1"));
        assert_eq!(back.key.as_deref(), Some("cust é"));
        let attr = |n: &str| {
            back.attributes
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.to_text().into_owned())
        };
        assert_eq!(attr("subject").as_deref(), Some("order 7 café"));
        assert_eq!(attr("pct").as_deref(), Some("a%41b"));
    }

    #[test]
    fn bad_binary_headers_are_refused_naming_them() {
        let refuse = |name: &str, value: &[u8], code: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                HeaderName::try_from(name).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
            let e = from_binary_headers(&headers).unwrap_err();
            let body = format!("{e:?}");
            assert!(body.contains(code), "{name}: {body}");
            assert!(body.contains(name), "{name} named: {body}");
        };
        refuse("ce-time", b"yesterday", "invalid_event");
        refuse("ce-source", b"", "invalid_event");
        refuse("ce-source", b"/a%20b", "invalid_event");
        refuse("ce-specversion", b"0.3", "invalid_event");
        refuse("ce-id", b"", "invalid_event");
        refuse("ce-subject", b"100%", "invalid_header");
        refuse("ce-subject", b"%FF", "invalid_header");
        refuse("ce-data", b"x", "invalid_header");
        refuse("ce-my_ext", b"x", "invalid_header");
        let mut headers = HeaderMap::new();
        headers.insert(
            "ce-subject",
            HeaderValue::from_bytes("café".as_bytes()).unwrap(),
        );
        let ok = from_binary_headers(&headers).unwrap();
        assert_eq!(
            ok.attributes[0].1,
            AttrValue::from("café"),
            "raw UTF-8 is taken"
        );
    }
}
