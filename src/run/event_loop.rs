//! The one place that waits: the signals that stop us (SIGTERM, SIGINT, SIGABRT) and,
//! behind them, whatever the current phase of a run waits on, in the one biased `select!`
//! of the crate.
//!
//! Every phase describes what it waits on as [`Waits`] (the container's and the master's
//! pidfds, a CLI command's pidfd and stderr, the inner bus's events and ping answer, the
//! watchdog timer, the instance's log watch, the phase's next deadline, a call such as the
//! bus connection) and hands it to [`next`], which returns what woke it as a [`Wake`].
//! The order is fixed here: signals first (SIGABRT first of them, see `policy`), then the
//! pidfds (the container's before its master's: with both ready, the container's end is
//! what happened), then the rest. The notifier's deferred datagrams (a full socket, a
//! rate-limited status) are sent from here too, whatever the phase. Nothing else selects
//! or handles a signal, and no phase waits on its own: it loops over [`next`]. The only
//! waits elsewhere are calls bounded by their own timeout (the bus connection, handed in
//! as [`Waits::call`]; a ping, on a task of its own whose answer is [`Waits::ping`]). A
//! signal that comes while what a phase does must finish first is noted
//! ([`Signals::note`]) and handed to the policy once that returns
//! ([`Signals::take_noted`]). A scan of the source (the tests at the bottom) holds the
//! crate to the one `select!` and the signals kept here.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::oneshot;
use tracing::info;

use super::policy::Sig;
use crate::host::overlay_lock::Probe;
use crate::os::inner::InnerEvent;
use crate::os::instance::ExitWatch;
use crate::os::notify::{Notifier, Ticker};
use crate::os::output::Forwarder;

/// Where the inner watcher's events come from: the latest state and the few events kept
/// in order (see `os::inner`).
pub(super) use crate::os::inner::InnerEvents;

/// The signals that stop us, and the notifier whose deferred sends the loop makes. SIGABRT
/// is what systemd sends when our watchdog expires (`WatchdogSignal=`): the container lives
/// outside the unit's cgroup, so even then we halt it before going. (A panic still aborts:
/// with a handler that returns, abort(3) restores the default action and raises again.)
pub(super) struct Signals {
    term: Signal,
    int: Signal,
    abrt: Signal,
    /// Signals that came while a call had to finish first, in arrival order, each once.
    noted: Vec<Sig>,
    notify: Notifier,
}

/// What the current phase waits on besides the signals. Each source is a branch of the
/// loop's select only while it is there; `Waits::default()` waits on the signals alone.
pub(super) struct Waits<'a, T = ()> {
    /// The container's init (pidfd).
    pub container: Option<&'a ExitWatch>,
    /// The Apptainer master (pidfd).
    pub master: Option<&'a ExitWatch>,
    /// A CLI command we run (pidfd) and its stderr.
    pub child: Option<&'a ExitWatch>,
    pub stderr: Option<&'a tokio::net::unix::pipe::Receiver>,
    /// The inner watcher's events and the answer to the last ping.
    pub inner: Option<&'a mut InnerEvents>,
    pub ping: Option<&'a mut oneshot::Receiver<bool>>,
    /// The answer of the overlay lock's probe (a thread of its own: it may hang on NFS).
    pub lock: Option<&'a mut oneshot::Receiver<Probe>>,
    /// The watchdog's timer.
    pub watchdog: Option<&'a Ticker>,
    /// The instance's logs were written to.
    pub output: Option<&'a Forwarder>,
    /// The phase's next deadline (the earliest of its own; see [`earliest`]).
    pub at: Option<Instant>,
    /// A call the phase made (bounded by its own timeout), to its result.
    pub call: Option<Pin<&'a mut dyn Future<Output = T>>>,
}

impl<T> Default for Waits<'_, T> {
    fn default() -> Self {
        Waits {
            container: None,
            master: None,
            child: None,
            stderr: None,
            inner: None,
            ping: None,
            lock: None,
            watchdog: None,
            output: None,
            at: None,
            call: None,
        }
    }
}

/// What [`next`] woke up for.
#[derive(Debug)]
pub(super) enum Wake<T = ()> {
    Signal(Sig),
    ContainerExited,
    MasterExited,
    ChildExited,
    /// The CLI command's stderr can be read (or has closed).
    Stderr,
    Inner(Option<InnerEvent>),
    Ping(bool),
    /// The overlay lock's probe answered.
    Lock(Probe),
    WatchdogTick,
    /// The instance's logs were written to.
    Output,
    /// [`Waits::at`] has come.
    Deadline,
    /// The call returned.
    Done(T),
}

/// The earliest of some deadlines (None: no deadline, no timer).
pub(super) fn earliest(at: impl IntoIterator<Item = Option<Instant>>) -> Option<Instant> {
    at.into_iter().flatten().min()
}

