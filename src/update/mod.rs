//! `apptainer-supervisor update NAME`: a new image for a running service, with a rollback
//! of image *and* overlay when the new one does not come up or does not stay up.
//!
//! The steps, in order (apptainer-supervisor(8), UPDATE): refuse unless this host runs the
//! service and its `image` is a managed pointer; pull into `images/` under the content
//! address ([`pull`]); nothing more when the digest is the running one; stop the unit
//! through the host's systemd; snapshot the overlay ([`snapshot`]); switch the pointer;
//! start the unit and wait for its job (READY=1 for `Type=notify`); a probation in which
//! the unit must stay active with no failed required unit inside. A failure after the
//! stop rolls back: stop, the failed overlay moved aside and the snapshot put back, the
//! pointer switched back, start. Every step is a line on stderr and an entry in the
//! journal (UPDATE_STEP=, IMAGE_DIGEST=, UPDATE_RESULT=); the outcome is kept in
//! `images/update.json` ([`record`]) for `status`.
//!
//! Interrupts (SIGINT, SIGTERM, SIGHUP): before the stop, the update ends and nothing is
//! switched (a pull's partial file is removed); after it, the service is never left down
//! by an interrupt: the update rolls back and then exits.

pub mod pull;
pub mod record;
pub mod snapshot;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::keys;
use crate::exit;
use crate::host::image_pointer::{self, ImageSource};
use crate::host::overlay_lock;
use crate::host::Canonical;
use crate::os::host_systemd::{HostBusError, HostSystemd};
use crate::os::journal::Journal;
use crate::os::live::{self, unix_now, LiveState};
use crate::os::sanitize;

/// `update`'s command line, past the service.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--image`: pull this instead of the service file's `image_url`.
    pub image: Option<String>,
    pub dry_run: bool,
    pub no_overlay_snapshot: bool,
    /// Where the supervisors publish their live state (for the probation).
    pub run_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{at}: `update` needs a managed image pointer: {reason}{}", if .fix.is_empty() { String::new() } else { format!("\n  hint: {}", .fix) })]
    Unmanaged {
        at: String,
        reason: String,
        fix: String,
    },
    #[error("{at}: {reason}")]
    Dangling { at: String, reason: String },
    #[error("{file}: no image_url to pull from\n  hint: set image_url = \"oras://…\" in the service file, or give --image URL")]
    NoUrl { file: String },
    #[error(transparent)]
    Bus(#[from] HostBusError),
    #[error("{name} does not run on this host (neither {name}.service nor apptainer-supervisor@{name}.service is active here){elsewhere}\n  hint: run `update` on the host that runs it")]
    NotHere { name: String, elsewhere: String },
    #[error("another update of {name} is running (lock {})", .lock.display())]
    Busy { name: String, lock: PathBuf },
    #[error(transparent)]
    Pull(#[from] pull::PullError),
    #[error("stopping {unit} ended with job result `{result}`: nothing was switched")]
    Stop { unit: String, result: String },
    #[error("the overlay {} is held after {unit} stopped ({holder}): nothing was switched; {unit} was started again", .overlay.display())]
    OverlayHeld {
        overlay: PathBuf,
        unit: String,
        holder: String,
    },
    #[error("{0}\n  nothing was switched; the unit was started again on its image")]
    Snapshot(snapshot::SnapshotError),
    #[error("switching {} to {digest}: {source}; the unit was started again on its image", .pointer.display())]
    Switch {
        pointer: PathBuf,
        digest: String,
        source: std::io::Error,
    },
    #[error("interrupted before anything was switched: {0}")]
    Interrupted(String),
    #[error("the update to {to} failed and was rolled back to {from}: {cause}{}", .aside.as_ref().map_or(String::new(), |p| format!("\n  the overlay as the failed boot left it: {}", p.display())))]
    RolledBack {
        from: String,
        to: String,
        cause: String,
        aside: Option<PathBuf>,
    },
    #[error("the update to {to} failed ({cause}) and so did the rollback to {from}: {why}\n  hint: look at the unit now: systemctl status {unit}; journalctl -u {unit}")]
    RollbackFailed {
        from: String,
        to: String,
        unit: String,
        cause: String,
        why: String,
    },
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl UpdateError {
    pub fn exit_code(&self) -> i32 {
        use UpdateError::*;
        match self {
            Unmanaged { .. } | Dangling { .. } | NoUrl { .. } => exit::CONFIG,
            Bus(_) | NotHere { .. } | Stop { .. } => exit::UNAVAILABLE,
            Busy { .. } | OverlayHeld { .. } => exit::TEMPFAIL,
            Pull(pull::PullError::Interrupted { .. }) | Interrupted(_) => exit::INTERRUPTED,
            Pull(pull::PullError::Io { .. }) => exit::CANTCREAT,
            Pull(_) => exit::UNAVAILABLE,
            Snapshot(
                snapshot::SnapshotError::NoSpace { .. } | snapshot::SnapshotError::Exists(_),
            ) => exit::CANTCREAT,
            Snapshot(_) | Switch { .. } | Io { .. } => exit::OSERR,
            RolledBack { .. } => exit::ROLLED_BACK,
            RollbackFailed { .. } => exit::ROLLBACK_FAILED,
        }
    }

    /// UPDATE_RESULT= of an update that ended so.
    fn result(&self) -> &'static str {
        use UpdateError::*;
        match self {
            Unmanaged { .. } | Dangling { .. } | NoUrl { .. } | NotHere { .. } | Busy { .. } => {
                "refused"
            }
            Pull(pull::PullError::Interrupted { .. }) | Interrupted(_) => "interrupted",
            RolledBack { .. } => "rolled-back",
            RollbackFailed { .. } => "rollback-failed",
            _ => "failed",
        }
    }
}

/// How an update that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// The registry's image is the running one.
    Unchanged { digest: String },
    /// `--dry-run`: what would be done.
    Would {
        from: String,
        to: String,
        plan: String,
    },
    Updated {
        from: String,
        to: String,
        timings: String,
    },
}

