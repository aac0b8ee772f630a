//! Step 2 of a run: what an earlier run left behind, judged by the *container* pid (see
//! [`judge`]), and cleared: stale files removed, an orphan halted, a foreign instance
//! refused.

use std::io;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{os, Supervisor};
use crate::exit::RunError;
use crate::os::apptainer::{self, StateFile};
use crate::os::instance::{self, ProcId, RunRecord};

/// What was found from an earlier run, judged by the container pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Leftover {
    /// Nothing.
    Clean,
    /// Files of a dead instance: remove them.
    Stale,
    /// Our container is alive without its supervisor (the master may be gone): halt it.
    Orphan {
        container: ProcId,
        master: Option<ProcId>,
    },
    /// A live instance of that name that we did not start: never touch it.
    Foreign { pid: i32 },
}

/// Pure: decides what to do with an earlier run's traces. `now(pid)` is the process that
/// has `pid` now; `is_master(ppid)` says whether `ppid` is a live Apptainer master of this
/// instance (its cmdline is `Apptainer instance: <user> [<name>]`).
pub(crate) fn judge(
    state: Option<&StateFile>,
    record: Option<&RunRecord>,
    now: impl Fn(i32) -> Option<ProcId>,
    is_master: impl Fn(i32) -> bool,
) -> Leftover {
    if let Some(r) = record {
        if now(r.container.pid) == Some(r.container) {
            let master = Some(r.master).filter(|m| now(m.pid) == Some(*m));
            return Leftover::Orphan {
                container: r.container,
                master,
            };
        }
    }
    match state {
        // A live instance that our record does not know: someone else's (an old start.sh).
        // Apptainer's own test for a live instance is its master (instance_linux.go, ghost
        // cleanup): a pid in a state file left over from before a reboot may belong to
        // anything now, even another service's container.
        Some(s) if now(s.pid).is_some() && is_master(s.ppid) => Leftover::Foreign { pid: s.pid },
        Some(_) => Leftover::Stale,
        None if record.is_some() => Leftover::Stale,
        None => Leftover::Clean,
    }
}

/// Whether `ppid` is alive and is Apptainer's master for instance `name`.
pub(crate) fn is_master_of(ppid: i32, name: &str) -> bool {
    instance::cmdline(ppid).is_some_and(|c| master_cmdline_names(&c, name))
}

fn master_cmdline_names(cmdline: &[u8], name: &str) -> bool {
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    argv0.starts_with(apptainer::MASTER_CMDLINE_PREFIX)
        && argv0.ends_with(format!("[{name}]").as_bytes())
}

