//! One report path out of `update`: each step is an entry in the journal (when there is
//! one) with the service's fields, under the unit (`OBJECT_SYSTEMD_UNIT=`, which
//! `journalctl -u` shows for entries of root's processes), then a line on stderr for the
//! operator. The journal first, and stderr written without panicking: a terminal that went
//! away (EIO after a dropped ssh session, EPIPE from a dead `| tee`) must not end an
//! update half-way, with its unit stopped.

use std::io::Write;
use std::time::Instant;

use crate::os::journal::Journal;
use crate::os::sanitize;

pub(super) struct Report {
    pub name: String,
    pub unit: Option<String>,
    journal: Option<Journal>,
}

impl Report {
    pub fn new(name: &str) -> Report {
        Report {
            name: name.to_owned(),
            unit: None,
            journal: Journal::connect().ok(),
        }
    }

    /// A step: an entry in the journal and a line on stderr.
    pub fn say(&self, step: &str, text: &str, digest: Option<&str>, result: Option<&str>) {
        self.journal(step, text, digest, result);
        err_line(&format!(
            "{}: {}",
            self.name,
            sanitize::one_line(text, 4096)
        ));
    }

    /// The journal's entry only (the end, which the command prints in its own words).
    pub fn journal(&self, step: &str, text: &str, digest: Option<&str>, result: Option<&str>) {
        let text = sanitize::one_line(text, 4096);
        let Some(j) = &self.journal else { return };
        let mut fields: Vec<(&str, &[u8])> = vec![
            ("MESSAGE", text.as_bytes()),
            (
                "PRIORITY",
                if result.is_some_and(|r| r != "updated" && r != "unchanged") {
                    b"3"
                } else {
                    b"6"
                },
            ),
            ("SYSLOG_IDENTIFIER", b"apptainer-supervisor"),
            ("SERVICE", self.name.as_bytes()),
            ("UPDATE_STEP", step.as_bytes()),
        ];
        if let Some(u) = &self.unit {
            fields.push(("OBJECT_SYSTEMD_UNIT", u.as_bytes()));
        }
        if let Some(d) = digest {
            fields.push(("IMAGE_DIGEST", d.as_bytes()));
        }
        if let Some(r) = result {
            fields.push(("UPDATE_RESULT", r.as_bytes()));
        }
        let _ = j.send(&fields);
    }
}

/// A line on stderr; a write error is ignored (see the module comment).
pub(super) fn err_line(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// A line on stdout; a write error is ignored.
pub(super) fn out_line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

/// The step timings of one update, in the order they happen.
#[derive(Default)]
pub(super) struct Timings(Vec<(&'static str, u64)>);

impl Timings {
    pub fn add(&mut self, step: &'static str, since: Instant) {
        self.0.push((
            step,
            u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
        ));
    }

    pub fn text(&self) -> String {
        self.0
            .iter()
            .map(|(s, ms)| format!("{s} {}.{:01} s", ms / 1000, (ms % 1000) / 100))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn map(&self) -> std::collections::BTreeMap<String, u64> {
        self.0
            .iter()
            .map(|(s, ms)| ((*s).to_owned(), *ms))
            .collect()
    }
}
