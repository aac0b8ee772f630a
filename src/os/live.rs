//! The running supervisor's live state, published for other commands (`status`, telegraf,
//! scripts) as `<run dir>/<name>.json`.
//!
//! The file is replaced atomically (a reader never sees half a file) whenever something an
//! operator would look at changes: the phase, the pids, the address, the inner manager's
//! state, the required units, failed units, restarts, the last error. The supervisor's own
//! pid and start time are in it, so a reader can tell a file whose writer is gone (killed
//! with SIGKILL, the host rebooted without /run being cleared) from a live one:
//! [`LiveState::is_stale`]. The schema is documented in apptainer-supervisor(8), section
//! STATE FILE; `schema` changes when a field changes meaning.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::os::inner::InnerState;
use crate::os::instance::ProcId;

/// The version of the file's layout.
pub const SCHEMA: u32 = 1;

/// Where a service's live state lives.
pub fn path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.json"))
}

/// Where the service is in its life. `stopped` and `failed` are final: the supervisor has
/// exited (the file stays, so `status` can say how the last run ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Reading the leftovers of an earlier run, preparing networks.
    #[default]
    Starting,
    /// `apptainer overlay create` is running.
    CreatingOverlay,
    /// `apptainer instance start` is running.
    StartingInstance,
    /// The instance is up; waiting for its systemd and the required units.
    Booting,
    /// READY=1 was sent.
    Ready,
    /// Ready before, now a required unit failed and is being restarted.
    Degraded,
    /// Halting the container.
    Stopping,
    /// The supervisor exited after a clean stop.
    Stopped,
    /// The supervisor exited with an error (`last_error`, `exit_code`).
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::CreatingOverlay => "creating-overlay",
            Phase::StartingInstance => "starting-instance",
            Phase::Booting => "booting",
            Phase::Ready => "ready",
            Phase::Degraded => "degraded",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }

    /// The supervisor has exited: its pid is not expected to live.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Stopped | Phase::Failed)
    }
}

/// A required unit inside, as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitSummary {
    pub active_state: String,
    pub sub_state: String,
    pub result: String,
}

/// The inner manager, as last seen over its bus.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InnerSummary {
    /// `SystemState`: initializing, starting, running, degraded, stopping …
    pub system_state: String,
    pub required_units: BTreeMap<String, UnitSummary>,
    /// Required units whose ActiveState is `failed`.
    pub failed_units: Vec<String>,
}

impl From<&InnerState> for InnerSummary {
    fn from(s: &InnerState) -> Self {
        InnerSummary {
            system_state: s.system_state.clone(),
            required_units: s
                .units
                .iter()
                .map(|(n, u)| {
                    (
                        n.clone(),
                        UnitSummary {
                            active_state: u.active_state.clone(),
                            sub_state: u.sub_state.clone(),
                            result: u.result.clone(),
                        },
                    )
                })
                .collect(),
            failed_units: s
                .units
                .iter()
                .filter(|(_, u)| u.active_state == "failed")
                .map(|(n, _)| n.clone())
                .collect(),
        }
    }
}