/// The interrupt signals, seen by every wait of the update. An interrupt during a pull
/// ends Apptainer's process group at once.
pub struct Interrupt {
    fired: AtomicBool,
    /// The process group of the running pull (0: none).
    pub(crate) child_group: AtomicI32,
    notify: tokio::sync::Notify,
}

impl Interrupt {
    fn new() -> Arc<Interrupt> {
        Arc::new(Interrupt {
            fired: AtomicBool::new(false),
            child_group: AtomicI32::new(0),
            notify: tokio::sync::Notify::new(),
        })
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
        let group = self.child_group.load(Ordering::SeqCst);
        if group > 0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    async fn wait(&self) {
        let n = self.notify.notified();
        if self.fired() {
            return;
        }
        n.await;
    }

    /// `f`, or `None` when an interrupt comes first.
    async fn or<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        let f = std::pin::pin!(f);
        let w = std::pin::pin!(self.wait());
        match futures_util::future::select(f, w).await {
            futures_util::future::Either::Left((v, _)) => Some(v),
            futures_util::future::Either::Right(_) => None,
        }
    }
}

/// Each step, on stderr for the operator and in the journal (when there is one) with the
/// service's fields, under the unit (`OBJECT_SYSTEMD_UNIT=`, which `journalctl -u` shows
/// for entries of root's processes).
struct Report {
    name: String,
    unit: Option<String>,
    journal: Option<Journal>,
}

impl Report {
    /// A step: a line on stderr and an entry in the journal.
    fn say(&self, step: &str, text: &str, digest: Option<&str>, result: Option<&str>) {
        eprintln!("{}: {}", self.name, sanitize::one_line(text, 4096));
        self.journal(step, text, digest, result);
    }

