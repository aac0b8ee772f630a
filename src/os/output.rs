//! The instance's own output: forwards new lines of Apptainer's `NAME.out` / `NAME.err` to
//! the journal under `SYSLOG_IDENTIFIER=NAME-instance`, bounded in rate, and keeps both
//! files bounded in size.
//!
//! Who writes the files: Apptainer's CLI opens them with
//! `O_RDWR|O_CREATE|O_APPEND|O_NOFOLLOW`, mode 0644 (`SetLogFile` in
//! `internal/pkg/instance/instance_linux.go`), and hands them to the starter as its
//! stdout/stderr (`cmd.Stdout`/`cmd.Stderr` in the launcher's `starterInstance`); the master
//! and every process of the container inherit those descriptors. The CLI exits after the
//! start, so the writers are the master and the container, for as long as they live.
//!
//! Wake-ups: inotify `IN_MODIFY` on both files (one event per `write(2)` batch), and a
//! one-shot timer only while lines are being suppressed, to report how many once the rate
//! allows. Nothing is armed while the instance writes nothing, so an idle supervisor still
//! wakes up zero times. The forwarder does not wait itself: the run's event loop waits on
//! [`Forwarder::written`] and [`Forwarder::deadline`] and then calls [`Forwarder::pump`].
//!
//! Rate: journald drops a unit's messages past `RateLimitBurst=10000` per
//! `RateLimitIntervalSec=30s` (`journald.conf(5)`; the burst is scaled by free disk space), and
//! what it drops would include the supervisor's own messages. Our own token bucket
//! ([`LIMITS`]) lets through at most `burst + 30 s × per_sec` = 4 000 lines per 30 s, well
//! below, and then logs one "N lines suppressed" entry (at most one a second,
//! [`REPORT_GAP`], while the flood goes on). Lines may be 16 KiB each, so a second
//! bucket bounds the bytes too ([`BYTE_LIMITS`]); a line either refuses is a suppressed line.
//!
//! Reading: at most [`MAX_READ`] bytes of each file per wake-up. A container writes faster
//! than we can read and forward; reading its backlog to the end in one go kept the loop
//! (READY=1, SIGTERM) waiting for seconds.
//!
//! Size: after reading, a file past [`MAX_FILE`] bytes is truncated to zero in place, also
//! when part of it is still unread: a writer faster than [`MAX_READ`] per wake-up would
//! otherwise fill the file system between two quiet moments. What is skipped unread is
//! counted and said in the next suppression report. Truncating is safe only because every
//! writer has `O_APPEND` (see above): its next write lands at the new end of file, so no hole
//! of NULs appears; a writer without `O_APPEND` would keep its offset and leave a sparse
//! file, and would need copy-truncate instead. What was read is not lost: it has been
//! forwarded to the journal, which is the archive. Bytes written between the last `fstat` and
//! the `ftruncate` (microseconds) are lost; logrotate's `copytruncate` has the same window.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

use crate::os::journal::Journal;

/// Longest line forwarded as one entry; longer lines are cut into pieces of this size
/// (journald's own stream transport cuts at `LineMax=48K`). It also keeps every entry far
/// below the datagram size limit, so no memfd is ever needed.
pub const MAX_LINE: usize = 16 * 1024;

/// A log file larger than this after reading is truncated (see the module docs).
pub const MAX_FILE: u64 = 1024 * 1024;

/// The most read of one log per wake-up (see the module docs).
pub const MAX_READ: u64 = 1024 * 1024;

/// How much of a file is read in one go.
const CHUNK: usize = 64 * 1024;

/// A token bucket: `burst` lines at once, then `per_sec` lines per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub burst: u32,
    pub per_sec: u32,
}

/// Our bound on forwarded lines, below journald's default per-unit limit (module docs).
pub const LIMITS: Limits = Limits {
    burst: 1000,
    per_sec: 100,
};

/// The least time between two "N lines suppressed" entries.
pub const REPORT_GAP: Duration = Duration::from_secs(1);

