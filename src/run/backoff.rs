//! Back-off between failing starts. `Restart=on-failure` restarts a service that exits 69,
//! 71 or 75 every `RestartSec=` (5 s) for ever: with an NFS server away, that hammers the
//! host (and the server when it comes back) with starts that cannot work, and
//! `StartLimitBurst=` would give up for good on what is often a transient outage
//! (`RestartSteps=`, a growing delay in systemd itself, needs systemd 254; EL8 has 239).
//! So the supervisor waits before a start, for longer the more starts failed in a row:
//! the count lives in `<run dir>/<name>.backoff` beside the live state file (a reboot
//! empties it), a run that reaches READY removes it, and an operator who fixed the cause
//! removes it to start at once. The wait is a deadline of the one event loop, so a stop
//! during it is honoured at once.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::event_loop::{self, Waits, Wake};
use super::report::Notice;
use super::Supervisor;
use crate::exit::{self, RunError};
use crate::os::sanitize::one_line;

/// The delay after two failed starts; it doubles with each further one.
const BASE: Duration = Duration::from_secs(5);
/// The longest delay, whatever `timeouts.start_sec` allows.
const MAX: Duration = Duration::from_secs(300);
/// How much of the cause the file and `STATUS=` keep.
const MAX_CAUSE: usize = 200;

/// What `<name>.backoff` holds: how many starts in a row ended in 69/71/75, and why the
/// last did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub failures: u32,
    pub cause: String,
}

/// Where a service's back-off count lives.
pub(crate) fn path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.backoff"))
}

/// The record, or none (no file: no failed start in a row). An unreadable file counts as
/// none: a back-off is a courtesy to the host, never a reason not to start.
pub(crate) fn read(path: &Path) -> Record {
    match std::fs::read(path) {
        Ok(data) => serde_json::from_slice(&data).unwrap_or_else(|e| {
            warn!(error = %e, "unreadable back-off file {}; not backing off", path.display());
            Record::default()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Record::default(),
        Err(e) => {
            warn!(error = %e, "unreadable back-off file {}; not backing off", path.display());
            Record::default()
        }
    }
}

/// Whether a run that ended with `code` counts as a failed start: the codes that may pass
/// by themselves (an unreachable image or network, a failed system call, a busy overlay).
/// 78 (a bad config) is not restarted at all, 1 is the container's own end.
pub(crate) fn counts(code: i32) -> bool {
    matches!(code, exit::UNAVAILABLE | exit::OSERR | exit::TEMPFAIL)
}

/// The wait before a start after `failures` failed starts in a row: none after one (the
/// unit's `RestartSec=` is enough), then 5, 10, 20, 40 … s, never more than half of
/// `timeouts.start_sec` nor 5 minutes.
pub(crate) fn delay(failures: u32, start_sec: u64) -> Duration {
    if failures < 2 {
        return Duration::ZERO;
    }
    let cap = MAX.min(Duration::from_secs(start_sec / 2));
    let doublings = (failures - 2).min(16);
    (BASE * 2u32.pow(doublings)).min(cap)
}

impl Supervisor<'_> {
    /// Waits out the back-off the earlier failed starts call for, saying so in `STATUS=`
    /// and the journal, with `EXTEND_TIMEOUT_USEC` covering the wait and the start after
    /// it. A stop meanwhile ends the run at once (nothing was started).
    pub(super) async fn back_off(&mut self) -> Result<(), RunError> {
        let failures = self.backoff.failures;
        let d = delay(failures, self.s.timeouts.start_sec);
        if d.is_zero() {
            return Ok(());
        }
        let msg = format!(
            "backing off {} s after {failures} failed starts: {}",
            d.as_secs(),
            self.backoff.cause
        );
        warn!(
            "{msg} (remove {} to start at once)",
            self.backoff_path.display()
        );
        self.report(Notice::Status, None, &msg);
        self.live.flush();
        self.notify
            .extend(d + Duration::from_secs(self.s.timeouts.start_sec));
        let at = Instant::now() + d;
        loop {
            let waits: Waits = Waits {
                at: Some(at),
                ..Waits::default()
            };
            match event_loop::next(&mut self.signals, waits).await {
                Wake::Deadline => return Ok(()),
                Wake::Signal(sig) => {
                    info!(
                        signal = sig.name(),
                        "stop requested while backing off; nothing was started"
                    );
                    return Err(RunError::StoppedDuringStart);
                }
                _ => {}
            }
        }
    }

    /// A run that reached READY: the failures in a row are over.
    pub(super) fn clear_backoff(&mut self) {
        if self.backoff == Record::default() {
            return;
        }
        self.backoff = Record::default();
        match std::fs::remove_file(&self.backoff_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(error = %e, "cannot remove the back-off file {}", self.backoff_path.display())
            }
        }
    }

    /// At the end of a run: one more failed start in a row if it ended in 69/71/75.
    pub(super) fn count_failed_start(&mut self, result: &Result<(), RunError>) {
        let Err(e) = result else { return };
        if !counts(e.exit_code()) {
            return;
        }
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        self.backoff.failures = self.backoff.failures.saturating_add(1);
        self.backoff.cause = one_line(first, MAX_CAUSE).into_owned();
        let data = match serde_json::to_vec(&self.backoff) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot serialise the back-off record");
                return;
            }
        };
        if let Err(e) = crate::os::fsutil::write_replace(&self.backoff_path, &data, 0o644) {
            warn!(error = %e, "cannot write the back-off file {}; the next start will not back off", self.backoff_path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_failures_and_stay_well_inside_the_start_timeout() {
        let secs = |n| delay(n, 300).as_secs();
        assert_eq!(
            (0..8).map(secs).collect::<Vec<_>>(),
            [0, 0, 5, 10, 20, 40, 80, 150]
        );
        assert_eq!(secs(1000), 150, "half of start_sec");
        assert_eq!(delay(1000, 3600), MAX);
        assert_eq!(delay(5, 30).as_secs(), 15);
        assert_eq!(delay(5, 1), Duration::ZERO);
    }

    #[test]
    fn only_69_71_75_count() {
        assert!(counts(69) && counts(71) && counts(75));
        for c in [0, 1, 70, 73, 77, 78, 133] {
            assert!(!counts(c), "{c}");
        }
    }

    #[test]
    fn an_unreadable_or_missing_file_means_no_back_off() {
        let d = tempfile::tempdir().unwrap();
        let p = path(d.path(), "x");
        assert_eq!(read(&p), Record::default());
        std::fs::write(&p, b"not json").unwrap();
        assert_eq!(read(&p), Record::default());
        std::fs::write(&p, br#"{"failures":3,"cause":"nfs"}"#).unwrap();
        assert_eq!(
            read(&p),
            Record {
                failures: 3,
                cause: "nfs".into()
            }
        );
    }
}
