//! Talking to the host's systemd: `READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`,
//! `EXTEND_TIMEOUT_USEC=` through the sd-notify crate.
//!
//! Sending is best effort: a lost datagram must never stop the supervisor, so errors are
//! logged at debug level and dropped. Without `NOTIFY_SOCKET` every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    /// Half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) recommends; None when off.
    pub watchdog_interval: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Self {
        Notifier {
            watchdog_interval: sd_notify::watchdog_enabled()
                .map(|d| d / 2)
                .filter(|d| !d.is_zero()),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// Asks systemd for `d` more from now (start or stop timeout).
    pub fn extend(&self, d: Duration) {
        let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }
}
