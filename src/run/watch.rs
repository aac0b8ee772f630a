//! Step 5 of a run: the loop that watches the running instance (SIGTERM/SIGINT/SIGABRT,
//! the container's and the master's pidfds, the instance's output, the inner bus, the
//! watchdog tick) and reacts to what it sees.

use std::path::Path;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tracing::{error, info, warn};

use super::{os, show_exit, Supervisor, Tracked};
use crate::config::{OnFailure, ReadinessMode};
use crate::exit::RunError;
use crate::os::apptainer;
use crate::os::inner::{self, Inner, InnerEvent, Shutdown};
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
        let mut w = WatchState {
            ready: false,
            last_status: String::new(),
            inner: None,
            events: None,
            ping: None,
            shutdown: None,
            restarts: std::collections::VecDeque::new(),
            failed_now: std::collections::BTreeSet::new(),
            verdict: None,
        };
        let start_deadline = self.started_at + Duration::from_secs(self.s.timeouts.start_sec);
        // Our own start timeout decides; keep systemd's TimeoutStartSec= behind it even
        // when overlay creation or an orphan's halt came first.
        if r.mode == ReadinessMode::InnerSystemd {
            let left = start_deadline.saturating_duration_since(Instant::now());
            self.notify.extend(left + Duration::from_secs(30));
        }
        match r.mode {
            ReadinessMode::Instance => {
                w.ready = true;
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
                self.notify.ready(&status);
                self.live.update(|s| s.ready_at = Some(live::unix_now()));
                self.live.phase(Phase::Ready, &status);
            }
            ReadinessMode::InnerSystemd => {
                if !inner::image_has_dbus(Path::new(&format!("/proc/{pid}/root"))) {
                    self.stop_tracked(&t, "stopping: the image has no D-Bus system bus", None)
                        .await;
                    return Err(RunError::NoInnerBus {
                        name: self.s.name.clone(),
                    });
                }
                self.live.phase(
                    Phase::Booting,
                    &format!("booting: instance pid {pid}; waiting for its system bus"),
                );
                self.status(&format!(
                    "booting: instance pid {pid}; waiting for its system bus"
                ));
                let left = start_deadline.saturating_duration_since(Instant::now());
                let container = t.container;
                // A stop request while we wait for the bus is served at once.
                let connected = tokio::select! {
                    r = Inner::connect(pid, left, || container.is_alive()) => Some(r),
                    sig = self.signals.recv() => {
                        info!(INSTANCE_PID = pid, signal = sig, "stop requested while the container boots");
                        None
                    }
                };
                let Some(connected) = connected else {
                    self.stop_tracked(&t, "stopping: halting the container", None)
                        .await;
                    return Ok(());
                };
                match connected {
                    Ok(i) => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        tokio::spawn(inner::watch(
                            i.clone(),
                            r.required_units.clone(),
                            r.accept_degraded,
                            tx,
                        ));
                        w.inner = Some(i);
                        w.events = Some(rx);
                    }
                    Err(e) if container.is_alive() => {
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
                    Err(_) => {}
                }
            }
        }
        let not_ready_by = tokio::time::sleep_until(start_deadline);
        tokio::pin!(not_ready_by);
        loop {
            let flush_due = self.live.due();
            tokio::select! {
                _ = sleep_until_opt(flush_due) => self.live.flush(),
                sig = self.signals.recv() => {
                    info!(INSTANCE_PID = pid, signal = sig, "stop requested");
                    self.stop_tracked(&t, "stopping: halting the container", w.events.as_mut()).await;
                    if sig == "SIGABRT" {
                        return Err(RunError::Aborted);
                    }
                    return Ok(());
                }
                _ = output.changed() => output.pump(),
                _ = t.container_fd.readable() => {
                    return match w.shutdown {
                        Some(kind) => Err(self.shut_down_inside(&t, kind).await),
                        None => Err(self.container_ended(&t).await),
                    };
                }
                _ = t.master_fd.readable() => {
                    if let (false, Some(kind)) = (t.container.is_alive(), w.shutdown) {
                        // Its container shut down from inside; the master is done.
                        return Err(self.shut_down_inside(&t, kind).await);
                    }
                    let exit = instance::try_reap(t.master.pid);
                    let container_alive = t.container.is_alive();
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
                    self.notify.stopping("master died: halting the container");
                    self.halt(&t.container, &t.container_fd, None, None, None).await;
                    self.release_networks(t.container.pid).await;
                    self.remove_leftovers();
                    return Err(RunError::MasterDied {
                        name: self.s.name.clone(),
                        pid: t.master.pid,
                        container: if container_alive { "was halted" } else { "died with it" },
                    });
                }
                ev = recv_opt(&mut w.events) => {
                    match ev {
                        Some(ev) => {
                            if let Some(err) = self.on_inner_event(&mut w, ev, &t).await {
                                return Err(err);
                            }
                        }
                        None => w.events = None,
                    }
                }
                _ = &mut not_ready_by, if !w.ready => {
                    let status = w.verdict.as_ref().map_or_else(|| "the container's systemd was not reached".to_owned(), |v| v.status.clone());
                    error!(INSTANCE_PID = pid, status = %status, timeout_sec = self.s.timeouts.start_sec, "not ready in time");
                    self.stop_tracked(&t, &format!("stopping: not ready after {} s: {status}", self.s.timeouts.start_sec), w.events.as_mut()).await;
                    return Err(RunError::NotReady { secs: self.s.timeouts.start_sec, status });
                }
                _ = tick(&watchdog) => {
                    // Both pidfds not readable ⇒ the instance is alive, and the loop answered.
                    // Once the inner manager is reached, it must answer too (bounded).
                    match &w.inner {
                        None => self.notify.watchdog(),
                        Some(inner) if w.ping.is_none() => {
                            let (tx, rx) = oneshot::channel();
                            let inner = inner.clone();
                            let bound = self.notify.watchdog_interval.unwrap_or(Duration::from_secs(1)) / 2;
                            tokio::spawn(async move { let _ = tx.send(inner.ping(bound).await); });
                            w.ping = Some(rx);
                        }
                        Some(_) => {
                            warn!(INSTANCE_PID = pid, "the container's systemd did not answer the last ping; no WATCHDOG=1");
                        }
                    }
                }
                answered = ping_opt(&mut w.ping) => {
                    w.ping = None;
                    if answered {
                        self.notify.watchdog();
                    } else {
                        warn!(INSTANCE_PID = pid, "the container's systemd did not answer in time; no WATCHDOG=1");
                    }
                }
            }
        }
    }

    /// One event from the inner watcher. Returns an error when the service must end.
    async fn on_inner_event(
        &mut self,
        w: &mut WatchState,
        ev: InnerEvent,
        t: &Tracked,
    ) -> Option<RunError> {
        let pid = t.container.pid;
        let r = self.s.readiness.clone();
        match ev {
            ev @ (InnerEvent::Connected(_) | InnerEvent::Changed(_)) => {
                let (ev_kind, state) = match ev {
                    InnerEvent::Connected(st) => (EvKind::Connected, st),
                    InnerEvent::Changed(st) => (EvKind::Changed, st),
                    _ => unreachable!("matched above"),
                };
                let v = inner::verdict(&state, &r.required_units, r.accept_degraded);
                let summary = InnerSummary::from(&state);
                if v.ready && !w.ready {
                    // READY=1 and its STATUS= in one datagram, without a status-only one first.
                    w.ready = true;
                    let status = self.with_ip(&v.status);
                    // READY=1 first (the inner boot's end → READY is what this loop is
                    // measured on), then the state file, before the loop waits again.
                    self.notify.ready(&status);
                    self.live.update(|s| {
                        s.inner = Some(summary);
                        s.ready_at = Some(live::unix_now());
                    });
                    self.live.phase(Phase::Ready, &status);
                    w.last_status = v.status.clone();
                    info!(INSTANCE_PID = pid, PHASE = "ready", SYSTEM_STATE = %state.system_state, IP = %self.ip, status = %status, "ready");
                } else {
                    if v.status != w.last_status {
                        self.notify.status(&v.status);
                        w.last_status = v.status.clone();
                    }
                    let back = w.ready && v.ready && self.live.state.phase == Phase::Degraded;
                    let status = v.status.clone();
                    self.live.update(|s| {
                        s.inner = Some(summary);
                        s.status = status.clone();
                    });
                    if back {
                        self.live.phase(Phase::Ready, &self.with_ip(&status));
                    }
                }
                let already_failed = if matches!(ev_kind, EvKind::Connected) {
                    v.failed.clone()
                } else {
                    Vec::new()
                };
                w.verdict = Some(v);
                // A required unit that had already failed when we connected gets the
                // policy too: no change signal will ever come for it.
                for (unit, result) in already_failed {
                    w.failed_now.insert(unit.clone());
                    warn!(INSTANCE_PID = pid, INNER_UNIT = %unit, ACTIVE_STATE = "failed", RESULT = %result, "required unit already failed");
                    if let Some(err) = self.on_unit_failed(w, &unit, &result, t).await {
                        return Some(err);
                    }
                }
                None
            }
            InnerEvent::UnitChanged(unit, u) => {
                let failed = u.active_state == "failed";
                let fields = |level_warn: bool| {
                    if level_warn {
                        warn!(INSTANCE_PID = pid, INNER_UNIT = %unit, ACTIVE_STATE = %u.active_state, SUB_STATE = %u.sub_state, RESULT = %u.result, "required unit changed");
                    } else {
                        info!(INSTANCE_PID = pid, INNER_UNIT = %unit, ACTIVE_STATE = %u.active_state, SUB_STATE = %u.sub_state, RESULT = %u.result, "required unit changed");
                    }
                };
                fields(failed);
                if !failed {
                    w.failed_now.remove(&unit);
                    return None;
                }
                if w.shutdown.is_none() && w.failed_now.insert(unit.clone()) {
                    return self.on_unit_failed(w, &unit, &u.result, t).await;
                }
                None
            }
            InnerEvent::Shutdown(kind) => {
                w.shutdown = Some(kind);
                let what = kind.as_str();
                info!(
                    INSTANCE_PID = pid,
                    PHASE = "stopping",
                    shutdown = what,
                    "the container is shutting down from inside"
                );
                self.notify
                    .stopping(&format!("stopping: {what} from inside the container"));
                None
            }
            InnerEvent::Lost(why) => {
                w.events = None;
                w.inner = None;
                if t.container.is_alive() && w.shutdown.is_none() {
                    warn!(INSTANCE_PID = pid, reason = %why, "lost the container's system bus; watching the instance only");
                    self.notify.status(
                        "running: the container's system bus is gone; watching the instance only",
                    );
                }
                None
            }
        }
    }

    /// The failure policy for a required unit that reached `failed` (its own `Restart=`
    /// has given up by then: while it still works the unit is `activating/auto-restart`).
    async fn on_unit_failed(
        &mut self,
        w: &mut WatchState,
        unit: &str,
        result: &str,
        t: &Tracked,
    ) -> Option<RunError> {
        let r = &self.s.readiness;
        match r.on_failure {
            OnFailure::Ignore => None,
            OnFailure::RestartUnit => {
                let now = Instant::now();
                let window = Duration::from_secs(r.restart_window_sec);
                while w
                    .restarts
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > window)
                {
                    w.restarts.pop_front();
                }
                if (w.restarts.len() as u32) < r.max_restarts {
                    w.restarts.push_back(now);
                    warn!(
                        INNER_UNIT = %unit,
                        RESULT = %result,
                        restart = w.restarts.len(),
                        max_restarts = r.max_restarts,
                        window_sec = r.restart_window_sec,
                        "restarting failed required unit (ResetFailed + RestartUnit)"
                    );
                    let status = format!(
                        "degraded: {unit} failed ({result}); restarting it ({}/{})",
                        w.restarts.len(),
                        r.max_restarts
                    );
                    self.notify.status(&status);
                    self.live.update(|s| {
                        s.restarts += 1;
                        s.last_error = Some(format!("{unit} failed ({result})"));
                    });
                    self.live.phase(Phase::Degraded, &status);
                    if let Some(inner) = w.inner.clone() {
                        let unit = unit.to_owned();
                        tokio::spawn(async move {
                            if let Err(e) = inner.restart_unit(&unit).await {
                                warn!(INNER_UNIT = %unit, error = %e, "restarting the unit failed");
                            }
                        });
                    }
                    None
                } else {
                    error!(INNER_UNIT = %unit, RESULT = %result, max_restarts = r.max_restarts, window_sec = r.restart_window_sec, "restart budget exhausted; restarting the whole service");
                    Some(self.give_up(w, unit, result, t).await)
                }
            }
            OnFailure::RestartService => {
                error!(INNER_UNIT = %unit, RESULT = %result, "required unit failed; restarting the whole service (readiness.on_failure = restart-service)");
                Some(self.give_up(w, unit, result, t).await)
            }
        }
    }

    /// Halts the container in order and ends the service with a failure, so that the unit's
    /// `Restart=on-failure` starts it afresh.
    async fn give_up(
        &mut self,
        w: &mut WatchState,
        unit: &str,
        result: &str,
        t: &Tracked,
    ) -> RunError {
        info!(INSTANCE_PID = t.container.pid, PHASE = "stopping", INNER_UNIT = %unit, RESULT = %result, "stopping");
        self.notify.stopping(&format!(
            "stopping: {unit} failed ({result}); the service will be restarted"
        ));
        self.halt(
            &t.container,
            &t.container_fd,
            Some(&t.master),
            Some(&t.master_fd),
            w.events.as_mut(),
        )
        .await;
        self.remove_leftovers();
        RunError::UnitFailed {
            unit: unit.to_owned(),
            result: result.to_owned(),
        }
    }

    /// The container ended after a shutdown job from inside: reboot → 133 (restarted by the
    /// unit's RestartForceExitStatus=), poweroff/halt → 0.
    async fn shut_down_inside(&mut self, t: &Tracked, kind: Shutdown) -> RunError {
        let grace = Duration::from_secs(self.s.timeouts.kill_sec);
        if timeout(grace, t.master_fd.readable()).await.is_err() {
            instance::signal(&t.master, libc::SIGKILL);
            let _ = t.master_fd.readable().await;
        }
        let exit = instance::try_reap(t.master.pid);
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
        events: Option<&mut mpsc::UnboundedReceiver<InnerEvent>>,
    ) {
        info!(INSTANCE_PID = t.container.pid, PHASE = "stopping", status = %why, "stopping");
        self.notify.stopping(why);
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
        let master_exit = match timeout(grace, t.master_fd.readable()).await {
            Ok(_) => instance::try_reap(t.master.pid),
            Err(_) => {
                warn!(
                    master_pid = t.master.pid,
                    "the master did not exit after its container; killing it"
                );
                instance::signal(&t.master, libc::SIGKILL);
                let _ = t.master_fd.readable().await;
                instance::try_reap(t.master.pid)
            }
        };
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

#[derive(Clone, Copy)]
enum EvKind {
    Connected,
    Changed,
}

/// What the watch loop knows beyond the two processes.
struct WatchState {
    ready: bool,
    last_status: String,
    inner: Option<Inner>,
    events: Option<mpsc::UnboundedReceiver<InnerEvent>>,
    ping: Option<oneshot::Receiver<bool>>,
    /// A shutdown job seen inside (reboot/poweroff/halt) that we did not ask for.
    shutdown: Option<Shutdown>,
    /// When required units were restarted, within the window.
    restarts: std::collections::VecDeque<Instant>,
    verdict: Option<inner::Verdict>,
    /// Required units whose failure was acted on and that have not left `failed` since.
    /// systemd sends the Unit and Service properties in separate signals, so one failure
    /// shows up more than once (e.g. `Result` reset by ResetFailed while ActiveState still
    /// reads `failed`): each failure must count once against the restart budget.
    failed_now: std::collections::BTreeSet<String>,
}

pub(super) async fn recv_opt(
    rx: &mut Option<mpsc::UnboundedReceiver<InnerEvent>>,
) -> Option<InnerEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn recv_opt_ref(
    rx: &mut Option<&mut mpsc::UnboundedReceiver<InnerEvent>>,
) -> Option<InnerEvent> {
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