/// For `update`, a command of its own with no run loop: `fire` is called on each SIGINT
/// or SIGTERM (from tasks on the current runtime); SIGHUP is handled and ignored (a
/// terminal that went away does not end an update half-way). Here so that every signal
/// handler of the crate is installed in this one file (the source scan below).
pub(crate) fn on_interrupt(fire: impl Fn() + Clone + Send + 'static) -> io::Result<()> {
    for kind in [SignalKind::interrupt(), SignalKind::terminate()] {
        let mut s = signal(kind)?;
        let fire = fire.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                fire();
            }
        });
    }
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move { while hup.recv().await.is_some() {} });
    Ok(())
}

impl Signals {
    /// Installs the handlers; from here on these signals no longer kill us by default.
    pub(super) fn install(notify: Notifier) -> Result<Self, (&'static str, io::Error)> {
        Ok(Signals {
            term: signal(SignalKind::terminate())
                .map_err(|e| ("installing the SIGTERM handler", e))?,
            int: signal(SignalKind::interrupt())
                .map_err(|e| ("installing the SIGINT handler", e))?,
            abrt: signal(SignalKind::from_raw(libc::SIGABRT))
                .map_err(|e| ("installing the SIGABRT handler", e))?,
            noted: Vec::new(),
            notify,
        })
    }

    /// Remembers a signal that came while a call had to finish first; `what` says what
    /// runs, for the log.
    pub(super) fn note(&mut self, sig: Sig, what: &str) {
        info!(
            signal = sig.name(),
            "stop requested while {what}; handled once that returns"
        );
        // Each kind once: a stream coalesces repeats the same way.
        if !self.noted.contains(&sig) {
            self.noted.push(sig);
        }
    }

    /// Whether a stop was noted and not handed on yet.
    pub(super) fn stop_noted(&self) -> bool {
        !self.noted.is_empty()
    }

    /// Whether a stop is pending: noted, or arrived while no phase listened (the
    /// synchronous work between waits) and noted now, without waiting; `what` says what
    /// was about to begin. Checked before each step that starts something.
    pub(super) fn stop_pending(&mut self, what: &str) -> bool {
        while let Some(Wake::Signal(sig)) = next::<()>(self, Waits::default()).now_or_never() {
            info!(signal = sig.name(), "stop requested before {what}");
            if !self.noted.contains(&sig) {
                self.noted.push(sig);
            }
        }
        self.stop_noted()
    }

    /// The noted signals, then those that have arrived and not been received yet, without
    /// waiting: what came while the caller could not listen, for the policy.
    pub(super) fn take_noted(&mut self) -> Vec<Sig> {
        let mut sigs = std::mem::take(&mut self.noted);
        while let Some(Wake::Signal(sig)) = next::<()>(self, Waits::default()).now_or_never() {
            sigs.push(sig);
        }
        sigs
    }

    /// Waits up to `within` for the process behind `fd` (the container or the master: it
    /// takes the first pidfd branch) to exit; a signal meanwhile is
    /// noted for the caller to hand on after (see [`Self::note`]; `what` says what is
    /// waited for). Whether it exited.
    pub(super) async fn exits_within(
        &mut self,
        fd: &ExitWatch,
        within: Duration,
        what: &str,
    ) -> bool {
        let at = Instant::now() + within;
        loop {
            let waits: Waits = Waits {
                container: Some(fd),
                at: Some(at),
                ..Waits::default()
            };
            match next(self, waits).await {
                Wake::ContainerExited => return true,
                Wake::Deadline => return false,
                Wake::Signal(sig) => self.note(sig, what),
                _ => {}
            }
        }
    }
}

/// Waits for the next signal or for one of `w`'s sources, whichever comes first: signals
/// first when several are ready, SIGABRT first of them, then the container's pidfd, then
/// the master's, then the rest. Cancel-safe: what is not returned stays pending in its
/// source (a signal in its stream, an event in its channel, readiness on its fd).
pub(super) async fn next<T>(signals: &mut Signals, mut w: Waits<'_, T>) -> Wake<T> {
    loop {
        let deferred = signals.notify.due();
        tokio::select! {
            biased;
            _ = signals.abrt.recv() => return Wake::Signal(Sig::Abrt),
            _ = signals.term.recv() => return Wake::Signal(Sig::Term),
            _ = signals.int.recv() => return Wake::Signal(Sig::Int),
            _ = exited(w.container), if w.container.is_some() => return Wake::ContainerExited,
            _ = exited(w.master), if w.master.is_some() => return Wake::MasterExited,
            _ = exited(w.child), if w.child.is_some() => return Wake::ChildExited,
            v = called(&mut w.call), if w.call.is_some() => return Wake::Done(v),
            ev = received(&mut w.inner), if w.inner.is_some() => return Wake::Inner(ev),
            answered = answer(&mut w.ping), if w.ping.is_some() => return Wake::Ping(answered),
            probe = probed(&mut w.lock), if w.lock.is_some() => return Wake::Lock(probe),
            _ = ticked(w.watchdog), if w.watchdog.is_some() => return Wake::WatchdogTick,
            _ = readable(w.stderr), if w.stderr.is_some() => return Wake::Stderr,
            _ = written(w.output), if w.output.is_some() => return Wake::Output,
            _ = sleep_until(w.at), if w.at.is_some() => return Wake::Deadline,
            // Not the phase's business: a datagram the socket refused, a held status.
            _ = sleep_until(deferred), if deferred.is_some() => signals.notify.send_due(),
        }
    }
}

