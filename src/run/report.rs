//! The one way out for what the service is doing: one text, said the same way to the host's
//! systemd (`STATUS=`, with `READY=1` or `STOPPING=1` when it is that), the live state file
//! (its status, and its phase when the phase changes) and the journal.

use tracing::info;

use super::Supervisor;
use crate::os::live::Phase;
use crate::os::sanitize::{one_line, MAX_STATUS};

/// What the `STATUS=` datagram carries besides the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Notice {
    /// A step of the supervisor's own.
    Status,
    /// How far the container is (job counts): STATUS= folds a burst into its latest.
    Progress,
    Ready,
    Stopping,
}

impl Supervisor<'_> {
    /// Says `status` to all three sinks; `phase`: the phase it begins, if any. READY=1 goes
    /// first (nothing may delay it), the state file right after.
    pub(super) fn report(&mut self, notice: Notice, phase: Option<Phase>, status: &str) {
        // The text may quote the container (unit names, states): the one-line form goes to
        // all three sinks, so that they say the same thing and none gets a forged line.
        let status = &*one_line(status, MAX_STATUS);
        match notice {
            Notice::Status => self.notify.status(status),
            Notice::Progress => self.notify.progress(status),
            Notice::Ready => self.notify.ready(status),
            Notice::Stopping => self.notify.stopping(status),
        }
        match phase {
            Some(p) => self.live.phase(p, status),
            None => {
                let text = status.to_owned();
                self.live.update(|s| s.status = text);
            }
        }
        info!(status = %status, "status");
    }
}
