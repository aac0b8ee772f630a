//! The one place that waits on the signals that stop us (SIGTERM, SIGINT, SIGABRT) and
//! the one biased `select!` that puts them first.
//!
//! Every phase of a run waits through [`next`]: the signals beside "the current
//! operation", a future that touches no signal (an Apptainer CLI command to completion,
//! the connection to the container's bus, the next thing the running instance does). A
//! signal wins over whatever is ready with it; the caller turns it into the policy's
//! [`Event::Signal`](super::policy::Event) or, while a call must finish first (a CLI
//! command half-way through making something), notes it with [`Signals::note`] so that it
//! is handed to the policy once the call returns ([`Signals::take_noted`]).

use std::future::Future;
use std::io;

use futures_util::FutureExt;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::info;

use super::policy::Sig;

/// The signals that stop us. SIGABRT is what systemd sends when our watchdog expires
/// (`WatchdogSignal=`): the container lives outside the unit's cgroup, so even then we
/// halt it before going. (A panic still aborts: with a handler that returns, abort(3)
/// restores the default action and raises again.)
pub(super) struct Signals {
    term: Signal,
    int: Signal,
    abrt: Signal,
    /// Signals that came while a call had to finish first, in arrival order, each once.
    noted: Vec<Sig>,
}

/// What [`next`] woke up for.
pub(super) enum Wake<T> {
    Signal(Sig),
    Done(T),
}

impl Signals {
    /// Installs the handlers; from here on these signals no longer kill us by default.
    pub(super) fn install() -> Result<Self, (&'static str, io::Error)> {
        Ok(Signals {
            term: signal(SignalKind::terminate())
                .map_err(|e| ("installing the SIGTERM handler", e))?,
            int: signal(SignalKind::interrupt())
                .map_err(|e| ("installing the SIGINT handler", e))?,
            abrt: signal(SignalKind::from_raw(libc::SIGABRT))
                .map_err(|e| ("installing the SIGABRT handler", e))?,
            noted: Vec::new(),
        })
    }

    /// Remembers a signal that came while a call had to finish first.
    pub(super) fn note(&mut self, sig: Sig) {
        // Each kind once: a stream coalesces repeats the same way.
        if !self.noted.contains(&sig) {
            self.noted.push(sig);
        }
    }

    /// Whether a stop was noted and not handed on yet.
    pub(super) fn stop_noted(&self) -> bool {
        !self.noted.is_empty()
    }

    /// The noted signals, then those that have arrived and not been received yet, without
    /// waiting: what came while the caller could not listen, for the policy.
    pub(super) fn take_noted(&mut self) -> Vec<Sig> {
        let mut sigs = std::mem::take(&mut self.noted);
        while let Some(Wake::Signal(sig)) = next(self, std::future::pending::<()>()).now_or_never()
        {
            sigs.push(sig);
        }
        sigs
    }
}

impl Signals {
    /// Runs `op`, a call that must finish (a CLI command half-way through making
    /// something, the halt's escalation), to its end while the loop keeps listening: a
    /// signal meanwhile is noted (see [`Self::note`]) for the caller to hand on after.
    /// `what` says what runs, for the log.
    pub(super) async fn call<T>(&mut self, what: &str, op: impl Future<Output = T>) -> T {
        tokio::pin!(op);
        loop {
            match next(self, &mut op).await {
                Wake::Signal(sig) => {
                    info!(
                        signal = sig.name(),
                        "stop requested while {what}; handled once that returns"
                    );
                    self.note(sig);
                }
                Wake::Done(v) => return v,
            }
        }
    }
}

/// Waits for the next signal or for `op`, whichever comes first; signals first when both
/// are ready, SIGABRT first of them (see `policy`). Cancel-safe for the signals: a signal
/// not returned stays pending in its stream.
pub(super) async fn next<T>(signals: &mut Signals, op: impl Future<Output = T>) -> Wake<T> {
    tokio::select! {
        biased;
        _ = signals.abrt.recv() => Wake::Signal(Sig::Abrt),
        _ = signals.term.recv() => Wake::Signal(Sig::Term),
        _ = signals.int.recv() => Wake::Signal(Sig::Int),
        v = op => Wake::Done(v),
    }
}
