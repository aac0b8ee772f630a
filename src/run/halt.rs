//! Stopping the container in order, with escalation: SIGRTMIN+3 to its init, then
//! `apptainer instance stop -F`, then SIGKILL; then the master's cleanup, bounded too.

use std::time::Duration;

use tokio::time::{timeout, Instant};
use tracing::{info, warn};

use super::report::Notice;
use super::watch::recv_opt_ref;
use super::{show_exit, Supervisor};
use crate::os::inner::{InnerEvent, InnerEvents};
use crate::os::instance::{self, ExitWatch, ProcId};
use crate::os::live::Phase;
use crate::plan::argv;

impl Supervisor<'_> {
    /// Orderly halt with escalation. Never returns early: when it returns, the container and
    /// the master are gone (or SIGKILLed and reaped as far as we can).
    pub(super) async fn halt(
        &mut self,
        container: &ProcId,
        container_fd: &ExitWatch,
        master: Option<&ProcId>,
        master_fd: Option<&ExitWatch>,
        mut events: Option<&mut InnerEvents>,
    ) {
        let to = self.s.timeouts;
        let stop = Duration::from_secs(to.stop_sec);
        let kill = Duration::from_secs(to.kill_sec);
        // An orphan halted before our own start is not this run stopping; a caller that
        // said why it stops has reported the phase already.
        if !matches!(self.live.state.phase, Phase::Starting | Phase::Stopping) {
            self.report(
                Notice::Status,
                Some(Phase::Stopping),
                "stopping: halting the container",
            );
        }
        // Room for the orderly halt plus both escalation steps.
        self.notify.extend(stop + kill * 2 + Duration::from_secs(5));
        let deadline = Instant::now() + stop;
        let sig = instance::sig_halt();
        let notify = self.notify.clone();
        let halted = async {
            // The init of a PID namespace drops a signal it has no handler for yet: wait
            // (bounded) until systemd has installed its handlers, then send.
            let mut sent = false;
            let mut last = String::new();
            let mut last_sent: Option<Instant> = None;
            loop {
                if !sent && instance::catches(container.pid, sig) {
                    sent = instance::signal(container, sig);
                    info!(
                        INSTANCE_PID = container.pid,
                        "sent SIGRTMIN+3 (halt) to the container's init"
                    );
                }
                if instance::is_stopped(container.pid) {
                    // SIGSTOPped (or traced): it cannot halt in order, however long we wait.
                    warn!(
                        INSTANCE_PID = container.pid,
                        "the container's init is stopped (T state); escalating at once"
                    );
                    return false;
                }
                let wait = if sent {
                    Duration::from_secs(5)
                } else {
                    Duration::from_millis(50)
                };
                tokio::select! {
                    _ = container_fd.readable() => return true,
                    ev = recv_opt_ref(&mut events) => match ev {
                        // While the inside shuts down in order, say how far it is.
                        Some(InnerEvent::Changed(st)) | Some(InnerEvent::Connected(st)) => {
                            // Hundreds of job changes in a few ms while the inside stops:
                            // a person reads a few updates a second, not each of them.
                            let msg = format!("stopping: {} jobs left inside", st.jobs);
                            let due = last_sent.is_none_or(|t| t.elapsed() >= Duration::from_millis(200));
                            if msg != last && due {
                                notify.status(&msg);
                                last = msg;
                                last_sent = Some(Instant::now());
                            }
                        }
                        Some(_) => {}
                        None => events = None,
                    },
                    _ = tokio::time::sleep(wait) => {
                        if sent {
                            // Keep systemd's stop timeout ahead of us while the inside stops.
                            let left = deadline.saturating_duration_since(Instant::now());
                            notify.extend(left + kill * 2 + Duration::from_secs(5));
                        }
                    }
                }
            }
        };
        // A bounded call the loop drives: a stop request meanwhile is noted and handed to
        // the policy once the halt returns.
        let in_order = self
            .signals
            .call("the container halts", timeout(stop, halted))
            .await;
        if !matches!(in_order, Ok(true)) {
            warn!(
                INSTANCE_PID = container.pid,
                timeout_sec = to.stop_sec,
                "the container did not halt in time; forcing it (apptainer instance stop -F, then SIGKILL)"
            );
            self.status("stopping: forcing the container down");
            // Each escalation step gets its own window (instance stop -F, SIGKILL, the
            // master's cleanup), so systemd's stop timeout stays ahead of us.
            self.notify.extend(kill * 3 + Duration::from_secs(5));
            let argv = argv::instance_stop_force(self.s);
            let m = master.zip(master_fd);
            let _ = self
                .run_cli_reaping(&argv, None, Some(Instant::now() + kill), m)
                .await;
            let forced = timeout(kill, container_fd.readable());
            if self
                .signals
                .call("the container is forced down", forced)
                .await
                .is_err()
            {
                self.notify.extend(kill * 2 + Duration::from_secs(5));
                instance::signal(container, libc::SIGKILL);
                let killed = timeout(kill, container_fd.readable());
                let _ = self.signals.call("the container is killed", killed).await;
            }
        }
        // The master cleans up after its container (CNI DEL, loop device, state file).
        if let (Some(m), Some(mfd)) = (master, master_fd) {
            let cleanup = reap_within(
                m,
                mfd,
                kill,
                "the master did not finish its cleanup in time; killing it",
            );
            let exit = self.signals.call("the master cleans up", cleanup).await;
            info!(master_pid = m.pid, EXIT_STATUS = %show_exit(exit), "master exited");
        }
        instance::try_reap(container.pid);
    }
}

/// Waits up to `grace` for `p` to exit, SIGKILLs it (saying `why`) if it has not, waits
/// for that (bounded again), and reaps it when it is our child. The one "wait out the
/// grace, SIGKILL, reap" of the master, whichever way the container went.
pub(super) async fn reap_within(
    p: &ProcId,
    fd: &ExitWatch,
    grace: Duration,
    why: &str,
) -> Option<instance::Exit> {
    if timeout(grace, fd.readable()).await.is_err() {
        warn!(master_pid = p.pid, "{why}");
        instance::signal(p, libc::SIGKILL);
        let _ = timeout(grace, fd.readable()).await;
    }
    instance::try_reap(p.pid)
}
