//! What `status` says about a service's image updates: the record `update` keeps beside the
//! images (`images/update.json`, see [`crate::update::record`]), whether an update runs
//! now, and the failed overlays a rollback kept aside. Read only: nothing here takes the
//! update's lock or touches a file (apptainer-supervisor(8), UPDATE and STATUS JSON).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::host::image_pointer::{self, ImageSource};
use crate::update::record;

/// `update` of `status --json`: present for a managed image, null otherwise.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UpdateInfo {
    /// The rollback target: the digest that ran before the last good update.
    pub previous: Option<String>,
    /// The last update as the record has it; None before the first one.
    pub last: Option<LastUpdate>,
    /// An update of the service runs now (its lock is held).
    pub running: bool,
    /// `<overlay>.failed-<time>` files that exist: overlays of failed boots that a
    /// rollback kept for inspection, never removed by the supervisor.
    pub kept_aside: Vec<PathBuf>,
    /// `<overlay>.update-snapshot` when it exists while no update runs: left by an update
    /// that did not finish; the next update refuses to overwrite it.
    pub leftover_snapshot: Option<PathBuf>,
}

/// The record's last update with every member present (null when unknown), so that a
/// script reads the same keys whatever the result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LastUpdate {
    pub result: String,
    pub from: String,
    pub to: Option<String>,
    pub url: String,
    pub manifest_digest: Option<String>,
    pub started_at: u64,
    pub ended_at: Option<u64>,
    pub cause: Option<String>,
    pub failed_overlay: Option<PathBuf>,
    pub snapshot: bool,
    pub timings_ms: std::collections::BTreeMap<String, u64>,
}

impl From<record::Last> for LastUpdate {
    fn from(l: record::Last) -> Self {
        LastUpdate {
            result: l.result,
            from: l.from,
            to: l.to,
            url: l.url,
            manifest_digest: l.manifest_digest,
            started_at: l.started_at,
            ended_at: l.ended_at,
            cause: l.cause,
            failed_overlay: l.failed_overlay,
            snapshot: l.snapshot,
            timings_ms: l.timings_ms,
        }
    }
}

/// The lock `update` holds while it runs, in the images directory.
const LOCK: &str = ".update.lock";

/// The update view of a service whose image is `source`, with its overlay at `overlay`;
/// None for an image that is not a managed pointer (`update` refuses it, so there is no
/// record to read).
pub fn info(source: &ImageSource, overlay: &Path) -> Option<UpdateInfo> {
    let images = source.images_dir()?;
    let rec = record::read(&images);
    let running = lock_held(&images.join(LOCK));
    let snapshot = crate::update::snapshot::path_for(overlay);
    Some(UpdateInfo {
        previous: rec.previous,
        last: rec.last.map(LastUpdate::from),
        running,
        kept_aside: kept_aside(overlay),
        leftover_snapshot: (!running && snapshot.symlink_metadata().is_ok()).then_some(snapshot),
    })
}

