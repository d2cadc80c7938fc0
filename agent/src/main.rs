//! `shoal-agent`: the Shoal sidecar.
#![forbid(unsafe_code)]

use clap::Parser;
use shoal_agent::entry::{self, Options};
use shoal_agent::Config;
use std::process::ExitCode;

fn main() -> ExitCode {
    let options = Options {
        program: "shoal-agent",
        outlive_stderr: false,
    };
    entry::run(Config::parse(), options, |_| {})
}
