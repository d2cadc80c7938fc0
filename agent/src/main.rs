//! `shoal-agent`: the Shoal sidecar.
#![forbid(unsafe_code)]

use clap::Parser;
use shoal_agent::entry::{self, Options};
use shoal_agent::Config;
use std::process::ExitCode;

/// The agent allocates and frees a few small buffers per message on every
/// hop (HTTP, routing, the mesh, the log); with glibc's malloc that was a
/// fifth of the publishing agent's CPU at 64 publishes in flight
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let options = Options {
        program: "shoal-agent",
        outlive_stderr: false,
    };
    entry::run(Config::parse(), options, |_| {})
}
