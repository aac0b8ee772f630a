//! Step 5 of a run: the loop that watches the running instance (SIGTERM/SIGINT/SIGABRT,
//! the container's and the master's pidfds, the instance's output, the inner bus, the
//! watchdog tick) and reacts to what it sees.

use std::path::Path;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::event_loop::{self, Wake};
use super::halt::reap_within;
use super::policy::{Action, End, Event, Policy};
use super::report::Notice;
use super::{os, show_exit, Supervisor, Tracked};
use crate::config::{OnFailure, ReadinessMode};
use crate::exit::RunError;
use crate::host::cni_del;
use crate::os::apptainer;
use crate::os::inner::{self, Inner, InnerEvent, InnerEvents, Shutdown};
use crate::os::instance::{self, Exit};
use crate::os::live::{self, InnerSummary, Phase};

impl Supervisor<'_> {
    pub(super) async fn watch(&mut self, t: Tracked) -> Result<(), RunError> {
        let pid = t.container.pid;
        info!(
            INSTANCE_PID = pid,
            PHASE = "booting",
            master_pid = t.master.pid,
            "instance running"
        );
        self.check_watchdog_setting();
        // The instance's own output → the journal; dropped (and so flushed) on every return.
        let p = &self.ctx.paths;
        let mut output = crate::os::output::Forwarder::new(
            &self.s.name,
            pid,
            &p.out_log,
            &p.err_log,
            self.log_start,
        );
        let watchdog = match self.notify.watchdog_interval {
            Some(d) => {
                Some(crate::os::notify::Ticker::new(d).map_err(os("creating the watchdog timer"))?)
            }
            None => None,
        };
        // The first ping right away, as tokio's interval did: the boot may take a while.
        if watchdog.is_some() {
            self.notify.watchdog();
        }
        let r = &self.s.readiness;
        let mut policy = Policy::new(r.clone(), r.mode == ReadinessMode::Instance);
        let mut inner: Option<Inner> = None;
        let mut events: Option<InnerEvents> = None;
        let mut ping: Option<oneshot::Receiver<bool>> = None;
        let start_deadline = self.started_at + Duration::from_secs(self.s.timeouts.start_sec);
        // Our own start timeout decides; keep systemd's TimeoutStartSec= behind it even
        // when overlay creation or an orphan's halt came first.
        if r.mode == ReadinessMode::InnerSystemd {
            let left = start_deadline.saturating_duration_since(Instant::now());
            self.notify.extend(left + Duration::from_secs(30));
        }
        match r.mode {
            ReadinessMode::Instance => {
                info!(
                    INSTANCE_PID = pid,
                    PHASE = "ready",
                    IP = %self.ip,
                    "ready (readiness.mode = instance: the instance is up)"
                );
                let status = self.with_ip(&format!(
                    "running: instance pid {pid} (readiness: instance up)"
                ));
                // READY=1 first (nothing may delay it), the state file right after: it is
                // written before the loop waits again, within a fraction of a millisecond.
                self.live.update(|s| s.ready_at = Some(live::unix_now()));
                self.report(Notice::Ready, Some(Phase::Ready), &status);
            }
            ReadinessMode::InnerSystemd => {
                if !inner::image_has_dbus(Path::new(&format!("/proc/{pid}/root"))) {
                    self.stop_tracked(&t, "stopping: the image has no D-Bus system bus", None)
                        .await;
                    return Err(RunError::NoInnerBus {
                        name: self.s.name.clone(),
                    });
                }
                self.report(
                    Notice::Status,
                    Some(Phase::Booting),
                    &format!("booting: instance pid {pid}; waiting for its system bus"),
                );
                let left = start_deadline.saturating_duration_since(Instant::now());
                let container = t.container;
                // A stop request while we wait for the bus is served at once.
                let connected = match event_loop::next(
                    &mut self.signals,
                    Inner::connect(pid, left, || container.is_alive()),
                )
                .await
                {
                    Wake::Signal(sig) => {
                        info!(
                            INSTANCE_PID = pid,
                            signal = sig.name(),
                            "stop requested while the container boots"
                        );
                        Err(sig)
                    }
                    Wake::Done(r) => Ok(r),
                };
                match connected {
                    Err(sig) => {
                        let actions = policy.on(Event::Signal(sig), std::time::Instant::now());
                        if let Some(r) = self
                            .act(&mut policy, actions, &t, &inner, &mut events)
                            .await
                        {
                            return r;
                        }
                    }
                    Ok(Ok(i)) => {
                        let (tx, rx) = inner::events();
                        tokio::spawn(inner::watch(
                            i.clone(),
                            r.required_units.clone(),
                            r.accept_degraded,
                            tx,
                        ));
                        inner = Some(i);
                        events = Some(rx);
                        policy.connected();
                    }
                    Ok(Err(e)) if container.is_alive() => {
                        error!(INSTANCE_PID = pid, error = %e, "cannot reach the container's systemd");
                        self.stop_tracked(
                            &t,
                            "stopping: the container's systemd cannot be reached",
                            None,
                        )
                        .await;
                        return Err(RunError::Inner(e));
                    }
                    // The container died while we waited: the loop below reports it.
                    Ok(Err(_)) => {}
                }
            }
        }
        let not_ready_by = tokio::time::sleep_until(start_deadline);
        tokio::pin!(not_ready_by);
        loop {
            let flush_due = self.live.due();
            // Signals first: with SIGABRT and SIGTERM both pending, the policy sees both
            // before anything else; then the pidfds, the container's before its master's.
            // Signals first (the event loop's), then the pidfds, the container's before its
            // master's: with SIGABRT and SIGTERM both pending, the policy sees both before
            // anything else.
            let source = async {
                tokio::select! {
                    biased;
                    _ = t.container_fd.readable() => Source::ContainerFd,
                    _ = t.master_fd.readable() => Source::MasterFd,
                    ev = recv_opt(&mut events) => Source::Inner(ev),
                    _ = &mut not_ready_by, if !policy.is_ready() => Source::StartDeadline,
                    _ = tick(&watchdog) => Source::WatchdogTick,
                    answered = ping_opt(&mut ping) => Source::Ping(answered),
                    _ = sleep_until_opt(flush_due) => Source::Flush,
                    _ = output.changed() => Source::Output,
                }
            };
            let ev = match event_loop::next(&mut self.signals, source).await {
                Wake::Signal(sig) => {
                    info!(INSTANCE_PID = pid, signal = sig.name(), "stop requested");
                    Event::Signal(sig)
                }
                Wake::Done(Source::ContainerFd) => Event::ContainerExited,
                Wake::Done(Source::MasterFd) => {
                    let container_alive = t.container.is_alive();
                    Event::MasterExited {
                        container_alive,
                        cleanup_done: !container_alive && self.master_cleaned_up(&t),
                    }
                }
                Wake::Done(Source::Inner(Some(ev))) => match self.on_inner_event(ev, &t) {
                    Some(ev) => ev,
                    None => continue,
                },
                Wake::Done(Source::Inner(None)) => {
                    events = None;
                    continue;
                }
                Wake::Done(Source::StartDeadline) => Event::StartDeadline,
                Wake::Done(Source::WatchdogTick) => Event::WatchdogTick,
                Wake::Done(Source::Ping(answered)) => {
                    ping = None;
                    Event::PingAnswered(answered)
                }
                Wake::Done(Source::Flush) => {
                    self.live.flush();
                    continue;
                }
                Wake::Done(Source::Output) => {
                    output.pump();
                    continue;
                }
            };
            if let Event::BusLost { .. } = ev {
                events = None;
                inner = None;
            }
            let actions = policy.on(ev, std::time::Instant::now());
            if actions.iter().any(|a| matches!(a, Action::End(_))) {
                // The container halts or has ended: no more waiting on its logs (the rest is
                // read when `output` is dropped).
                output.stop_watching();
            }
            if actions.contains(&Action::Ping) {
                if let Some(i) = &inner {
                    let (tx, rx) = oneshot::channel();
                    let i = i.clone();
                    let bound = self
                        .notify
                        .watchdog_interval
                        .unwrap_or(Duration::from_secs(1))
                        / 2;
                    tokio::spawn(async move {
                        let _ = tx.send(i.ping(bound).await);
                    });
                    ping = Some(rx);
                }
            }
            if let Some(r) = self
                .act(&mut policy, actions, &t, &inner, &mut events)
                .await
            {
                return r;
            }
        }
    }

    /// Reports one event from the inner watcher (the journal, the live state file) and
    /// turns it into the policy's event; `None` when there is nothing to decide.
    fn on_inner_event(&mut self, ev: InnerEvent, t: &Tracked) -> Option<Event> {
        let pid = t.container.pid;
        match ev {
            InnerEvent::Connected(state) => {
                self.inner_state(&state);
                Some(Event::Inner { state, first: true })
            }
            InnerEvent::Changed(state) => {
                self.inner_state(&state);
                Some(Event::Inner {
                    state,
                    first: false,
                })
            }
            // A ResetFailed half-applied: systemd sends the Unit and the Service properties in
            // separate signals, so `Result` reads success while ActiveState still reads
            // failed. A failed unit always has a non-success result: wait for the rest.
            InnerEvent::UnitChanged(_, u)
                if u.active_state == "failed" && u.result == "success" =>
            {
                None
            }
            InnerEvent::UnitChanged(unit, u) => {
                if u.active_state == "failed" {
                    warn!(INSTANCE_PID = pid, INNER_UNIT = %unit, ACTIVE_STATE = %u.active_state, SUB_STATE = %u.sub_state, RESULT = %u.result, "required unit changed");
                } else {
                    info!(INSTANCE_PID = pid, INNER_UNIT = %unit, ACTIVE_STATE = %u.active_state, SUB_STATE = %u.sub_state, RESULT = %u.result, "required unit changed");
                }
                Some(Event::UnitChanged {
                    unit,
                    active_state: u.active_state,
                    result: u.result,
                })
            }
            InnerEvent::Shutdown(kind) => Some(Event::Shutdown(kind)),
            InnerEvent::Lost(why) => Some(Event::BusLost {
                why,
                container_alive: t.container.is_alive(),
            }),
        }
    }

    /// Whether the exited master ran its cleanup, judged from what that cleanup leaves
    /// behind, before our own leftover cleanup touches anything: Apptainer's master runs
    /// the CNI DEL of every network and then removes its instance state file
    /// (cleanup_linux.go `CleanupContainer`, see DOUBLE.md row 15), then exits re-raising
    /// its container's signal. A state file that is gone is not proof on its own: a
    /// concurrent `apptainer instance list` or `stop` also removes the state file of a
    /// dead (even a zombie) master (instance_linux.go, ghost cleanup), so a master death
    /// can look clean. Then the CNI DEL is what tells: libcni's cached ADD result is
    /// still there when no DEL ran.
    fn master_cleaned_up(&self, t: &Tracked) -> bool {
        !self.ctx.paths.state_file.exists() && !cni_del::del_pending(self.s, t.container.pid)
    }

    /// The inner manager's state, as the live state file shows it.
    fn inner_state(&mut self, state: &inner::InnerState) {
        let summary = InnerSummary::from(state);
        self.system_state = state.system_state.clone();
        self.live.update(|s| s.inner = Some(summary));
    }

    /// Carries out the policy's actions, in order. `Some` when the run ends.
    async fn act(
        &mut self,
        policy: &mut Policy,
        actions: Vec<Action>,
        t: &Tracked,
        inner: &Option<Inner>,
        events: &mut Option<InnerEvents>,
    ) -> Option<Result<(), RunError>> {
        let pid = t.container.pid;
        for a in actions {
            match a {
                Action::Ready { status } => {
                    let status = self.with_ip(&status);
                    // READY=1 first (the inner boot's end → READY is what this loop is
                    // measured on), then the state file, before the loop waits again.
                    self.live.update(|s| s.ready_at = Some(live::unix_now()));
                    self.report(Notice::Ready, Some(Phase::Ready), &status);
                    info!(INSTANCE_PID = pid, PHASE = "ready", SYSTEM_STATE = %self.system_state, IP = %self.ip, status = %status, "ready");
                }
                Action::Status(status) => self.report(Notice::Status, None, &status),
                Action::BackToReady { status } => {
                    let status = self.with_ip(&status);
                    self.report(Notice::Status, Some(Phase::Ready), &status);
                }
                Action::RestartUnit {
                    unit,
                    result,
                    restart,
                    max,
                } => {
                    let window_sec = self.s.readiness.restart_window_sec;
                    warn!(
                        INNER_UNIT = %unit,
                        RESULT = %result,
                        restart,
                        max_restarts = max,
                        window_sec,
                        "restarting failed required unit (ResetFailed + RestartUnit)"
                    );
                    let status = format!(
                        "degraded: {unit} failed ({result}); restarting it ({restart}/{max})"
                    );
                    self.live.update(|s| {
                        s.restarts += 1;
                        s.last_error = Some(format!("{unit} failed ({result})"));
                    });
                    self.report(Notice::Status, Some(Phase::Degraded), &status);
                    if let Some(inner) = inner.clone() {
                        tokio::spawn(async move {
                            if let Err(e) = inner.restart_unit(&unit).await {
                                warn!(INNER_UNIT = %unit, error = %e, "restarting the unit failed");
                            }
                        });
                    }
                }
                Action::ShutdownInside(kind) => {
                    let what = kind.as_str();
                    info!(
                        INSTANCE_PID = pid,
                        PHASE = "stopping",
                        shutdown = what,
                        "the container is shutting down from inside"
                    );
                    self.report(
                        Notice::Stopping,
                        None,
                        &format!("stopping: {what} from inside the container"),
                    );
                }
                Action::WatchInstanceOnly { why } => {
                    warn!(INSTANCE_PID = pid, reason = %why, "lost the container's system bus; watching the instance only");
                    self.report(
                        Notice::Status,
                        None,
                        "running: the container's system bus is gone; watching the instance only",
                    );
                }
                // Started by the loop, which holds the answer's receiver.
                Action::Ping => {}
                Action::Watchdog => self.notify.watchdog(),
                Action::PingUnanswered => {
                    warn!(
                        INSTANCE_PID = pid,
                        "the container's systemd did not answer the last ping; no WATCHDOG=1"
                    );
                }
                Action::PingTimedOut => {
                    warn!(
                        INSTANCE_PID = pid,
                        "the container's systemd did not answer in time; no WATCHDOG=1"
                    );
                }
                Action::End(end) => {
                    let mut r = self.end(end, t, events.as_mut()).await;
                    // A signal that came while we halted still counts (see policy): those
                    // the loop noted while a call ran, then those still pending.
                    for sig in self.signals.take_noted() {
                        for a in policy.on(Event::Signal(sig), std::time::Instant::now()) {
                            if let Action::EndAs(End::Aborted) = a {
                                info!(
                                    INSTANCE_PID = pid,
                                    signal = sig.name(),
                                    "aborted while stopping"
                                );
                                r = Err(RunError::Aborted);
                            }
                        }
                    }
                    return Some(r);
                }
                // Only seen after an End, handled there.
                Action::EndAs(_) => {}
            }
        }
        None
    }

    /// Halts what is left and ends the run as the policy decided.
    async fn end(
        &mut self,
        end: End,
        t: &Tracked,
        events: Option<&mut InnerEvents>,
    ) -> Result<(), RunError> {
        let pid = t.container.pid;
        match end {
            End::Stopped => {
                self.stop_tracked(t, "stopping: halting the container", events)
                    .await;
                Ok(())
            }
            End::Aborted => {
                self.stop_tracked(t, "stopping: halting the container", events)
                    .await;
                Err(RunError::Aborted)
            }
            End::NotReady { status } => {
                let secs = self.s.timeouts.start_sec;
                error!(INSTANCE_PID = pid, status = %status, timeout_sec = secs, "not ready in time");
                self.stop_tracked(
                    t,
                    &format!("stopping: not ready after {secs} s: {status}"),
                    events,
                )
                .await;
                Err(RunError::NotReady { secs, status })
            }
            End::UnitFailed { unit, result } => {
                match self.s.readiness.on_failure {
                    OnFailure::RestartUnit => {
                        let r = &self.s.readiness;
                        error!(INNER_UNIT = %unit, RESULT = %result, max_restarts = r.max_restarts, window_sec = r.restart_window_sec, "restart budget exhausted; restarting the whole service");
                    }
                    _ => {
                        error!(INNER_UNIT = %unit, RESULT = %result, "required unit failed; restarting the whole service (readiness.on_failure = restart-service)");
                    }
                }
                info!(INSTANCE_PID = pid, PHASE = "stopping", INNER_UNIT = %unit, RESULT = %result, "stopping");
                self.report(
                    Notice::Stopping,
                    Some(Phase::Stopping),
                    &format!("stopping: {unit} failed ({result}); the service will be restarted"),
                );
                self.halt(
                    &t.container,
                    &t.container_fd,
                    Some(&t.master),
                    Some(&t.master_fd),
                    events,
                )
                .await;
                self.remove_leftovers();
                Err(RunError::UnitFailed { unit, result })
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
        let exit = reap_within(
            &t.master,
            &t.master_fd,
            grace,
            "the master did not exit after its container shut down; killing it",
        )
        .await;
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
    /// stopping and why, then removes what is left of it.
    pub(super) async fn stop_tracked(
        &mut self,
        t: &Tracked,
        why: &str,
        events: Option<&mut InnerEvents>,
    ) {
        info!(INSTANCE_PID = t.container.pid, PHASE = "stopping", status = %why, "stopping");
        self.report(Notice::Stopping, Some(Phase::Stopping), why);
        self.halt(
            &t.container,
            &t.container_fd,
            Some(&t.master),
            Some(&t.master_fd),
            events,
        )
        .await;
        self.remove_leftovers();
    }

    /// A status line with the instance's address, when it has one.
    pub(super) fn with_ip(&self, status: &str) -> String {
        if self.ip.is_empty() {
            status.to_owned()
        } else {
            format!("{status}; ip {}", self.ip)
        }
    }

    /// `timeouts.watchdog_sec` is the watchdog the service is meant to have; the unit's
    /// `WatchdogSec=` (seen as `WATCHDOG_USEC`) is what systemd enforces, so a difference is
    /// worth a warning.
    fn check_watchdog_setting(&self) {
        let unit = self
            .notify
            .watchdog_interval
            .map_or(0, |d| (d * 2).as_secs());
        let want = self.s.timeouts.watchdog_sec;
        if unit != want {
            warn!(
                unit_watchdog_sec = unit,
                config_watchdog_sec = want,
                "the unit's WatchdogSec= differs from timeouts.watchdog_sec; the unit's value is used (set it with a drop-in)"
            );
        }
    }

    /// The container exited without being asked: collect why, let the master clean up.
    async fn container_ended(&mut self, t: &Tracked) -> RunError {
        let pid = t.container.pid;
        // The master's exit status is the container's (Apptainer re-raises its signal).
        let grace = Duration::from_secs(self.s.timeouts.kill_sec);
        let master_exit = reap_within(
            &t.master,
            &t.master_fd,
            grace,
            "the master did not exit after its container; killing it",
        )
        .await;
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

/// What the running instance's sources woke the loop for.
enum Source {
    ContainerFd,
    MasterFd,
    Inner(Option<InnerEvent>),
    StartDeadline,
    WatchdogTick,
    Ping(bool),
    Flush,
    Output,
}

pub(super) async fn recv_opt(rx: &mut Option<InnerEvents>) -> Option<InnerEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn recv_opt_ref(rx: &mut Option<&mut InnerEvents>) -> Option<InnerEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn ping_opt(rx: &mut Option<oneshot::Receiver<bool>>) -> bool {
    match rx {
        Some(rx) => rx.await.unwrap_or(false),
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`; never wakes without one (no timer while nothing is pending).
pub(super) async fn sleep_until_opt(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn tick(t: &Option<crate::os::notify::Ticker>) {
    match t {
        Some(t) => t.tick().await,
        None => std::future::pending::<()>().await,
    }
}
