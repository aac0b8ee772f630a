//! One overlay, one host: the supervisor's own claim on the overlay image, across hosts.
//!
//! Apptainer takes an OFD write lock on the writable image over [0, size)
//! (pkg/image/image.go `lockSection`, pkg/image/ext3.go `Partitions[0]`, pkg/util/fs/lock
//! `F_OFD_SETLK`) and keeps it for the instance's life. Before `instance start` the
//! supervisor takes an OFD write lock of its own on [size, ∞) — the *claim*, which never
//! overlaps Apptainer's — and tests [0, size) for an Apptainer started by hand. On NFS with
//! working locks (NFSv4, or NFSv3 with lockd) both reach the server, so a second host sees
//! them. Who holds the claim is written beside the image (the holder record), and read only
//! when a lock says "held": the lock decides, the record only names.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Who holds the claim: what the holder record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub boot_id: String,
    pub pid: u32,
    pub unit: String,
    pub service: String,
    /// RFC 3339, UTC.
    pub since: String,
    pub version: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (supervisor pid {}, unit {}, boot {}, since {})",
            self.host, self.pid, self.unit, self.boot_id, self.since
        )
    }
}

/// Why the claim was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("overlay {path} is in use on {}; its lock is held{}", holder_host(.holder), hint(.holder))]
    Held {
        path: PathBuf,
        holder: Option<Box<Holder>>,
    },
    #[error("overlay {path}: file locking is not supported there (ENOLCK): Apptainer would run without any lock, and nothing would stop a second host\n  hint: mount it with working locks (NFSv4, or NFSv3 with lockd), or set overlay.allow_local_locks = true to accept the risk")]
    NotSupported { path: PathBuf },
    #[error("overlay {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn holder_host(h: &Option<Box<Holder>>) -> String {
    match h {
        Some(h) => h.to_string(),
        None => "some host, holder unknown (no holder record: an Apptainer started by hand or by start.sh?)".to_owned(),
    }
}

fn hint(h: &Option<Box<Holder>>) -> String {
    match h {
        Some(h) => format!(
            "\n  hint: stop it there (systemctl stop {} on {}) or move the service in the inventory",
            h.unit, h.host
        ),
        None => "\n  hint: find the process holding it (`cat /proc/locks`, `losetup -j` on each host) and stop it".to_owned(),
    }
}

/// The claim, held for the run's life; the kernel drops the lock when the fd closes (also
/// when the supervisor dies). The holder record goes with it when it is still ours.
#[derive(Debug)]
pub struct Claim {
    file: File,
    record: PathBuf,
    mine: Holder,
    /// The image is on an NFSv4 mount: the lock can be lost (lease expiry).
    nfs4: bool,
}

impl Claim {
    /// The claim's file: the lock owner, for the lost-lock probe.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Only our own record: a newer holder's (after ours was lost) stays.
        if read_record(&self.record).as_ref() == Some(&self.mine) {
            let _ = std::fs::remove_file(&self.record);
        }
    }
}

/// `.<image name>.holder` beside the image.
pub fn record_path(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    super::overlay::parent_dir(image).join(format!(".{name}.holder"))
}

/// The record, when it is a regular file that parses. Opened without following a link and
/// without blocking (a FIFO planted there must not hang a start or `status`), read up to
/// 64 KiB.
pub fn read_record(path: &Path) -> Option<Holder> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let text = crate::os::fsutil::read_regular(f, 64 * 1024).ok()?;
    serde_json::from_slice(&text).ok()
}

fn flock(kind: libc::c_short, start: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value that is then filled in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 0;
    fl
}

/// `F_OFD_SETLK F_WRLCK` on [start, ∞).
fn set_lock(file: &File, start: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_WRLCK as libc::c_short, start);
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl))?;
    Ok(())
}

/// Whether a write lock of another open file description covers [0, len).
pub(crate) fn is_locked(file: &File, len: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, 0);
    fl.l_len = len;
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Test hook (apptainer-supervisor(8), ENVIRONMENT): when set, the lost-lock probe runs on
/// any filesystem and reports the lock lost once the file it names exists. No NFS server
/// runs where the tests run; this shows the reaction only.
pub const TEST_PROBE_ENV: &str = "APPTAINER_SUPERVISOR_TEST_LOCK_PROBE";

/// What one probe of the claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The read through the claim's description went through: the lock state is there.
    Held,
    /// EIO through the lock owner's description: the NFS client marked the lock lost
    /// (nfs4_copy_lock_stateid, `recover_lost_locks=0`). Why, for the journal.
    Lost(String),
    /// Another error: the state is unknown (a warning, not a halt).
    Failed(String),
}

/// Probes the claim while the instance runs: an `O_DIRECT` read through the claim's own
/// open file description (the lock owner), so that it reaches the server and the NFS
/// client's lost-lock check (a page-cache hit would not). Blocking; run off the loop.
#[derive(Debug)]
pub struct Prober {
    file: File,
    hook: Option<PathBuf>,
}

