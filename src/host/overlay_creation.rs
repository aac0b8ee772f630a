//! Creating the overlay image, atomically and privately ([`Creation`]), and clearing what an
//! interrupted creation left ([`remove_stale_temps`]). Split from [`super::overlay`], which
//! judges an existing image.

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::overlay::parent_dir;

/// Marker between the image's file name and the random part of a creation directory.
const CREATING: &str = ".creating-";

/// One creation of the overlay at `path`, in a private directory of its own beside it.
///
/// `apptainer overlay create` follows symbolic links everywhere: `truncate`/`dd` open the
/// temporary `<path>.ext3` through any link, `os.Chmod` follows it and `os.Rename` replaces
/// whatever is at the target (internal/app/apptainer/overlay_create.go: `:179` the name,
/// `:188`/`:190` truncate or dd, `:199` chmod, `:287` rename, the same lines at v1.3.6 and
/// v1.4.5). So it is never pointed at a directory others can write: it builds the image in
/// `.<file>.creating-XXXXXX`, made by `mkdtemp(3)` (mode 0700, a name nobody can guess)
/// in the image's directory, so that the final rename stays within one file system. The
/// image is published only if it is a regular file, made by us and linked once, found in
/// that very directory (compared by device and inode with what was made), and moved with
/// `renameat2(RENAME_NOREPLACE)` through directory fds, never over anything. The directory
/// goes on every way out ([`Drop`]).
#[derive(Debug)]
pub struct Creation {
    /// The overlay's directory and the image's name in it.
    parent: std::os::fd::OwnedFd,
    name: std::ffi::OsString,
    /// The private directory: its path (for Apptainer), its fd and its identity.
    dir: PathBuf,
    dir_fd: std::os::fd::OwnedFd,
    dir_id: (u64, u64),
}

/// What `overlay create` must be given for a [`Creation`], and what publishing found.
#[derive(Debug, thiserror::Error)]
pub enum CreationError {
    #[error("cannot make a private directory for the new overlay in {dir}: {source}")]
    MakeDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the overlay's directory {dir} is writable by group or others (mode {mode:04o}): whoever can write it could redirect Apptainer's creation (it follows links)\n  hint: chmod go-w {dir}, or create the overlay by hand")]
    SharedDir { dir: PathBuf, mode: u32 },
    #[error("the new overlay in {dir} is not the regular file Apptainer made there ({what}); nothing was published")]
    NotOurs { dir: PathBuf, what: String },
    #[error("cannot move the new overlay to {path}: {source}")]
    Publish {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Others who may write the overlay's directory could replace our private directory by a
/// link while Apptainer works in it (the path rule only warns about a group-writable one).
fn shared_dir(dir: &Path, st_mode: u32) -> Option<CreationError> {
    let mode = st_mode & 0o7777;
    (mode & 0o022 != 0).then(|| CreationError::SharedDir {
        dir: dir.to_owned(),
        mode,
    })
}

fn nix_io(e: nix::errno::Errno) -> io::Error {
    io::Error::from(e)
}

impl Creation {
    /// Makes the private directory beside `path` (whose directory must exist).
    pub fn begin(path: &Path) -> Result<Creation, CreationError> {
        use nix::fcntl::{open, OFlag};
        use nix::sys::stat::{fstat, Mode};
        let parent_path = parent_dir(path);
        let make_err = |source| CreationError::MakeDir {
            dir: parent_path.clone(),
            source,
        };
        let name = path
            .file_name()
            .ok_or_else(|| make_err(io::Error::from(io::ErrorKind::InvalidInput)))?
            .to_owned();
        let parent = open(
            &parent_path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| make_err(nix_io(e)))?;
        let mode = fstat(std::os::fd::AsFd::as_fd(&parent))
            .map_err(|e| make_err(nix_io(e)))?
            .st_mode;
        if let Some(e) = shared_dir(&parent_path, mode) {
            return Err(e);
        }
        let mut template = std::ffi::OsString::from(".");
        template.push(&name);
        template.push(CREATING);
        template.push("XXXXXX");
        let dir =
            nix::unistd::mkdtemp(&parent_path.join(template)).map_err(|e| make_err(nix_io(e)))?;
        let dir_fd = match open(
            &dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(make_err(nix_io(e)));
            }
        };
        let st = fstat(std::os::fd::AsFd::as_fd(&dir_fd)).map_err(|e| make_err(nix_io(e)))?;
        Ok(Creation {
            parent,
            name,
            dir,
            dir_fd,
            dir_id: (st.st_dev, st.st_ino),
        })
    }

    /// Why no creation may happen in `dir` as it is now, if none may (for `check --host`,
    /// which says so before `run` meets it).
    pub fn refused_in(dir: &Path) -> Option<CreationError> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir).ok()?;
        shared_dir(dir, m.mode())
    }

    /// The path `apptainer overlay create` is given: the image's name in the private
    /// directory.
    pub fn temp_image(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Moves the finished image to the overlay path, never over anything: see [`Creation`].
    /// The private directory is removed whatever happens.
    pub fn publish(self) -> Result<(), CreationError> {
        use nix::fcntl::{renameat2, AtFlags, RenameFlags};
        use nix::sys::stat::fstatat;
        use std::os::fd::AsFd;
        let not_ours = |what: String| CreationError::NotOurs {
            dir: self.dir.clone(),
            what,
        };
        // The directory is still the one we made (a private one cannot be entered by
        // others, but its name in a shared directory could be replaced).
        match fstatat(
            self.parent.as_fd(),
            self.dir.file_name().unwrap_or_default(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if (st.st_dev, st.st_ino) == self.dir_id => {}
            Ok(_) => return Err(not_ours("its directory was replaced".into())),
            Err(e) => return Err(not_ours(format!("its directory: {e}"))),
        }
        let st = fstatat(
            self.dir_fd.as_fd(),
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| not_ours(e.to_string()))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(not_ours("not a regular file".into()));
        }
        if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_nlink != 1 {
            return Err(not_ours(format!(
                "owned by uid {} with {} links",
                st.st_uid, st.st_nlink
            )));
        }
        let made = (st.st_dev, st.st_ino);
        let publish_err = |source| CreationError::Publish {
            path: self.final_path(),
            source,
        };
        let r = renameat2(
            self.dir_fd.as_fd(),
            self.name.as_os_str(),
            self.parent.as_fd(),
            self.name.as_os_str(),
            RenameFlags::RENAME_NOREPLACE,
        );
        match r {
            Ok(()) => {}
            // NFS before Linux 6.x answers EINVAL: link(2) never replaces either.
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOSYS) => {
                nix::unistd::linkat(
                    self.dir_fd.as_fd(),
                    self.name.as_os_str(),
                    self.parent.as_fd(),
                    self.name.as_os_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| publish_err(nix_io(e)))?;
            }
            Err(e) => return Err(publish_err(nix_io(e))),
        }
        // What is now at the overlay path is the file we checked.
        match fstatat(
            self.parent.as_fd(),
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if (st.st_dev, st.st_ino) == made => {}
            _ => {
                return Err(publish_err(io::Error::other(
                    "the overlay path does not hold the file that was made",
                )))
            }
        }
        // The new directory entry must survive a crash right after we report success.
        File::open(parent_dir(&self.final_path()))
            .and_then(|f| f.sync_all())
            .map_err(publish_err)
    }

    fn final_path(&self) -> PathBuf {
        parent_dir(&self.dir).join(&self.name)
    }
}

