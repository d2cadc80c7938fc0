//! raft-rs logs through slog; this drain forwards its records to `tracing`.

use slog::{Drain, Level, OwnedKVList, Record, KV};
use std::fmt::Write as _;

/// A slog drain that writes each record as one `tracing` event, target
/// `shoal_replica::raft`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TracingDrain;

struct Fields(String);

impl slog::Serializer for Fields {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = Fields(String::new());
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let message = record.msg();
        match record.level() {
            Level::Critical | Level::Error => {
                tracing::error!(target: "shoal_replica::raft", "{message}{}", fields.0)
            }
            Level::Warning => {
                tracing::warn!(target: "shoal_replica::raft", "{message}{}", fields.0)
            }
            Level::Info => tracing::debug!(target: "shoal_replica::raft", "{message}{}", fields.0),
            Level::Debug | Level::Trace => {
                tracing::trace!(target: "shoal_replica::raft", "{message}{}", fields.0)
            }
        }
        Ok(())
    }
}

/// The logger every group's `RawNode` gets.
pub(crate) fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}
