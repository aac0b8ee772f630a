//! The overlay as it was before the update, so that a rollback gives the old image the
//! overlay it knew: a new image's first boot writes into the overlay (package scripts,
//! migrations, copy-ups that shadow the image's files), and the old image on that overlay
//! is not the old service.
//!
//! Taken with the unit stopped: an ext3 image mounted read-write cannot be copied
//! consistently. A reflink (`cp --reflink=always`: XFS with reflink, Btrfs) costs no space
//! and no time; otherwise a sparse copy (`cp --sparse=always`) costs the overlay's
//! allocated blocks in space and in time, checked against the free space first. Beside the
//! overlay, in the same directory: the same filesystem, so restoring is two renames.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Free space kept beyond the copy's allocated size, so that the snapshot never fills the
/// filesystem the running overlays live on.
pub const MARGIN_BYTES: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not enough space for the overlay snapshot in {}: {} MiB free, {} MiB needed (the overlay's {} MiB allocated + {} MiB margin)\n  hint: free space there, or update with --no-overlay-snapshot (a rollback then restores the image only, on the overlay as the new image left it)", .dir.display(), .free >> 20, (.allocated + MARGIN_BYTES) >> 20, .allocated >> 20, MARGIN_BYTES >> 20)]
    NoSpace {
        dir: PathBuf,
        free: u64,
        allocated: u64,
    },
    #[error("a snapshot of an earlier update is still there: {}\n  hint: an earlier update did not finish; compare it with the overlay, then move it away, before updating again", .0.display())]
    Exists(PathBuf),
    #[error("copying {} to {} failed ({status}): {stderr}", .from.display(), .to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A snapshot taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub path: PathBuf,
    /// Shared blocks (no space used until either side is written).
    pub reflinked: bool,
    /// The overlay's allocated bytes (what a sparse copy wrote).
    pub allocated: u64,
}

/// `<overlay>.update-snapshot`: where the snapshot of `overlay` lives during an update.
pub fn path_for(overlay: &Path) -> PathBuf {
    let mut p = overlay.as_os_str().to_owned();
    p.push(".update-snapshot");
    PathBuf::from(p)
}

/// `<overlay>.failed-<unix time>`: where a failed boot's overlay is kept for inspection.
pub fn failed_path(overlay: &Path, at: u64) -> PathBuf {
    let mut p = overlay.as_os_str().to_owned();
    p.push(format!(".failed-{at}"));
    PathBuf::from(p)
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io { what, path, source }
}

/// What a snapshot of `overlay` would cost and whether it fits (for `--dry-run` and the
/// check before the copy): (allocated bytes, free bytes for root).
pub fn cost(overlay: &Path) -> Result<(u64, u64), SnapshotError> {
    let m = std::fs::metadata(overlay).map_err(io("reading", overlay))?;
    let dir = overlay.parent().unwrap_or(Path::new("/"));
    let st =
        nix::sys::statvfs::statvfs(dir).map_err(|e| io("statvfs", dir)(std::io::Error::from(e)))?;
    #[allow(clippy::useless_conversion)] // c_ulong/fsblkcnt_t differ by target
    let free = u64::from(st.blocks_available()) * u64::from(st.fragment_size());
    Ok((m.blocks() * 512, free))
}

