//! The one place that waits on the signals that stop us (SIGTERM, SIGINT, SIGABRT) and
//! the one biased `select!` that puts them first.
//!
//! Every phase of a run waits through [`next`]: the signals beside "the current
//! operation", a future that touches no signal (an Apptainer CLI command to completion,
//! the connection to the container's bus, the next thing the running instance does). A
//! signal wins over whatever is ready with it; the caller turns it into the policy's
//! [`Event::Signal`](super::policy::Event) or, while a call must finish first (a CLI
//! command half-way through making something), notes it with [`Signals::note`] so that it
//! is handed to the policy once the call returns ([`Signals::take_noted`]). No other code
//! constructs a signal stream, and no other `select!` appears but the few listed in the
//! scan at the bottom of this file (each among its own signal-free sources).

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

/// What a scan of the source can hold the rest of the crate to: no other file constructs a
/// signal stream, and no new `select!` appears outside this file. It does not prove that a
/// future handed to [`next`] is free of its own waits, nor that fault reactions are decided
/// in `policy` only (a scan cannot tell a match on a verdict from making one).
#[cfg(test)]
mod source_scan {
    use std::path::{Path, PathBuf};

    const HOME: &str = "src/run/event_loop.rs";

    /// The `select!`s that remain outside the loop, each among its own signal-free sources
    /// (see `run/mod.rs`): a count may only go down.
    const LEFT: &[(&str, usize)] = &[
        // The CLI command to its exit: pidfd, stderr, deadline, EXTEND_TIMEOUT_USEC.
        ("src/run/child.rs", 1),
        // The halt's wait for the init's handler (a /proc poll no pidfd replaces).
        ("src/run/halt.rs", 1),
        // The running instance's sources, driven by `next`.
        ("src/run/watch.rs", 1),
        // The log forwarder's inotify or its rate-limit deadline.
        ("src/os/output.rs", 1),
    ];

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
    fn no_select_outside_the_event_loop_but_the_known_ones() {
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
        assert!(
            found.is_empty(),
            "select! outside {HOME}:\n{}",
            found.join("\n")
        );
    }
}
