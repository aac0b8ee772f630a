//! Stopping the container in order, with escalation: SIGRTMIN+3 to its init, then
//! `apptainer instance stop -F`, then SIGKILL; then the master's cleanup, bounded too.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::event_loop::{self, InnerEvents, Waits, Wake};
use super::report::Notice;
use super::{show_exit, Supervisor};
use crate::os::inner::InnerEvent;
use crate::os::instance::{self, ExitWatch, ProcId};
use crate::os::live::Phase;
use crate::plan::argv;

impl Supervisor<'_> {
    /// Orderly halt with escalation. Never returns early: when it returns, the container and
    /// the master are gone (or SIGKILLed and reaped as far as we can). A stop request
    /// meanwhile is noted and handed to the policy once the halt returns.
    pub(super) async fn halt(
        &mut self,
        container: &ProcId,
        container_fd: &ExitWatch,
        master: Option<&ProcId>,
        master_fd: Option<&ExitWatch>,
        events: Option<&mut InnerEvents>,
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
        if !self
            .halt_in_order(container, container_fd, events, stop, kill)
            .await
        {
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
            let forced = "the container is forced down";
            if !self.signals.exits_within(container_fd, kill, forced).await {
                self.notify.extend(kill * 2 + Duration::from_secs(5));
                instance::signal(container, libc::SIGKILL);
                let killed = "the container is killed";
                self.signals.exits_within(container_fd, kill, killed).await;
            }
        }
        // The master cleans up after its container (CNI DEL, loop device, state file).
        if let (Some(m), Some(mfd)) = (master, master_fd) {
            let why = "the master did not finish its cleanup in time; killing it";
            let exit = self.reap_within(m, mfd, kill, why).await;
            info!(master_pid = m.pid, EXIT_STATUS = %show_exit(exit), "master exited");
        }
        instance::try_reap(container.pid);
    }

    /// SIGRTMIN+3 to the container's init, then up to `stop` for it to exit. The init of a
    /// PID namespace drops a signal it has no handler for yet: until systemd has installed
    /// its handlers (which no pidfd tells), `/proc` is looked at every 50 ms, bounded by
    /// `stop`. Whether it halted in order.
    async fn halt_in_order(
        &mut self,
        container: &ProcId,
        container_fd: &ExitWatch,
        mut events: Option<&mut InnerEvents>,
        stop: Duration,
        kill: Duration,
    ) -> bool {
        let deadline = Instant::now() + stop;
        let sig = instance::sig_halt();
        let mut sent = false;
        let mut last = String::new();
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
            let poll = if sent {
                Duration::from_secs(5)
            } else {
                Duration::from_millis(50)
            };
            let waits: Waits = Waits {
                container: Some(container_fd),
                inner: events.as_deref_mut(),
                at: Some((Instant::now() + poll).min(deadline)),
                ..Waits::default()
            };
            match event_loop::next(&mut self.signals, waits).await {
                Wake::ContainerExited => return true,
                // While the inside shuts down in order, say how far it is (the notifier
                // keeps STATUS= to a few a second: hundreds of job changes come in a few ms).
                Wake::Inner(Some(InnerEvent::Changed(st) | InnerEvent::Connected(st))) => {
                    let msg = format!("stopping: {} jobs left inside", st.jobs);
                    if msg != last {
                        self.notify.progress(&msg);
                        last = msg;
                    }
                }
                Wake::Inner(None) => events = None,
                Wake::Deadline if Instant::now() >= deadline => return false,
                Wake::Deadline if sent => {
                    // Keep systemd's stop timeout ahead of us while the inside stops.
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.notify.extend(left + kill * 2 + Duration::from_secs(5));
                }
                Wake::Signal(sig) => self.signals.note(sig, "the container halts"),
                _ => {}
            }
        }
    }

    /// Waits up to `grace` for `p` to exit, SIGKILLs it (saying `why`) if it has not, waits
    /// for that (bounded again), and reaps it when it is our child. The one "wait out the
    /// grace, SIGKILL, reap" of the master, whichever way the container went.
    pub(super) async fn reap_within(
        &mut self,
        p: &ProcId,
        fd: &ExitWatch,
        grace: Duration,
        why: &str,
    ) -> Option<instance::Exit> {
        if !self
            .signals
            .exits_within(fd, grace, "the master exits")
            .await
        {
            warn!(master_pid = p.pid, "{why}");
            instance::signal(p, libc::SIGKILL);
            self.signals
                .exits_within(fd, grace, "the master is killed")
                .await;
        }
        instance::try_reap(p.pid)
    }
}