/// Our bound on forwarded bytes (the lines' text): 100 lines of [`MAX_LINE`] a second would
/// be 48 MiB per 30 s.
pub const BYTE_LIMITS: Limits = Limits {
    burst: 1024 * 1024,
    per_sec: 128 * 1024,
};

/// Which of the instance's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}

impl Stream {
    /// Default priorities: stdout is informational (6). stderr is warning (4), not error
    /// (3): programs, systemd included, write routine progress there, and err-level
    /// alerting on every such line would be noise — yet it stays apart from stdout.
    pub fn priority(self) -> u8 {
        match self {
            Stream::Out => 6,
            Stream::Err => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Stream::Out => "stdout",
            Stream::Err => "stderr",
        }
    }
}

/// The priority of a line and its text: a leading `<N>` (N = 0–7, `sd-daemon(3)`) sets it,
/// as journald does for stream clients (`SyslogLevelPrefix=yes`, `systemd.exec(5)`);
/// otherwise the stream's default.
pub fn priority_of(stream: Stream, line: &[u8]) -> (u8, &[u8]) {
    match line {
        [b'<', d @ b'0'..=b'7', b'>', rest @ ..] => (d - b'0', rest),
        _ => (stream.priority(), line),
    }
}

/// Cuts a byte stream into lines (without the `\n`), keeping an unfinished last line until
/// its end arrives; a line longer than [`MAX_LINE`] is emitted in pieces.
#[derive(Debug, Default)]
pub struct Splitter {
    carry: Vec<u8>,
}

impl Splitter {
    pub fn push(&mut self, data: &[u8], mut emit: impl FnMut(&[u8])) {
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            if self.carry.is_empty() {
                emit_cut(&rest[..i], &mut emit);
            } else {
                self.carry.extend_from_slice(&rest[..i]);
                emit_cut(&self.carry, &mut emit);
                self.carry.clear();
            }
            rest = &rest[i + 1..];
        }
        self.carry.extend_from_slice(rest);
        while self.carry.len() >= MAX_LINE {
            emit(&self.carry[..MAX_LINE]);
            self.carry.drain(..MAX_LINE);
        }
    }

    /// The unfinished last line, if any (when the writer is gone).
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.carry.is_empty() {
            emit(&self.carry);
            self.carry.clear();
        }
    }

    fn reset(&mut self) {
        self.carry.clear();
    }
}

fn emit_cut(line: &[u8], emit: &mut impl FnMut(&[u8])) {
    if line.is_empty() {
        emit(line);
    }
    for piece in line.chunks(MAX_LINE) {
        emit(piece);
    }
}

/// Token bucket with a count of what it refused.
#[derive(Debug)]
pub struct Bucket {
    limits: Limits,
    tokens: f64,
    last: Instant,
    /// Lines refused since the last report.
    pub suppressed: u64,
    /// The least time between two reports ([`Self::with_report_gap`]).
    report_gap: Duration,
    last_report: Option<Instant>,
}

impl Bucket {
    pub fn new(limits: Limits, now: Instant) -> Bucket {
        Bucket {
            limits,
            tokens: f64::from(limits.burst),
            last: now,
            suppressed: 0,
            report_gap: Duration::ZERO,
            last_report: None,
        }
    }

    /// At most one report per `gap`: a flood that goes on is counted in one entry a
    /// second, not in one per wake-up that finds a token.
    pub fn with_report_gap(mut self, gap: Duration) -> Bucket {
        self.report_gap = gap;
        self
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens =
            (self.tokens + dt * f64::from(self.limits.per_sec)).min(f64::from(self.limits.burst));
        self.last = now;
    }

    fn take(&mut self, now: Instant) -> bool {
        self.take_n(now, 1)
    }

