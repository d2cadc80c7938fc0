//! Shoal's mesh wire protocol.
//!
//! Agents talk over long-lived QUIC streams that carry many frames each.
//! A frame is a 4-byte big-endian length, then a 1-byte protocol version,
//! then the body: one [`Message`] encoded with postcard (serde). Many frames
//! are encoded into one buffer and written together, so small messages share
//! packets. The decoder is incremental, bounded and never panics: a bad frame
//! is an error for that stream, never for the process.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use bytes::{BufMut, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub mod raft;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes before a frame's body: the length and the version.
pub const HEADER_LEN: usize = 5;
/// Largest frame body: a 16 MiB entry plus room for its metadata.
pub const MAX_FRAME_BYTES: usize = 17 * 1024 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME_BYTES`].
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The peer speaks a protocol version this build does not.
    #[error("protocol version {got} is not supported (this agent speaks {supported})")]
    UnsupportedVersion {
        /// Version in the frame.
        got: u8,
        /// Version spoken here.
        supported: u8,
    },
    /// A frame with no version byte.
    #[error("empty frame")]
    Empty,
    /// The body is not a valid message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// A message could not be encoded.
    #[error("cannot encode a message: {0}")]
    Encode(String),
}

/// Messages between agents. New variants go at the end: postcard encodes the
/// variant index, so the order is part of the protocol version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First frame on a connection: who is speaking.
    Hello {
        /// The agent's node name.
        node: String,
        /// Incremented on every restart, so peers tell a rejoin from a stale member.
        incarnation: u64,
        /// Whether the agent stores partitions.
        broker: bool,
    },
    /// Liveness probe.
    Ping {
        /// Echoed in the pong.
        seq: u64,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's sequence number.
        seq: u64,
    },
    /// The peer refuses the stream and says why (then closes it).
    Refuse {
        /// Why.
        reason: String,
    },
    /// Messages for partitions this agent's peer is home to. Answered by
    /// [`Message::Published`] with one result per entry, in order.
    Publish {
        /// Request id, echoed in the answer.
        req: u64,
        /// Topic.
        topic: String,
        /// The messages and the partitions the publishing agent chose.
        entries: Vec<PublishEntry>,
    },
    /// Answer to [`Message::Publish`].
    Published {
        /// The request's id.
        req: u64,
        /// One result per entry, in order.
        results: Vec<PublishResult>,
    },
    /// Reads a partition for a consumer group, waiting up to `wait_ms` for
    /// entries at or after `from`. Answered by [`Message::Fetched`].
    Fetch {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Consumer group.
        group: String,
        /// Where a group new to the partition starts (JSON of the start position).
        start: String,
        /// First offset wanted; `None` asks the home where the group resumes.
        from: Option<u64>,
        /// Most entries to return.
        max: u32,
        /// Longest wait for new entries, in milliseconds.
        wait_ms: u32,
    },
    /// Answer to [`Message::Fetch`].
    Fetched {
        /// The request's id.
        req: u64,
        /// Entries, or why not.
        result: Result<FetchedBatch, WireError>,
    },
    /// A consumer group's next offset on a partition, stored by its home. One way.
    Commit {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Consumer group.
        group: String,
        /// The next offset the group will read.
        next: u64,
    },
    /// A topic's configuration, shared with every agent. One way; the higher
    /// version wins.
    Topic {
        /// Topic name.
        name: String,
        /// The configuration, JSON.
        config: String,
        /// Version: milliseconds since the epoch of the change, 0 for a topic
        /// created implicitly with defaults.
        version: u64,
    },
    /// The consumer groups an agent has members in, replacing what it said
    /// before. One way.
    Subscribers {
        /// The agent's node name.
        node: String,
        /// Its subscriptions.
        subs: Vec<SubscriberRef>,
    },
    /// A request for one push subscriber of a topic on the receiving agent.
    /// Answered by [`Message::Reply`].
    Request {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
        /// The encoded message.
        message: Vec<u8>,
        /// How long the requester waits, in milliseconds.
        timeout_ms: u64,
    },
    /// Answer to [`Message::Request`]: the subscriber app's response.
    Reply {
        /// The request's id.
        req: u64,
        /// The response, or why there is none.
        result: Result<ReplyBody, WireError>,
    },
    /// A partition's log and committed offsets moving to its new home.
    /// Answered by [`Message::HandoffAck`].
    Handoff {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// True on the first chunk: the receiver replaces its copy,
        /// starting at `first_index`.
        reset: bool,
        /// The sender's first offset.
        first_index: u64,
        /// The sender's last offset: a receiver holding a longer copy keeps
        /// its own and answers `stale_copy`.
        end_index: u64,
        /// Entries of this chunk, in order.
        entries: Vec<WireEntry>,
        /// Committed offsets of the consumer groups (on the last chunk).
        offsets: Vec<(String, u64)>,
        /// True on the last chunk: the receiver may serve the partition.
        last: bool,
    },
    /// Answer to [`Message::Handoff`] and [`Message::HandoffRequest`].
    HandoffAck {
        /// The request's id.
        req: u64,
        /// Stored, or why not.
        result: Result<(), WireError>,
    },
    /// Asks the partition's previous home to hand it off to the sender, its new home.
    HandoffRequest {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// The sender stops gracefully and has handed off its partitions: take it
    /// out of placement now. One way.
    Leaving {
        /// The agent's node name.
        node: String,
    },
    /// A request could not be handled at all.
    Failed {
        /// The request's id.
        req: u64,
        /// Why.
        error: WireError,
    },
    /// Every member the sender knows, including down ones gossip forgot and
    /// ones that left: placement counts them, so a joining agent must too.
    /// One way, sent when a connection comes up.
    Roster {
        /// The members.
        members: Vec<RosterMember>,
    },
    /// Raft traffic of every group between the two agents (one-way; see [`raft`]).
    Raft(raft::RaftBatch),
    /// Asks the receiver, the home of the partitions listed, for their
    /// figures (offsets, size). Answered by [`Message::StatsAnswer`].
    Stats {
        /// Request id.
        req: u64,
        /// Topic.
        topic: String,
        /// Partitions wanted.
        partitions: Vec<u32>,
    },
    /// Answer to [`Message::Stats`]: the figures of the partitions the
    /// receiver serves (partitions it does not serve are left out).
    StatsAnswer {
        /// The request's id.
        req: u64,
        /// Figures, or why not.
        result: Result<Vec<PartitionStats>, WireError>,
    },
    /// One part of a [`Message::Raft`] frame too large for one frame (the
    /// snapshot of a partition holding more than a frame's worth). The parts
    /// of one transfer, in order, are the postcard of a [`raft::RaftBatch`];
    /// the receiver steps it once it has them all. One way.
    RaftPart {
        /// The sender's id of this transfer.
        transfer: u64,
        /// This part's place, from 0.
        part: u32,
        /// How many parts the transfer has.
        parts: u32,
        /// This part's bytes.
        bytes: Vec<u8>,
    },
}

/// A partition's figures as its home sees them ([`Message::StatsAnswer`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStats {
    /// Partition.
    pub partition: u32,
    /// Oldest stored offset.
    pub first_offset: u64,
    /// Offset the next message gets.
    pub next_offset: u64,
    /// Bytes on disk.
    pub bytes: u64,
    /// Segment files.
    pub segments: u64,
}

/// A member as [`Message::Roster`] describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterMember {
    /// Node name.
    pub node: String,
    /// Mesh address.
    pub addr: std::net::SocketAddr,
    /// Whether it stores partitions.
    pub broker: bool,
    /// Its incarnation as last seen.
    pub incarnation: u64,
    /// True when it left gracefully (with that incarnation).
    pub departed: bool,
}

impl Message {
    /// The request id of a request or an answer, if it is one.
    pub fn req(&self) -> Option<u64> {
        match self {
            Message::Publish { req, .. }
            | Message::Published { req, .. }
            | Message::Fetch { req, .. }
            | Message::Fetched { req, .. }
            | Message::Request { req, .. }
            | Message::Reply { req, .. }
            | Message::Handoff { req, .. }
            | Message::HandoffAck { req, .. }
            | Message::HandoffRequest { req, .. }
            | Message::Stats { req, .. }
            | Message::StatsAnswer { req, .. }
            | Message::Failed { req, .. } => Some(*req),
            _ => None,
        }
    }

    /// Whether this answers a request (rather than asking or informing).
    pub fn is_answer(&self) -> bool {
        matches!(
            self,
            Message::Published { .. }
                | Message::Fetched { .. }
                | Message::Reply { .. }
                | Message::HandoffAck { .. }
                | Message::StatsAnswer { .. }
                | Message::Failed { .. }
                | Message::Pong { .. }
        )
    }
}

/// A message to store, with the partition the publishing agent chose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishEntry {
    /// Partition.
    pub partition: u32,
    /// The encoded message.
    pub message: Vec<u8>,
}

/// Where a forwarded message was stored, or why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PublishResult {
    /// Stored (or found within the dedupe window).
    Stored {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// True when nothing new was stored because the id was seen before.
        duplicate: bool,
    },
    /// Not stored.
    Failed(WireError),
}

/// An error as the app API would answer it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// HTTP status.
    pub status: u16,
    /// The documented error code.
    pub code: String,
    /// For people.
    pub message: String,
    /// Seconds to wait before retrying, 0 for none.
    pub retry_after: u32,
}

/// A log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// Offset.
    pub index: u64,
    /// When it was stored.
    pub timestamp_ms: u64,
    /// The encoded message.
    pub data: Vec<u8>,
}

/// Entries read for a consumer group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedBatch {
    /// Where the group resumes (the `from` of the fetch, or the home's answer to `None`).
    pub start: u64,
    /// The partition's first offset (retention may have moved it past `start`).
    pub first_index: u64,
    /// Entries from `start` on.
    pub entries: Vec<WireEntry>,
}

/// A consumer group an agent has members in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SubscriberRef {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Whether a member pushes to the app (can answer requests).
    pub push: bool,
}

/// A subscriber app's response to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyBody {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

/// Appends one frame holding `msg` to `out`.
pub fn encode<T: Serialize>(msg: &T, out: &mut BytesMut) -> Result<(), FrameError> {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(PROTOCOL_VERSION);
    let body = postcard::to_extend(msg, Vec::new()).map_err(|e| FrameError::Encode(e.to_string()));
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    let len = body.len() + 1;
    if len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    out.put_slice(&body);
    let len = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: MAX_FRAME_BYTES,
    })?;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Takes the next whole frame off the front of `buf`, if one is there.
/// Returns `Ok(None)` when more bytes are needed; an error means the stream
/// is unusable and should be closed.
pub fn decode<T: DeserializeOwned>(buf: &mut BytesMut) -> Result<Option<T>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    let version = buf[4];
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            got: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let frame = buf.split_to(4 + len);
    let (msg, rest) = postcard::take_from_bytes::<T>(&frame[HEADER_LEN..])
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    Ok(Some(msg))
}

#[cfg(test)]
mod tests;
