//! What the supervisor does about what it sees while the instance runs: every readiness
//! verdict and every fault reaction is decided here, and only here.
//!
//! A pure state machine: [`Policy::on`] takes one [`Event`] (a signal, a pidfd, the inner
//! manager's state, a deadline, the watchdog tick) and the time, and returns the
//! [`Action`]s to take, in order. No tokio, no I/O, no clock of its own: `run/watch.rs`
//! turns what the loop (`run/event_loop.rs`, signals first) wakes it for into events and
//! carries out the actions, and the tables at the bottom of this file test the decisions
//! as event sequences.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::config::{OnFailure, Readiness};
use crate::os::inner::{self, InnerState, Shutdown};

/// A signal that stops the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sig {
    Term,
    Int,
    /// What systemd sends when our watchdog expires (`WatchdogSignal=`).
    Abrt,
}

impl Sig {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Sig::Term => "SIGTERM",
            Sig::Int => "SIGINT",
            Sig::Abrt => "SIGABRT",
        }
    }
}

/// Something the loop saw.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    Signal(Sig),
    /// The container's pidfd became readable.
    ContainerExited,
    /// The master's pidfd became readable; whether the container still lives, and whether
    /// what the master's cleanup leaves behind is there (its state file removed, its CNI
    /// DEL run).
    MasterExited {
        container_alive: bool,
        cleanup_done: bool,
    },
    /// The inner manager's state: `first` when just connected (units that had failed
    /// before get no change signal, so they count now).
    Inner {
        state: InnerState,
        first: bool,
    },
    /// A required unit's ActiveState changed.
    UnitChanged {
        unit: String,
        active_state: String,
        result: String,
    },
    /// A job for reboot/poweroff/halt was queued inside.
    Shutdown(Shutdown),
    /// The container's bus went away, and why.
    BusLost {
        why: String,
        container_alive: bool,
    },
    /// `timeouts.start_sec` passed.
    StartDeadline,
    /// The watchdog interval passed.
    WatchdogTick,
    /// The inner manager answered the last ping (or not, within its bound).
    PingAnswered(bool),
    /// What the probe of the overlay's claim found (see `host::overlay_lock`); `None`: it
    /// did not answer within its bound (a cut-off NFS client's call hangs).
    LockProbe(Option<crate::host::overlay_lock::Probe>),
}

/// How the run ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Stopped on request (SIGTERM/SIGINT): exit 0.
    Stopped,
    /// SIGABRT (the watchdog): halted, exit 1.
    Aborted,
    /// Not ready within `timeouts.start_sec`, with the last readiness status.
    NotReady { status: String },
    /// A required unit failed past the policy: the service restarts as a whole.
    UnitFailed { unit: String, result: String },
    /// The container exited without being asked.
    ContainerEnded,
    /// The container ended after a shutdown job from inside.
    ShutDownInside(Shutdown),
    /// The master died; its cleanup did not run.
    MasterDied { container_alive: bool },
    /// The overlay's lock was lost (and why): halted at once, exit 74.
    LockLost { why: String },
}

/// What to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// READY=1 with this status (the address appended by the loop).
    Ready { status: String },
    /// A new readiness status (STATUS=), not a phase change.
    Status(String),
    /// Back from degraded to ready, with this status.
    BackToReady { status: String },
    /// A required unit failed and is restarted (n of max).
    RestartUnit {
        unit: String,
        result: String,
        restart: usize,
        max: u32,
    },
    /// A shutdown from inside began: STOPPING=1.
    ShutdownInside(Shutdown),
    /// The bus is gone while the container runs (and why): watch the instance only.
    WatchInstanceOnly { why: String },
    /// Ask the inner manager whether it answers (bounded).
    Ping,
    /// WATCHDOG=1.
    Watchdog,
    /// The last ping is still unanswered: no WATCHDOG=1.
    PingUnanswered,
    /// The inner manager did not answer within the bound: no WATCHDOG=1.
    PingTimedOut,
    /// The overlay's lock could not be probed (why), or the probe did not answer (`None`):
    /// a warning and a status; the run goes on.
    LockUnknown(Option<String>),
    /// Halt what runs (unless it ended) and end the run so.
    End(End),
    /// The run already ends; it ends as this instead (a SIGABRT seen while stopping).
    EndAs(End),
}

