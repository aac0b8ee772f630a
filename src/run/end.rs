//! How a run ends once the policy said so: the container halted (or collected when it
//! ended by itself), what is left removed, and the run's result.

use std::time::Duration;

use tracing::{error, info};

use super::event_loop::InnerEvents;
use super::policy::End;
use super::report::Notice;
use super::{show_exit, Supervisor, Tracked};
use crate::config::OnFailure;
use crate::exit::RunError;
use crate::os::apptainer;
use crate::os::inner::Shutdown;
use crate::os::instance::{self, Exit};
use crate::os::live::Phase;

impl Supervisor<'_> {
    /// Halts what is left and ends the run as the policy decided.
    pub(super) async fn end(
        &mut self,
        end: End,
        t: &Tracked,
        events: Option<&mut InnerEvents>,
    ) -> Result<(), RunError> {
        let pid = t.container.pid;
        let halting = "stopping: halting the container";
        match end {
            End::Stopped => {
                self.stop_tracked(t, halting, None, events).await;
                Ok(())
            }
            End::Aborted => {
                self.stop_tracked(t, halting, None, events).await;
                Err(RunError::Aborted)
            }
            End::NotReady { status } => {
                let secs = self.s.timeouts.start_sec;
                error!(INSTANCE_PID = pid, status = %status, timeout_sec = secs, "not ready in time");
                let why = format!("stopping: not ready after {secs} s: {status}");
                self.stop_tracked(t, &why, None, events).await;
                Err(RunError::NotReady { secs, status })
            }
            End::UnitFailed { unit, result } => {
                let r = &self.s.readiness;
                match r.on_failure {
                    OnFailure::RestartUnit => {
                        error!(INNER_UNIT = %unit, RESULT = %result, max_restarts = r.max_restarts, window_sec = r.restart_window_sec, "restart budget exhausted; restarting the whole service");
                    }
                    _ => {
                        error!(INNER_UNIT = %unit, RESULT = %result, "required unit failed; restarting the whole service (readiness.on_failure = restart-service)");
                    }
                }
                let why =
                    format!("stopping: {unit} failed ({result}); the service will be restarted");
                self.stop_tracked(t, &why, Some((&unit, &result)), events)
                    .await;
                Err(RunError::UnitFailed { unit, result })
            }
            End::LockLost { why } => {
                let path = self.s.overlay.path.clone();
                error!(INSTANCE_PID = pid, overlay = %path.display(), reason = %why, "the overlay's lock was lost; another host may be using the image: halting the container at once");
                let status = format!("stopping: the overlay's lock was lost ({why})");
                self.stop_tracked(t, &status, None, events).await;
                Err(RunError::LockLost { path, why })
            }
            End::ContainerEnded => Err(self.container_ended(t).await),
            End::ShutDownInside(kind) => Err(self.shut_down_inside(t, kind).await),
            End::MasterDied { container_alive } => {
                let exit = instance::try_reap(t.master.pid);
                error!(
                    INSTANCE_PID = pid,
                    PHASE = "stopping",
                    master_pid = t.master.pid,
                    EXIT_STATUS = %show_exit(exit),
                    container_alive,
                    "the Apptainer master died; its cleanup did not run"
                );
                // From here on we are stopping: tell systemd, so that the watchdog
                // does not fire while the container halts.
                self.report(
                    Notice::Stopping,
                    Some(Phase::Stopping),
                    "master died: halting the container",
                );
                self.halt(&t.container, &t.container_fd, None, None, None)
                    .await;
                self.release_networks(t.container.pid).await;
                self.remove_leftovers();
                Err(RunError::MasterDied {
                    name: self.s.name.clone(),
                    pid: t.master.pid,
                    container: if container_alive {
                        "was halted"
                    } else {
                        "died with it"
                    },
                })
            }
        }
    }

    /// The container ended after a shutdown job from inside: reboot → 133 (restarted by the
    /// unit's RestartForceExitStatus=), poweroff/halt → 0.
    async fn shut_down_inside(&mut self, t: &Tracked, kind: Shutdown) -> RunError {
        let grace = Duration::from_secs(self.s.timeouts.kill_sec);
        let why = "the master did not exit after its container shut down; killing it";
        let exit = self.reap_within(&t.master, &t.master_fd, grace, why).await;
        instance::try_reap(t.container.pid);
        self.remove_leftovers();
        info!(INSTANCE_PID = t.container.pid, EXIT_STATUS = %show_exit(exit), shutdown = kind.as_str(), "the container shut down from inside");
        match kind {
            Shutdown::Reboot => RunError::RebootedInside {
                name: self.s.name.clone(),
            },
            Shutdown::Poweroff | Shutdown::Halt => RunError::PoweredOffInside {
                name: self.s.name.clone(),
            },
        }
    }

    /// Halts the tracked instance in order (see [`Self::halt`]) after telling systemd we are
    /// stopping and why (`failed`: the required unit and its result, when that is why),
    /// then removes what is left of it.
    pub(super) async fn stop_tracked(
        &mut self,
        t: &Tracked,
        why: &str,
        failed: Option<(&str, &str)>,
        events: Option<&mut InnerEvents>,
    ) {
        let (unit, result) = failed.unzip();
        info!(INSTANCE_PID = t.container.pid, PHASE = "stopping", INNER_UNIT = unit, RESULT = result, status = %why, "stopping");
        self.report(Notice::Stopping, Some(Phase::Stopping), why);
        let (c, cfd) = (&t.container, &t.container_fd);
        self.halt(c, cfd, Some(&t.master), Some(&t.master_fd), events)
            .await;
        self.remove_leftovers();
    }

    /// The container exited without being asked: collect why, let the master clean up.
    async fn container_ended(&mut self, t: &Tracked) -> RunError {
        let pid = t.container.pid;
        // The master's exit status is the container's (Apptainer re-raises its signal).
        let grace = Duration::from_secs(self.s.timeouts.kill_sec);
        let why = "the master did not exit after its container; killing it";
        let master_exit = self.reap_within(&t.master, &t.master_fd, grace, why).await;
        // If the master died first the container became our child: reap it too.
        let container_exit = instance::try_reap(pid);
        let exit = container_exit
            .or(master_exit)
            .map_or_else(|| "unknown status".to_owned(), |e: Exit| e.to_string());
        let tail = apptainer::log_tail(&self.ctx.paths.err_log, 10);
        error!(INSTANCE_PID = pid, EXIT_STATUS = %exit, err_log_tail = %tail, "instance ended by itself");
        self.status(&format!("instance ended: {exit}"));
        self.remove_leftovers();
        RunError::InstanceEnded {
            name: self.s.name.clone(),
            pid,
            exit,
            tail: if tail.is_empty() {
                String::new()
            } else {
                format!(
                    "\nlast lines of {}:\n{tail}",
                    self.ctx.paths.err_log.display()
                )
            },
        }
    }
}