impl Prober {
    pub fn probe(&self) -> Probe {
        use std::os::unix::fs::FileExt;
        if let Some(hook) = &self.hook {
            return if hook.exists() {
                Probe::Lost(format!(
                    "test hook {TEST_PROBE_ENV}: {} exists",
                    hook.display()
                ))
            } else {
                Probe::Held
            };
        }
        // O_DIRECT needs an aligned buffer: 4 KiB at a 4 KiB boundary inside 8 KiB.
        let mut buf = vec![0u8; 8192];
        let skip = buf.as_ptr().align_offset(4096);
        let Some(aligned) = buf.get_mut(skip..skip + 4096) else {
            return Probe::Failed("no aligned buffer".to_owned());
        };
        match self.file.read_at(aligned, 0) {
            Ok(_) => Probe::Held,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Probe::Lost(format!(
                "reading through the lock's own descriptor failed: {e}"
            )),
            Err(e) => Probe::Failed(e.to_string()),
        }
    }
}

impl Claim {
    /// The prober for this claim, when there is something to lose: an NFSv4 mount (leases;
    /// a local filesystem's lock cannot be lost, NFSv3 has no leases), or the test hook.
    pub fn prober(&self) -> Option<Prober> {
        let hook = std::env::var_os(TEST_PROBE_ENV).map(PathBuf::from);
        if hook.is_none() && !self.nfs4 {
            return None;
        }
        let file = self.file.try_clone().ok()?;
        if hook.is_none() {
            // Shared with the claim's description (F_SETFL acts on it): only on NFS, where
            // O_DIRECT is supported.
            use nix::fcntl::{fcntl, FcntlArg, OFlag};
            let ok = fcntl(&file, FcntlArg::F_GETFL).is_ok_and(|fl| {
                let fl = OFlag::from_bits_retain(fl) | OFlag::O_DIRECT;
                fcntl(&file, FcntlArg::F_SETFL(fl)).is_ok()
            });
            if !ok {
                tracing::warn!(
                    "cannot set O_DIRECT on the overlay's claim; the lost-lock probe is off"
                );
                return None;
            }
        }
        Some(Prober { file, hook })
    }
}

/// What a look at the lock says, without claiming (`check --host`, `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Free,
    Held(Option<Holder>),
}

/// Whether anything holds a write lock on the image (the claim or Apptainer's), and who
/// the record says it is.
pub fn look(image: &Path) -> std::io::Result<Seen> {
    let file = File::open(image)?;
    // Len 0: [0, ∞), the claim's range included.
    Ok(if is_locked(&file, 0)? {
        Seen::Held(read_record(&record_path(image)))
    } else {
        Seen::Free
    })
}

/// [`look`] on a thread of its own, waited for at most `within` (a cut-off NFS client's
/// call hangs; `status` and `check` must not): `None` when the image is missing, else a
/// line for the operator: `free`, `held by …`, `held, holder unknown …`, `unknown: …`.
pub fn describe(image: &Path, within: std::time::Duration) -> Option<String> {
    if !image.is_file() {
        return None;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let path = image.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(look(&path));
    });
    Some(match rx.recv_timeout(within) {
        Ok(Ok(Seen::Free)) => "free".to_owned(),
        Ok(Ok(Seen::Held(Some(h)))) => format!("held by {h}"),
        Ok(Ok(Seen::Held(None))) => {
            "held, holder unknown (no holder record: an Apptainer started by hand?)".to_owned()
        }
        Ok(Err(e)) => format!("unknown: {e}"),
        Err(_) => format!(
            "unknown: the filesystem did not answer within {} s (NFS server not answering?)",
            within.as_secs()
        ),
    })
}

/// Takes the claim on `image` for service `service`, then checks that no Apptainer holds
/// [0, size), then writes the holder record. `Ok(None)`: locks are not supported there
/// and `allow_local_locks` accepts it.
pub fn claim(
    image: &Path,
    service: &str,
    allow_local_locks: bool,
) -> Result<Option<Claim>, ClaimError> {
    let io = |what: &'static str| {
        move |source| ClaimError::Io {
            path: image.to_path_buf(),
            what,
            source,
        }
    };
    let record = record_path(image);
    // Read-write: F_WRLCK needs it. Nothing is written through it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io("opening it for the claim"))?;
    let size =
        i64::try_from(file.metadata().map_err(io("fstat")).map(|m| m.len())?).unwrap_or(i64::MAX);
    match set_lock(&file, size) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
            return Err(ClaimError::Held {
                path: image.to_path_buf(),
                holder: read_record(&record).map(Box::new),
            });
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOLCK) => {
            if allow_local_locks {
                tracing::warn!(overlay = %image.display(), "file locking is not supported on the overlay's filesystem (ENOLCK); starting without the guard (overlay.allow_local_locks)");
                return Ok(None);
            }
            return Err(ClaimError::NotSupported {
                path: image.to_path_buf(),
            });
        }
        Err(e) => return Err(io("taking the claim lock")(e)),
    }
    // Apptainer's own lock on [0, size): one started by hand, by start.sh, or a master
    // whose supervisor is gone.
    if size > 0 && is_locked(&file, size).map_err(io("testing Apptainer's lock"))? {
        return Err(ClaimError::Held {
            path: image.to_path_buf(),
            holder: read_record(&record).map(Box::new),
        });
    }
    if let Some(stale) = read_record(&record) {
        tracing::info!(overlay = %image.display(), "stale holder record ignored ({stale}): nothing holds the lock");
    }
    let mine = Holder {
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|b| b.trim().to_owned())
            .unwrap_or_default(),
        pid: std::process::id(),
        unit: super::lock::own_unit().unwrap_or_else(|| "none".into()),
        service: service.to_owned(),
        since: rfc3339_now(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    write_record(&record, &mine).map_err(io("writing the holder record"))?;
    let nfs4 = super::mounts::overlay_mount(image).is_some_and(|m| {
        m.fstype.starts_with("nfs")
            && super::mounts::nfs_version(&m).is_some_and(|v| v.starts_with('4'))
    });
    Ok(Some(Claim {
        file,
        record,
        mine,
        nfs4,
    }))
}