impl Drop for Creation {
    fn drop(&mut self) {
        use std::os::fd::AsFd;
        // Only through the fds we hold: the directory we made, whatever its name now.
        clear_dir(self.dir_fd.as_fd());
        if let Some(n) = self.dir.file_name() {
            if let Ok(st) = nix::sys::stat::fstatat(
                self.parent.as_fd(),
                n,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                if (st.st_dev, st.st_ino) == self.dir_id {
                    // Not empty when an abandoned mkfs still writes in it (or NFS keeps a
                    // `.nfsXXXX` of a file still open): the next start's stale cleanup
                    // removes it.
                    if let Err(e) = nix::unistd::unlinkat(
                        self.parent.as_fd(),
                        n,
                        nix::unistd::UnlinkatFlags::RemoveDir,
                    ) {
                        tracing::warn!(
                            temporary = %self.dir.display(),
                            error = %e,
                            "cannot remove the private directory of the overlay creation; the next start removes it"
                        );
                    }
                }
            }
        }
    }
}

/// Removes every entry of the directory `dir` (open), never following a link: links are
/// removed as links, directories emptied the same way first. Listed through
/// `/proc/self/fd`, which names the open directory whatever its path is now.
fn clear_dir(dir: std::os::fd::BorrowedFd<'_>) {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    use nix::unistd::{unlinkat, UnlinkatFlags};
    use std::os::fd::{AsFd, AsRawFd};
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        // file_type comes from the directory entry: a link is a link, never followed.
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if let Ok(sub) = openat(
                dir,
                name.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                clear_dir(sub.as_fd());
            }
            let _ = unlinkat(dir, name.as_os_str(), UnlinkatFlags::RemoveDir);
        } else {
            let _ = unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Whether the entry `name` of the overlay's directory is the private directory of an
/// interrupted [`Creation`] of `image`: judged by what it is, not by its name alone — a
/// directory (not a link to one) named `.<image>.creating-…`, mode 0700, owned by us.
fn is_our_creation_dir(parent: std::os::fd::BorrowedFd<'_>, name: &[u8], image: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(b".").and_then(|r| r.strip_prefix(image)) else {
        return false;
    };
    if rest
        .strip_prefix(CREATING.as_bytes())
        .is_none_or(<[u8]>::is_empty)
    {
        return false;
    }
    let Ok(st) = nix::sys::stat::fstatat(
        parent,
        std::ffi::OsStr::from_bytes(name),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) else {
        return false;
    };
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
        && st.st_mode & 0o7777 == 0o700
        && st.st_uid == nix::unistd::geteuid().as_raw()
}