/// The loop's knowledge beyond the two processes.
#[derive(Debug)]
pub(crate) struct Policy {
    r: Readiness,
    ready: bool,
    degraded: bool,
    last_status: String,
    /// The last readiness status, for a `NotReady` end.
    verdict_status: Option<String>,
    /// A shutdown job seen inside (reboot/poweroff/halt) that we did not ask for.
    shutdown: Option<Shutdown>,
    /// The inner manager is reachable: pings go to it.
    bus: bool,
    ping_pending: bool,
    /// When required units were restarted, within the window.
    restarts: VecDeque<Instant>,
    /// Required units whose failure was acted on and that have not left `failed` since.
    /// systemd sends the Unit and Service properties in separate signals, so one failure
    /// shows up more than once (e.g. `Result` reset by ResetFailed while ActiveState still
    /// reads `failed`): each failure must count once against the restart budget.
    failed_now: BTreeSet<String>,
    ending: Option<End>,
}

impl Policy {
    /// `ready`: readiness is already given (readiness.mode = instance).
    pub(crate) fn new(r: Readiness, ready: bool) -> Policy {
        Policy {
            r,
            ready,
            degraded: false,
            last_status: String::new(),
            verdict_status: None,
            shutdown: None,
            bus: false,
            ping_pending: false,
            restarts: VecDeque::new(),
            failed_now: BTreeSet::new(),
            ending: None,
        }
    }

    /// The inner manager was reached: pings go to it from now on.
    pub(crate) fn connected(&mut self) {
        self.bus = true;
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready
    }

    /// The one decision: what to do about `ev` at `now`.
    pub(crate) fn on(&mut self, ev: Event, now: Instant) -> Vec<Action> {
        if let Some(ending) = &self.ending {
            // Stopping already. A SIGABRT seen before we exit is still the watchdog's
            // verdict: exit 1, whichever signal came first.
            return match ev {
                Event::Signal(Sig::Abrt) if *ending == End::Stopped => {
                    self.ending = Some(End::Aborted);
                    vec![Action::EndAs(End::Aborted)]
                }
                _ => Vec::new(),
            };
        }
        match ev {
            Event::Signal(sig) => self.end(match sig {
                Sig::Abrt => End::Aborted,
                Sig::Term | Sig::Int => End::Stopped,
            }),
            Event::ContainerExited => self.end(match self.shutdown {
                Some(kind) => End::ShutDownInside(kind),
                None => End::ContainerEnded,
            }),
            Event::MasterExited {
                container_alive,
                cleanup_done,
            } => match (container_alive, self.shutdown) {
                // Its container shut down from inside; the master is done.
                (false, Some(kind)) => self.end(End::ShutDownInside(kind)),
                // The container ended by itself and its master cleaned up after it, as
                // Apptainer's master does before it exits (re-raising the container's
                // signal, so both exits read alike): the instance ended, nothing died.
                (false, None) if cleanup_done => self.end(End::ContainerEnded),
                _ => self.end(End::MasterDied { container_alive }),
            },
            Event::Inner { state, first } => self.on_inner(&state, first, now),
            Event::UnitChanged {
                unit,
                active_state,
                result,
            } => {
                if active_state != "failed" {
                    self.failed_now.remove(&unit);
                    return Vec::new();
                }
                if self.shutdown.is_none() && self.failed_now.insert(unit.clone()) {
                    return self.on_unit_failed(unit, result, now);
                }
                Vec::new()
            }
            Event::Shutdown(kind) => {
                self.shutdown = Some(kind);
                vec![Action::ShutdownInside(kind)]
            }
            Event::BusLost {
                why,
                container_alive,
            } => {
                self.bus = false;
                self.ping_pending = false;
                if container_alive && self.shutdown.is_none() {
                    vec![Action::WatchInstanceOnly { why }]
                } else {
                    Vec::new()
                }
            }
            Event::StartDeadline if !self.ready => self.end(End::NotReady {
                status: self
                    .verdict_status
                    .clone()
                    .unwrap_or_else(|| "the container's systemd was not reached".to_owned()),
            }),
            Event::StartDeadline => Vec::new(),
            // Both pidfds not readable ⇒ the instance is alive, and the loop answered. Once
            // the inner manager is reached, it must answer too (bounded).
            Event::WatchdogTick if !self.bus => vec![Action::Watchdog],
            Event::WatchdogTick if self.ping_pending => vec![Action::PingUnanswered],
            Event::WatchdogTick => {
                self.ping_pending = true;
                vec![Action::Ping]
            }
            // A lost lock: another host may mount the image now. Better a stopped service
            // than a corrupted overlay; no more WATCHDOG=1 from here.
            Event::LockProbe(Some(crate::host::overlay_lock::Probe::Lost(why))) => {
                self.end(End::LockLost { why })
            }
            Event::LockProbe(Some(crate::host::overlay_lock::Probe::Held)) => Vec::new(),
            Event::LockProbe(Some(crate::host::overlay_lock::Probe::Failed(why))) => {
                vec![Action::LockUnknown(Some(why))]
            }
            // Unanswered: the container's own I/O is stalled too, and halting needs it; the
            // kernel refuses its writes once it learns of a loss. Only the status says so.
            Event::LockProbe(None) => vec![Action::LockUnknown(None)],
            Event::PingAnswered(answered) => {
                self.ping_pending = false;
                if answered {
                    vec![Action::Watchdog]
                } else {
                    vec![Action::PingTimedOut]
                }
            }
        }
    }

