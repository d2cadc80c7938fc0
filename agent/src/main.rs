//! `shoal-agent`: the Shoal sidecar.
#![forbid(unsafe_code)]

use clap::Parser;
use shoal_agent::config::LogFormat;
use shoal_agent::Config;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|e| {
        eprintln!(
            "shoal-agent: invalid --log-level {:?} ({e}); using info",
            config.log_level
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Plain => builder.init(),
    }
}

fn main() -> ExitCode {
    let config = Config::parse();
    init_logging(&config);
    // Two worker threads: a sidecar shares the pod's CPU with the app.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let running = match shoal_agent::run::start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        let stopper = running.stopper();
        tokio::spawn(async move {
            shoal_agent::run::signal().await;
            stopper.send_replace(true);
        });
        match running.wait().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("stopped with an error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