/// Temp file in the same directory, fsync, rename over the record, fsync the directory:
/// a reader sees the old record or the new one, never half of one.
fn write_record(record: &Path, h: &Holder) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = super::overlay::parent_dir(record);
    let name = record
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    let text = serde_json::to_vec(h).map_err(std::io::Error::other)?;
    // A new file, never a link planted at the temporary's name (O_EXCL does not follow
    // one): a leftover of a crashed run (or a planted link) is unlinked first.
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
    };
    let written = (|| {
        let mut f = match create() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&tmp)?;
                create()?
            }
            r => r?,
        };
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, record)?;
        File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or_default();
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_655_731), "2026-12-07T15:02:11Z");
    }

    #[test]
    fn a_second_claim_is_refused_naming_the_holder_and_the_record_goes_with_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("overlay.img");
        std::fs::write(&img, vec![0u8; 8192]).unwrap();
        assert_eq!(look(&img).unwrap(), Seen::Free);
        let first = claim(&img, "svc", false).unwrap().expect("claimed");
        let rec = read_record(&record_path(&img)).expect("record");
        assert_eq!(rec.pid, std::process::id());
        assert_eq!(rec.service, "svc");
        match claim(&img, "svc", false) {
            Err(ClaimError::Held {
                holder: Some(h), ..
            }) => assert_eq!(*h, rec),
            other => panic!("{other:?}"),
        }
        assert_eq!(look(&img).unwrap(), Seen::Held(Some(rec)));
        drop(first);
        assert!(!record_path(&img).exists());
        assert_eq!(look(&img).unwrap(), Seen::Free);
    }

    /// The record only names: with the lock free, a record of another host is stale and
    /// replaced by ours.
    #[test]
    fn a_stale_holder_record_is_ignored_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("overlay.img");
        std::fs::write(&img, vec![0u8; 8192]).unwrap();
        let stale = Holder {
            host: "core9".into(),
            boot_id: "b".into(),
            pid: 1,
            unit: "x.service".into(),
            service: "svc".into(),
            since: "2026-01-01T00:00:00Z".into(),
            version: "0".into(),
        };
        write_record(&record_path(&img), &stale).unwrap();
        assert_eq!(look(&img).unwrap(), Seen::Free);
        let c = claim(&img, "svc", false).unwrap().expect("claimed");
        let now = read_record(&record_path(&img)).expect("record");
        assert_ne!(now.host, "core9");
        assert_eq!(now.pid, std::process::id());
        drop(c);
    }

    /// Links and FIFOs planted at the record's names: never followed, never waited on.
    #[test]
    fn planted_links_and_fifos_at_the_records_names_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("overlay.img");
        std::fs::write(&img, vec![0u8; 8192]).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let tmp = dir
            .path()
            .join(format!(".overlay.img.holder.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        nix::unistd::mkfifo(&record_path(&img), nix::sys::stat::Mode::S_IRUSR).unwrap();
        assert_eq!(read_record(&record_path(&img)), None);
        let c = claim(&img, "svc", false).unwrap().expect("claimed");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(read_record(&record_path(&img)).is_some());
        drop(c);
    }

    #[test]
    fn an_apptainer_lock_on_the_image_is_held_with_holder_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("overlay.img");
        std::fs::write(&img, vec![0u8; 8192]).unwrap();
        // Apptainer's lock: another description, [0, size).
        let apptainer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut fl = flock(libc::F_WRLCK as libc::c_short, 0);
        fl.l_len = 8192;
        nix::fcntl::fcntl(&apptainer, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).unwrap();
        match claim(&img, "svc", false) {
            Err(e @ ClaimError::Held { holder: None, .. }) => {
                assert!(e.to_string().contains("holder unknown"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!record_path(&img).exists());
    }
}
