//! Talking to the host's systemd: `READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`,
//! `EXTEND_TIMEOUT_USEC=`. Messages are built from the sd-notify crate's `NotifyState`.
//!
//! The socket is ours, not the crate's: the crate opens a blocking socket per message and
//! does not support abstract addresses (`NOTIFY_SOCKET=@…`). A send that blocks would
//! stall the one event loop, so ours is non-blocking and never waits: a datagram that does
//! not fit right away (systemd's queue is full for a moment) is kept, in order, and the
//! event loop sends it when [`Notifier::due`] comes ([`Notifier::send_due`]). Later
//! datagrams queue behind it, so `READY=1` still comes before what follows it, and
//! `READY=1`/`STOPPING=1` are never dropped; of the rest, repeats are folded into the last
//! one queued, and past [`MAX_QUEUED`] the oldest is dropped with a log line.
//!
//! `STATUS=` goes out at most [`STATUS_PER_WINDOW`] times in any [`STATUS_WINDOW`] (5 a
//! second: systemd stores each one, and a person reads a few a second). Progress driven by
//! the container ([`Notifier::progress`]: job counts and readiness, hundreds of changes a
//! second while it boots or stops, or as fast as a hostile inside makes them) may take
//! [`PROGRESS_PER_WINDOW`] of them; past that it is held, a newer one replacing it, and the
//! latest goes out as soon as the window has room. A sporadic change (a unit that fails)
//! goes out at once. The supervisor's own steps ([`Notifier::status`]: phases, restarts,
//! the halt's escalation) take the rest and wait their turn in order when the window is
//! full; a step drops held progress, which is older. `READY=1` and `STOPPING=1` are never
//! held (the slot progress leaves free is theirs): steps still held go out right before
//! them and held progress is dropped. `WATCHDOG=1` and `EXTEND_TIMEOUT_USEC=` carry no
//! status and are never held. What is held at the end of the run goes out then
//! ([`Notifier::finish`]). Without `NOTIFY_SOCKET` every call is a no-op.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::os::sanitize::{one_line, MAX_STATUS};

/// `STATUS=`: at most this many in any [`STATUS_WINDOW`].
pub const STATUS_PER_WINDOW: usize = 5;
pub const STATUS_WINDOW: Duration = Duration::from_secs(1);

/// How many of a window's statuses progress may take, so that one is left for what is
/// never held (`READY=1`, `STOPPING=1`) while the container floods us with progress.
pub const PROGRESS_PER_WINDOW: usize = 4;

/// Statuses held back by the rate; past this, a new one replaces the newest held.
const MAX_HELD: usize = 8;

/// Datagrams kept while the socket is full, beyond `READY=1`/`STOPPING=1` (never dropped).
pub const MAX_QUEUED: usize = 16;

/// The first retry of a refused datagram; doubled up to [`RETRY_MAX`] while it stays full.
const RETRY_FIRST: Duration = Duration::from_millis(5);
const RETRY_MAX: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<Arc<Socket>>,
    /// Half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) recommends; None when off.
    pub watchdog_interval: Option<Duration>,
}

#[derive(Debug)]
struct Socket {
    sock: UnixDatagram,
    addr: SocketAddr,
    out: Mutex<Outbox>,
}

/// What a datagram is, for folding repeats and for what may be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The container's progress: a repeat replaces the one before it.
    Status,
    /// A step of the supervisor's own: never folded.
    Step,
    Watchdog,
    Extend,
    /// `READY=1` or `STOPPING=1` (with their status): never folded, never dropped.
    Keep,
}

