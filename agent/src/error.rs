//! Errors: [`ApiError`] is what an app sees (a status and a JSON body);
//! [`AgentError`] is what stops the agent from starting or running.

use http::StatusCode;
use std::path::PathBuf;

/// An error answered to an app as `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, documented in docs/api.md.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Seconds for the `Retry-After` header on 429 and 503.
    pub retry_after: Option<u32>,
    /// The methods a route serves, for the `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: None,
        }
    }
    /// 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 404.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    /// 409.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    /// 503 with `Retry-After`.
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry_after: u32) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message);
        e.retry_after = Some(retry_after);
        e
    }
    /// 429 with `Retry-After`.
    pub fn too_many(code: &'static str, message: impl Into<String>, retry_after: u32) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        e.retry_after = Some(retry_after);
        e
    }
    /// 500, for storage failures that are not the caller's fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({"error": {"code": self.code, "message": self.message}}).to_string()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl From<shoal_storage::StorageError> for ApiError {
    fn from(e: shoal_storage::StorageError) -> Self {
        ApiError::unavailable("storage_error", format!("storage: {e}"), 1)
    }
}

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A flag or environment variable is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The data directory or a log could not be opened.
    #[error("storage at {path}: {message}")]
    Storage {
        /// Where.
        path: PathBuf,
        /// What.
        message: String,
    },
    /// Other I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}
