//! A message as stored in a partition log entry, and its binary codec.
//!
//! Layout (all integers little-endian), version 1:
//! `u8 version | u8 flags | u16 id_len | id | u16 key_len | key |
//!  u16 ct_len | content_type | [u64 expires_at_ms] | [u64 deliver_at_ms] |
//!  u16 attr_count | (u16 name_len | name | u32 value_len | value)* | payload`.
//! Flags say which optional fields are present. The publish time is the log
//! entry's timestamp and is not repeated here.
//!
//! Version 2 is version 1 with a type byte after each attribute name
//! (`u16 name_len | name | u8 type | u32 value_len | value`; type 0 string,
//! 1 integer, 2 boolean, the value in its canonical text). A message whose
//! attributes are all strings is written as version 1, so agents that only
//! read version 1 still read it; version 1 attributes are strings.

use bytes::{BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;
/// Version 1 plus attribute types.
const VERSION_TYPED: u8 = 2;
const HAS_KEY: u8 = 1;
const HAS_CONTENT_TYPE: u8 = 2;
const HAS_EXPIRES: u8 = 4;
const HAS_DELIVER_AT: u8 = 8;
const HAS_CLIENT_ID: u8 = 16;

/// A message: payload plus the metadata delivered with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// Message id (`Shoal-Id`, `ce-id`, or generated).
    pub id: String,
    /// Whether the publisher chose the id (and so it is deduplicated).
    pub client_id: bool,
    /// Partition key.
    pub key: Option<String>,
    /// Payload content type.
    pub content_type: Option<String>,
    /// When the message expires undelivered (ms since the epoch).
    pub expires_at_ms: Option<u64>,
    /// Not delivered before this time (ms since the epoch).
    pub deliver_at_ms: Option<u64>,
    /// CloudEvents attributes other than id (`source`, `type`, extensions, ...), by attribute name.
    pub attributes: Vec<(String, AttrValue)>,
    /// The payload.
    pub payload: Bytes,
}

/// The value of a CloudEvents attribute, with the CloudEvents type it has in
/// the JSON format: a string (String, URI, URI-reference, Timestamp, ...), an
/// Integer (a JSON number) or a Boolean (a JSON boolean). In HTTP binary mode
/// every value is text ([`AttrValue::to_text`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrValue {
    /// Any string-typed attribute.
    String(String),
    /// A CloudEvents Integer (Shoal's own extensions may exceed 32 bits).
    Integer(i64),
    /// A CloudEvents Boolean.
    Boolean(bool),
}

impl AttrValue {
    /// The string, for a string-typed value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The canonical text (the CloudEvents string encoding): the string
    /// itself, an integer in decimal, `true` or `false`.
    pub fn to_text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            AttrValue::String(s) => std::borrow::Cow::Borrowed(s),
            AttrValue::Integer(n) => std::borrow::Cow::Owned(n.to_string()),
            AttrValue::Boolean(b) => std::borrow::Cow::Borrowed(if *b { "true" } else { "false" }),
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            AttrValue::String(_) => 0,
            AttrValue::Integer(_) => 1,
            AttrValue::Boolean(_) => 2,
        }
    }
}

impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::String(s)
    }
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::String(s.to_string())
    }
}