/// What has not been sent yet.
#[derive(Debug, Default)]
struct Outbox {
    /// Datagrams the socket refused, and those behind them, oldest first.
    queued: VecDeque<(Kind, String)>,
    /// When to try the queue again, and the wait after that.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Statuses held back by the rate, oldest first, each marked when it is progress; and
    /// when the last [`STATUS_PER_WINDOW`] statuses and the last [`PROGRESS_PER_WINDOW`]
    /// progress went out, oldest first.
    held: VecDeque<(bool, String)>,
    said: VecDeque<Instant>,
    said_progress: VecDeque<Instant>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|p| match open(&p) {
            Ok((sock, addr)) => Some(Arc::new(Socket {
                sock,
                addr,
                out: Mutex::default(),
            })),
            Err(e) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; systemd will not hear from us");
                None
            }
        });
        Notifier {
            socket,
            watchdog_interval: sd_notify::watchdog_enabled()
                .map(|d| d / 2)
                .filter(|d| !d.is_zero()),
        }
    }

    fn send(&self, kind: Kind, states: &[NotifyState], now: Instant) {
        let Some(sock) = &self.socket else { return };
        let mut msg = String::new();
        for s in states {
            let _ = writeln!(msg, "{s}");
        }
        let mut out = sock.outbox();
        // Behind a refused datagram it waits its turn (the loop retries); else it goes now.
        let waiting = !out.queued.is_empty();
        match kind {
            // Never held: the steps still held are said first, in order; held progress is
            // older than what it says, and dropped.
            Kind::Keep => {
                let held = std::mem::take(&mut out.held);
                for (_, text) in held.into_iter().filter(|(progress, _)| !progress) {
                    out.push(Kind::Step, format!("{}\n", NotifyState::Status(&text)));
                    out.said(now);
                }
                out.said(now);
            }
            Kind::Step => out.said(now),
            Kind::Status => {
                out.said(now);
                out.said_progress.push_back(now);
                while out.said_progress.len() > PROGRESS_PER_WINDOW {
                    out.said_progress.pop_front();
                }
            }
            Kind::Watchdog | Kind::Extend => {}
        }
        out.push(kind, msg);
        if !waiting {
            sock.flush(&mut out, now);
        }
    }

    fn status_at(&self, status: &str, progress: bool, now: Instant) {
        let Some(sock) = &self.socket else { return };
        let text = one_line(status, MAX_STATUS).into_owned();
        {
            let mut out = sock.outbox();
            if !progress {
                // A step says something newer than any progress held before it.
                out.held.retain(|(p, _)| !p);
            }
            if !out.held.is_empty() || !out.fits(progress, now) {
                out.hold(progress, text);
                return;
            }
        }
        let kind = if progress { Kind::Status } else { Kind::Step };
        self.send(kind, &[NotifyState::Status(&text)], now);
    }

    /// Every STATUS= goes through here, [`Notifier::progress`] and
    /// [`Notifier::ready`]/[`Notifier::stopping`]: the text may quote the container (unit
    /// names, states), so it is kept on one line ([`one_line`]) — a newline would add
    /// notify fields of the container's choosing. A step of the supervisor's own: sent at
    /// once (module docs).
    pub fn status(&self, status: &str) {
        self.status_at(status, false, Instant::now());
    }

    /// A status that says how far the container is (job counts, readiness): at most one
    /// [`STATUS_PER_WINDOW`] per [`STATUS_WINDOW`], the latest one (module docs).
    pub fn progress(&self, status: &str) {
        self.status_at(status, true, Instant::now());
    }

    pub fn ready(&self, status: &str) {
        self.send(
            Kind::Keep,
            &[
                NotifyState::Ready,
                NotifyState::Status(&one_line(status, MAX_STATUS)),
            ],
            Instant::now(),
        );
    }

    pub fn watchdog(&self) {
        self.send(Kind::Watchdog, &[NotifyState::Watchdog], Instant::now());
    }

    pub fn stopping(&self, status: &str) {
        self.send(
            Kind::Keep,
            &[
                NotifyState::Stopping,
                NotifyState::Status(&one_line(status, MAX_STATUS)),
            ],
            Instant::now(),
        );
    }

    /// Asks systemd for `d` more from now (start or stop timeout).
    pub fn extend(&self, d: Duration) {
        let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.send(
            Kind::Extend,
            &[NotifyState::ExtendTimeoutUsec(usec)],
            Instant::now(),
        );
    }

    /// When something held or refused is to be sent ([`Self::send_due`]); `None` when
    /// nothing waits, so that no timer is armed.
    pub fn due(&self) -> Option<Instant> {
        let sock = self.socket.as_ref()?;
        let out = sock.outbox();
        let held = out
            .held
            .front()
            .map(|(progress, _)| out.room_at(*progress).unwrap_or(Instant::now()));
        let retry = out.retry_at.filter(|_| !out.queued.is_empty());
        held.into_iter().chain(retry).min()
    }

    /// Sends what is due: held progress once its time has come, the queue when the
    /// socket takes it again. Never waits.
    pub fn send_due(&self) {
        self.send_due_at(Instant::now());
    }

    fn send_due_at(&self, now: Instant) {
        let Some(sock) = &self.socket else { return };
        {
            let mut out = sock.outbox();
            if out.retry_at.is_some_and(|t| t <= now) {
                sock.flush(&mut out, now);
            }
        }
        // What the window has room for, in order.
        loop {
            let next = {
                let mut out = sock.outbox();
                match out.held.front() {
                    Some((progress, _)) if out.fits(*progress, now) => out.held.pop_front(),
                    _ => None,
                }
            };
            let Some((progress, text)) = next else { return };
            let kind = if progress { Kind::Status } else { Kind::Step };
            self.send(kind, &[NotifyState::Status(&text)], now);
        }
    }

    /// The end of the run, after the loop: held progress goes out now, and what the
    /// socket refused is retried for a short, bounded while (nothing else waits on us).
    pub fn finish(&self) {
        let Some(sock) = &self.socket else { return };
        let held = std::mem::take(&mut sock.outbox().held);
        for (progress, text) in held {
            let kind = if progress { Kind::Status } else { Kind::Step };
            self.send(kind, &[NotifyState::Status(&text)], Instant::now());
        }
        for _ in 0..10 {
            let mut out = sock.outbox();
            if out.queued.is_empty() {
                return;
            }
            sock.flush(&mut out, Instant::now());
            drop(out);
            std::thread::sleep(RETRY_FIRST);
        }
        let lost = sock.outbox().queued.len();
        if lost > 0 {
            tracing::warn!(
                datagrams = lost,
                "sd_notify messages dropped at exit: the socket stayed full"
            );
        }
    }
}

