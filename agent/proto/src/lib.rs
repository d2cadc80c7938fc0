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
