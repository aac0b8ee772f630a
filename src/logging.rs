//! tracing → journald when systemd started us, formatted text on stderr otherwise.
//!
//! journald gets structured fields (SERVICE, INSTANCE_PID, …) with their own priorities
//! rather than formatted text through one priority. Field names are fixed and documented
//! in apptainer-supervisor(8) so `journalctl -u ood001 INSTANCE_PID=…` works.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter::LevelFilter, Layer};

/// systemd sets these for services it starts; then stderr is the journal anyway, but the
/// native protocol keeps fields and levels.
pub fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

pub fn init(verbose: bool) {
    let level = if verbose {
        LevelFilter::DEBUG
    } else {
        LevelFilter::INFO
    };
    if under_systemd() {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer
                .with_field_prefix(None)
                .with_syslog_identifier("apptainer-supervisor".into());
            tracing_subscriber::registry()
                .with(layer.with_filter(level))
                .init();
            return;
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(false);
    tracing_subscriber::registry()
        .with(fmt.with_filter(level))
        .init();
}