    /// Takes `n` tokens if there are that many.
    fn take_n(&mut self, now: Instant, n: usize) -> bool {
        self.refill(now);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Whether `n` tokens are there, taking none.
    fn has(&mut self, now: Instant, n: usize) -> bool {
        self.refill(now);
        self.tokens >= n as f64
    }

    /// Whether the next line may pass; a refused line is counted. Reports are not made
    /// here but once per read-out ([`Self::report`]), so that a flood read in one go gives
    /// one report, not one per token that trickles back in while it is read.
    pub fn admit(&mut self, now: Instant) -> bool {
        let pass = self.take(now);
        if !pass {
            self.suppressed += 1;
        }
        pass
    }

    /// The count of suppressed lines, when there are some and a token allows the report
    /// (which uses that token).
    pub fn report(&mut self, now: Instant) -> Option<u64> {
        let gap_over = self.last_report.is_none_or(|t| now >= t + self.report_gap);
        if self.suppressed > 0 && gap_over && self.take(now) {
            self.last_report = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            None
        }
    }

    /// When a report becomes possible: only while lines are suppressed (so no timer is armed
    /// when nothing is written).
    pub fn deadline(&self) -> Option<Instant> {
        if self.suppressed == 0 {
            return None;
        }
        let missing = (1.0 - self.tokens).max(0.0);
        let per_sec = f64::from(self.limits.per_sec.max(1));
        // A millisecond late, so that float rounding never leaves the token at 0.999… when
        // the timer fires (which would fire it again at once).
        let token =
            self.last + Duration::from_secs_f64(missing / per_sec) + Duration::from_millis(1);
        Some(match self.last_report {
            Some(t) => token.max(t + self.report_gap),
            None => token,
        })
    }
}

/// Whether a line of `len` bytes may pass: both budgets must allow it. The byte budget is
/// asked first, so that a line it refuses takes no line token; refused by either, it is one
/// suppressed line (counted in `lines`).
pub fn admit_line(lines: &mut Bucket, bytes: &mut Bucket, now: Instant, len: usize) -> bool {
    if !bytes.has(now, len) {
        lines.suppressed += 1;
        false
    } else if lines.admit(now) {
        bytes.take_n(now, len);
        true
    } else {
        false
    }
}

/// Whether a file of `size` bytes, read as far as the wake-up allowed, is to be truncated.
pub fn should_truncate(size: u64) -> bool {
    size > MAX_FILE
}

/// The sizes of the two logs before `instance start`: forwarding starts there, so lines of
/// earlier runs (Apptainer appends across runs) are not sent again.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    out: u64,
    err: u64,
}

impl Start {
    pub fn now(out_log: &Path, err_log: &Path) -> Start {
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        Start {
            out: len(out_log),
            err: len(err_log),
        }
    }
}

/// nix's `Inotify` is `AsFd` only; tokio's `AsyncFd` wants `AsRawFd`.
struct Watch(Inotify);

impl std::os::fd::AsRawFd for Watch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// Where forwarded lines go: the journal under systemd, else stderr with a prefix.
enum Sink {
    Journal(Journal),
    Stderr,
}

struct Log {
    stream: Stream,
    path: PathBuf,
    file: File,
    offset: u64,
    split: Splitter,
}

/// Forwards the instance's output; see the module docs. Dropping it forwards what is left.
pub struct Forwarder {
    ident: String,
    service: String,
    pid: String,
    sink: Sink,
    logs: Vec<Log>,
    bucket: Bucket,
    /// The bytes of forwarded lines ([`BYTE_LIMITS`]).
    bytes: Bucket,
    /// Bytes truncated away unread since the last report.
    skipped: u64,
    /// Bytes truncated away unread and already reported, in all.
    skipped_reported: u64,
    inotify: Option<AsyncFd<Watch>>,
}

