//! `shoal-injector`: Shoal's control plane for Kubernetes.
//!
//! A mutating admission webhook adds the agent sidecar to every new pod of an
//! opted-in namespace. The injection logic ([`inject`]) is shared by the
//! webhook ([`admission`], [`server`]) and by offline injection ([`offline`],
//! the `shoal inject` command), so both produce the same pods.
//!
//! - [`config`]: what gets injected and its defaults.
//! - [`annotations`]: the annotations read and written, and their parsing.
//! - [`inject`]: the decision and the JSON Patch.
//! - [`admission`]: AdmissionReview v1 in and out, fail-open.
//! - [`nscache`]: namespaces watched with a kube-rs reflector.
//! - [`tls`], [`bootstrap`]: serving certificates from files or self-made.
//! - [`identity`], [`meshca`]: the identity service that signs agent
//!   certificates with the mesh CA kept in a Secret.
//! - [`podcert`]: the signer of Kubernetes pod certificates (KEP-4317),
//!   the other way to the same certificates.
//! - [`peers`]: discovery, from a watch of injected pods.
//! - [`server`], [`run`]: the HTTPS and admin servers and the process.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admission;
pub mod annotations;
pub mod bootstrap;
pub mod config;
pub mod error;
pub mod identity;
pub mod inject;
pub mod meshca;
pub mod metrics;
pub mod nscache;
pub mod offline;
pub mod peers;
pub mod podcert;
pub mod run;
pub mod server;
pub mod tls;
mod watch;

pub use config::InjectConfig;
pub use error::InjectorError;
