//! The watcher → event loop hand-over, bounded whatever the container does: a JobNew flood
//! took the supervisor from 12 to 466 MB through the unbounded channel this replaces. The
//! state is a latest-value cell; the few events that must not be lost are kept, coalesced.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{InnerEvent, InnerState, UnitState};

/// How often a change of the inner job count alone reaches the event loop (and so
/// `STATUS=`): a boot or a stop queues hundreds of jobs in a few milliseconds, and a person
/// reads a count a few times a second.
pub(crate) const JOBS_INTERVAL: Duration = Duration::from_millis(500);

/// Other changes (SystemState, a required unit's states) go at once while this many are in
/// hand: a boot, a failure and a restart take a handful, so READY=1 never waits for the
/// limit …
const STATE_BURST: f64 = 16.0;

/// … which then refills at this rate per second: a unit flapping as fast as the container
/// can make it reaches the loop, with the job count, at most 2 + 3 = 5 times a second (the
/// issue's bound on `STATUS=`).
const STATE_RATE: f64 = 3.0;

/// A required unit's changes queued at most before the oldest are dropped: enough for a
/// failure and a recovery the loop has not seen yet.
const UNIT_CHANGES_KEPT: usize = 4;

/// The sending half of the watcher's events: see [`InnerEvents`].
pub struct InnerSender {
    shared: Arc<Shared>,
}

/// What the event loop waits on for the inner bus: bounded whatever the container does.
/// The state is a latest-value cell (a state not yet taken is replaced by a newer one); the
/// few events that must not be lost are kept in order, coalesced: the first state after
/// connecting, a shutdown job (the latest), each required unit's last changes
/// (`UNIT_CHANGES_KEPT`, failure and recovery alternating), the loss of the bus. A change of
/// the job count alone is handed out at most every [`JOBS_INTERVAL`]; any other change at
/// once, up to `STATE_BURST` of them, then `STATE_RATE` a second.
pub struct InnerEvents {
    shared: Arc<Shared>,
    /// The state last handed out, and when.
    delivered: Option<(InnerState, Instant)>,
    /// The token bucket of state changes, as of `refilled`.
    tokens: f64,
    refilled: Instant,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    connected: Option<InnerState>,
    /// UnitChanged and Shutdown, in order.
    discrete: VecDeque<InnerEvent>,
    latest: Option<InnerState>,
    lost: Option<String>,
    /// The sender is gone.
    closed: bool,
}

/// A new channel for one watch.
pub fn events() -> (InnerSender, InnerEvents) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        wake: Notify::new(),
    });
    (
        InnerSender {
            shared: shared.clone(),
        },
        InnerEvents {
            shared,
            delivered: None,
            tokens: STATE_BURST,
            refilled: Instant::now(),
        },
    )
}

fn is_failed(u: &UnitState) -> bool {
    u.active_state == "failed"
}

impl Queue {
    fn push(&mut self, ev: InnerEvent) {
        match ev {
            InnerEvent::Connected(s) => self.connected = Some(s),
            InnerEvent::Changed(s) => match &mut self.connected {
                // Not taken yet: the first state is the newest one, still `first`.
                Some(c) => *c = s,
                None => self.latest = Some(s),
            },
            InnerEvent::Lost(why) => {
                self.lost.get_or_insert(why);
            }
            InnerEvent::Shutdown(kind) => {
                let old = self
                    .discrete
                    .iter_mut()
                    .find(|e| matches!(e, InnerEvent::Shutdown(_)));
                match old {
                    Some(e) => *e = InnerEvent::Shutdown(kind),
                    None => self.discrete.push_back(InnerEvent::Shutdown(kind)),
                }
            }
            InnerEvent::UnitChanged(unit, st) => {
                let of_unit =
                    |e: &InnerEvent| matches!(e, InnerEvent::UnitChanged(u, _) if *u == unit);
                // The same side of `failed` as the last queued change: that one is replaced.
                let last = self.discrete.iter_mut().rev().find(|e| of_unit(e));
                if let Some(InnerEvent::UnitChanged(_, prev)) = last {
                    if is_failed(prev) == is_failed(&st) {
                        *prev = st;
                        return;
                    }
                }
                self.discrete
                    .push_back(InnerEvent::UnitChanged(unit.clone(), st));
                // Too many flips not yet taken: drop the oldest failure-and-recovery pair.
                while self.discrete.iter().filter(|e| of_unit(e)).count() > UNIT_CHANGES_KEPT {
                    for _ in 0..2 {
                        if let Some(i) = self.discrete.iter().position(of_unit) {
                            self.discrete.remove(i);
                        }
                    }
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.discrete.len()
            + usize::from(self.connected.is_some())
            + usize::from(self.latest.is_some())
            + usize::from(self.lost.is_some())
    }
}

impl InnerSender {
    /// Hands an event over (never waits, never grows without bound).
    pub fn send(&self, ev: InnerEvent) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.push(ev);
        }
        self.shared.wake.notify_one();
    }
}

impl Drop for InnerSender {
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.closed = true;
        }
        self.shared.wake.notify_one();
    }
}

