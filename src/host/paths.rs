//! sshd's StrictModes for the files that decide what root runs: the service file, the env
//! file, the image and the overlay, and every directory above them. Each path is resolved
//! first and then walked from `/` one component at a time with `openat(O_NOFOLLOW)`, every
//! component judged on the fd that was opened (`fstat`), so a symlink swapped in after the
//! resolution fails the walk instead of redirecting it, and a file is read from the very fd
//! that was judged.
//!
//! A component is at fault when it is writable by others or by its group, or owned by a uid
//! that is neither root nor listed in `[security] trusted_owners` (nor, for an unprivileged
//! `check`, the caller). One exception, as on every Linux host: a world-writable directory
//! with the sticky bit (`/tmp`) is no fault when the next component is an existing directory
//! with a trusted owner, since nobody else may rename or remove that entry (chmod(2),
//! `S_ISVTX`). The directory that holds one of the files gets no such exception: others could
//! still add a file there that a later start reads (a default env file that is absent today).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, Mode};

use crate::config::Security;

/// What is wrong with one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Writable by others (`o+w`).
    WorldWritable,
    /// Writable by its group (`g+w`).
    GroupWritable,
    /// Owned by this uid, neither root nor trusted.
    Owner(u32),
}

/// One component at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offender {
    pub(crate) path: PathBuf,
    pub(crate) mode: u32,
    pub(crate) is_dir: bool,
    pub(crate) fault: Fault,
}

impl Offender {
    /// The command that removes the fault.
    pub(crate) fn fix(&self) -> String {
        let p = self.path.display();
        match self.fault {
            Fault::WorldWritable => format!("chmod o-w {p}"),
            Fault::GroupWritable => format!("chmod g-w {p}"),
            Fault::Owner(uid) => format!(
                "chown root {p} (or, when the file server shows root's files as uid {uid}, list it in [security] trusted_owners)"
            ),
        }
    }

    /// What is wrong, in words, without the path.
    pub(crate) fn what(&self) -> String {
        match self.fault {
            Fault::WorldWritable => format!("is writable by others (mode {:04o})", self.mode),
            Fault::GroupWritable => format!("is writable by its group (mode {:04o})", self.mode),
            Fault::Owner(uid) => format!("is owned by uid {uid}, neither root nor a trusted owner"),
        }
    }
}

/// The end of a walk.
#[derive(Debug)]
pub(crate) struct Walk {
    /// The resolved path that was walked.
    pub(crate) path: PathBuf,
    /// Every component at fault, from `/` down (the target last, when it exists).
    pub(crate) offenders: Vec<Offender>,
    /// The target, opened read-only without following a symlink; `None` when it (or a
    /// directory above it) does not exist: then the offenders cover what exists.
    pub(crate) file: Option<File>,
}

/// Why a walk could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WalkError {
    #[error("{path} is a symbolic link: a file that decides what root runs is read only where it is, never through a link\n  hint: name the file it points to ({target}) in the service file instead")]
    Symlink { path: PathBuf, target: String },
    #[error("{path}: {component} changed while it was checked (now a symbolic link or not a directory): nothing is read through it")]
    Swapped { path: PathBuf, component: PathBuf },
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// The uids that may own the checked paths: root, `[security] trusted_owners`, and the
/// caller when it is not root (an unprivileged `check` of its own files).
pub(crate) fn trusted(sec: &Security) -> Vec<u32> {
    let mut t = vec![0];
    t.extend(&sec.trusted_owners);
    let me = nix::unistd::geteuid().as_raw();
    if me != 0 {
        t.push(me);
    }
    t
}

/// Walks `p` (resolved first) from `/`, judging each component; see the module doc. The
/// target is opened to be read.
pub(crate) fn walk(p: &Path, trusted: &[u32]) -> Result<Walk, WalkError> {
    walk_resolved(super::canonical_path(p), trusted, true)
}

/// [`walk`] for a target that is only judged, never read (the image, which may be a
/// directory, and the overlay): it is opened `O_PATH`, so no device or FIFO is opened.
pub(crate) fn walk_judge_only(p: &Path, trusted: &[u32]) -> Result<Walk, WalkError> {
    walk_resolved(super::canonical_path(p), trusted, false)
}

