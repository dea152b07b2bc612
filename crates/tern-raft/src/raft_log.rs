//! raft-rs's logs (slog) in Tern's own (tracing), under the target `raft`, tagged with the group.
//! raft-rs reports every election and role change at info; Tern logs leader changes itself, once
//! each (`Replica::on_role_change`), so raft-rs's info goes to debug, its debug to trace, and its
//! warnings and errors stay what they are.

use std::fmt::Write;

/// A slog drain that hands each record to tracing, formatting it only when its level is enabled.
pub struct TracingDrain;

struct Fields(String);

impl slog::Serializer for Fields {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use tracing::Level;
        let level = match record.level() {
            slog::Level::Critical | slog::Level::Error => Level::ERROR,
            slog::Level::Warning => Level::WARN,
            slog::Level::Info => Level::DEBUG,
            slog::Level::Debug | slog::Level::Trace => Level::TRACE,
        };
        let enabled = match level {
            Level::ERROR => tracing::enabled!(target: "raft", Level::ERROR),
            Level::WARN => tracing::enabled!(target: "raft", Level::WARN),
            Level::DEBUG => tracing::enabled!(target: "raft", Level::DEBUG),
            _ => tracing::enabled!(target: "raft", Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut fields = Fields(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut fields);
        let _ = slog::KV::serialize(values, record, &mut fields);
        let message = record.msg();
        let fields = fields.0;
        match level {
            Level::ERROR => tracing::error!(target: "raft", "{message}{fields}"),
            Level::WARN => tracing::warn!(target: "raft", "{message}{fields}"),
            Level::DEBUG => tracing::debug!(target: "raft", "{message}{fields}"),
            _ => tracing::trace!(target: "raft", "{message}{fields}"),
        }
        Ok(())
    }
}

/// The logger a replica gives raft-rs: its records go to tracing, tagged with the group.
pub fn logger(group: impl std::fmt::Display) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("group" => group.to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn raft_records_reach_tracing_at_their_levels() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::fmt().with_max_level(tracing::Level::DEBUG).with_ansi(false).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            let log = super::logger("t1.p0");
            slog::warn!(log, "a warning"; "peer" => 3);
            slog::info!(log, "became leader"; "term" => 7);
            slog::debug!(log, "too chatty for debug");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("WARN raft: a warning peer=3 group=t1.p0"), "{text}");
        assert!(text.contains("DEBUG raft: became leader term=7"), "{text}");
        assert!(!text.contains("too chatty"), "{text}");
    }
}
