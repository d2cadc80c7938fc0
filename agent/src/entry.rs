//! The agent's process entry point, shared by `shoal-agent` and `shoal agent`:
//! logging, the runtime (`--worker-threads`), and a stop on SIGTERM or SIGINT.

use crate::config::{Config, LogFormat};
use std::process::ExitCode;
use tokio::sync::watch;

/// Worker threads of the agent's runtime by default (`--worker-threads`).
/// A sidecar shares its pod's CPU with the app, and one worker hands work
/// between its tasks without waking another thread: on two cores shared by
/// three agents it answered a publish waiting for each ack at a p50 of
/// 0.26 ms instead of 0.36 ms (docs/benchmarks.md). Replicated partitions'
/// periodic fsyncs run on a thread of their own.
pub const DEFAULT_WORKER_THREADS: u16 = 1;

/// How the process around the agent behaves.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Program name in messages printed before logging starts.
    pub program: &'static str,
    /// Drop log lines that cannot be written instead of reporting them:
    /// tracing-subscriber reports them with `eprintln!`, which panics once
    /// the reader of stderr (`shoal dev`) is gone.
    pub outlive_stderr: bool,
}

/// Sets up logging as `--log-level` and `--log-format` say, on stderr.
pub fn init_logging(config: &Config, options: Options) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level).unwrap_or_else(|e| {
        eprintln!(
            "{}: invalid --log-level {:?} ({e}); using info",
            options.program, config.log_level
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(!options.outlive_stderr);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Plain => builder.init(),
    }
}

/// Runs one agent until SIGTERM or SIGINT (or until `also_stop` sends
/// `true` on the stopper it is given) and returns the process's exit code.
pub fn run(
    config: Config,
    options: Options,
    also_stop: impl FnOnce(watch::Sender<bool>),
) -> ExitCode {
    init_logging(&config, options);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.worker_threads))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", options.program);
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let running = match crate::run::start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        let stopper = running.stopper();
        also_stop(stopper.clone());
        tokio::spawn(async move {
            crate::run::signal().await;
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
