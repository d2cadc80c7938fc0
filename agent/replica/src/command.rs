//! What a partition's log entries hold.
//!
//! A normal entry's data is a command, encoded by hand so that reading a
//! message back costs no allocation:
//!
//! | tag | layout after the tag (little-endian) |
//! | --- | --- |
//! | 1 `Message` | timestamp ms u64, id length u16, id (UTF-8), body |
//! | 2 `Commit` | timestamp ms u64, next offset u64, group name (UTF-8) |
//! | 3 `Window` | timestamp ms u64, dedupe window ms u64 |
//!
//! An empty entry is a new leader's no-op. The timestamp is the leader's
//! clock when it proposed the entry; every replica applies the same one, so
//! the dedupe window and retention by age agree everywhere. The window's
//! length goes through the log too (`Window`), so every replica judges the
//! same entries duplicates. An agent that predates a tag skips its entries
//! (and says so in its log).

/// Largest dedupe id, in bytes.
pub const MAX_ID_BYTES: usize = 1024;
/// Largest consumer group name, in bytes.
pub const MAX_GROUP_BYTES: usize = 1024;

const TAG_MESSAGE: u8 = 1;
const TAG_COMMIT: u8 = 2;
const TAG_WINDOW: u8 = 3;

/// A decoded command, borrowing from the entry's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// A new leader's empty entry.
    Noop,
    /// A published message.
    Message {
        /// The leader's clock when it was proposed.
        timestamp_ms: u64,
        /// The publisher's `Shoal-Id`, for the dedupe window.
        id: Option<&'a str>,
        /// The encoded message.
        body: &'a [u8],
    },
    /// A consumer group's committed offset.
    Commit {
        /// The leader's clock when it was proposed.
        timestamp_ms: u64,
        /// The group.
        group: &'a str,
        /// The next offset the group reads.
        next: u64,
    },
    /// The partition's dedupe window from this entry on (the topic's
    /// `dedupeWindow`, as its leader knew it).
    Window {
        /// The leader's clock when it was proposed.
        timestamp_ms: u64,
        /// The window's length.
        window_ms: u64,
    },
}

/// A command that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Unknown tag.
    #[error("unknown command tag {0}")]
    UnknownTag(u8),
    /// Too short for its tag.
    #[error("truncated command")]
    Truncated,
    /// A name or id that is not UTF-8.
    #[error("command text is not UTF-8")]
    NotUtf8,
    /// An id or group name over its limit.
    #[error("{what} of {len} bytes exceeds {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl<'a> Command<'a> {
    /// Encodes the command as entry data.
    pub fn encode(&self) -> Result<Vec<u8>, CommandError> {
        match *self {
            Command::Noop => Ok(Vec::new()),
            Command::Message {
                timestamp_ms,
                id,
                body,
            } => {
                let id = id.unwrap_or("");
                if id.len() > MAX_ID_BYTES {
                    return Err(CommandError::TooLong {
                        what: "id",
                        len: id.len(),
                        max: MAX_ID_BYTES,
                    });
                }
                let mut out = Vec::with_capacity(11 + id.len() + body.len());
                out.push(TAG_MESSAGE);
                out.extend_from_slice(&timestamp_ms.to_le_bytes());
                out.extend_from_slice(&(id.len() as u16).to_le_bytes());
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(body);
                Ok(out)
            }
            Command::Commit {
                timestamp_ms,
                group,
                next,
            } => {
                if group.len() > MAX_GROUP_BYTES {
                    return Err(CommandError::TooLong {
                        what: "group",
                        len: group.len(),
                        max: MAX_GROUP_BYTES,
                    });
                }
                let mut out = Vec::with_capacity(17 + group.len());
                out.push(TAG_COMMIT);
                out.extend_from_slice(&timestamp_ms.to_le_bytes());
                out.extend_from_slice(&next.to_le_bytes());
                out.extend_from_slice(group.as_bytes());
                Ok(out)
            }
            Command::Window {
                timestamp_ms,
                window_ms,
            } => {
                let mut out = Vec::with_capacity(17);
                out.push(TAG_WINDOW);
                out.extend_from_slice(&timestamp_ms.to_le_bytes());
                out.extend_from_slice(&window_ms.to_le_bytes());
                Ok(out)
            }
        }
    }

    /// Decodes entry data.
    pub fn decode(data: &'a [u8]) -> Result<Command<'a>, CommandError> {
        let Some((&tag, rest)) = data.split_first() else {
            return Ok(Command::Noop);
        };
        let timestamp_ms = u64::from_le_bytes(take::<8>(rest)?);
        let rest = &rest[8..];
        match tag {
            TAG_MESSAGE => {
                let id_len = usize::from(u16::from_le_bytes(take::<2>(rest)?));
                let rest = &rest[2..];
                if rest.len() < id_len {
                    return Err(CommandError::Truncated);
                }
                let (id, body) = rest.split_at(id_len);
                let id = std::str::from_utf8(id).map_err(|_| CommandError::NotUtf8)?;
                Ok(Command::Message {
                    timestamp_ms,
                    id: (!id.is_empty()).then_some(id),
                    body,
                })
            }
            TAG_COMMIT => {
                let next = u64::from_le_bytes(take::<8>(rest)?);
                let group = std::str::from_utf8(&rest[8..]).map_err(|_| CommandError::NotUtf8)?;
                Ok(Command::Commit {
                    timestamp_ms,
                    group,
                    next,
                })
            }
            TAG_WINDOW => Ok(Command::Window {
                timestamp_ms,
                window_ms: u64::from_le_bytes(take::<8>(rest)?),
            }),
            other => Err(CommandError::UnknownTag(other)),
        }
    }

    /// The leader's timestamp, 0 for a no-op.
    pub fn timestamp_ms(&self) -> u64 {
        match *self {
            Command::Noop => 0,
            Command::Message { timestamp_ms, .. }
            | Command::Commit { timestamp_ms, .. }
            | Command::Window { timestamp_ms, .. } => timestamp_ms,
        }
    }
}

fn take<const N: usize>(data: &[u8]) -> Result<[u8; N], CommandError> {
    data.get(..N)
        .and_then(|s| s.try_into().ok())
        .ok_or(CommandError::Truncated)
}