/// The `<overlay>.failed-*` regular files beside the overlay, sorted (oldest first, as the
/// suffix is a unix time of equal width for centuries).
pub fn kept_aside(overlay: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (overlay.parent(), overlay.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.failed-", name.to_string_lossy());
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                // Not followed: a link is nothing a rollback made.
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// How long the question to another host's lock may take (a cut-off NFS client hangs).
const ASK_WITHIN: Duration = Duration::from_secs(2);

/// Whether an update holds the flock(2) of `lock`, found without ever taking the lock (a
/// `status` at that moment must not make an update that starts then fail as busy).
/// On this host: /proc/locks, which names a lock's file as `MAJOR:MINOR:INODE` (hex, hex,
/// decimal: fs/locks.c `lock_get_status`). On another host sharing the directory over
/// NFS: there flock(2) is a whole-file byte-range lock at the server (flock(2), NOTES),
/// which a test for a conflicting lock sees; asked on a thread, for at most
/// [`ASK_WITHIN`].
fn lock_held(lock: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(lock) else {
        return false;
    };
    if std::fs::read_to_string("/proc/locks").is_ok_and(|l| flock_listed(&l, m.dev(), m.ino())) {
        return true;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let path = lock.to_owned();
    std::thread::spawn(move || {
        let held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .and_then(|f| crate::host::overlay_lock::is_locked(&f, 0));
        let _ = tx.send(held);
    });
    matches!(rx.recv_timeout(ASK_WITHIN), Ok(Ok(true)))
}

fn flock_listed(locks: &str, dev: u64, ino: u64) -> bool {
    let id = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    locks.lines().any(|l| {
        let mut words = l.split_whitespace();
        words.clone().any(|w| w == "FLOCK") && words.any(|w| w == id)
    })
}

/// The warning lines of the update view (each escaped when rendered, as every warning).
/// `now`: unix seconds.
pub fn warnings(u: &UpdateInfo, now: u64) -> Vec<String> {
    let mut out = Vec::new();
    let short = |d: &str| image_pointer::short_digest(d).to_owned();
    let ago = |t: u64| super::human_duration(now.saturating_sub(t));
    if let Some(l) = &u.last {
        let to = l.to.as_deref().map_or_else(|| "?".to_owned(), short);
        let cause = l.cause.as_deref().unwrap_or("cause not recorded");
        let when = ago(l.ended_at.unwrap_or(l.started_at));
        match l.result.as_str() {
            "in-progress" if u.running => out.push(format!(
                "update in-progress: {} -> {to}, started {} ago",
                short(&l.from),
                ago(l.started_at)
            )),
            "in-progress" => out.push(format!(
                "the update {} -> {to} started {} ago did not finish (interrupted or crashed): look at its journal (UPDATE_STEP=*)",
                short(&l.from),
                ago(l.started_at)
            )),
            "rolled-back" => out.push(format!(
                "the last update, to {to}, was rolled back {when} ago: {cause}"
            )),
            "rollback-failed" => out.push(format!(
                "the last update, to {to}, failed {when} ago and so did its rollback: {cause}"
            )),
            "failed" => out.push(format!(
                "the last update, to {to}, failed {when} ago: {cause}"
            )),
            _ => {}
        }
    }
    if !u.kept_aside.is_empty() {
        let paths: Vec<String> = u
            .kept_aside
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        out.push(format!(
            "failed overlay kept aside after a rollback, never removed automatically: {} (remove it when done with it)",
            paths.join(", ")
        ));
    }
    if let Some(s) = &u.leftover_snapshot {
        out.push(format!(
            "an overlay snapshot of an update that did not finish is still there: {} (the next update refuses until it is moved away)",
            s.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const NEW: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    /// A service directory as `update` leaves it after a rollback: the pointer on the old
    /// image, the record, the failed overlay kept aside (and a link of that name, which a
    /// rollback never makes).
    fn rolled_back_dir() -> (tempfile::TempDir, ImageSource, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let containers = d.path().join("containers");
        let images = containers.join("images");
        std::fs::create_dir_all(&images).unwrap();
        for hex in [OLD, NEW] {
            std::fs::write(images.join(format!("sha256-{hex}.sif")), hex).unwrap();
        }
        let pointer = containers.join("current.sif");
        std::os::unix::fs::symlink(image_pointer::link_text(OLD), &pointer).unwrap();
        let source = image_pointer::classify(&pointer, &crate::host::canonical_path(&pointer));
        assert!(matches!(source, ImageSource::Managed { .. }), "{source:?}");
        let overlay_dir = d.path().join("overlay");
        std::fs::create_dir(&overlay_dir).unwrap();
        let overlay = overlay_dir.join("overlay.img");
        std::fs::write(&overlay, "").unwrap();
        std::fs::write(overlay_dir.join("overlay.img.failed-123"), "").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", overlay_dir.join("overlay.img.failed-9"))
            .unwrap();
        let rec = record::Record {
            previous: Some(format!("sha256:{OLD}")),
            last: Some(record::Last {
                result: "rolled-back".into(),
                from: format!("sha256:{OLD}"),
                to: Some(format!("sha256:{NEW}")),
                url: "oras://registry.example/ood:latest".into(),
                manifest_digest: None,
                started_at: 1000,
                ended_at: Some(1300),
                cause: Some(
                    "required units failed inside during the probation: httpd.service\n\x1b[2J"
                        .into(),
                ),
                failed_overlay: Some(overlay_dir.join("overlay.img.failed-123")),
                snapshot: true,
                timings_ms: [("pull".to_owned(), 1200)].into(),
            }),
            ..record::Record::default()
        };
        record::write(&images, &rec).unwrap();
        (d, source, overlay)
    }

    #[test]
    fn a_rollback_shows_its_cause_and_the_kept_aside_overlay() {
        let (_d, source, overlay) = rolled_back_dir();
        let u = info(&source, &overlay).unwrap();
        assert_eq!(
            u.previous.as_deref(),
            Some(format!("sha256:{OLD}").as_str())
        );
        assert!(!u.running);
        assert_eq!(u.leftover_snapshot, None);
        let failed = overlay.with_file_name("overlay.img.failed-123");
        assert_eq!(u.kept_aside, vec![failed.clone()]);
        let last = u.last.clone().unwrap();
        assert_eq!(last.result, "rolled-back");
        assert_eq!(last.failed_overlay, Some(failed));
        assert_eq!(last.timings_ms.get("pull"), Some(&1200));

        let w = warnings(&u, 1300 + 7200);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("the last update, to sha256:222222222222, was rolled back 2h00m ago: required units failed"),
            "{w:?}"
        );
        assert!(
            w[1].contains("overlay.img.failed-123") && !w[1].contains("failed-9"),
            "{w:?}"
        );

        // Every member is there for scripts, null when unknown.
        let j = serde_json::to_value(&u).unwrap();
        for k in [
            "previous",
            "last",
            "running",
            "kept_aside",
            "leftover_snapshot",
        ] {
            assert!(j.get(k).is_some(), "{k} missing: {j}");
        }
        for k in [
            "result",
            "from",
            "to",
            "url",
            "manifest_digest",
            "started_at",
            "ended_at",
            "cause",
            "failed_overlay",
            "snapshot",
            "timings_ms",
        ] {
            assert!(j["last"].get(k).is_some(), "last.{k} missing: {j}");
        }
    }

    #[test]
    fn an_unmanaged_image_has_no_update_view() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("container.sif");
        std::fs::write(&image, "x").unwrap();
        let source = image_pointer::classify(&image, &crate::host::canonical_path(&image));
        assert!(info(&source, &d.path().join("overlay.img")).is_none());
    }

    /// A record left `in-progress` by an update that is gone (its lock free) is said to
    /// be unfinished, with the snapshot it left; one whose lock is held is running.
    #[test]
    fn in_progress_is_told_apart_from_an_update_that_died() {
        let (_d, source, overlay) = rolled_back_dir();
        let ImageSource::Managed { pointer, .. } = &source else {
            unreachable!()
        };
        let images = pointer.parent().unwrap().join("images");
        let mut rec = record::read(&images);
        let last = rec.last.as_mut().unwrap();
        last.result = "in-progress".into();
        last.ended_at = None;
        record::write(&images, &rec).unwrap();
        std::fs::write(crate::update::snapshot::path_for(&overlay), "").unwrap();

        let u = info(&source, &overlay).unwrap();
        assert!(!u.running);
        assert_eq!(
            u.leftover_snapshot,
            Some(crate::update::snapshot::path_for(&overlay))
        );
        let w = warnings(&u, 1060);
        assert!(w[0].contains("did not finish"), "{w:?}");
        assert!(w.iter().any(|l| l.contains("update-snapshot")), "{w:?}");

        let lock = std::fs::File::create(images.join(LOCK)).unwrap();
        lock.try_lock().unwrap();
        let u = info(&source, &overlay).unwrap();
        assert!(u.running);
        assert_eq!(u.leftover_snapshot, None);
        let w = warnings(&u, 1060);
        assert_eq!(
            w[0],
            "update in-progress: sha256:111111111111 -> sha256:222222222222, started 1m00s ago"
        );
    }

    /// An update on another host shows here as a byte-range lock (NFS emulates flock(2)
    /// so): stood in for by an OFD lock of another open file description.
    #[test]
    fn a_byte_range_lock_on_the_lock_file_counts_as_an_update_running() {
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join(LOCK);
        assert!(!lock_held(&lock), "no file, no update");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .unwrap();
        assert!(!lock_held(&lock));
        // SAFETY: flock is plain data; all-zero is a valid value, then filled in.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).unwrap();
        assert!(lock_held(&lock));
    }

    #[test]
    fn proc_locks_lines_are_matched_by_device_and_inode() {
        let dev = nix::sys::stat::makedev(0xfd, 0);
        let locks = "1: POSIX  ADVISORY  WRITE 77 fd:00:42 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 99 fd:00:4242 0 EOF\n";
        assert!(flock_listed(locks, dev, 4242));
        assert!(
            !flock_listed(locks, dev, 42),
            "a POSIX lock is not update's"
        );
        assert!(!flock_listed(locks, dev, 424));
        assert!(!flock_listed(locks, nix::sys::stat::makedev(8, 1), 4242));
    }
}