impl InnerEvents {
    /// The next event; `None` once the watcher has ended and everything was taken.
    pub async fn recv(&mut self) -> Option<InnerEvent> {
        loop {
            let due = {
                let Ok(mut q) = self.shared.queue.lock() else {
                    return None;
                };
                if let Some(s) = q.connected.take() {
                    self.delivered = Some((s.clone(), Instant::now()));
                    return Some(InnerEvent::Connected(s));
                }
                if let Some(ev) = q.discrete.pop_front() {
                    return Some(ev);
                }
                let mut due = None;
                if let Some(s) = q.latest.take() {
                    let now = Instant::now();
                    self.tokens = (self.tokens
                        + now.duration_since(self.refilled).as_secs_f64() * STATE_RATE)
                        .min(STATE_BURST);
                    self.refilled = now;
                    let jobs_only =
                        matches!(&self.delivered, Some((d, _)) if only_jobs_differ(d, &s));
                    let at = match &self.delivered {
                        // The bus is gone: what it said last goes out now.
                        _ if q.lost.is_some() => now,
                        Some((_, at)) if jobs_only => *at + JOBS_INTERVAL,
                        _ if self.tokens >= 1.0 => now,
                        _ => now + Duration::from_secs_f64((1.0 - self.tokens) / STATE_RATE),
                    };
                    if at <= now {
                        if !jobs_only {
                            self.tokens = (self.tokens - 1.0).max(0.0);
                        }
                        self.delivered = Some((s.clone(), now));
                        return Some(InnerEvent::Changed(s));
                    }
                    q.latest = Some(s);
                    due = Some(at);
                }
                if due.is_none() {
                    if let Some(why) = q.lost.take() {
                        q.closed = true;
                        return Some(InnerEvent::Lost(why));
                    }
                    if q.closed {
                        return None;
                    }
                }
                due
            };
            match due {
                // Woken by the sender, or at the time the held state is due.
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, self.shared.wake.notified()).await;
                }
                None => self.shared.wake.notified().await,
            }
        }
    }
}