impl Socket {
    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        // Nothing panics while holding it; a poisoned lock still holds a usable outbox.
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends the queue in order until the socket refuses; then a retry is due later.
    fn flush(&self, out: &mut Outbox, now: Instant) {
        while let Some((_, msg)) = out.queued.front() {
            match self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
                Ok(_) => {
                    out.queued.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The manager's queue is full for a moment: the loop tries again.
                    let wait = out.backoff.clamp(RETRY_FIRST, RETRY_MAX);
                    out.retry_at = Some(now + wait);
                    out.backoff = (wait * 2).min(RETRY_MAX);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, notify_message = %msg.trim_end(), "sd_notify message dropped");
                    out.queued.pop_front();
                }
            }
        }
        out.retry_at = None;
        out.backoff = RETRY_FIRST;
    }
}

impl Outbox {
    /// Notes a status that went out (or was queued) at `now`.
    fn said(&mut self, now: Instant) {
        self.said.push_back(now);
        while self.said.len() > STATUS_PER_WINDOW {
            self.said.pop_front();
        }
    }

    /// When the window has room for one more status, progress or a step (`None`: it has).
    fn room_at(&self, progress: bool) -> Option<Instant> {
        // Once the limit-th newest has left the window, fewer than `limit` are in it.
        let room = |said: &VecDeque<Instant>, limit: usize| {
            let n = said.len();
            (n >= limit).then(|| said[n - limit] + STATUS_WINDOW)
        };
        let any = room(&self.said, STATUS_PER_WINDOW);
        if progress {
            any.max(room(&self.said_progress, PROGRESS_PER_WINDOW))
        } else {
            any
        }
    }

    fn fits(&self, progress: bool, now: Instant) -> bool {
        self.room_at(progress).is_none_or(|t| t <= now)
    }