/// Removes the private directories interrupted creations of `path` left behind (see
/// [`is_our_creation_dir`]) and returns them; anything else (a file or a link of that
/// name) is left alone. Called under the service lock, so no other supervisor of this
/// service is creating the image now.
pub fn remove_stale_temps(path: &Path) -> io::Result<Vec<PathBuf>> {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::Mode;
    use std::os::fd::AsFd;
    let Some(image) = path.file_name() else {
        return Ok(Vec::new());
    };
    let dir = parent_dir(path);
    let parent = match open(
        &dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(nix_io(e)),
    };
    let mut removed = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let name = e.file_name();
        if !is_our_creation_dir(parent.as_fd(), name.as_bytes(), image.as_bytes()) {
            continue;
        }
        if let Ok(sub) = openat(
            parent.as_fd(),
            name.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            clear_dir(sub.as_fd());
        }
        match nix::unistd::unlinkat(
            parent.as_fd(),
            name.as_os_str(),
            nix::unistd::UnlinkatFlags::RemoveDir,
        ) {
            Ok(()) => removed.push(e.path()),
            Err(nix::errno::Errno::ENOENT) => {}
            Err(err) => return Err(nix_io(err)),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn creation_is_private_and_publishes_only_what_it_made_never_over_anything() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("overlay.img");
        let c = Creation::begin(&img).unwrap();
        let tmp = c.temp_image();
        let dir = tmp.parent().unwrap().to_owned();
        assert_eq!(tmp.file_name().unwrap(), "overlay.img");
        assert_eq!(dir.parent().unwrap(), d.path());
        assert!(dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".overlay.img.creating-"));
        assert_eq!(mode(&dir), 0o700);
        std::fs::write(&tmp, b"new").unwrap();
        c.publish().unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), b"new");
        assert!(!dir.exists(), "the private directory is gone");

        // Never over an existing image; the directory goes all the same.
        let c = Creation::begin(&img).unwrap();
        std::fs::write(c.temp_image(), b"newer").unwrap();
        let dir = c.temp_image().parent().unwrap().to_owned();
        let e = c.publish().unwrap_err();
        assert!(
            matches!(&e, CreationError::Publish { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{e}"
        );
        assert_eq!(std::fs::read(&img).unwrap(), b"new", "kept");
        assert!(!dir.exists());
    }

    #[test]
    fn no_creation_in_a_directory_others_can_write() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            d.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o775),
        )
        .unwrap();
        let e = Creation::begin(&d.path().join("overlay.img")).unwrap_err();
        assert!(
            matches!(e, CreationError::SharedDir { mode: 0o775, .. }),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_link_or_a_second_name_in_the_private_directory_is_never_published() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("overlay.img");
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"host file").unwrap();
        // A symbolic link where the image should be.
        let c = Creation::begin(&img).unwrap();
        std::os::unix::fs::symlink(&victim, c.temp_image()).unwrap();
        assert!(matches!(c.publish(), Err(CreationError::NotOurs { .. })));
        // A hard link to a host file (two names).
        let c = Creation::begin(&img).unwrap();
        std::fs::hard_link(&victim, c.temp_image()).unwrap();
        assert!(matches!(c.publish(), Err(CreationError::NotOurs { .. })));
        assert!(!img.exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"host file");
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["victim"], "no private directory left");
    }

    #[test]
    fn stale_creations_are_judged_by_their_directory_never_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("overlay.img");
        let keep = d.path().join("keep");
        std::fs::create_dir(&keep).unwrap();
        std::fs::write(keep.join("data"), b"x").unwrap();
        // An interrupted creation of ours: dropped without publishing, as by SIGKILL.
        let c = Creation::begin(&img).unwrap();
        let ours = c.temp_image().parent().unwrap().to_owned();
        std::fs::write(c.temp_image(), b"half").unwrap();
        std::os::unix::fs::symlink(&keep, ours.join("overlay.img.ext3")).unwrap();
        std::mem::forget(c);
        // Not ours: a link, a file and a directory of another mode under the same pattern.
        std::os::unix::fs::symlink(&keep, d.path().join(".overlay.img.creating-link")).unwrap();
        std::fs::write(d.path().join(".overlay.img.creating-4242"), b"old").unwrap();
        std::fs::create_dir(d.path().join(".overlay.img.creating-open")).unwrap();
        std::fs::set_permissions(
            d.path().join(".overlay.img.creating-open"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let removed = remove_stale_temps(&img).unwrap();
        assert_eq!(removed, [ours]);
        assert_eq!(
            std::fs::read(keep.join("data")).unwrap(),
            b"x",
            "never followed"
        );
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".overlay.img.creating-4242",
                ".overlay.img.creating-link",
                ".overlay.img.creating-open",
                "keep"
            ]
        );
    }
}
