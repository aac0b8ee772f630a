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
//! Interrupts (SIGINT, SIGTERM; [`interrupt`]): before the stop, the update ends and
//! nothing is switched (a pull's partial download is removed); after it, the service is
//! never left down by an interrupt: the update starts it again (or rolls back) and then
//! exits. SIGHUP is ignored. While the unit is down the update holds the overlay's claim,
//! so nothing can mount it while it is copied, restored or its image switched.

pub mod interrupt;
mod manifest;
mod probation;
pub mod pull;
pub mod record;
mod report;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::keys;
use crate::exit;
use crate::host::image_pointer::{self, ImageSource};
use crate::host::overlay_lock;
use crate::host::Canonical;
use crate::os::host_systemd::{HostBusError, HostSystemd};
use crate::os::live::{self, unix_now};
use crate::os::sanitize;
use interrupt::Interrupt;
use report::{err_line, out_line, Report, Timings};

/// `update`'s command line, past the service.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--image`: pull this instead of the service file's `image_url`.
    pub image: Option<String>,
    pub dry_run: bool,
    pub no_overlay_snapshot: bool,
    /// Where the supervisors publish their live state (for the probation).
    pub run_dir: PathBuf,
    /// The service files' directory (no two services may share an images directory).
    pub config_dir: PathBuf,
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
    #[error("{at}: `update` cannot follow {url}: only a URL whose file is the registry's (oras://, library://, https://, http://) has a digest that stays the same; a docker:// or oci:// image is built into a SIF on this host, a new file at every pull\n  hint: push the SIF with `apptainer push IMAGE oras://…` and name that")]
    UrlScheme { at: String, url: String },
    #[error("{} holds the images of {others} too: `update` keeps one record, lock and retention per images directory, and would remove their images\n  hint: give each service a directory of its own (its image pointer and images/ under its service_dir)", .images.display())]
    SharedImages { images: PathBuf, others: String },
    #[error(transparent)]
    Bus(#[from] HostBusError),
    #[error("{name} does not run on this host (neither {name}.service nor apptainer-supervisor@{name}.service is active here){elsewhere}\n  hint: run `update` on the host that runs it")]
    NotHere { name: String, elsewhere: String },
    #[error("another update of {name} is running (lock {})", .lock.display())]
    Busy { name: String, lock: PathBuf },
    #[error(transparent)]
    Pull(#[from] pull::PullError),
    #[error("stopping {unit} ended with {result}: nothing was switched; {after}")]
    Stop {
        unit: String,
        result: String,
        after: String,
    },
    #[error("the overlay {} is held after {unit} stopped: {why}", .overlay.display())]
    OverlayHeld {
        overlay: PathBuf,
        unit: String,
        why: String,
    },
    #[error("{unit} was started by someone else while the update had it stopped: nothing was switched, it runs its image")]
    StartedMeanwhile { unit: String },
    #[error(transparent)]
    Snapshot(snapshot::SnapshotError),
    #[error("switching {} to {digest}: {source}", .pointer.display())]
    Switch {
        pointer: PathBuf,
        digest: String,
        source: std::io::Error,
    },
    #[error("interrupted before anything was switched: {0}")]
    Interrupted(String),
    /// A failure after the stop that switched nothing: the unit was started again on
    /// its image (`restart` None), or that start failed too.
    #[error("{first}\n  nothing was switched; {}", match .restart { None => format!("{unit} was started again on its image"), Some(why) => format!("starting {unit} again on its image failed ({why}): it is down\n  hint: look at it now: systemctl status {unit}; journalctl -u {unit}") })]
    AfterStop {
        first: Box<UpdateError>,
        unit: String,
        restart: Option<String>,
    },
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
            Unmanaged { .. }
            | Dangling { .. }
            | NoUrl { .. }
            | UrlScheme { .. }
            | SharedImages { .. } => exit::CONFIG,
            Bus(_) | NotHere { .. } | Stop { .. } => exit::UNAVAILABLE,
            Busy { .. } | OverlayHeld { .. } | StartedMeanwhile { .. } => exit::TEMPFAIL,
            AfterStop {
                restart: Some(_), ..
            } => exit::ROLLBACK_FAILED,
            AfterStop { first, .. } => first.exit_code(),
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
            Unmanaged { .. }
            | Dangling { .. }
            | NoUrl { .. }
            | UrlScheme { .. }
            | SharedImages { .. }
            | NotHere { .. }
            | Busy { .. } => "refused",
            AfterStop { first, .. } => first.result(),
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

/// Runs `update` for the service; the exit code.
pub fn main(s: &Canonical, o: &Options) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            err_line(&format!("error: {}: starting the runtime: {e}", s.name));
            return exit::OSERR;
        }
    };
    rt.block_on(async {
        let interrupt = Interrupt::new();
        // Handled (tokio's handlers replace the default action), so an interrupt never
        // kills the update half-way.
        let me = Arc::clone(&interrupt);
        if let Err(e) = crate::run::event_loop::on_interrupt(move || me.fire()) {
            err_line(&format!("error: {}: signal handlers: {e}", s.name));
            return exit::OSERR;
        }
        let mut rep = Report::new(&s.name);
        let began = unix_now();
        // The update lock, held until the record has its last word.
        let mut lock = None;
        match update(s, o, &mut rep, &interrupt, &mut lock).await {
            Ok(Done::Unchanged { digest }) => {
                let text = format!(
                    "{digest} is the image the registry has and the one that runs: nothing to do"
                );
                rep.journal("end", &text, Some(&digest), Some("unchanged"));
                out_line(&format!("{}: up to date ({digest})", s.name));
                exit::OK
            }
            Ok(Done::Would { from, to, plan }) => {
                out_line(&format!("{}: {from} -> {to} available\n{plan}", s.name));
                exit::OK
            }
            Ok(Done::Updated { from, to, timings }) => {
                rep.journal(
                    "end",
                    &format!("updated from {from} to {to} ({timings})"),
                    Some(&to),
                    Some("updated"),
                );
                out_line(&format!("{}: updated {from} -> {to} ({timings})", s.name));
                exit::OK
            }
            Err(e) => {
                close_record(s, &e, began);
                rep.journal("end", &e.to_string(), None, Some(e.result()));
                err_line(&format!("error: {e}"));
                e.exit_code()
            }
        }
    })
}