    /// Holds a status: progress replaces progress held last, a step waits its turn, and
    /// past [`MAX_HELD`] the newest held is replaced.
    fn hold(&mut self, progress: bool, text: String) {
        let fold =
            self.held.len() >= MAX_HELD || (progress && self.held.back().is_some_and(|(p, _)| *p));
        match self.held.back_mut() {
            Some(last) if fold => *last = (progress, text),
            _ => self.held.push_back((progress, text)),
        }
    }

    /// Queues a datagram behind those not sent yet: a repeat of the last one queued
    /// replaces it, and past [`MAX_QUEUED`] the oldest that may be dropped is.
    fn push(&mut self, kind: Kind, msg: String) {
        if !matches!(kind, Kind::Keep | Kind::Step) {
            if let Some(last) = self.queued.back_mut().filter(|(k, _)| *k == kind) {
                last.1 = msg;
                return;
            }
        }
        self.queued.push_back((kind, msg));
        let droppable = self.queued.iter().filter(|(k, _)| *k != Kind::Keep).count();
        if droppable > MAX_QUEUED {
            if let Some(i) = self.queued.iter().position(|(k, _)| *k != Kind::Keep) {
                if let Some((_, msg)) = self.queued.remove(i) {
                    tracing::warn!(notify_message = %msg.trim_end(), "sd_notify message dropped: the socket stays full");
                }
            }
        }
    }
}

/// `NOTIFY_SOCKET` is a path, or `@name` for the abstract namespace (sd_notify(3)).
fn open(p: &std::ffi::OsStr) -> io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = p.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(p))?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    Ok((sock, addr))
}