/// The bytes of an entry are not a message this version can read.
#[derive(Debug, thiserror::Error)]
#[error("undecodable message: {0}")]
pub struct DecodeError(&'static str);

impl Message {
    /// Encodes into the log entry format. Fails only for fields too long for their length prefix.
    pub fn encode(&self) -> Result<Bytes, &'static str> {
        let mut flags = 0;
        if self.key.is_some() {
            flags |= HAS_KEY;
        }
        if self.content_type.is_some() {
            flags |= HAS_CONTENT_TYPE;
        }
        if self.expires_at_ms.is_some() {
            flags |= HAS_EXPIRES;
        }
        if self.deliver_at_ms.is_some() {
            flags |= HAS_DELIVER_AT;
        }
        if self.client_id {
            flags |= HAS_CLIENT_ID;
        }
        let attrs_len: usize = self
            .attributes
            .iter()
            .map(|(k, v)| 7 + k.len() + v.to_text().len())
            .sum();
        let typed = self
            .attributes
            .iter()
            .any(|(_, v)| !matches!(v, AttrValue::String(_)));
        let mut b = BytesMut::with_capacity(
            32 + self.id.len()
                + self.key.as_ref().map_or(0, String::len)
                + self.content_type.as_ref().map_or(0, String::len)
                + attrs_len
                + self.payload.len(),
        );
        b.put_u8(if typed { VERSION_TYPED } else { VERSION });
        b.put_u8(flags);
        put_short(&mut b, self.id.as_bytes(), "id")?;
        if let Some(k) = &self.key {
            put_short(&mut b, k.as_bytes(), "key")?;
        }
        if let Some(ct) = &self.content_type {
            put_short(&mut b, ct.as_bytes(), "content type")?;
        }
        if let Some(t) = self.expires_at_ms {
            b.put_u64_le(t);
        }
        if let Some(t) = self.deliver_at_ms {
            b.put_u64_le(t);
        }
        let count = u16::try_from(self.attributes.len()).map_err(|_| "too many attributes")?;
        b.put_u16_le(count);
        for (k, v) in &self.attributes {
            put_short(&mut b, k.as_bytes(), "attribute name")?;
            if typed {
                b.put_u8(v.type_byte());
            }
            let text = v.to_text();
            let len = u32::try_from(text.len()).map_err(|_| "attribute value too long")?;
            b.put_u32_le(len);
            b.put_slice(text.as_bytes());
        }
        b.put_slice(&self.payload);
        Ok(b.freeze())
    }

    /// Decodes an entry; the payload shares `data`'s memory.
    pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
        let mut r = Reader { data, pos: 0 };
        let typed = match r.u8()? {
            VERSION => false,
            VERSION_TYPED => true,
            _ => return Err(DecodeError("unknown message version")),
        };
        let flags = r.u8()?;
        let id = r.short_string()?;
        let key = if flags & HAS_KEY != 0 {
            Some(r.short_string()?)
        } else {
            None
        };
        let content_type = if flags & HAS_CONTENT_TYPE != 0 {
            Some(r.short_string()?)
        } else {
            None
        };
        let expires_at_ms = if flags & HAS_EXPIRES != 0 {
            Some(r.u64()?)
        } else {
            None
        };
        let deliver_at_ms = if flags & HAS_DELIVER_AT != 0 {
            Some(r.u64()?)
        } else {
            None
        };
        let count = r.u16()?;
        let mut attributes = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let k = r.short_string()?;
            let kind = if typed { r.u8()? } else { 0 };
            let len = r.u32()? as usize;
            let text = r.string(len)?;
            let v = match kind {
                0 => AttrValue::String(text),
                1 => AttrValue::Integer(
                    text.parse()
                        .map_err(|_| DecodeError("invalid integer attribute"))?,
                ),
                2 => AttrValue::Boolean(match text.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(DecodeError("invalid boolean attribute")),
                }),
                _ => return Err(DecodeError("unknown attribute type")),
            };
            attributes.push((k, v));
        }
        let payload = data.slice(r.pos..);
        Ok(Message {
            id,
            client_id: flags & HAS_CLIENT_ID != 0,
            key,
            content_type,
            expires_at_ms,
            deliver_at_ms,
            attributes,
            payload,
        })
    }

    /// The value of a CloudEvents attribute kept with the message.
    pub fn attribute(&self, name: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

fn put_short(b: &mut BytesMut, s: &[u8], what: &'static str) -> Result<(), &'static str> {
    let len = u16::try_from(s.len()).map_err(|_| what)?;
    b.put_u16_le(len);
    b.put_slice(s);
    Ok(())
}

struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError("length overflow"))?;
        let s = self
            .data
            .get(self.pos..end)
            .ok_or(DecodeError("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn short_string(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        self.string(len)
    }
    fn string(&mut self, len: usize) -> Result<String, DecodeError> {
        let s = self.take(len)?;
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError("invalid UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_fields() {
        let m = Message {
            id: "abc".into(),
            client_id: true,
            key: Some("k1".into()),
            content_type: Some("application/json".into()),
            expires_at_ms: Some(42),
            deliver_at_ms: Some(7),
            attributes: vec![("source".into(), "/a".into()), ("type".into(), "t".into())],
            payload: Bytes::from_static(b"{\"x\":1}"),
        };
        let bytes = m.encode().unwrap();
        assert_eq!(bytes[0], VERSION, "string attributes only: version 1");
        assert_eq!(Message::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn typed_attributes_round_trip_as_version_2() {
        let m = Message {
            id: "abc".into(),
            attributes: vec![
                ("source".into(), "/a".into()),
                ("count".into(), AttrValue::Integer(-42)),
                ("big".into(), AttrValue::Integer(1 << 40)),
                ("flag".into(), AttrValue::Boolean(true)),
                ("off".into(), AttrValue::Boolean(false)),
            ],
            payload: Bytes::from_static(b"p"),
            ..Default::default()
        };
        let bytes = m.encode().unwrap();
        assert_eq!(bytes[0], VERSION_TYPED);
        assert_eq!(Message::decode(&bytes).unwrap(), m);
        // A version 1 reader's layout differs; a bad type byte is refused.
        let mut bad = bytes.to_vec();
        let at = bad.windows(5).position(|w| w == b"count").unwrap();
        bad[at + 5] = 9;
        assert!(Message::decode(&Bytes::from(bad)).is_err());
    }

    #[test]
    fn round_trip_minimal() {
        let m = Message {
            id: "x".into(),
            payload: Bytes::new(),
            ..Default::default()
        };
        assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
    }

    #[test]
    fn truncated_and_garbage_fail_cleanly() {
        let m = Message {
            id: "abc".into(),
            key: Some("k".into()),
            attributes: vec![("source".into(), "/a".into())],
            payload: Bytes::from_static(b"p"),
            ..Default::default()
        };
        let bytes = m.encode().unwrap();
        for cut in 0..bytes.len() - 1 {
            // Every strict prefix up to the payload must fail or decode without panicking.
            let _ = Message::decode(&bytes.slice(..cut));
        }
        assert!(Message::decode(&Bytes::from_static(&[9, 0])).is_err());
        assert!(Message::decode(&Bytes::new()).is_err());
    }
}