impl Forwarder {
    /// Opens both logs (read-write, for the truncation; `O_NOFOLLOW` as Apptainer does) and
    /// watches them. A log that cannot be opened or watched is reported and skipped: the
    /// output is a convenience, never a reason to stop the service.
    pub fn new(service: &str, pid: i32, out_log: &Path, err_log: &Path, start: Start) -> Self {
        let sink = if crate::logging::under_systemd() {
            match Journal::connect() {
                Ok(j) => Sink::Journal(j),
                Err(e) => {
                    tracing::warn!(error = %e, "journald's socket is unusable; the instance's output goes to stderr");
                    Sink::Stderr
                }
            }
        } else {
            Sink::Stderr
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(io::Error::from)
            .and_then(|i| {
                // SAFETY: the AsyncFd owns the Inotify (and so its descriptor) for its whole
                // life; the descriptor is never closed or replaced behind it.
                unsafe { AsyncFd::register_with_interest(Watch(i), tokio::io::Interest::READABLE) }
                    .map_err(io::Error::from)
            });
        let inotify = match inotify {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(error = %e, "inotify is unusable; the instance's output is forwarded at stop only");
                None
            }
        };
        let mut logs = Vec::new();
        for (stream, path, from) in [
            (Stream::Out, out_log, start.out),
            (Stream::Err, err_log, start.err),
        ] {
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path);
            let file = match opened {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(log = %path.display(), error = %e, "cannot open the instance's log; its lines are not forwarded");
                    continue;
                }
            };
            if let Some(ino) = &inotify {
                if let Err(e) = ino.get_ref().0.add_watch(path, AddWatchFlags::IN_MODIFY) {
                    tracing::warn!(log = %path.display(), error = %e, "cannot watch the instance's log; its lines are forwarded at stop only");
                }
            }
            let size = file.metadata().map_or(0, |m| m.len());
            logs.push(Log {
                stream,
                path: path.to_owned(),
                file,
                // Shorter than before the start: someone truncated it; read it all.
                offset: if from <= size { from } else { 0 },
                split: Splitter::default(),
            });
        }
        let mut f = Forwarder {
            ident: format!("{service}-instance"),
            service: service.to_owned(),
            pid: pid.to_string(),
            sink,
            logs,
            bucket: Bucket::new(LIMITS, Instant::now()).with_report_gap(REPORT_GAP),
            bytes: Bucket::new(BYTE_LIMITS, Instant::now()),
            skipped: 0,
            skipped_reported: 0,
            inotify,
        };
        // What was written before the watches existed (during the start) would otherwise
        // wait for the next write.
        f.pump();
        f
    }

    /// Waits until a log was written to (then [`Self::pump`] forwards it); never without
    /// a watch. The event loop waits on this beside [`Self::deadline`].
    /// Cancel-safe: it only consumes inotify events, and [`Self::pump`] reads by size.
    pub async fn written(&self) {
        let Some(fd) = &self.inotify else {
            return std::future::pending().await;
        };
        match fd.readable().await {
            Ok(mut guard) => {
                // Drain the queue; try_io clears readiness on EAGAIN.
                while let Ok(Ok(_)) =
                    guard.try_io(|i| i.get_ref().0.read_events().map_err(io::Error::from))
                {
                }
            }
            Err(_) => std::future::pending().await,
        }
    }

    /// When suppressed lines can be reported (then [`Self::pump`] reports them); `None`
    /// while nothing is suppressed, so that no timer is armed.
    pub fn deadline(&self) -> Option<Instant> {
        self.bucket.deadline()
    }

    /// Stops watching the logs for writes; what is written from now on is forwarded when
    /// the forwarder is dropped (it reads by size). Called when the container starts to
    /// halt: closing an inotify descriptor waits for an SRCU grace period (some ms), so it
    /// is closed on a thread of its own while the container halts, not on the loop after.
    pub fn stop_watching(&mut self) {
        if let Some(fd) = self.inotify.take() {
            let watch = fd.into_inner();
            if std::thread::Builder::new()
                .name("inotify-close".into())
                .spawn(move || drop(watch))
                .is_err()
            {
                // No thread to be had: the close blocks here instead, as it used to.
                tracing::debug!("closing the log watch on the loop");
            }
        }
    }

    /// Forwards the complete new lines of at most [`MAX_READ`] bytes of each log, reports
    /// suppressed lines when the rate allows, and truncates a log past [`MAX_FILE`].
    pub fn pump(&mut self) {
        let mut logs = std::mem::take(&mut self.logs);
        for log in &mut logs {
            self.read_new(log);
            match log.file.metadata() {
                Ok(m) if should_truncate(m.len()) => {
                    if let Err(e) = log.file.set_len(0) {
                        tracing::warn!(log = %log.path.display(), error = %e, "cannot truncate the instance's log");
                    } else {
                        let unread = m.len().saturating_sub(log.offset);
                        tracing::debug!(log = %log.path.display(), size = m.len(), "instance log truncated");
                        if unread > 0 {
                            // The unfinished line's end is among what is skipped.
                            self.skipped += unread;
                            log.split.reset();
                        }
                        log.offset = 0;
                    }
                }
                _ => {}
            }
        }
        self.logs = logs;
        if let Some(n) = self.bucket.report(Instant::now()) {
            self.send_suppressed(n);
        }
    }

    fn read_new(&mut self, log: &mut Log) {
        let mut buf = vec![0u8; CHUNK];
        let mut budget = MAX_READ;
        while budget > 0 {
            let size = match log.file.metadata() {
                Ok(m) => m.len(),
                Err(_) => return,
            };
            if size < log.offset {
                // Truncated behind our back (an operator, or our own set_len): start over.
                log.offset = 0;
                log.split.reset();
            }
            if size == log.offset {
                return;
            }
            let want =
                usize::try_from((size - log.offset).min(budget)).map_or(CHUNK, |n| n.min(CHUNK));
            let n = match log.file.read_at(&mut buf[..want], log.offset) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            log.offset += n as u64;
            budget = budget.saturating_sub(n as u64);
            let stream = log.stream;
            let mut lines = Vec::new();
            log.split.push(&buf[..n], |l| lines.push(l.to_vec()));
            for l in lines {
                self.line(stream, &l);
            }
        }
    }

    fn line(&mut self, stream: Stream, line: &[u8]) {
        let now = Instant::now();
        let (prio, text) = priority_of(stream, line);
        if admit_line(&mut self.bucket, &mut self.bytes, now, text.len()) {
            self.send(stream, prio, text);
        }
    }

    fn send_suppressed(&mut self, n: u64) {
        let mut parts = Vec::new();
        if n > 0 {
            parts.push(format!(
                "{n} lines of the instance's output suppressed (more than {} lines or {} KiB at once, or {} lines or {} KiB per second)",
                LIMITS.burst,
                BYTE_LIMITS.burst / 1024,
                LIMITS.per_sec,
                BYTE_LIMITS.per_sec / 1024
            ));
        }
        let skipped = std::mem::take(&mut self.skipped);
        self.skipped_reported += skipped;
        if skipped > 0 {
            parts.push(format!(
                "{skipped} bytes of the instance's output skipped unread (a log past {} KiB is emptied)",
                MAX_FILE / 1024
            ));
        }
        let msg = parts.join("; ");
        self.send_fields(4, msg.as_bytes(), None, Some(n));
    }

    fn send(&self, stream: Stream, prio: u8, text: &[u8]) {
        self.send_fields(prio, text, Some(stream), None);
    }

    fn send_fields(&self, prio: u8, text: &[u8], stream: Option<Stream>, suppressed: Option<u64>) {
        match &self.sink {
            Sink::Journal(j) => {
                let prio = [b'0' + prio];
                let n = suppressed.map(|n| n.to_string());
                let mut fields: Vec<(&str, &[u8])> = vec![
                    ("MESSAGE", text),
                    ("PRIORITY", &prio),
                    ("SYSLOG_IDENTIFIER", self.ident.as_bytes()),
                    ("SERVICE", self.service.as_bytes()),
                    ("INSTANCE_PID", self.pid.as_bytes()),
                ];
                if let Some(s) = stream {
                    fields.push(("STREAM", s.name().as_bytes()));
                }
                if let Some(n) = &n {
                    fields.push(("SUPPRESSED", n.as_bytes()));
                }
                // Like tracing-journald, nothing sensible is left to do with a failed send.
                let _ = j.send(&fields);
            }
            Sink::Stderr => {
                use std::io::Write;
                let tag = stream.map_or("", |s| match s {
                    Stream::Out => "",
                    Stream::Err => " (stderr)",
                });
                let line = terminal_line(&self.ident, tag, text);
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }
}

impl Drop for Forwarder {
    /// The instance is gone or going: forward what is left, the unfinished last lines
    /// too, and report any suppressed count without waiting for the rate.
    fn drop(&mut self) {
        self.pump();
        let mut logs = std::mem::take(&mut self.logs);
        for log in &mut logs {
            let mut rest = Vec::new();
            log.split.finish(|l| rest.push(l.to_vec()));
            for l in rest {
                self.line(log.stream, &l);
            }
        }
        if self.bucket.suppressed > 0 || self.skipped > 0 {
            let n = std::mem::take(&mut self.bucket.suppressed);
            self.send_suppressed(n);
        }
    }
}

/// One line of the instance's output for stderr, a terminal most likely: the container's
/// bytes shown, never acted on (control characters escaped, see `os/sanitize`).
fn terminal_line(ident: &str, tag: &str, text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let text = crate::os::sanitize::one_line(&text, 64 * 1024);
    format!("{ident}{tag}: {text}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(l.to_vec()));
        }
        let mut rest = Vec::new();
        s.finish(|l| rest = l.to_vec());
        (out, rest)
    }

    #[test]
    fn lines_are_split_across_reads_and_the_tail_waits() {
        let (lines, rest) = split_all(&[b"a\nb", b"c\n\nd"]);
        assert_eq!(lines, [b"a".to_vec(), b"bc".to_vec(), b"".to_vec()]);
        assert_eq!(rest, b"d");
    }

    #[test]
    fn long_lines_are_cut_at_max_line() {
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let mut data = long.clone();
        data.push(b'\n');
        let (lines, rest) = split_all(&[&data]);
        assert_eq!(
            lines.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_LINE, MAX_LINE, 5]
        );
        assert!(rest.is_empty());
        // Without a newline, the carry never grows past MAX_LINE.
        let (lines, rest) = split_all(&[&long]);
        assert_eq!(lines.len(), 2);
        assert_eq!(rest.len(), 5);
    }

    #[test]
    fn priority_by_stream_or_sd_daemon_prefix() {
        assert_eq!(priority_of(Stream::Out, b"hi"), (6, &b"hi"[..]));
        assert_eq!(priority_of(Stream::Err, b"oops"), (4, &b"oops"[..]));
        assert_eq!(priority_of(Stream::Out, b"<3>bad"), (3, &b"bad"[..]));
        assert_eq!(priority_of(Stream::Err, b"<8>x"), (4, &b"<8>x"[..]));
    }

    #[test]
    fn bucket_passes_a_burst_then_counts_and_reports_once() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            Limits {
                burst: 3,
                per_sec: 10,
            },
            t0,
        );
        let passed: Vec<bool> = (0..10).map(|_| b.admit(t0)).collect();
        assert_eq!(passed.iter().filter(|p| **p).count(), 3);
        assert_eq!(b.suppressed, 7);
        // One token comes back after 100 ms: the deadline says so, and the report takes it.
        let d = b.deadline().expect("a report is pending");
        assert_eq!(d, t0 + Duration::from_millis(101));
        assert_eq!(b.report(t0 + Duration::from_millis(50)), None);
        assert_eq!(b.report(d), Some(7));
        assert_eq!(b.deadline(), None, "no timer once reported");
        // The next line needs another token; a refused one is counted for the next report.
        assert!(!b.admit(d));
        // 0.01 token was left over from the refill at d: 99 ms more, plus the margin.
        let next = b.deadline().expect("pending again");
        assert!(
            next > d + Duration::from_millis(99) && next <= d + Duration::from_millis(101),
            "{:?}",
            next - d
        );
        assert!(b.admit(d + Duration::from_millis(200)));
        assert_eq!(b.report(d + Duration::from_millis(300)), Some(1));
    }

    #[test]
    fn bucket_refills_to_burst_only() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            Limits {
                burst: 2,
                per_sec: 100,
            },
            t0,
        );
        let later = t0 + Duration::from_secs(3600);
        let passed = (0..5).filter(|_| b.admit(later)).count();
        assert_eq!(passed, 2);
    }

    #[test]
    fn reports_of_a_flood_that_goes_on_come_once_per_gap() {
        let t0 = Instant::now();
        let limits = Limits {
            burst: 1,
            per_sec: 1000,
        };
        let mut b = Bucket::new(limits, t0).with_report_gap(Duration::from_secs(1));
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(b.admit(t0));
        assert!(!b.admit(t0));
        assert_eq!(b.report(ms(2)), Some(1));
        assert!(!b.admit(ms(2)));
        // A token is back after 1 ms, but the next report waits for the gap.
        assert_eq!(b.report(ms(500)), None);
        assert_eq!(b.deadline(), Some(ms(1002)));
        assert_eq!(b.report(ms(1002)), Some(1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_backlog_is_read_one_mib_at_a_time_and_the_rest_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.out");
        let err = dir.path().join("x.err");
        std::fs::write(&out, "").unwrap();
        std::fs::write(&err, "").unwrap();
        let mut f = Forwarder::new("x", 1, &out, &err, Start::now(&out, &err));
        // 3 MiB of 100-byte lines in one write, before the forwarder looks.
        let line = format!("{}\n", "z".repeat(99));
        let backlog = line.repeat(3 * 1024 * 1024 / 100);
        let mut w = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        use std::io::Write;
        w.write_all(backlog.as_bytes()).unwrap();
        f.pump();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 0, "emptied");
        // Counted, whether or not the pump's report went out already (it does when the
        // rate bucket has a token again, which a slow machine gives it).
        assert_eq!(
            f.skipped + f.skipped_reported,
            backlog.len() as u64 - MAX_READ,
            "one pump reads MAX_READ bytes, the rest is skipped and counted"
        );
        assert_eq!(f.logs[0].offset, 0);
        assert!(f.logs[0].split.carry.is_empty(), "the cut line is dropped");
    }

    #[test]
    fn a_line_for_the_terminal_holds_no_byte_a_terminal_acts_on() {
        let line = terminal_line(
            "x",
            " (stderr)",
            b"ok\x1b]0;pwned\x07\x1b[2J\rforged\xc2\x9b",
        );
        assert_eq!(
            line,
            "x (stderr): ok\\x1b]0;pwned\\x07\\x1b[2J\\rforged\\u{9b}\n"
        );
    }

    #[test]
    fn big_files_are_truncated_read_or_not() {
        assert!(!should_truncate(MAX_FILE));
        assert!(should_truncate(MAX_FILE + 1));
    }

    #[test]
    fn a_line_needs_both_budgets_and_a_refused_one_is_counted_once() {
        let t0 = Instant::now();
        let mut lines = Bucket::new(
            Limits {
                burst: 10,
                per_sec: 1,
            },
            t0,
        );
        let mut bytes = Bucket::new(
            Limits {
                burst: 100,
                per_sec: 1,
            },
            t0,
        );
        // 40-byte lines: the bytes allow two, the lines ten.
        let passed = (0..5)
            .filter(|_| admit_line(&mut lines, &mut bytes, t0, 40))
            .count();
        assert_eq!((passed, lines.suppressed), (2, 3));
        assert!(lines.has(t0, 8), "refused lines took no line token");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn forwards_appended_lines_and_truncates_big_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.out");
        let err = dir.path().join("x.err");
        std::fs::write(&out, "old line\n").unwrap();
        std::fs::write(&err, "").unwrap();
        let start = Start::now(&out, &err);
        let mut f = Forwarder::new("x", 1, &out, &err, start);
        assert!(
            matches!(f.sink, Sink::Stderr),
            "not under systemd in unit tests"
        );
        let mut w = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        use std::io::Write;
        w.write_all(b"new\npart").unwrap();
        f.written().await;
        f.pump();
        assert_eq!(
            f.logs[0].offset,
            9 + 8,
            "read to the end, past the old content"
        );
        assert_eq!(f.logs[0].split.carry, b"part");
        // A big write gets forwarded (rate-limited) and then the file is emptied; the
        // O_APPEND writer continues at the new end.
        let big = vec![b'y'; MAX_FILE as usize];
        w.write_all(&big).unwrap();
        w.write_all(b"\n").unwrap();
        f.written().await;
        f.pump();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
        assert_eq!(f.logs[0].offset, 0);
        w.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"after\n");
    }
}