/// A periodic timer on a timerfd: exactly one wake-up per period. tokio's own interval
/// sleeps on its hierarchical timer wheel, which wakes the process a few extra times per
/// long period to move the entry between levels; an idle supervisor should wake only to
/// ping the watchdog.
pub struct Ticker {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl Ticker {
    pub fn new(period: Duration) -> io::Result<Ticker> {
        use std::os::fd::FromRawFd;
        // SAFETY: timerfd_create takes two integer flags and returns a new fd or -1.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let ts = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: `spec` is a valid itimerspec for the duration of the call; the old value
        // is not wanted (null).
        let r = unsafe {
            libc::timerfd_settime(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the timerfd for its whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(Ticker { fd })
    }

    /// Waits for the next expiry (missed ones are folded into one).
    pub async fn tick(&self) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let mut buf = [0u8; 8];
            let res = guard.try_io(|fd| {
                // SAFETY: reading 8 bytes into an 8-byte buffer from our timerfd.
                let n = unsafe {
                    libc::read(
                        std::os::fd::AsRawFd::as_raw_fd(fd.get_ref()),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            if let Ok(Ok(())) = res {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notifier sending to a fresh path socket, with the listening end (and the directory
    /// that holds the socket, kept alive by the caller).
    fn at_path_socket() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("n.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let (sock, addr) = open(path.as_os_str()).unwrap();
        let n = Notifier {
            socket: Some(Arc::new(Socket {
                sock,
                addr,
                out: Mutex::default(),
            })),
            watchdog_interval: None,
        };
        (d, listener, n)
    }

    #[test]
    fn sends_to_a_path_socket() {
        let (_d, listener, n) = at_path_socket();
        n.ready("up");
        let mut buf = [0u8; 128];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up\n");
    }

    #[test]
    fn a_status_from_inside_stays_one_field() {
        let (_d, listener, n) = at_path_socket();
        n.ready("x.service failed\nMAINPID=1\nWATCHDOG=trigger");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..len],
            b"READY=1\nSTATUS=x.service failed\\nMAINPID=1\\nWATCHDOG=trigger\n"
        );
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("asv-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let (sock, addr) = open(std::ffi::OsStr::new(&format!("@{name}"))).unwrap();
        let n = Notifier {
            socket: Some(Arc::new(Socket {
                sock,
                addr,
                out: Mutex::default(),
            })),
            watchdog_interval: None,
        };
        n.watchdog();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let (_d, listener, n) = at_path_socket();
        // Nobody reads: a blocking socket would hang here for good once the queue is full
        // (net.unix.max_dgram_qlen); ours returns at once and keeps what does not fit for
        // the event loop to retry (see the tests below).
        for _ in 0..20 {
            n.status("x");
        }
        listener.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let mut queued = 0;
        while listener.recv(&mut buf).is_ok() {
            queued += 1;
        }
        assert!(
            (1..20).contains(&queued),
            "some queued, the rest dropped: {queued}"
        );
    }

    /// Fills the listener's queue from a socket of its own, until the kernel refuses more.
    fn fill(path: &std::path::Path) -> usize {
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        let mut n = 0;
        while filler.send_to(b"X=1\n", path).is_ok() {
            n += 1;
        }
        n
    }

    /// Every datagram queued at the listener now.
    fn received(listener: &UnixDatagram) -> Vec<String> {
        listener.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        let mut got = Vec::new();
        while let Ok(len) = listener.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        got
    }

    #[test]
    fn a_full_socket_keeps_ready_and_stopping_in_order_without_waiting() {
        let (d, listener, n) = at_path_socket();
        let filled = fill(&d.path().join("n.sock"));
        // Each call returns at once (no sleep on the loop): the refused ones are kept.
        n.ready("up");
        n.watchdog();
        n.watchdog();
        n.stopping("bye");
        let retry = n.due().expect("a retry is due");
        assert_eq!(
            received(&listener).len(),
            filled,
            "only the filler's got in"
        );
        // The loop's timer: the queue goes out in order, repeats folded.
        n.send_due_at(retry);
        assert_eq!(
            received(&listener),
            [
                "READY=1\nSTATUS=up\n",
                "WATCHDOG=1\n",
                "STOPPING=1\nSTATUS=bye\n"
            ]
        );
        assert_eq!(n.due(), None, "nothing left, no timer");
    }

    #[test]
    fn a_socket_that_stays_full_drops_the_oldest_status_never_ready() {
        let (d, listener, n) = at_path_socket();
        let filled = fill(&d.path().join("n.sock"));
        n.ready("up");
        for i in 0..MAX_QUEUED * 2 {
            // Steps of our own: never held, each is queued.
            n.status(&format!("s{i}"));
            n.extend(Duration::from_secs(1));
        }
        assert_eq!(received(&listener).len(), filled);
        // The loop's timer, until all is out (the listener's queue is short).
        let mut got = Vec::new();
        while let Some(due) = n.due() {
            n.send_due_at(due);
            got.extend(received(&listener));
        }
        assert_eq!(got[0], "READY=1\nSTATUS=up\n", "{got:?}");
        assert!(got.len() <= MAX_QUEUED + 1 + MAX_HELD, "{got:?}");
        assert_eq!(
            got.iter()
                .rev()
                .find(|m| m.starts_with("STATUS="))
                .map(String::as_str),
            Some(format!("STATUS=s{}\n", MAX_QUEUED * 2 - 1).as_str()),
            "the latest status is kept: {got:?}"
        );
    }

    #[test]
    fn a_burst_of_progress_gives_five_now_and_the_last_when_due() {
        let (_d, listener, n) = at_path_socket();
        let t0 = Instant::now();
        for i in 0..1000 {
            n.status_at(&format!("status {i}"), true, t0);
        }
        assert_eq!(
            received(&listener),
            (0..PROGRESS_PER_WINDOW)
                .map(|i| format!("STATUS=status {i}\n"))
                .collect::<Vec<_>>()
        );
        let due = n.due().expect("the latest is held");
        assert_eq!(due, t0 + STATUS_WINDOW);
        n.send_due_at(due);
        assert_eq!(received(&listener), ["STATUS=status 999\n"]);
        assert_eq!(n.due(), None);
    }

    #[test]
    fn progress_goes_out_at_most_five_a_second_and_the_last_arrives() {
        let (_d, listener, n) = at_path_socket();
        let t0 = Instant::now();
        // 1000 updates in one second, with the event loop's timer between them.
        let mut sent: Vec<(Duration, String)> = Vec::new();
        let mut note = |at: Instant| {
            for m in received(&listener) {
                sent.push((at - t0, m));
            }
        };
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(i);
            if n.due().is_some_and(|d| d <= now) {
                n.send_due_at(now);
            }
            n.status_at(&format!("status {i}"), true, now);
            note(now);
        }
        while let Some(due) = n.due() {
            n.send_due_at(due);
            note(due);
        }
        assert_eq!(
            sent.last().map(|(_, m)| m.as_str()),
            Some("STATUS=status 999\n")
        );
        for (i, (at, _)) in sent.iter().enumerate() {
            let in_a_second = sent[i..]
                .iter()
                .take_while(|(t, _)| *t < *at + Duration::from_secs(1))
                .count();
            assert!(in_a_second <= 5, "{sent:?}");
        }
        assert_eq!(
            sent.len(),
            PROGRESS_PER_WINDOW + 1,
            "the first four at once, the last when the window has room: {sent:?}"
        );
    }

    /// Fills the status window with progress said at `t0` (more, if it had some already),
    /// and drains the listener.
    fn fill_window(n: &Notifier, listener: &UnixDatagram, t0: Instant) {
        for i in 0..PROGRESS_PER_WINDOW {
            n.status_at(&format!("booting: {i} jobs"), true, t0);
        }
        assert!(!received(listener).is_empty());
    }

    #[test]
    fn steps_go_out_at_once_and_drop_older_progress() {
        let (_d, listener, n) = at_path_socket();
        let t0 = Instant::now();
        fill_window(&n, &listener, t0);
        n.status_at("booting: 12 jobs", true, t0);
        n.status("halting an orphan");
        n.status_at("booting: 3 jobs", true, t0);
        let mut got = received(&listener);
        while let Some(due) = n.due() {
            n.send_due_at(due);
            got.extend(received(&listener));
        }
        assert_eq!(
            got,
            ["STATUS=halting an orphan\n", "STATUS=booting: 3 jobs\n"],
            "the step at once, the progress held before it dropped, the one after it held"
        );
    }

    #[test]
    fn a_failure_right_after_ready_is_said_at_once() {
        let (_d, listener, n) = at_path_socket();
        let t0 = Instant::now();
        n.status_at("booting: 1 jobs queued", true, t0);
        n.status_at("booting: 0 jobs queued", true, t0);
        n.ready("running: 1/1 required units active");
        let later = t0 + Duration::from_millis(80);
        n.status_at("degraded: 1/1 required units active", true, later);
        n.status_at("degraded: x.service failed (signal)", true, later);
        let got = received(&listener);
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[4], "STATUS=degraded: x.service failed (signal)\n");
        assert_eq!(n.due(), None);
    }

    #[test]
    fn ready_and_stopping_are_never_held_and_replace_a_held_status() {
        let (_d, listener, n) = at_path_socket();
        fill_window(&n, &listener, Instant::now());
        n.status("booting");
        n.status("waiting for the bus");
        n.progress("booting: 3 jobs");
        assert!(n.due().is_some(), "the progress is held");
        n.ready("up");
        assert_eq!(
            received(&listener),
            [
                "STATUS=booting\n",
                "STATUS=waiting for the bus\n",
                "READY=1\nSTATUS=up\n"
            ],
            "a held step goes out before READY=1, held progress is dropped"
        );
        assert_eq!(
            n.due(),
            None,
            "the older held status is not sent after READY=1"
        );
        n.progress("stopping: 3 jobs left");
        n.stopping("stopping");
        // Never held, though the window is full.
        assert_eq!(
            received(&listener),
            ["STOPPING=1\nSTATUS=stopping\n"],
            "held progress is dropped by STOPPING=1"
        );
        // The window is still full: held until the end.
        n.progress("stopping: 1 jobs left");
        assert!(received(&listener).is_empty());
        n.finish();
        assert_eq!(
            received(&listener),
            ["STATUS=stopping: 1 jobs left\n"],
            "the last held goes out at the end"
        );
    }
}
