//! Where the agent's log lines go: journald with structured fields (DEPLOYMENT_ID,
//! DEPLOYMENT_GROUP, LIFECYCLE_EVENT, SCRIPT, ...) when the journal socket exists, plain
//! stderr otherwise. Log records carry those fields as `log` key-values; the stderr logger
//! prints them as `key=value` after the message.

use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};

/// Installs the process-wide logger at `level` (the daemon logs at info; the one-shot
/// commands, which print their own progress, at warn).
pub fn init(level: LevelFilter) {
    if systemd_journal_logger::connected_to_journal() || journal_socket_present() {
        if let Ok(j) = systemd_journal_logger::JournalLog::new() {
            if j.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    if log::set_boxed_logger(Box::new(StderrLog)).is_ok() {
        log::set_max_level(level);
    }
}

/// True when journald listens on this host, even if stderr is not connected to it (a daemon
/// started by hand on a systemd host still belongs in the journal).
fn journal_socket_present() -> bool {
    std::env::var_os("PIER_LOG_STDERR").is_none()
        && std::path::Path::new("/run/systemd/journal/socket").exists()
}

struct StderrLog;

struct Fields(String);

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.push_str(&format!(" {}={}", key.as_str(), value));
        Ok(())
    }
}

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut fields = Fields(String::new());
        let _ = record.key_values().visit(&mut fields);
        let _ = writeln!(
            std::io::stderr().lock(),
            "{} {:<5} {}{}",
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            record.level(),
            record.args(),
            fields.0
        );
    }

    fn flush(&self) {}
}