fn only_jobs_differ(a: &InnerState, b: &InnerState) -> bool {
    a.system_state == b.system_state && a.units == b.units
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{state, unit};
    use super::super::Shutdown;
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn a_flood_of_states_is_one_latest_state() {
        let (tx, mut rx) = events();
        tx.send(InnerEvent::Connected(state("starting", 0, &[])));
        for jobs in 1..=100_000 {
            tx.send(InnerEvent::Changed(state("starting", jobs, &[])));
            assert!(tx.shared.queue.lock().unwrap().len() <= 1);
        }
        rt().block_on(async {
            // The first state is still `Connected`, with the newest content.
            assert_eq!(
                rx.recv().await,
                Some(InnerEvent::Connected(state("starting", 100_000, &[])))
            );
            // A job count alone waits for its interval; a new system state does not.
            tx.send(InnerEvent::Changed(state("starting", 7, &[])));
            tx.send(InnerEvent::Changed(state("running", 0, &[])));
            assert_eq!(
                rx.recv().await,
                Some(InnerEvent::Changed(state("running", 0, &[])))
            );
            tx.send(InnerEvent::Changed(state("running", 3, &[])));
            tx.send(InnerEvent::Changed(state("running", 4, &[])));
            // Handed out (after JOBS_INTERVAL) as the latest only.
            assert_eq!(
                rx.recv().await,
                Some(InnerEvent::Changed(state("running", 4, &[])))
            );
            drop(tx);
            assert_eq!(rx.recv().await, None);
        });
    }

    #[test]
    fn discrete_events_are_kept_in_order_and_bounded() {
        let (tx, mut rx) = events();
        let httpd =
            |active: &str| InnerEvent::UnitChanged("httpd.service".into(), unit(active, "x", ""));
        tx.send(InnerEvent::Connected(state("running", 0, &[])));
        tx.send(httpd("failed"));
        tx.send(InnerEvent::Shutdown(Shutdown::Reboot));
        // A failure and a recovery flapping 100 000 times: the last few flips only.
        for i in 0..100_000 {
            tx.send(httpd(if i % 2 == 0 { "activating" } else { "failed" }));
            assert!(tx.shared.queue.lock().unwrap().len() <= UNIT_CHANGES_KEPT + 2);
        }
        tx.send(InnerEvent::Shutdown(Shutdown::Poweroff));
        tx.send(InnerEvent::Lost("bus closed".into()));
        tx.send(InnerEvent::Lost("later".into()));
        rt().block_on(async {
            let mut got = Vec::new();
            while let Some(ev) = rx.recv().await {
                got.push(ev);
            }
            assert!(matches!(got[0], InnerEvent::Connected(_)), "{got:?}");
            // One shutdown, the latest kind, where the first was.
            let shutdowns: Vec<_> = got
                .iter()
                .filter(|e| matches!(e, InnerEvent::Shutdown(_)))
                .collect();
            assert_eq!(shutdowns, [&InnerEvent::Shutdown(Shutdown::Poweroff)]);
            let flips: Vec<&str> = got
                .iter()
                .filter_map(|e| match e {
                    InnerEvent::UnitChanged(_, u) => Some(u.active_state.as_str()),
                    _ => None,
                })
                .collect();
            assert!(flips.len() <= UNIT_CHANGES_KEPT, "{flips:?}");
            // Failure and recovery alternate, and the last one seen is the last one sent.
            assert!(
                flips
                    .windows(2)
                    .all(|w| (w[0] == "failed") != (w[1] == "failed")),
                "{flips:?}"
            );
            assert_eq!(flips.last(), Some(&"failed"));
            assert_eq!(got.last(), Some(&InnerEvent::Lost("bus closed".into())));
        });
    }

    #[test]
    fn a_flapping_unit_reaches_the_loop_a_few_times_a_second() {
        let (tx, mut rx) = events();
        tx.send(InnerEvent::Connected(state("running", 0, &[])));
        rt().block_on(async {
            assert!(matches!(rx.recv().await, Some(InnerEvent::Connected(_))));
            let start = std::time::Instant::now();
            let mut at_once = 0;
            for i in 0..2000 {
                let sub = if i % 2 == 0 { "start" } else { "running" };
                tx.send(InnerEvent::Changed(state(
                    "running",
                    0,
                    &[("httpd.service", unit("activating", sub, ""))],
                )));
                // Only what is due now: nothing waits here.
                if let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, rx.recv()).await {
                    at_once += 1;
                }
            }
            // The burst, and what the bucket refilled meanwhile; nothing else went at once.
            let refilled = (start.elapsed().as_secs_f64() * STATE_RATE).ceil() as usize;
            assert!(
                at_once <= STATE_BURST as usize + refilled + 1,
                "{at_once} at once in {:?}",
                start.elapsed()
            );
            assert!(at_once >= STATE_BURST as usize, "{at_once}");
            // The newest state still comes, once due.
            let last = rx.recv().await;
            assert_eq!(
                last,
                Some(InnerEvent::Changed(state(
                    "running",
                    0,
                    &[("httpd.service", unit("activating", "running", ""))],
                )))
            );
        });
    }
}