    /// The journal's entry only (the end, which the command prints in its own words).
    fn journal(&self, step: &str, text: &str, digest: Option<&str>, result: Option<&str>) {
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

/// Runs `update` for the service; the exit code.
pub fn main(s: &Canonical, o: &Options) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {}: starting the runtime: {e}", s.name);
            return exit::OSERR;
        }
    };
    rt.block_on(async {
        let interrupt = Interrupt::new();
        // Handled (tokio's handlers replace the default action), so an interrupt never
        // kills the update half-way.
        let me = Arc::clone(&interrupt);
        if let Err(e) = crate::run::event_loop::on_interrupt(move || me.fire()) {
            eprintln!("error: {}: signal handlers: {e}", s.name);
            return exit::OSERR;
        }
        let mut rep = Report {
            name: s.name.clone(),
            unit: None,
            journal: Journal::connect().ok(),
        };
        let began = unix_now();
        match update(s, o, &mut rep, &interrupt).await {
            Ok(Done::Unchanged { digest }) => {
                let text = format!(
                    "{digest} is the image the registry has and the one that runs: nothing to do"
                );
                rep.say("end", &text, Some(&digest), Some("unchanged"));
                println!("{}: up to date ({digest})", s.name);
                exit::OK
            }
            Ok(Done::Would { from, to, plan }) => {
                println!("{}: {from} -> {to} available\n{plan}", s.name);
                exit::OK
            }
            Ok(Done::Updated { from, to, timings }) => {
                rep.journal(
                    "end",
                    &format!("updated from {from} to {to} ({timings})"),
                    Some(&to),
                    Some("updated"),
                );
                println!("{}: updated {from} -> {to} ({timings})", s.name);
                exit::OK
            }
            Err(e) => {
                close_record(s, &e, began);
                rep.journal("end", &e.to_string(), None, Some(e.result()));
                eprintln!("error: {e}");
                e.exit_code()
            }
        }
    })
}

