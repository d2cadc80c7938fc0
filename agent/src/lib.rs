//! `shoal-agent`: the Shoal sidecar.
//!
//! It serves the app API on loopback (publish, subscribe by push, pull or
//! server-sent events, request/reply), stores durable topics in per-partition
//! logs ([`shoal_storage`]), delivers to consumer groups with at-least-once
//! semantics, and exports Prometheus metrics on its admin port.
//!
//! The crate is split by job: [`broker`] owns topics, partitions and
//! publishing; [`group`] is the sans-IO consumer-group state machine and
//! [`delivery`] its I/O shell; [`api`] is the HTTP surface; [`admin`] the
//! admin port; [`client`] a small HTTP client shared by the `shoal` CLI,
//! tests and benchmarks.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod api;
pub mod broker;
pub mod client;
pub mod cloudevents;
pub mod config;
pub mod delivery;
pub mod entry;
pub mod error;
pub mod flusher;
pub mod group;
pub mod json_object;
pub mod mesh;
pub mod message;
pub mod metrics;
pub mod names;
pub mod replication;
pub mod router;
pub mod run;
pub mod subscription;
pub mod tenancy;
pub mod time;
pub mod topic;

pub use config::Config;
pub use error::{AgentError, ApiError};