/// [`walk`] with only the directories resolved: a symlink as the last component is refused
/// ([`WalkError::Symlink`]), not followed.
pub(crate) fn walk_no_final_link(p: &Path, trusted: &[u32]) -> Result<Walk, WalkError> {
    walk_resolved(super::canonical_dir_of(p), trusted, true)
}

/// [`walk`] of a path already resolved: a symlink met on the way is a swap.
fn walk_resolved(path: PathBuf, trusted: &[u32], read: bool) -> Result<Walk, WalkError> {
    let open_err = |at: &Path, source| WalkError::Open {
        path: at.to_owned(),
        source,
    };
    let root = Path::new("/");
    let mut dir: OwnedFd = openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| open_err(root, e))?;
    let names: Vec<_> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            _ => None,
        })
        .collect();
    let mut at = PathBuf::from("/");
    // The previous component's state, judged once we know whether its child exists.
    let mut pending = Some(fstat(dir.as_fd()).map_err(|e| open_err(&at, e))?);
    let mut offenders = Vec::new();
    let mut file = None;
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        let child = at.join(name);
        let flags = if last && read {
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK
        } else if last {
            // O_PATH with O_NOFOLLOW opens a link itself: caught by its type below.
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
        } else {
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
        };
        match openat(dir.as_fd(), name.as_os_str(), flags, Mode::empty()) {
            Ok(fd) => {
                let st = fstat(fd.as_fd()).map_err(|e| open_err(&child, e))?;
                if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                    return Err(WalkError::Swapped {
                        path: path.clone(),
                        component: child,
                    });
                }
                if let Some(parent) = pending.take() {
                    let child_dir =
                        (st.st_mode & libc::S_IFMT == libc::S_IFDIR && !last).then_some(st.st_uid);
                    judge(&at, &parent, child_dir, trusted, &mut offenders);
                }
                pending = Some(st);
                if last {
                    file = Some(File::from(fd));
                } else {
                    dir = fd;
                }
            }
            Err(Errno::ENOENT) => {
                if let Some(parent) = pending.take() {
                    judge(&at, &parent, None, trusted, &mut offenders);
                }
                return Ok(Walk {
                    path,
                    offenders,
                    file: None,
                });
            }
            Err(Errno::ELOOP) if last => {
                return Err(WalkError::Symlink {
                    target: std::fs::read_link(&child)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default(),
                    path: child,
                })
            }
            // O_NOFOLLOW on a symlink: ELOOP; O_DIRECTORY on a symlink or a file: ENOTDIR.
            // The path was resolved just before: something changed it since.
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                return Err(WalkError::Swapped {
                    path: path.clone(),
                    component: child,
                })
            }
            Err(e) => return Err(open_err(&child, e)),
        }
        at = child;
    }
    if let Some(st) = pending.take() {
        judge(&at, &st, None, trusted, &mut offenders);
    }
    Ok(Walk {
        path,
        offenders,
        file,
    })
}