    fn end(&mut self, end: End) -> Vec<Action> {
        self.ending = Some(end.clone());
        vec![Action::End(end)]
    }

    fn on_inner(&mut self, state: &InnerState, first: bool, now: Instant) -> Vec<Action> {
        let v = inner::verdict(state, &self.r.required_units, self.r.accept_degraded);
        let mut out = Vec::new();
        if v.ready && !self.ready {
            // READY=1 and its STATUS= in one datagram, without a status-only one first.
            self.ready = true;
            self.last_status = v.status.clone();
            out.push(Action::Ready {
                status: v.status.clone(),
            });
        } else {
            if v.status != self.last_status {
                self.last_status = v.status.clone();
                out.push(Action::Status(v.status.clone()));
            }
            if self.ready && v.ready && self.degraded {
                self.degraded = false;
                out.push(Action::BackToReady {
                    status: v.status.clone(),
                });
            }
        }
        self.verdict_status = Some(v.status);
        // A required unit that had already failed when we connected gets the policy too:
        // no change signal will ever come for it.
        if first {
            for (unit, result) in v.failed {
                self.failed_now.insert(unit.clone());
                out.extend(self.on_unit_failed(unit, result, now));
                if self.ending.is_some() {
                    break;
                }
            }
        }
        out
    }