/// The step timings of one update, in the order they happen.
#[derive(Default)]
struct Timings(Vec<(&'static str, u64)>);

impl Timings {
    fn add(&mut self, step: &'static str, since: Instant) {
        self.0.push((
            step,
            u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
        ));
    }
    fn text(&self) -> String {
        self.0
            .iter()
            .map(|(s, ms)| format!("{s} {}.{:01} s", ms / 1000, (ms % 1000) / 100))
            .collect::<Vec<_>>()
            .join(", ")
    }
    fn map(&self) -> std::collections::BTreeMap<String, u64> {
        self.0
            .iter()
            .map(|(s, ms)| ((*s).to_owned(), *ms))
            .collect()
    }
}

/// Everything between the pointer's digest and the end of the probation (or rollback).
async fn update(
    s: &Canonical,
    o: &Options,
    rep: &mut Report,
    intr: &Interrupt,
) -> Result<Done, UpdateError> {
    let (pointer, from) = match s.image_source() {
        ImageSource::Managed {
            pointer, digest, ..
        } => (pointer.clone(), digest.clone()),
        ImageSource::Unmanaged { reason, fix, .. } => {
            return Err(UpdateError::Unmanaged {
                at: s.locate(keys::IMAGE),
                reason: reason.clone(),
                fix: fix.clone(),
            })
        }
        d @ ImageSource::Dangling { .. } => {
            return Err(UpdateError::Dangling {
                at: s.locate(keys::IMAGE),
                reason: d.dangling().unwrap_or_default(),
            })
        }
    };
    let url = match (&o.image, &s.image_url) {
        (Some(u), _) | (None, Some(u)) => u.clone(),
        (None, None) => {
            return Err(UpdateError::NoUrl {
                file: s.file.display().to_string(),
            })
        }
    };
    let images = pointer
        .parent()
        .unwrap_or(Path::new("/"))
        .join(image_pointer::IMAGES_DIR);

    let host = HostSystemd::connect().await?;
    let Some(unit) = host.running_unit(&s.name).await? else {
        let elsewhere =
            match overlay_lock::describe(&s.overlay.path, Duration::from_secs(2)).as_deref() {
                Some(l) if l.starts_with("held by") => format!("; its overlay is {l}"),
                _ => String::new(),
            };
        return Err(UpdateError::NotHere {
            name: s.name.clone(),
            elsewhere,
        });
    };
    rep.unit = Some(unit.clone());

    // One update (or dry run) of a service at a time, on whichever host: the lock lives
    // beside the images (`status` reads it, here or over NFS, without taking it).
    std::fs::create_dir_all(&images).map_err(|source| UpdateError::Io {
        what: "creating",
        path: images.clone(),
        source,
    })?;
    let lock_path = images.join(".update.lock");
    let lock = std::fs::File::create(&lock_path).map_err(|source| UpdateError::Io {
        what: "opening",
        path: lock_path.clone(),
        source,
    })?;
    if lock.try_lock().is_err() {
        return Err(UpdateError::Busy {
            name: s.name.clone(),
            lock: lock_path,
        });
    }
    for p in pull::remove_stale(&images) {
        rep.say(
            "pull",
            &format!(
                "removed the partial file of an earlier pull: {}",
                p.display()
            ),
            None,
            None,
        );
    }

    let mut t = Timings::default();
    let started_at = unix_now();
    rep.say("pull", &format!("pulling {url}"), Some(&from), None);
    let t0 = Instant::now();
    let pulled = pull::pull(&s.apptainer.binary, &url, &images, intr, !o.dry_run).await?;
    t.add("pull", t0);
    let to = format!("sha256:{}", pulled.hex);
    let mut rec = record::read(&images);
    if to == from {
        if !o.dry_run {
            rec.last = Some(last(
                "unchanged",
                &from,
                Some(&to),
                &url,
                started_at,
                &t,
                false,
            ));
            write_record(&images, &rec, rep);
        }
        return Ok(Done::Unchanged { digest: to });
    }
    if o.dry_run {
        return Ok(Done::Would {
            plan: dry_plan(s, &unit, &pointer, &pulled, o),
            from,
            to,
        });
    }
    rep.say(
        "pull",
        &format!(
            "{} {} in {}",
            if pulled.existed { "found" } else { "pulled" },
            pulled.path.display(),
            t.text()
        ),
        Some(&to),
        None,
    );
    rec.keep(&to, unix_now(), "pulled");
    rec.last = Some(last(
        "in-progress",
        &from,
        Some(&to),
        &url,
        started_at,
        &t,
        false,
    ));
    write_record(&images, &rec, rep);
    if intr.fired() {
        return Err(UpdateError::Interrupted(format!(
            "{} was pulled and is kept; {unit} was not stopped",
            pulled.path.display()
        )));
    }

    // From here the unit is down until it is started again, on one image or the other.
    let stop_within = Duration::from_secs(s.timeouts.stop_sec + 2 * s.timeouts.kill_sec + 30);
    let start_within = Duration::from_secs(s.timeouts.start_sec + 90);
    rep.say("stop", &format!("stopping {unit}"), Some(&from), None);
    let t0 = Instant::now();
    let r = host.stop(&unit, stop_within).await?;
    t.add("stop", t0);
    if r != "done" {
        return Err(UpdateError::Stop { unit, result: r });
    }
    // An operator's update is a new cause: the back-off of earlier failed starts
    // (run/backoff.rs) must not delay the start of the new image or of the rollback.
    let backoff = crate::run::backoff::path(&o.run_dir, &s.name);
    let clear_backoff = || {
        let _ = std::fs::remove_file(&backoff);
    };
    // Back on the image it ran, for the failures below that switched nothing.
    let restart_old = |e: UpdateError| async {
        clear_backoff();
        let _ = host.start(&unit, start_within).await;
        e
    };
    if let Ok(overlay_lock::Seen::Held(h)) = overlay_lock::look(&s.overlay.path) {
        let holder = h.map_or_else(|| "holder unknown".to_owned(), |h| format!("held by {h}"));
        return Err(restart_old(UpdateError::OverlayHeld {
            overlay: s.overlay.path.clone(),
            unit: unit.clone(),
            holder,
        })
        .await);
    }
    let overlay = s.overlay.path.clone();
    let mut snap = None;
    if o.no_overlay_snapshot {
        rep.say(
            "snapshot",
            "no overlay snapshot (--no-overlay-snapshot): a rollback restores the image only",
            None,
            None,
        );
    } else if overlay.exists() {
        let t0 = Instant::now();
        match snapshot::take(&overlay).await {
            Ok(sn) => {
                t.add("snapshot", t0);
                rep.say(
                    "snapshot",
                    &format!(
                        "overlay snapshot {} ({}, {} MiB allocated) in {:.1} s",
                        sn.path.display(),
                        if sn.reflinked {
                            "reflink"
                        } else {
                            "sparse copy"
                        },
                        sn.allocated >> 20,
                        t0.elapsed().as_secs_f64()
                    ),
                    None,
                    None,
                );
                snap = Some(sn);
            }
            Err(e) => return Err(restart_old(UpdateError::Snapshot(e)).await),
        }
    }
    if intr.fired() {
        if let Some(sn) = &snap {
            let _ = snapshot::discard(&sn.path);
        }
        return Err(restart_old(UpdateError::Interrupted(format!(
            "{unit} was started again on {from}"
        )))
        .await);
    }
    let t0 = Instant::now();
    if let Err(source) = image_pointer::switch(&pointer, &pulled.hex) {
        if let Some(sn) = &snap {
            let _ = snapshot::discard(&sn.path);
        }
        return Err(restart_old(UpdateError::Switch {
            pointer,
            digest: to,
            source,
        })
        .await);
    }
    t.add("switch", t0);
    rep.say(
        "switch",
        &format!(
            "{} -> {}",
            pointer.display(),
            image_pointer::link_text(&pulled.hex).display()
        ),
        Some(&to),
        None,
    );

    // The new image: started, READY, then on probation.
    rep.say(
        "start",
        &format!("starting {unit} on {to}"),
        Some(&to),
        None,
    );
    let t0 = Instant::now();
    clear_backoff();
    let verdict = match intr.or(host.start(&unit, start_within)).await {
        None => Err("interrupted while the new image started".to_owned()),
        Some(Err(e)) => Err(e.to_string()),
        Some(Ok(job)) => {
            t.add("start", t0);
            match host.state(&unit).await {
                Err(e) => Err(format!("reading the state of {unit} after its start: {e}")),
                Ok(Some(st)) if job == "done" && st.active_state == "active" => {
                    rep.say(
                        "probation",
                        &format!(
                            "{unit} is ready on {to}; on probation for {} s",
                            s.update.probation_sec
                        ),
                        Some(&to),
                        None,
                    );
                    let t0 = Instant::now();
                    let v = probation(s, o, &host, &unit, intr).await;
                    t.add("probation", t0);
                    v
                }
                Ok(st) => Err(start_failed(
                    &unit,
                    &job,
                    st.as_ref(),
                    &live::path(&o.run_dir, &s.name),
                )),
            }
        }
    };
    let cause = match verdict {
        Ok(()) => {
            if let Some(sn) = &snap {
                if let Err(e) = snapshot::discard(&sn.path) {
                    rep.say("end", &format!("warning: {e}"), None, None);
                }
            }
            rec.previous = Some(from.clone());
            rec.keep(&from, unix_now(), "ran");
            rec.keep(&to, unix_now(), "running");
            rec.last = Some(last(
                "updated",
                &from,
                Some(&to),
                &url,
                started_at,
                &t,
                snap.is_some(),
            ));
            for p in record::retain(&images, &mut rec, &to, s.update.keep) {
                rep.say(
                    "retention",
                    &format!("removed {} (update.keep = {})", p.display(), s.update.keep),
                    None,
                    None,
                );
            }
            write_record(&images, &rec, rep);
            return Ok(Done::Updated {
                from,
                to,
                timings: t.text(),
            });
        }
        Err(cause) => sanitize::one_line(&cause, 2048).into_owned(),
    };

    // Rollback: the old image on the overlay it knew.
    rep.say(
        "rollback",
        &format!("the new image failed: {cause}; rolling back to {from}"),
        Some(&to),
        None,
    );
    let t0 = Instant::now();
    let stopped = host.stop(&unit, stop_within).await;
    let mut aside = None;
    let mut why = None;
    if !matches!(stopped.as_deref(), Ok("done")) {
        why = Some(format!(
            "stopping {unit} for the rollback: {}",
            match stopped {
                Ok(r) => format!("job result `{r}`"),
                Err(e) => e.to_string(),
            }
        ));
    }
    if why.is_none() {
        if let Some(sn) = &snap {
            match snapshot::restore(&overlay, &sn.path, unix_now()) {
                Ok(a) => aside = a,
                Err(e) => why = Some(e.to_string()),
            }
        }
    }
    if why.is_none() {
        if let Some(hex) = image_pointer::hex_of(&from) {
            if let Err(e) = image_pointer::switch(&pointer, hex) {
                why = Some(format!("switching {} back: {e}", pointer.display()));
            }
        }
    }
    if why.is_none() {
        clear_backoff();
        match host.start(&unit, start_within).await {
            Ok(r) if r == "done" => {}
            Ok(r) => {
                why = Some(format!(
                    "starting {unit} on {from} ended with job result `{r}`"
                ))
            }
            Err(e) => why = Some(e.to_string()),
        }
    }
    t.add("rollback", t0);
    rec.keep(&to, unix_now(), &format!("failed: {cause}"));
    let mut l = last(
        if why.is_none() {
            "rolled-back"
        } else {
            "rollback-failed"
        },
        &from,
        Some(&to),
        &url,
        started_at,
        &t,
        snap.is_some(),
    );
    l.cause = Some(cause.clone());
    l.failed_overlay = aside.clone();
    rec.last = Some(l);
    write_record(&images, &rec, rep);
    if snap.is_none() {
        rep.say(
            "rollback",
            "the overlay was not snapshotted: the old image runs on the overlay as the new one left it",
            Some(&from),
            None,
        );
    }
    match why {
        None => Err(UpdateError::RolledBack {
            from,
            to,
            cause,
            aside,
        }),
        Some(why) => Err(UpdateError::RollbackFailed {
            from,
            to,
            unit,
            cause,
            why,
        }),
    }
}

/// Why a start of the new image failed, in words: the supervisor's own last error (its live
/// state file, e.g. "required unit asv-slow.service failed (exit-code)"), else the unit's
/// state and STATUS= text.
fn start_failed(
    unit: &str,
    job: &str,
    st: Option<&crate::os::host_systemd::UnitState>,
    live_path: &Path,
) -> String {
    let mut s = format!("the start of {unit} ended with job result `{job}`");
    if let Some(e) = LiveState::read(live_path)
        .ok()
        .flatten()
        .and_then(|l| l.last_error)
    {
        s.push_str(&format!(": {e}"));
    } else if let Some(st) = st {
        s.push_str(&format!(
            ", the unit {}/{} (Result={})",
            st.active_state, st.sub_state, st.result
        ));
        if !st.status_text.is_empty() {
            s.push_str(&format!(", status: {}", st.status_text));
        }
    }
    s
}

/// The new image on probation: the unit must stay active, in the same invocation, with no
/// restart by systemd and none of a required unit by the supervisor, and no required unit
/// failed inside, for `update.probation_sec`. Woken by every change of the unit (the
/// supervisor's STATUS= changes with the inner state), not by polling.
async fn probation(
    s: &Canonical,
    o: &Options,
    host: &HostSystemd,
    unit: &str,
    intr: &Interrupt,
) -> Result<(), String> {
    let mut watch = host.watch(unit).await.map_err(|e| e.to_string())?;
    let first = host
        .state(unit)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{unit} is no longer loaded"))?;
    let live_path = live::path(&o.run_dir, &s.name);
    let restarts0 = LiveState::read(&live_path)
        .ok()
        .flatten()
        .map_or(0, |l| l.restarts);
    let deadline = Instant::now() + Duration::from_secs(s.update.probation_sec);
    loop {
        let st = host
            .state(unit)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{unit} is no longer loaded"))?;
        if st.active_state != "active"
            || st.invocation_id != first.invocation_id
            || st.n_restarts != first.n_restarts
        {
            return Err(format!(
                "{unit} did not stay up during the probation: {}/{} (Result={}){}",
                st.active_state,
                st.sub_state,
                st.result,
                if st.status_text.is_empty() {
                    String::new()
                } else {
                    format!(", status: {}", st.status_text)
                }
            ));
        }
        if let Ok(Some(l)) = LiveState::read(&live_path) {
            if let Some(inner) = &l.inner {
                if !inner.failed_units.is_empty() {
                    return Err(format!(
                        "required units failed inside during the probation: {}",
                        inner.failed_units.join(", ")
                    ));
                }
            }
            if l.restarts > restarts0 {
                return Err(format!(
                    "the supervisor restarted a failed required unit during the probation ({} restarts)",
                    l.restarts - restarts0
                ));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        if intr.or(watch.changed(left)).await.is_none() {
            return Err("interrupted during the probation".to_owned());
        }
    }
}

fn last(
    result: &str,
    from: &str,
    to: Option<&str>,
    url: &str,
    started_at: u64,
    t: &Timings,
    snapshot: bool,
) -> record::Last {
    record::Last {
        result: result.to_owned(),
        from: from.to_owned(),
        to: to.map(str::to_owned),
        url: url.to_owned(),
        started_at,
        ended_at: (result != "in-progress").then(unix_now),
        cause: None,
        failed_overlay: None,
        snapshot,
        timings_ms: t.map(),
    }
}

/// An update that ended with an error before its own last word (a stop that failed, an
/// interrupt, a snapshot that did not fit …) leaves `in-progress` in the record: the
/// result and cause go there now. Only this update's own entry (begun at `began` or later,
/// under the update lock) is changed.
fn close_record(s: &Canonical, e: &UpdateError, began: u64) {
    let ImageSource::Managed { pointer, .. } = s.image_source() else {
        return;
    };
    let images = pointer
        .parent()
        .unwrap_or(Path::new("/"))
        .join(image_pointer::IMAGES_DIR);
    let mut rec = record::read(&images);
    let Some(l) = rec.last.as_mut() else { return };
    if l.result != "in-progress" || l.started_at < began {
        return;
    }
    l.result = e.result().to_owned();
    l.cause = Some(sanitize::one_line(&e.to_string(), 2048).into_owned());
    l.ended_at = Some(unix_now());
    let _ = record::write(&images, &rec);
}

fn write_record(images: &Path, r: &record::Record, rep: &Report) {
    if let Err(e) = record::write(images, r) {
        rep.say(
            "record",
            &format!("warning: writing {}: {e}", record::path(images).display()),
            None,
            None,
        );
    }
}

/// What `--dry-run` says an update would do.
fn dry_plan(
    s: &Canonical,
    unit: &str,
    pointer: &Path,
    pulled: &pull::Pulled,
    o: &Options,
) -> String {
    let overlay = &s.overlay.path;
    let snap = if o.no_overlay_snapshot {
        "no overlay snapshot (--no-overlay-snapshot): a rollback would restore the image only"
            .to_owned()
    } else {
        match snapshot::cost(overlay) {
            Ok((alloc, free)) => format!(
                "snapshot {} to {} (a reflink where the filesystem can, else a sparse copy of {} MiB; {} MiB free there)",
                overlay.display(),
                snapshot::path_for(overlay).display(),
                alloc >> 20,
                free >> 20
            ),
            Err(_) => format!("no overlay snapshot: {} does not exist yet", overlay.display()),
        }
    };
    format!(
        "would: place {}\n  stop {unit}\n  {snap}\n  switch {} -> {}\n  start {unit}, wait for READY, probation {} s\n  keep {} earlier images (update.keep)\nnothing was changed (--dry-run)",
        pulled.path.display(),
        pointer.display(),
        image_pointer::link_text(&pulled.hex).display(),
        s.update.probation_sec,
        s.update.keep
    )
}