// Each source, as a future; never polled while its branch is off (see the guards above),
// so `None` only ever waits for good.

async fn exited(fd: Option<&ExitWatch>) {
    match fd {
        // A pidfd stays readable once its process exited: no readiness to clear.
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}

async fn called<T>(call: &mut Option<Pin<&mut dyn Future<Output = T>>>) -> T {
    match call {
        Some(c) => c.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn received(rx: &mut Option<&mut InnerEvents>) -> Option<InnerEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn answer(rx: &mut Option<&mut oneshot::Receiver<bool>>) -> bool {
    match rx {
        Some(rx) => (&mut **rx).await.unwrap_or(false),
        None => std::future::pending().await,
    }
}

async fn probed(rx: &mut Option<&mut oneshot::Receiver<Probe>>) -> Probe {
    match rx {
        Some(rx) => (&mut **rx)
            .await
            .unwrap_or_else(|_| Probe::Failed("the probe thread ended".to_owned())),
        None => std::future::pending().await,
    }
}

async fn ticked(t: Option<&Ticker>) {
    match t {
        Some(t) => t.tick().await,
        None => std::future::pending().await,
    }
}

async fn readable(p: Option<&tokio::net::unix::pipe::Receiver>) {
    match p {
        // An error (the pipe is gone) is for the reader to find.
        Some(p) => {
            let _ = p.readable().await;
        }
        None => std::future::pending().await,
    }
}

async fn written(f: Option<&Forwarder>) {
    match f {
        Some(f) => f.written().await,
        None => std::future::pending().await,
    }
}

/// No timer at all without a deadline: an idle supervisor wakes up for nothing.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What a scan of the source can hold the rest of the crate to: no other file constructs a
/// signal stream, and the crate has one `select!`, [`next`]'s. It does not prove that a
/// future handed to [`next`] is free of its own waits, nor that fault reactions are decided
/// in `policy` only (a scan cannot tell a match on a verdict from making one).
#[cfg(test)]
mod source_scan {
    use std::path::{Path, PathBuf};

    const HOME: &str = "src/run/event_loop.rs";

    /// The `select!`s allowed outside the loop: none (the list stays so that a reason to
    /// add one is written here, beside the rule it breaks).
    const LEFT: &[(&str, usize)] = &[];

    /// What only this file may contain: a signal stream's constructor.
    const SIGNAL_STREAMS: &[&str] = &[
        "signal(SignalKind",
        "SignalKind::",
        "signal_hook",
        "tokio::signal",
    ];

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("src/ is listable").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Every file's code lines (comments left out: docs may name what they describe),
    /// keyed by the path relative to the crate.
    fn sources() -> Vec<(String, Vec<String>)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        rust_files(&root.join("src"), &mut files);
        assert!(files.len() > 10, "the scan found the sources");
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("a source file is readable");
                let rel = p
                    .strip_prefix(root)
                    .expect("under the crate")
                    .to_string_lossy()
                    .into_owned();
                let code = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .map(str::to_owned)
                    .collect();
                (rel, code)
            })
            .collect()
    }

    #[test]
    fn only_the_event_loop_constructs_signal_streams() {
        let mut found = Vec::new();
        for (path, code) in sources() {
            for (n, line) in code.iter().enumerate() {
                if path != HOME && SIGNAL_STREAMS.iter().any(|s| line.contains(s)) {
                    found.push(format!("{path}: code line {}: {}", n + 1, line.trim()));
                }
            }
        }
        assert!(
            found.is_empty(),
            "signal streams outside {HOME}:\n{}",
            found.join("\n")
        );
    }

    #[test]
    fn one_select_in_the_crate_the_event_loops() {
        let mut found = Vec::new();
        let mut home = 0;
        for (path, code) in sources() {
            let n = code.iter().filter(|l| l.contains("select!")).count();
            if path == HOME {
                // This scan's own strings below do not count.
                home = code
                    .iter()
                    .take_while(|l| !l.starts_with("#[cfg(test)]"))
                    .filter(|l| l.contains("select!"))
                    .count();
                continue;
            }
            let allowed = LEFT.iter().find(|(p, _)| *p == path).map_or(0, |(_, n)| *n);
            if n > allowed {
                found.push(format!("{path}: {n} select! (allowed {allowed})"));
            }
        }
        assert_eq!(home, 1, "{HOME} holds the one select over the signals");
        let total: usize = home + LEFT.iter().map(|(_, n)| n).sum::<usize>();
        assert_eq!(total, 1, "one select! in the crate");
        assert!(
            found.is_empty(),
            "select! outside {HOME}:\n{}",
            found.join("\n")
        );
    }
}
