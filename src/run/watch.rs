//! Step 5 of a run: watching the running instance through the event loop (the signals,
//! the container's and the master's pidfds, the instance's output, the inner bus, the
//! watchdog tick, the start deadline), turning what it sees into the policy's events and
//! carrying out the actions the policy returns.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::event_loop::{self, earliest, InnerEvents, Waits, Wake};
use super::policy::{Action, End, Event, Policy, Sig};
use super::report::Notice;
use super::{os, Supervisor, Tracked};
use crate::config::ReadinessMode;
use crate::exit::RunError;
use crate::host::cni_del;
use crate::os::inner::{self, Inner, InnerError, InnerEvent};
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
        // The overlay lock's probe, at each watchdog tick (one in flight at most: a hung NFS
        // read cannot be cancelled), and when its answer is due.
        let prober = self
            .claim
            .as_ref()
            .and_then(|c| c.prober())
            .map(std::sync::Arc::new);
        let mut lock: Option<oneshot::Receiver<crate::host::overlay_lock::Probe>> = None;
        let mut lock_due: Option<Instant> = None;
        // When the pending ping was sent (Unix ms), for the live state file.
        let mut ping_sent_ms = 0;
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
                self.say_ready(&status);
            }
            ReadinessMode::InnerSystemd => {
                if !inner::image_has_dbus(Path::new(&format!("/proc/{pid}/root"))) {
                    let why = "stopping: the image has no D-Bus system bus";
                    self.stop_tracked(&t, why, None, None).await;
                    return Err(RunError::NoInnerBus {
                        name: self.s.name.clone(),
                    });
                }
                self.report(
                    Notice::Status,
                    Some(Phase::Booting),
                    &format!("booting: instance pid {pid}; waiting for its system bus"),
                );
                match self.wait_for_bus(&t, start_deadline).await {
                    Err(sig) => {
                        let actions = policy.on(Event::Signal(sig), Instant::now());
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
                    Ok(Err(e)) if t.container.is_alive() => {
                        error!(INSTANCE_PID = pid, error = %e, "cannot reach the container's systemd");
                        let why = "stopping: the container's systemd cannot be reached";
                        self.stop_tracked(&t, why, None, None).await;
                        return Err(RunError::Inner(e));
                    }
                    // The container died while we waited: the loop below reports it.
                    Ok(Err(_)) => {}
                }
            }
        }
        loop {
            // The event loop orders the sources: signals first, then the container's pidfd,
            // then its master's, then the rest.
            let at = earliest([
                (!policy.is_ready()).then_some(start_deadline),
                lock_due,
                self.live.due(),
                output.deadline(),
            ]);
            let waits = Waits {
                container: Some(&t.container_fd),
                master: Some(&t.master_fd),
                inner: events.as_mut(),
                ping: ping.as_mut(),
                lock: lock.as_mut(),
                watchdog: watchdog.as_ref(),
                output: Some(&output),
                at,
                ..Waits::default()
            };
            let ev = match event_loop::next(&mut self.signals, waits).await {
                Wake::Signal(sig) => {
                    info!(INSTANCE_PID = pid, signal = sig.name(), "stop requested");
                    Event::Signal(sig)
                }
                Wake::ContainerExited => Event::ContainerExited,
                Wake::MasterExited => {
                    let container_alive = t.container.is_alive();
                    Event::MasterExited {
                        container_alive,
                        cleanup_done: !container_alive && self.master_cleaned_up(&t),
                    }
                }
                Wake::Inner(Some(ev)) => match self.on_inner_event(ev, &t) {
                    Some(ev) => ev,
                    None => continue,
                },
                Wake::Inner(None) => {
                    events = None;
                    continue;
                }
                Wake::WatchdogTick => {
                    if let (Some(p), None) = (&prober, &lock) {
                        let (tx, rx) = oneshot::channel();
                        let p = p.clone();
                        // A thread, not a task: the read blocks, and on a cut-off NFS client
                        // it may block for good.
                        std::thread::spawn(move || {
                            let _ = tx.send(p.probe());
                        });
                        lock = Some(rx);
                        let bound = self
                            .notify
                            .watchdog_interval
                            .unwrap_or(Duration::from_secs(1))
                            / 2;
                        lock_due = Some(Instant::now() + bound);
                    }
                    Event::WatchdogTick
                }
                Wake::Lock(probe) => {
                    lock = None;
                    lock_due = None;
                    Event::LockProbe(Some(probe))
                }
                Wake::Ping(answered) => {
                    ping = None;
                    if !answered {
                        let at = Some(ping_sent_ms);
                        self.live.update(|s| s.last_unanswered_ping_ms = at);
                    }
                    Event::PingAnswered(answered)
                }
                Wake::Output => {
                    output.pump();
                    continue;
                }
                Wake::Deadline => {
                    let now = Instant::now();
                    if lock_due.is_some_and(|d| d <= now) {
                        // Said once; the probe stays in flight, its late answer still counts.
                        lock_due = None;
                        Event::LockProbe(None)
                    } else {
                        if self.live.due().is_some_and(|d| d <= now) {
                            self.live.flush();
                        }
                        if output.deadline().is_some_and(|d| d <= now) {
                            output.pump();
                        }
                        if policy.is_ready() || start_deadline > now {
                            continue;
                        }
                        Event::StartDeadline
                    }
                }
                Wake::ChildExited | Wake::Stderr | Wake::Done(()) => continue,
            };
            if let Event::BusLost { .. } = ev {
                events = None;
                inner = None;
            }
            let actions = policy.on(ev, Instant::now());
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
                    ping_sent_ms = live::unix_now_ms();
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

    /// Waits (bounded by `until`, the start deadline) for the container's bus. A stop
    /// request meanwhile is served at once: `Err` with its signal.
    async fn wait_for_bus(
        &mut self,
        t: &Tracked,
        until: Instant,
    ) -> Result<Result<Inner, InnerError>, Sig> {
        let (pid, container) = (t.container.pid, t.container);
        let left = until.saturating_duration_since(Instant::now());
        let mut connect = std::pin::pin!(Inner::connect(pid, left, || container.is_alive()));
        loop {
            let waits = Waits {
                call: Some(connect.as_mut()),
                ..Waits::default()
            };
            match event_loop::next(&mut self.signals, waits).await {
                Wake::Signal(sig) => {
                    let signal = sig.name();
                    info!(
                        INSTANCE_PID = pid,
                        signal, "stop requested while the container boots"
                    );
                    return Err(sig);
                }
                Wake::Done(r) => return Ok(r),
                _ => {}
            }
        }
    }

    /// READY=1 first (nothing may delay it: the inner boot's end → READY is what the loop
    /// is measured on), the state file right after, before the loop waits again.
    fn say_ready(&mut self, status: &str) {
        self.live.update(|s| s.ready_at = Some(live::unix_now()));
        self.report(Notice::Ready, Some(Phase::Ready), status);
        self.clear_backoff();
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
                    self.say_ready(&status);
                    info!(INSTANCE_PID = pid, PHASE = "ready", SYSTEM_STATE = %self.system_state, IP = %self.ip, status = %status, "ready");
                }
                Action::Status(status) => self.report(Notice::Progress, None, &status),
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
                        for a in policy.on(Event::Signal(sig), Instant::now()) {
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
                Action::LockUnknown(why) => {
                    let status = match &why {
                        Some(e) => format!("running: the overlay's lock cannot be probed ({e}); its state is unknown"),
                        None => "running: the NFS server is not answering; the overlay's lock state is unknown".to_owned(),
                    };
                    warn!(INSTANCE_PID = pid, "{status}");
                    self.status(&status);
                }
                // Only seen after an End, handled there.
                Action::EndAs(_) => {}
            }
        }
        None
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
}