/// The accepted URL schemes: those whose pulled file is the registry's own bytes.
const SCHEMES: &[&str] = &["oras://", "library://", "https://", "http://"];

/// Other services of the config directory whose managed pointer shares `images`.
fn sharing(s: &Canonical, o: &Options, images: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(&o.config_dir) else {
        return Vec::new();
    };
    let mut others: Vec<String> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && *p != s.file)
        .filter_map(|p| crate::config::load(&p, None).ok())
        .filter(|other| other.name != s.name)
        .filter(|other| {
            crate::host::canonicalize(other)
                .image_source()
                .images_dir()
                .as_deref()
                == Some(images)
        })
        .map(|other| other.name)
        .collect();
    others.sort();
    others
}

/// Everything between the pointer's digest and the end of the probation (or rollback).
async fn update(
    s: &Canonical,
    o: &Options,
    rep: &mut Report,
    intr: &Interrupt,
    lock_slot: &mut Option<std::fs::File>,
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
    if !SCHEMES.iter().any(|p| url.starts_with(p)) {
        return Err(UpdateError::UrlScheme {
            at: if o.image.is_some() {
                "--image".to_owned()
            } else {
                s.locate(keys::IMAGE_URL)
            },
            url,
        });
    }
    let images = image_pointer::images_dir(&pointer);
    let others = sharing(s, o, &images);
    if !others.is_empty() {
        return Err(UpdateError::SharedImages {
            images,
            others: others.join(", "),
        });
    }

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
    *lock_slot = Some(lock);
    for p in pull::remove_stale(&images) {
        rep.say(
            "pull",
            &format!("removed the remains of an earlier pull: {}", p.display()),
            None,
            None,
        );
    }
    let overlay = s.overlay.path.clone();
    let snapshot_wanted = !o.no_overlay_snapshot && overlay.exists();
    // Refusals that can be known now cost no downtime.
    if snapshot_wanted && !o.dry_run {
        snapshot::precheck(&overlay)
            .await
            .map_err(UpdateError::Snapshot)?;
    }

    let mut t = Timings::default();
    let started_at = unix_now();
    rep.say("pull", &format!("pulling {url}"), Some(&from), None);
    let t0 = Instant::now();
    let pulled = pull::pull(&s.apptainer.binary, &url, &images, intr, !o.dry_run).await?;
    t.add("pull", t0);
    let to = format!("sha256:{}", pulled.hex);
    // The registry's manifest digest, for the record (the SIF's digest decides).
    let manifest_digest = if url.starts_with("oras://") {
        match manifest::digest(&url).await {
            Ok(d) => Some(d),
            Err(why) => {
                rep.say(
                    "pull",
                    &format!("the manifest digest of {url} is not known: {why}"),
                    Some(&to),
                    None,
                );
                None
            }
        }
    } else {
        None
    };
    let attempt = Attempt {
        from: &from,
        to: &to,
        url: &url,
        manifest_digest: manifest_digest.clone(),
        started_at,
    };
    let mut rec = record::read(&images);
    if to == from {
        if !o.dry_run {
            rec.last = Some(attempt.last("unchanged", &t, false));
            write_record(&images, &rec, rep);
        }
        return Ok(Done::Unchanged { digest: to });
    }
    if o.dry_run {
        let refusal = if snapshot_wanted {
            snapshot::precheck(&overlay).await.err()
        } else {
            None
        };
        return Ok(Done::Would {
            plan: dry_plan(s, &unit, &pointer, &pulled, o, refusal),
            from,
            to,
        });
    }
    rep.say(
        "pull",
        &format!(
            "{} {} in {}{}",
            if pulled.existed { "found" } else { "pulled" },
            pulled.path.display(),
            t.text(),
            manifest_digest
                .as_deref()
                .map_or_else(String::new, |d| format!(" (manifest {d})"))
        ),
        Some(&to),
        None,
    );
    rec.keep(&to, unix_now(), "pulled");
    rec.last = Some(attempt.last("in-progress", &t, false));
    write_record(&images, &rec, rep);
    if intr.fired() {
        return Err(UpdateError::Interrupted(format!(
            "{} was pulled and is kept; {unit} was not stopped",
            pulled.path.display()
        )));
    }

    let w = Window {
        host: &host,
        unit: &unit,
        backoff: crate::run::backoff::path(&o.run_dir, &s.name),
        stop_within: Duration::from_secs(s.timeouts.stop_sec + 2 * s.timeouts.kill_sec + 30),
        start_within: Duration::from_secs(s.timeouts.start_sec + 90),
        overlay: &overlay,
        name: &s.name,
        allow_local_locks: s.overlay.allow_local_locks,
    };
    let before_stop = host
        .state(&unit)
        .await?
        .map(|st| st.invocation_id)
        .unwrap_or_default();

    // From here the unit is down until it is started again, on one image or the other.
    rep.say("stop", &format!("stopping {unit}"), Some(&from), None);
    let t0 = Instant::now();
    w.stop().await?;
    t.add("stop", t0);
    if intr.fired() {
        return Err(w
            .restart_old(UpdateError::Interrupted(format!("{unit} was stopped")))
            .await);
    }
    // Nothing may mount the overlay while it is copied and the pointer switched: the
    // update holds the overlay's claim (host/overlay_lock.rs) until the start.
    let claim = match w.claim() {
        Ok(c) => c,
        Err(e) => return Err(w.restart_old(e).await),
    };
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
            Err(e) => {
                drop(claim);
                return Err(w.restart_old(UpdateError::Snapshot(e)).await);
            }
        }
    }
    let discard = |snap: &Option<snapshot::Snapshot>| {
        if let Some(sn) = snap {
            let _ = snapshot::discard(&sn.path);
        }
    };
    if intr.fired() {
        discard(&snap);
        drop(claim);
        return Err(w
            .restart_old(UpdateError::Interrupted(format!("{unit} was stopped")))
            .await);
    }
    // Started by someone else meanwhile (it could not have mounted the overlay while the
    // claim was held, but its start job may be queued or have failed): never switch under
    // a unit that is not down.
    // (Not loaded counts as down: systemd unloads a stopped unit nothing refers to.)
    if !is_down(host.state(&unit).await?.as_ref()) {
        discard(&snap);
        drop(claim);
        return Err(UpdateError::StartedMeanwhile { unit });
    }
    let t0 = Instant::now();
    if let Err(source) = image_pointer::switch(&pointer, &pulled.hex) {
        discard(&snap);
        drop(claim);
        return Err(w
            .restart_old(UpdateError::Switch {
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
    drop(claim);

    // The new image: started, READY, then on probation.
    rep.say(
        "start",
        &format!("starting {unit} on {to}"),
        Some(&to),
        None,
    );
    let t0 = Instant::now();
    let live_path = live::path(&o.run_dir, &s.name);
    let verdict = match intr.or(w.start_judged(&before_stop, &live_path, &to)).await {
        None => Err("interrupted while the new image started".to_owned()),
        Some(Err(cause)) => Err(cause),
        Some(Ok(())) => {
            t.add("start", t0);
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
            let v = probation::probation(
                &host,
                &unit,
                &live_path,
                &to,
                Duration::from_secs(s.update.probation_sec),
                intr,
            )
            .await;
            t.add("probation", t0);
            v
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
            rec.last = Some(attempt.last("updated", &t, snap.is_some()));
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
    let (aside, why) = w.roll_back(&pointer, &from, snap.as_ref()).await;
    t.add("rollback", t0);
    rec.keep(&to, unix_now(), &format!("failed: {cause}"));
    let mut l = attempt.last(
        if why.is_none() {
            "rolled-back"
        } else {
            "rollback-failed"
        },
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

/// A unit that is not running: inactive, failed, or not loaded at all.
fn is_down(st: Option<&crate::os::host_systemd::UnitState>) -> bool {
    st.is_none_or(|st| matches!(st.active_state.as_str(), "inactive" | "failed"))
}

/// The stopped window of an update: the unit's jobs, the overlay's claim, the back-off.
struct Window<'a> {
    host: &'a HostSystemd,
    unit: &'a str,
    name: &'a str,
    overlay: &'a Path,
    allow_local_locks: bool,
    /// `<run dir>/NAME.backoff`: an operator's update is a new cause, so the back-off of
    /// earlier failed starts (run/backoff.rs) must not delay the starts it makes.
    backoff: PathBuf,
    stop_within: Duration,
    start_within: Duration,
}

impl Window<'_> {
    /// The stop job, to `done`. Otherwise nothing is switched, and a unit left down by the
    /// failed stop is started again.
    async fn stop(&self) -> Result<(), UpdateError> {
        let result = match self.host.stop(self.unit, self.stop_within).await {
            Ok(r) if r == "done" => return Ok(()),
            Ok(r) => format!("job result `{r}`"),
            Err(e) => e.to_string(),
        };
        let state = self.host.state(self.unit).await;
        let down = matches!(&state, Ok(st) if is_down(st.as_ref()));
        let state = state.ok().flatten();
        let e = UpdateError::Stop {
            unit: self.unit.to_owned(),
            result,
            after: state.map_or_else(
                || "it is not loaded".to_owned(),
                |st| format!("it is {}/{}", st.active_state, st.sub_state),
            ),
        };
        Err(if down { self.restart_old(e).await } else { e })
    }

    /// Starts the unit again on the image it ran, after a failure that switched nothing.
    async fn restart_old(&self, first: UpdateError) -> UpdateError {
        let _ = std::fs::remove_file(&self.backoff);
        let _ = self.host.reset_failed(self.unit).await;
        let restart = match self.host.start(self.unit, self.start_within).await {
            Ok(r) if r == "done" => None,
            Ok(r) => Some(format!("job result `{r}`")),
            Err(e) => Some(e.to_string()),
        };
        UpdateError::AfterStop {
            first: Box::new(first),
            unit: self.unit.to_owned(),
            restart,
        }
    }

    /// The overlay's claim while the unit is down (`None`: no overlay yet, or locks not
    /// supported and allowed).
    fn claim(&self) -> Result<Option<overlay_lock::Claim>, UpdateError> {
        if !self.overlay.exists() {
            return Ok(None);
        }
        overlay_lock::claim(self.overlay, self.name, self.allow_local_locks).map_err(|e| {
            UpdateError::OverlayHeld {
                overlay: self.overlay.to_owned(),
                unit: self.unit.to_owned(),
                why: e.to_string(),
            }
        })
    }

    /// The start of the new image, judged (probation::judge_start).
    async fn start_judged(
        &self,
        before_stop: &[u8],
        live_path: &Path,
        to: &str,
    ) -> Result<(), String> {
        let _ = std::fs::remove_file(&self.backoff);
        self.host
            .reset_failed(self.unit)
            .await
            .map_err(|e| e.to_string())?;
        let n_restarts = self
            .host
            .state(self.unit)
            .await
            .map_err(|e| e.to_string())?
            .map_or(0, |st| st.n_restarts);
        let job = self
            .host
            .start(self.unit, self.start_within)
            .await
            .map_err(|e| e.to_string())?;
        let st = self
            .host
            .state(self.unit)
            .await
            .map_err(|e| format!("reading the state of {} after its start: {e}", self.unit))?;
        probation::judge_start(
            self.unit,
            &job,
            st.as_ref(),
            &probation::Before {
                invocation_id: before_stop.to_vec(),
                n_restarts,
            },
            live_path,
            to,
        )
    }

    /// Stop, the snapshot put back (the failed overlay kept aside), the pointer switched
    /// back, start. Returns where the failed overlay went and, if the rollback did not
    /// bring the service back, why.
    async fn roll_back(
        &self,
        pointer: &Path,
        from: &str,
        snap: Option<&snapshot::Snapshot>,
    ) -> (Option<PathBuf>, Option<String>) {
        match self.host.stop(self.unit, self.stop_within).await {
            Ok(r) if r == "done" => {}
            Ok(r) => {
                return (
                    None,
                    Some(format!(
                        "stopping {} for the rollback: job result `{r}`",
                        self.unit
                    )),
                )
            }
            Err(e) => {
                return (
                    None,
                    Some(format!("stopping {} for the rollback: {e}", self.unit)),
                )
            }
        }
        let mut aside = None;
        {
            // Never rename an overlay that something has mounted.
            let claim = match self.claim() {
                Ok(c) => c,
                Err(e) => return (None, Some(e.to_string())),
            };
            if let Some(sn) = snap {
                match snapshot::restore(self.overlay, &sn.path, unix_now()) {
                    Ok(a) => aside = a,
                    Err(e) => return (None, Some(e.to_string())),
                }
            }
            if let Some(hex) = image_pointer::hex_of(from) {
                if let Err(e) = image_pointer::switch(pointer, hex) {
                    return (
                        aside,
                        Some(format!("switching {} back: {e}", pointer.display())),
                    );
                }
            }
            drop(claim);
        }
        let _ = std::fs::remove_file(&self.backoff);
        let _ = self.host.reset_failed(self.unit).await;
        let why = match self.host.start(self.unit, self.start_within).await {
            Ok(r) if r == "done" => None,
            Ok(r) => Some(format!(
                "starting {} on {from} ended with job result `{r}`",
                self.unit
            )),
            Err(e) => Some(e.to_string()),
        };
        (aside, why)
    }
}

/// One update's identity in the record: what it switched from and to, from where, when.
struct Attempt<'a> {
    from: &'a str,
    to: &'a str,
    url: &'a str,
    manifest_digest: Option<String>,
    started_at: u64,
}

impl Attempt<'_> {
    /// The record's `last` for this update, ended as `result` (`in-progress`: not yet).
    fn last(&self, result: &str, t: &Timings, snapshot: bool) -> record::Last {
        record::Last {
            result: result.to_owned(),
            from: self.from.to_owned(),
            to: Some(self.to.to_owned()),
            url: self.url.to_owned(),
            manifest_digest: self.manifest_digest.clone(),
            started_at: self.started_at,
            ended_at: (result != "in-progress").then(unix_now),
            cause: None,
            failed_overlay: None,
            snapshot,
            timings_ms: t.map(),
        }
    }
}

/// An update that ended with an error before its own last word (a stop that failed, an
/// interrupt, a snapshot that did not fit …) leaves `in-progress` in the record: the
/// result and cause go there now. Only this update's own entry (begun at `began` or later,
/// under the update lock) is changed.
fn close_record(s: &Canonical, e: &UpdateError, began: u64) {
    let Some(images) = s.image_source().images_dir() else {
        return;
    };
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
    refusal: Option<snapshot::SnapshotError>,
) -> String {
    if let Some(e) = refusal {
        return format!(
            "would be refused before {unit} is stopped: {e}\nnothing was changed (--dry-run)"
        );
    }
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
