//! `shoal-injector`: the admission webhook process.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::process::ExitCode;

use clap::Parser as _;
use shoal_injector::run::{init_logging, run, Args};

fn main() -> ExitCode {
    shoal_exposition::mark_process_start();
    let args = Args::parse();
    init_logging(&args);
    // rustls needs one process-wide provider for clients built by kube.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal-injector: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "shoal-injector failed");
            eprintln!("shoal-injector: {e}");
            ExitCode::FAILURE
        }
    }
}