impl Supervisor<'_> {
    pub(super) async fn clear_leftovers(&mut self) -> Result<(), RunError> {
        let state = StateFile::read(&self.ctx.paths.state_file).unwrap_or_else(|e| {
            warn!(error = %e, "unreadable instance state file; treating it as stale");
            None
        });
        let record = RunRecord::read(&self.record_path);
        let name = self.s.name.clone();
        match judge(state.as_ref(), record.as_ref(), ProcId::live, |ppid| {
            is_master_of(ppid, &name)
        }) {
            Leftover::Clean => Ok(()),
            Leftover::Stale => {
                info!(
                    state_file = %self.ctx.paths.state_file.display(),
                    "removing leftovers of an instance that is no longer running"
                );
                // A state file still there means its master never finished its cleanup.
                if let Some(st) = state.as_ref().filter(|st| !is_master_of(st.ppid, &name)) {
                    self.release_networks(st.pid).await;
                }
                self.remove_leftovers();
                Ok(())
            }
            Leftover::Foreign { pid } => Err(RunError::ForeignInstance {
                name: self.s.name.clone(),
                pid,
            }),
            Leftover::Orphan { container, master } => {
                warn!(
                    INSTANCE_PID = container.pid,
                    master_alive = master.is_some(),
                    "found this service's container still running without its supervisor; halting it before starting fresh"
                );
                self.status("halting an orphaned instance from an earlier run");
                let container_fd = match instance::watch(&container) {
                    Ok(fd) => fd,
                    // It exited between judging and here: only its leftovers remain.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        self.remove_leftovers();
                        return Ok(());
                    }
                    Err(e) => return Err(os("pidfd_open(container)")(e)),
                };
                // A master that exits between judging and here is simply not waited for.
                let master_fd = master.and_then(|m| instance::watch(&m).ok());
                self.halt(
                    &container,
                    &container_fd,
                    master.as_ref(),
                    master_fd.as_ref(),
                    None,
                )
                .await;
                if master.is_none() {
                    self.release_networks(container.pid).await;
                }
                self.remove_leftovers();
                info!(INSTANCE_PID = container.pid, "orphaned instance halted");
                Ok(())
            }
        }
    }

    /// The CNI DEL a master that died without its cleanup never ran (see [`crate::host::cni_del`]),
    /// so that its IPAM leases are free for the next start.
    pub(super) async fn release_networks(&self, container_pid: i32) {
        if self.s.networks.is_empty() {
            return;
        }
        let per_plugin = Duration::from_secs(self.s.timeouts.kill_sec.max(1));
        for (network, r) in crate::host::cni_del::release(self.s, container_pid, per_plugin).await {
            match r {
                Ok(()) => info!(
                    network = %network,
                    container_id = container_pid,
                    "released the network the dead master left (CNI DEL)"
                ),
                Err(e) => warn!(
                    network = %network,
                    container_id = container_pid,
                    error = %e,
                    "could not release the network the dead master left"
                ),
            }
        }
    }

    /// Removes the run record and, when its master is gone, Apptainer's instance directory
    /// (Apptainer's own ghost cleanup would do the same on its next `instance list`).
    pub(super) fn remove_leftovers(&self) {
        let _ = std::fs::remove_file(&self.record_path);
        if let Ok(Some(st)) = StateFile::read(&self.ctx.paths.state_file) {
            if is_master_of(st.ppid, &self.s.name) {
                return;
            }
        }
        match std::fs::remove_dir_all(&self.ctx.paths.dir) {
            Ok(()) => debug!(dir = %self.ctx.paths.dir.display(), "removed instance directory"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %self.ctx.paths.dir.display(), error = %e, "cannot remove instance directory")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn st(pid: i32) -> StateFile {
        StateFile {
            pid,
            ppid: 10,
            name: "x".into(),
            user: "root".into(),
            image: String::new(),
            ip: String::new(),
            log_err_path: String::new(),
            log_out_path: String::new(),
            cgroup: true,
        }
    }

    fn rec(pid: i32, start: u64) -> RunRecord {
        RunRecord {
            name: "x".into(),
            container: ProcId {
                pid,
                start_time: start,
            },
            master: ProcId {
                pid: 10,
                start_time: 5,
            },
            state_file: PathBuf::new(),
            overlay: PathBuf::new(),
            supervisor_pid: 1,
        }
    }

    /// Processes alive now: (pid, start time).
    fn procs(alive: &'static [(i32, u64)]) -> impl Fn(i32) -> Option<ProcId> {
        move |pid| {
            alive
                .iter()
                .find(|(p, _)| *p == pid)
                .map(|&(pid, start_time)| ProcId { pid, start_time })
        }
    }

    #[test]
    fn master_cmdline_must_name_the_instance() {
        assert!(master_cmdline_names(
            b"Apptainer instance: root [ood001]\0/x",
            "ood001"
        ));
        assert!(!master_cmdline_names(
            b"Apptainer instance: root [ood002]\0",
            "ood001"
        ));
        assert!(!master_cmdline_names(
            b"/usr/sbin/httpd\0[ood001]",
            "ood001"
        ));
    }

    #[test]
    fn state_file_from_before_a_reboot_is_stale_even_if_its_pid_lives() {
        // The pid now belongs to something else and no master of this instance lives.
        assert_eq!(
            judge(Some(&st(20)), None, procs(&[(20, 3)]), |_| false),
            Leftover::Stale
        );
    }

    #[test]
    fn nothing_is_clean() {
        assert_eq!(judge(None, None, procs(&[]), |_| true), Leftover::Clean);
    }

    #[test]
    fn dead_container_is_stale() {
        assert_eq!(
            judge(Some(&st(20)), Some(&rec(20, 7)), procs(&[]), |_| true),
            Leftover::Stale
        );
        assert_eq!(
            judge(None, Some(&rec(20, 7)), procs(&[]), |_| true),
            Leftover::Stale
        );
    }

    #[test]
    fn our_container_alive_is_an_orphan_even_with_master_gone() {
        let got = judge(Some(&st(20)), Some(&rec(20, 7)), procs(&[(20, 7)]), |_| {
            true
        });
        assert_eq!(
            got,
            Leftover::Orphan {
                container: ProcId {
                    pid: 20,
                    start_time: 7
                },
                master: None
            }
        );
    }

    #[test]
    fn reused_pid_is_not_ours() {
        // Same pid, other start time, and it is no container init: a reused pid.
        assert_eq!(
            judge(Some(&st(20)), Some(&rec(20, 7)), procs(&[(20, 99)]), |_| {
                false
            }),
            Leftover::Stale
        );
    }

    #[test]
    fn unknown_live_instance_is_foreign() {
        assert_eq!(
            judge(Some(&st(20)), None, procs(&[(20, 3)]), |_| true),
            Leftover::Foreign { pid: 20 }
        );
    }
}