    /// The failure policy for a required unit that reached `failed` (its own `Restart=`
    /// has given up by then: while it still works the unit is `activating/auto-restart`).
    fn on_unit_failed(&mut self, unit: String, result: String, now: Instant) -> Vec<Action> {
        match self.r.on_failure {
            OnFailure::Ignore => Vec::new(),
            OnFailure::RestartUnit => {
                let window = Duration::from_secs(self.r.restart_window_sec);
                while self
                    .restarts
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > window)
                {
                    self.restarts.pop_front();
                }
                if (self.restarts.len() as u32) < self.r.max_restarts {
                    self.restarts.push_back(now);
                    self.degraded = true;
                    vec![Action::RestartUnit {
                        unit,
                        result,
                        restart: self.restarts.len(),
                        max: self.r.max_restarts,
                    }]
                } else {
                    self.end(End::UnitFailed { unit, result })
                }
            }
            OnFailure::RestartService => self.end(End::UnitFailed { unit, result }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReadinessMode;
    use crate::os::inner::UnitState;

    fn readiness(on_failure: OnFailure, max_restarts: u32) -> Readiness {
        Readiness {
            mode: ReadinessMode::InnerSystemd,
            required_units: vec!["httpd.service".to_owned()],
            accept_degraded: true,
            on_failure,
            max_restarts,
            restart_window_sec: 60,
        }
    }

    fn state(system: &str, httpd: &str) -> InnerState {
        let mut s = InnerState {
            system_state: system.to_owned(),
            jobs: 0,
            units: Default::default(),
        };
        s.units.insert(
            "httpd.service".to_owned(),
            UnitState {
                load_state: "loaded".to_owned(),
                active_state: httpd.to_owned(),
                sub_state: String::new(),
                result: if httpd == "failed" {
                    "exit-code"
                } else {
                    "success"
                }
                .to_owned(),
            },
        );
        s
    }

    fn inner(system: &str, httpd: &str, first: bool) -> Event {
        Event::Inner {
            state: state(system, httpd),
            first,
        }
    }

    fn unit(active: &str) -> Event {
        Event::UnitChanged {
            unit: "httpd.service".to_owned(),
            active_state: active.to_owned(),
            result: "exit-code".to_owned(),
        }
    }

    /// Runs `events` (each at its offset in seconds) and returns the kinds of actions of
    /// each step, as short names, for tables that read like the log.
    fn run(p: &mut Policy, events: Vec<(u64, Event)>) -> Vec<Vec<String>> {
        let t0 = Instant::now();
        events
            .into_iter()
            .map(|(at, ev)| {
                p.on(ev, t0 + Duration::from_secs(at))
                    .into_iter()
                    .map(|a| match a {
                        Action::Ready { .. } => "ready".to_owned(),
                        Action::Status(s) => format!("status: {s}"),
                        Action::BackToReady { .. } => "back-to-ready".to_owned(),
                        Action::RestartUnit { restart, max, .. } => {
                            format!("restart-unit {restart}/{max}")
                        }
                        Action::ShutdownInside(k) => format!("shutdown {}", k.as_str()),
                        Action::WatchInstanceOnly { .. } => "watch-instance-only".to_owned(),
                        Action::Ping => "ping".to_owned(),
                        Action::Watchdog => "WATCHDOG=1".to_owned(),
                        Action::PingUnanswered => "ping-unanswered".to_owned(),
                        Action::PingTimedOut => "ping-timed-out".to_owned(),
                        Action::LockUnknown(why) => format!("lock-unknown {why:?}"),
                        Action::End(e) => format!("end {e:?}"),
                        Action::EndAs(e) => format!("end-as {e:?}"),
                    })
                    .collect()
            })
            .collect()
    }

    fn p(on_failure: OnFailure, max_restarts: u32) -> Policy {
        let mut p = Policy::new(readiness(on_failure, max_restarts), false);
        p.connected();
        p
    }

    #[test]
    fn readiness_waits_for_the_boot_and_the_required_units() {
        let mut p = p(OnFailure::RestartUnit, 3);
        let got = run(
            &mut p,
            vec![
                (0, inner("starting", "activating", true)),
                (1, inner("running", "activating", false)),
                (2, inner("running", "active", false)),
                (3, inner("running", "active", false)),
                (4, Event::StartDeadline),
            ],
        );
        assert_eq!(got[0].len(), 1, "{got:?}");
        assert!(got[0][0].starts_with("status: "), "{got:?}");
        assert!(got[1][0].starts_with("status: "), "{got:?}");
        assert_eq!(got[2], ["ready"]);
        // Nothing new, nothing said; the deadline after READY is moot.
        assert!(got[3].is_empty() && got[4].is_empty(), "{got:?}");
    }

    #[test]
    fn not_ready_by_the_deadline_ends_with_the_last_status() {
        let mut p = p(OnFailure::RestartUnit, 3);
        p.on(inner("starting", "activating", true), Instant::now());
        let a = p.on(Event::StartDeadline, Instant::now());
        match &a[..] {
            [Action::End(End::NotReady { status })] => assert!(!status.is_empty()),
            other => panic!("{other:?}"),
        }
        // Without a word from inside, the status says so.
        let mut q = Policy::new(readiness(OnFailure::RestartUnit, 3), false);
        assert_eq!(
            q.on(Event::StartDeadline, Instant::now()),
            [Action::End(End::NotReady {
                status: "the container's systemd was not reached".to_owned()
            })]
        );
    }

    #[test]
    fn restart_budget_counts_each_failure_once_within_the_window() {
        // (budget, events at their second, what each event makes the policy do)
        type Row = (u32, Vec<(u64, Event)>, Vec<&'static str>);
        let rows: Vec<Row> = vec![
            // Two failures within the window, budget 2: both restarted, the third ends it.
            (
                2,
                vec![
                    (0, inner("running", "active", true)),
                    (1, unit("failed")),
                    (2, unit("failed")), // the same failure seen again: counts once
                    (3, unit("active")),
                    (4, unit("failed")),
                    (5, unit("active")),
                    (6, unit("failed")),
                ],
                vec![
                    "ready",
                    "restart-unit 1/2",
                    "",
                    "",
                    "restart-unit 2/2",
                    "",
                    "end UnitFailed { unit: \"httpd.service\", result: \"exit-code\" }",
                ],
            ),
            // Failures further apart than the window (60 s) never exhaust the budget.
            (
                1,
                vec![
                    (0, inner("running", "active", true)),
                    (1, unit("failed")),
                    (2, unit("active")),
                    (100, unit("failed")),
                    (101, unit("active")),
                    (200, unit("failed")),
                ],
                vec![
                    "ready",
                    "restart-unit 1/1",
                    "",
                    "restart-unit 1/1",
                    "",
                    "restart-unit 1/1",
                ],
            ),
        ];
        for (max, events, want) in rows {
            let mut p = p(OnFailure::RestartUnit, max);
            let got: Vec<String> = run(&mut p, events)
                .into_iter()
                .map(|a| a.join("; "))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_unit_failed_before_we_connected_gets_the_policy_too() {
        let mut p = p(OnFailure::RestartService, 3);
        let got = run(&mut p, vec![(0, inner("degraded", "failed", true))]);
        assert_eq!(
            got[0].last().unwrap(),
            "end UnitFailed { unit: \"httpd.service\", result: \"exit-code\" }"
        );
        let mut q = self::p(OnFailure::Ignore, 3);
        let got = run(
            &mut q,
            vec![(0, inner("degraded", "failed", true)), (1, unit("failed"))],
        );
        assert!(
            got.iter().flatten().all(|a| !a.starts_with("end")),
            "{got:?}"
        );
    }

    #[test]
    fn degraded_then_back_to_ready() {
        let mut p = p(OnFailure::RestartUnit, 3);
        let got = run(
            &mut p,
            vec![
                (0, inner("running", "active", true)),
                (1, unit("failed")),
                (2, inner("running", "failed", false)),
                (3, unit("active")),
                (4, inner("running", "active", false)),
            ],
        );
        assert_eq!(got[1], ["restart-unit 1/3"]);
        assert!(got[4].contains(&"back-to-ready".to_owned()), "{got:?}");
    }

    #[test]
    fn watchdog_pings_the_inside_and_says_nothing_while_it_hangs() {
        let mut p = p(OnFailure::RestartUnit, 3);
        let got = run(
            &mut p,
            vec![
                (0, Event::WatchdogTick),
                (1, Event::PingAnswered(true)),
                (2, Event::WatchdogTick),
                (3, Event::WatchdogTick), // the inside hangs: no WATCHDOG=1
                (4, Event::PingAnswered(false)),
                (
                    5,
                    Event::BusLost {
                        why: "gone".to_owned(),
                        container_alive: true,
                    },
                ),
                (6, Event::WatchdogTick), // the instance alone now
            ],
        );
        assert_eq!(
            got,
            [
                vec!["ping"],
                vec!["WATCHDOG=1"],
                vec!["ping"],
                vec!["ping-unanswered"],
                vec!["ping-timed-out"],
                vec!["watch-instance-only"],
                vec!["WATCHDOG=1"],
            ]
        );
    }

    /// The overlay's lock (issue 16): lost → halted at once (exit 74, and no WATCHDOG=1
    /// after); a probe that failed or did not answer only says so; a SIGABRT while
    /// halting for a lost lock keeps the lost lock as the reason.
    #[test]
    fn a_lost_lock_ends_the_run_and_an_unanswered_probe_only_says_so() {
        use crate::host::overlay_lock::Probe;
        let mut p = p(OnFailure::RestartUnit, 3);
        let got = run(
            &mut p,
            vec![
                (0, Event::LockProbe(Some(Probe::Held))),
                (1, Event::LockProbe(None)),
                (2, Event::LockProbe(Some(Probe::Failed("EACCES".into())))),
                (3, Event::LockProbe(Some(Probe::Lost("EIO".into())))),
                (4, Event::Signal(Sig::Abrt)),
                (5, Event::WatchdogTick),
                (6, Event::PingAnswered(true)),
            ],
        );
        let want: Vec<Vec<String>> = vec![
            vec![],
            vec!["lock-unknown None".into()],
            vec!["lock-unknown Some(\"EACCES\")".into()],
            vec!["end LockLost { why: \"EIO\" }".into()],
            vec![],
            vec![],
            vec![],
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn signals_exits_and_shutdowns_end_the_run() {
        let rows: Vec<(Vec<Event>, End)> = vec![
            (vec![Event::Signal(Sig::Term)], End::Stopped),
            (vec![Event::Signal(Sig::Int)], End::Stopped),
            (vec![Event::Signal(Sig::Abrt)], End::Aborted),
            (vec![Event::ContainerExited], End::ContainerEnded),
            (
                vec![Event::MasterExited {
                    container_alive: true,
                    cleanup_done: false,
                }],
                End::MasterDied {
                    container_alive: true,
                },
            ),
            // The master died, the container with it (PR_SET_PDEATHSIG), no cleanup ran.
            (
                vec![Event::MasterExited {
                    container_alive: false,
                    cleanup_done: false,
                }],
                End::MasterDied {
                    container_alive: false,
                },
            ),
            // The container was SIGKILLed and its master's exit is seen first (or both at
            // once): its cleanup ran, so the instance ended by itself.
            (
                vec![Event::MasterExited {
                    container_alive: false,
                    cleanup_done: true,
                }],
                End::ContainerEnded,
            ),
            (
                vec![Event::Shutdown(Shutdown::Reboot), Event::ContainerExited],
                End::ShutDownInside(Shutdown::Reboot),
            ),
            // After a poweroff from inside the master may be seen first.
            (
                vec![
                    Event::Shutdown(Shutdown::Poweroff),
                    Event::MasterExited {
                        container_alive: false,
                        cleanup_done: true,
                    },
                ],
                End::ShutDownInside(Shutdown::Poweroff),
            ),
        ];
        for (events, want) in rows {
            let mut p = p(OnFailure::RestartUnit, 3);
            let mut last = Vec::new();
            for ev in events {
                last = p.on(ev, Instant::now());
            }
            assert_eq!(last, [Action::End(want)]);
        }
    }

    #[test]
    fn a_sigabrt_seen_before_exit_is_exit_1_whichever_came_first() {
        // SIGABRT first: aborted; a SIGTERM behind it changes nothing.
        let mut p = p(OnFailure::RestartUnit, 3);
        assert_eq!(
            p.on(Event::Signal(Sig::Abrt), Instant::now()),
            [Action::End(End::Aborted)]
        );
        assert!(p.on(Event::Signal(Sig::Term), Instant::now()).is_empty());
        // SIGTERM first, SIGABRT while stopping: aborted all the same.
        let mut q = self::p(OnFailure::RestartUnit, 3);
        assert_eq!(
            q.on(Event::Signal(Sig::Term), Instant::now()),
            [Action::End(End::Stopped)]
        );
        assert_eq!(
            q.on(Event::Signal(Sig::Abrt), Instant::now()),
            [Action::EndAs(End::Aborted)]
        );
        // A SIGABRT while a failure ends the run does not hide the failure.
        let mut r = self::p(OnFailure::RestartService, 3);
        r.on(inner("running", "active", true), Instant::now());
        r.on(unit("failed"), Instant::now());
        assert!(r.on(Event::Signal(Sig::Abrt), Instant::now()).is_empty());
    }

    #[test]
    fn stop_during_start_and_unit_failures_during_a_shutdown_are_not_faults() {
        // A stop before READY is a stop: exit 0.
        let mut p = p(OnFailure::RestartService, 3);
        p.on(inner("starting", "activating", true), Instant::now());
        assert_eq!(
            p.on(Event::Signal(Sig::Term), Instant::now()),
            [Action::End(End::Stopped)]
        );
        // Units failing while the inside shuts down are not acted on.
        let mut q = self::p(OnFailure::RestartService, 3);
        q.on(inner("running", "active", true), Instant::now());
        assert_eq!(
            q.on(Event::Shutdown(Shutdown::Poweroff), Instant::now()),
            [Action::ShutdownInside(Shutdown::Poweroff)]
        );
        assert!(q.on(unit("failed"), Instant::now()).is_empty());
    }
}
