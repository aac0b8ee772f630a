//! Talking to the host's systemd: `READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`,
//! `EXTEND_TIMEOUT_USEC=`. Messages are built from the sd-notify crate's `NotifyState`.
//!
//! The socket is ours, not the crate's: the crate opens a blocking socket per message and
//! does not support abstract addresses (`NOTIFY_SOCKET=@…`). A send that blocks would
//! stall the one event loop, so ours is non-blocking; a datagram that does not fit right
//! away is retried a few times (bounded) and then dropped with a log line. Without
//! `NOTIFY_SOCKET` every call is a no-op.

use std::fmt::Write as _;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::os::sanitize::{one_line, MAX_STATUS};

#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<Arc<(UnixDatagram, SocketAddr)>>,
    /// Half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) recommends; None when off.
    pub watchdog_interval: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|p| match open(&p) {
            Ok(s) => Some(Arc::new(s)),
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

    fn send(&self, states: &[NotifyState]) {
        let Some(sock) = &self.socket else { return };
        let mut msg = String::new();
        for s in states {
            let _ = writeln!(msg, "{s}");
        }
        for attempt in 0..10 {
            match sock.0.send_to_addr(msg.as_bytes(), &sock.1) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && attempt < 9 => {
                    // The manager's queue is full for a moment: a short, bounded wait.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    tracing::warn!(error = %e, notify_message = %msg.trim_end(), "sd_notify message dropped");
                    return;
                }
            }
        }
    }

    /// Every STATUS= goes through here and [`Notifier::ready`]/[`Notifier::stopping`]: the
    /// text may quote the container (unit names, states), so it is kept on one line
    /// ([`one_line`]) — a newline would add notify fields of the container's choosing.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(&one_line(status, MAX_STATUS))]);
    }

    pub fn ready(&self, status: &str) {
        self.send(&[
            NotifyState::Ready,
            NotifyState::Status(&one_line(status, MAX_STATUS)),
        ]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub fn stopping(&self, status: &str) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status(&one_line(status, MAX_STATUS)),
        ]);
    }

    /// Asks systemd for `d` more from now (start or stop timeout).
    pub fn extend(&self, d: Duration) {
        let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
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
            socket: Some(Arc::new((sock, addr))),
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
            socket: Some(Arc::new((sock, addr))),
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
        // Nobody reads: the queue fills (net.unix.max_dgram_qlen); a blocking socket would
        // hang here for good, ours returns and drops what does not fit.
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
}