/// Adds `at`'s faults. `child_dir`: the owner of the next component when that is an
/// existing directory on the way (which a sticky world-writable directory protects).
fn judge(
    at: &Path,
    st: &nix::sys::stat::FileStat,
    child_dir: Option<u32>,
    trusted: &[u32],
    out: &mut Vec<Offender>,
) {
    let mode = st.st_mode & 0o7777;
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    let sticky_guard =
        is_dir && mode & 0o1000 != 0 && child_dir.is_some_and(|u| trusted.contains(&u));
    let mut push = |fault| {
        out.push(Offender {
            path: at.to_owned(),
            mode,
            is_dir,
            fault,
        })
    };
    if !sticky_guard {
        if mode & 0o002 != 0 {
            push(Fault::WorldWritable);
        } else if mode & 0o020 != 0 {
            push(Fault::GroupWritable);
        }
    }
    if !trusted.contains(&st.st_uid) {
        push(Fault::Owner(st.st_uid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn every_offender_is_listed_with_its_fix_and_the_file_is_the_one_judged() {
        let d = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(d.path()).unwrap();
        let bin = top.join("a/bin");
        std::fs::create_dir_all(&bin).unwrap();
        chmod(&top.join("a"), 0o775);
        chmod(&bin, 0o777);
        let env = bin.join(".service_env");
        std::fs::write(&env, "A=1\n").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let w = walk(&env, &[0, me]).unwrap();
        let got: Vec<_> = w
            .offenders
            .iter()
            .map(|o| (o.path.clone(), o.fault, o.fix()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    top.join("a"),
                    Fault::GroupWritable,
                    format!("chmod g-w {}", top.join("a").display())
                ),
                (
                    bin.clone(),
                    Fault::WorldWritable,
                    format!("chmod o-w {}", bin.display())
                ),
            ]
        );
        let mut text = String::new();
        std::io::Read::read_to_string(&mut w.file.unwrap(), &mut text).unwrap();
        assert_eq!(text, "A=1\n");
    }

    #[test]
    fn a_sticky_directory_guards_only_an_existing_trusted_child() {
        let d = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(d.path()).unwrap();
        let tmp = top.join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        chmod(&tmp, 0o1777);
        std::fs::create_dir(tmp.join("svc")).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        // /tmp-like above an existing directory of ours: no fault.
        let w = walk(&tmp.join("svc/overlay.img"), &[0, me]).unwrap();
        assert!(w.offenders.is_empty(), "{:?}", w.offenders);
        assert!(w.file.is_none());
        // The missing file's own directory: anyone could create it there.
        let w = walk(&tmp.join("overlay.img"), &[0, me]).unwrap();
        assert_eq!(w.offenders.len(), 1, "{:?}", w.offenders);
        assert_eq!(w.offenders[0].fault, Fault::WorldWritable);
        // Nor the directory of an existing file of ours: others may add files beside it.
        std::fs::write(tmp.join(".service_env"), "").unwrap();
        let w = walk(&tmp.join(".service_env"), &[0, me]).unwrap();
        assert_eq!(w.offenders.len(), 1, "{:?}", w.offenders);
        assert_eq!(w.offenders[0].path, tmp);
    }

    #[test]
    fn an_untrusted_owner_is_named_and_a_listed_uid_is_accepted() {
        let d = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(d.path()).unwrap();
        let f = top.join("f");
        std::fs::write(&f, "").unwrap();
        let owner = nix::unistd::geteuid().as_raw();
        let w = walk(&f, &[u32::MAX - 1]).unwrap();
        assert!(w.offenders.contains(&Offender {
            path: f.clone(),
            mode: std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&f).unwrap()) & 0o7777,
            is_dir: false,
            fault: Fault::Owner(owner),
        }));
        let w = walk(&f, &[0, owner]).unwrap();
        assert!(w.offenders.is_empty(), "{:?}", w.offenders);
    }

    #[test]
    fn a_symlink_swapped_in_after_resolution_fails_the_walk() {
        let d = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir(top.join("real")).unwrap();
        std::fs::write(top.join("real/f"), "").unwrap();
        let resolved = top.join("real/f");
        // `real` replaced by a symlink between the resolution and the walk.
        std::fs::rename(top.join("real"), top.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(top.join("elsewhere"), top.join("real")).unwrap();
        let err = walk_resolved(resolved, &[0], true);
        assert!(matches!(err, Err(WalkError::Swapped { .. })), "{err:?}");
    }

    #[test]
    fn a_symlinked_file_is_refused_where_its_directory_may_be_a_link() {
        let d = tempfile::tempdir().unwrap();
        let top = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir(top.join("real")).unwrap();
        std::fs::write(top.join("real/env"), "A=1\n").unwrap();
        std::os::unix::fs::symlink(top.join("real"), top.join("dirlink")).unwrap();
        std::os::unix::fs::symlink(top.join("real/env"), top.join("real/envlink")).unwrap();
        let w = walk_no_final_link(&top.join("dirlink/env"), &[0]).unwrap();
        assert_eq!(w.path, top.join("real/env"));
        assert!(w.file.is_some());
        let err = walk_no_final_link(&top.join("dirlink/envlink"), &[0]).unwrap_err();
        assert!(
            matches!(&err, WalkError::Symlink { path, .. } if *path == top.join("real/envlink")),
            "{err:?}"
        );
    }
}