/// Everything in `<name>.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveState {
    pub schema: u32,
    pub service: String,
    pub phase: Phase,
    /// The last STATUS= line sent to systemd.
    pub status: String,
    /// The supervisor that writes this file.
    pub supervisor: Option<ProcId>,
    /// The container's init (what `apptainer instance list` calls PID).
    pub instance: Option<ProcId>,
    /// The Apptainer master (starter) of the instance.
    pub master: Option<ProcId>,
    /// The instance's address ("" without a network).
    pub ip: String,
    /// Unix time (s) when `apptainer instance start` was run; `ready_at` when READY=1 was sent.
    pub started_at: Option<u64>,
    pub ready_at: Option<u64>,
    /// Unix time (s) of this version of the file.
    pub updated_at: u64,
    pub inner: Option<InnerSummary>,
    /// Restarts of failed required units done by the supervisor in this run.
    pub restarts: u32,
    pub last_error: Option<String>,
    /// Unix time (ms) when the last ping of the container's systemd that went unanswered
    /// was sent (the watchdog: no WATCHDOG=1 for it). Pings go one at a time, so every
    /// earlier ping was settled by then.
    pub last_unanswered_ping_ms: Option<u64>,
    /// Set when the supervisor has exited (phase stopped or failed).
    pub exit_code: Option<i32>,
    /// `sha256:<64 hex>` of the managed image this run started (apptainer-supervisor(8),
    /// IMAGE POINTER); absent for an unmanaged image and in files of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// What the host checks warned about at start (paths others could write, binds that
    /// expose service files), for `status`. Absent in files of earlier versions.
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl LiveState {
    /// A file whose writer is gone without saying so: not final, and the supervisor pid
    /// (with its start time) is not alive any more.
    pub fn is_stale(&self) -> bool {
        !self.phase.is_final() && !self.supervisor.is_some_and(|p| p.is_alive())
    }

    pub fn read(path: &Path) -> Result<Option<LiveState>, StateFileError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|source| StateFileError::Parse {
                        path: path.to_owned(),
                        source,
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateFileError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{path}: cannot read the live state file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: malformed live state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// [`unix_now`] in milliseconds.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Keeps the state and writes it. Phase changes are written at once; other changes (the
/// job count while a system boots changes hundreds of times a second) are coalesced: the
/// loop calls [`Publisher::flush`] when [`Publisher::due`] says so.
pub struct Publisher {
    path: PathBuf,
    pub state: LiveState,
    written: Option<LiveState>,
    due: Option<Instant>,
    /// The last write failed: say so once, and once more when it works again.
    failing: bool,
}

/// How long a change other than the phase may wait before it is written.
pub const COALESCE: Duration = Duration::from_millis(200);

impl Publisher {
    pub fn new(run_dir: &Path, name: &str) -> Self {
        Publisher {
            path: path(run_dir, name),
            state: LiveState {
                schema: SCHEMA,
                service: name.to_owned(),
                supervisor: ProcId::of(std::process::id() as i32),
                ..LiveState::default()
            },
            written: None,
            due: None,
            failing: false,
        }
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the pending change must be written (None: nothing pending).
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Sets the phase (and the status line); written now.
    pub fn phase(&mut self, phase: Phase, status: &str) {
        self.state.phase = phase;
        if !status.is_empty() {
            self.state.status = status.to_owned();
        }
        self.flush();
    }

    /// Changes something other than the phase: written within [`COALESCE`].
    pub fn update(&mut self, f: impl FnOnce(&mut LiveState)) {
        f(&mut self.state);
        if self.due.is_none() {
            self.due = Some(Instant::now() + COALESCE);
        }
    }

    /// Writes the state if it differs from what was written last.
    pub fn flush(&mut self) {
        self.due = None;
        if self.written.as_ref() == Some(&self.state) {
            return;
        }
        let mut st = self.state.clone();
        st.updated_at = unix_now();
        let data = match serde_json::to_vec_pretty(&st) {
            Ok(mut d) => {
                d.push(b'\n');
                d
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot serialise the live state");
                return;
            }
        };
        // 0644: `status` run by any user may read it; only root writes /run.
        // No fsync: /run is emptied at boot anyway, and this runs on the way to READY=1.
        match crate::os::fsutil::write_replace(&self.path, &data, 0o644) {
            Ok(()) => {
                if self.failing {
                    tracing::info!(state_file = %self.path.display(), "live state file written again");
                    self.failing = false;
                }
                self.written = Some(self.state.clone());
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(state_file = %self.path.display(), error = %e, "cannot write the live state file; the previous one is left as it was");
                    self.failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_serialise_as_documented() {
        for (p, s) in [
            (Phase::Starting, "starting"),
            (Phase::CreatingOverlay, "creating-overlay"),
            (Phase::StartingInstance, "starting-instance"),
            (Phase::Booting, "booting"),
            (Phase::Ready, "ready"),
            (Phase::Degraded, "degraded"),
            (Phase::Stopping, "stopping"),
            (Phase::Stopped, "stopped"),
            (Phase::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{s}\""));
            assert_eq!(p.as_str(), s);
        }
    }

    #[test]
    fn a_dead_writer_makes_the_file_stale_unless_it_said_it_ended() {
        let mut st = LiveState {
            phase: Phase::Ready,
            // pid 1 with a start time it never had: not alive as far as we know.
            supervisor: Some(ProcId {
                pid: 1,
                start_time: u64::MAX,
            }),
            ..LiveState::default()
        };
        assert!(st.is_stale());
        st.phase = Phase::Stopped;
        assert!(!st.is_stale());
        st.phase = Phase::Ready;
        st.supervisor = ProcId::of(std::process::id() as i32);
        assert!(!st.is_stale());
    }

    #[test]
    fn publisher_writes_phase_changes_at_once_and_coalesces_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Publisher::new(dir.path(), "ood001");
        p.phase(Phase::Booting, "booting: instance pid 42");
        let on_disk = LiveState::read(p.path()).unwrap().unwrap();
        assert_eq!(on_disk.phase, Phase::Booting);
        assert_eq!(on_disk.service, "ood001");
        assert_eq!(on_disk.schema, SCHEMA);
        assert!(!on_disk.is_stale(), "written by a live process");

        p.update(|s| s.ip = "10.0.0.2".into());
        assert!(p.due().is_some());
        assert_eq!(LiveState::read(p.path()).unwrap().unwrap().ip, "");
        p.flush();
        assert_eq!(p.due(), None);
        assert_eq!(LiveState::read(p.path()).unwrap().unwrap().ip, "10.0.0.2");
    }

    #[test]
    fn an_unchanged_state_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Publisher::new(dir.path(), "x");
        p.phase(Phase::Ready, "running");
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p.path()).unwrap());
        p.update(|_| {});
        p.flush();
        let again = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p.path()).unwrap());
        assert_eq!(ino, again, "rename would have made a new inode");
    }

    #[test]
    fn a_failed_write_keeps_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Publisher::new(dir.path(), "x");
        p.phase(Phase::Ready, "running");
        let before = std::fs::read(p.path()).unwrap();
        // Make the directory unwritable for the temp file: as root, a path whose parent
        // is a regular file fails the same way a full disk does (no new file possible).
        let mut q = Publisher::new(&p.path().join("not-a-dir"), "x");
        q.phase(Phase::Failed, "x");
        assert!(q.failing);
        assert_eq!(std::fs::read(p.path()).unwrap(), before);
    }
}