/// Whether `cp --reflink=always` works in `dir`: a 4 KiB probe file cloned and both
/// removed (EOPNOTSUPP on ext4, works on XFS with reflink and Btrfs).
pub async fn can_reflink(dir: &Path) -> bool {
    let a = dir.join(format!(".reflink-probe-{}", std::process::id()));
    let b = dir.join(format!(".reflink-probe-{}.copy", std::process::id()));
    let ok = std::fs::write(&a, [0x5au8; 4096]).is_ok()
        && cp(&["--reflink=always"], &a, &b).await.is_ok();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

/// Before the unit is stopped: would a snapshot of `overlay` be refused? (An earlier
/// snapshot is still there, or it cannot be a reflink and does not fit.) Refusing here
/// costs the service no downtime; [`take`] checks again after the stop.
pub async fn precheck(overlay: &Path) -> Result<(), SnapshotError> {
    let dest = path_for(overlay);
    if dest.symlink_metadata().is_ok() {
        return Err(SnapshotError::Exists(dest));
    }
    let dir = overlay.parent().unwrap_or(Path::new("/"));
    let (allocated, free) = cost(overlay)?;
    if free < allocated + MARGIN_BYTES && !can_reflink(dir).await {
        return Err(SnapshotError::NoSpace {
            dir: dir.to_owned(),
            free,
            allocated,
        });
    }
    Ok(())
}

/// Copies `overlay` (the unit stopped) to [`path_for`] it: a reflink when the filesystem
/// can, else a sparse copy if the free space allows. Written under a `.partial` name,
/// synced, then renamed: a snapshot that exists is whole.
pub async fn take(overlay: &Path) -> Result<Snapshot, SnapshotError> {
    let dest = path_for(overlay);
    if dest.exists() {
        return Err(SnapshotError::Exists(dest));
    }
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    // Ours: the remains of a copy that was cut off.
    let _ = std::fs::remove_file(&partial);
    let (allocated, free) = cost(overlay)?;
    let reflinked = cp(&["--reflink=always"], overlay, &partial).await.is_ok();
    if !reflinked {
        let _ = std::fs::remove_file(&partial);
        if free < allocated + MARGIN_BYTES {
            return Err(SnapshotError::NoSpace {
                dir: overlay.parent().unwrap_or(Path::new("/")).to_owned(),
                free,
                allocated,
            });
        }
        if let Err(e) = cp(&["--sparse=always"], overlay, &partial).await {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    }
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .map_err(io("syncing", &partial))?;
    std::fs::rename(&partial, &dest).map_err(io("renaming the snapshot to", &dest))?;
    sync_dir(&dest)?;
    Ok(Snapshot {
        path: dest,
        reflinked,
        allocated,
    })
}

/// The rollback's overlay: the failed boot's overlay renamed to [`failed_path`] (kept for
/// inspection), the snapshot renamed to the overlay's name. Returns where the failed one
/// went (`None` when there was no overlay).
pub fn restore(overlay: &Path, snapshot: &Path, at: u64) -> Result<Option<PathBuf>, SnapshotError> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    let aside = failed_path(overlay, at);
    // Never over an existing file: an earlier failed overlay of the same second stays.
    let moved = match renameat2(
        AT_FDCWD,
        overlay,
        AT_FDCWD,
        &aside,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => Some(aside),
        Err(nix::errno::Errno::ENOENT) => None,
        Err(e) => {
            return Err(io("moving the failed overlay aside to", &aside)(
                std::io::Error::from(e),
            ))
        }
    };
    if let Err(e) = std::fs::rename(snapshot, overlay) {
        // Put the failed overlay back rather than leave no overlay at the path (a later
        // start would create an empty one).
        if let Some(a) = &moved {
            let _ = std::fs::rename(a, overlay);
        }
        return Err(io("restoring the snapshot to", overlay)(e));
    }
    sync_dir(overlay)?;
    Ok(moved)
}

/// After a good probation: the snapshot is no longer needed.
pub fn discard(snapshot: &Path) -> Result<(), SnapshotError> {
    std::fs::remove_file(snapshot).map_err(io("removing", snapshot))
}

fn sync_dir(p: &Path) -> Result<(), SnapshotError> {
    let dir = p.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

/// coreutils `cp`, no shell; mode, owner and times kept (the overlay is root's, 0600).
async fn cp(how: &[&str], from: &Path, to: &Path) -> Result<(), SnapshotError> {
    let out = tokio::process::Command::new("cp")
        .args(how)
        .arg("--preserve=mode,ownership,timestamps")
        .arg("--")
        .arg(from)
        .arg(to)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io("running cp for", to))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SnapshotError::Copy {
            from: from.to_owned(),
            to: to.to_owned(),
            status: out.status.to_string(),
            stderr: crate::os::sanitize::one_line(&String::from_utf8_lossy(&out.stderr), 512)
                .into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sparse file's snapshot is sparse too, and whole; a second one is refused (never
    /// over an earlier snapshot); restore keeps the failed one aside.
    #[tokio::test(flavor = "current_thread")]
    async fn a_sparse_overlay_is_copied_sparse_and_restored_by_renames() {
        let d = tempfile::tempdir().unwrap();
        let ov = d.path().join("overlay.img");
        let f = std::fs::File::create(&ov).unwrap();
        f.set_len(1 << 30).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"before", 4096).unwrap();
        drop(f);
        let s = take(&ov).await.unwrap();
        assert_eq!(s.path, path_for(&ov));
        let m = std::fs::metadata(&s.path).unwrap();
        assert_eq!(m.len(), 1 << 30);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "sparse: {} bytes allocated",
            m.blocks() * 512
        );
        assert!(matches!(take(&ov).await, Err(SnapshotError::Exists(_))));
        // The "failed boot" writes into the overlay; the restore puts the snapshot back.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&ov)
            .unwrap()
            .write_all_at(b"failed", 4096)
            .unwrap();
        let aside = restore(&ov, &s.path, 7).unwrap().unwrap();
        assert_eq!(aside, failed_path(&ov, 7));
        let mut buf = [0u8; 6];
        std::fs::File::open(&ov)
            .unwrap()
            .read_exact_at(&mut buf, 4096)
            .unwrap();
        assert_eq!(&buf, b"before");
        std::fs::File::open(&aside)
            .unwrap()
            .read_exact_at(&mut buf, 4096)
            .unwrap();
        assert_eq!(&buf, b"failed");
        assert!(!s.path.exists());
    }
}
