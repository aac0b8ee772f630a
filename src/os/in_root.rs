//! A path inside the container, resolved inside the container's root.
//!
//! `/proc/<pid>/root/<path>` is not that: the kernel follows an absolute symlink met on the
//! way from the *caller's* root, so a container whose `/run/dbus/system_bus_socket` is a
//! link to `/run/some/host.sock` would have us (root, on the host) open the host's file.
//! openat2(`RESOLVE_IN_ROOT`) does the right thing but needs Linux 5.6, and EL8 runs 4.18;
//! so the walk is done here, one component at a time, as libpathrs and systemd's `chase()`
//! do: each component opened with `openat(O_PATH|O_NOFOLLOW)` below the directory reached so
//! far, a symlink read (`readlinkat` on its O_PATH fd) and its target walked again — from the
//! container's root when absolute — and `..` taken from the directories we walked, never
//! above the root. At most [`MAX_SYMLINKS`] links, the kernel's own bound.
//!
//! What comes back is an O_PATH fd of the file itself; a socket is then connected through
//! `/proc/self/fd/N` (as systemd's `connect_unix_path()` does), so no second lookup by name
//! can land somewhere else.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{open, openat, readlinkat, OFlag};
use nix::sys::stat::{fstat, Mode, SFlag};

use super::sanitize::one_line;

/// Links followed in one resolution at most (the kernel's `MAXSYMLINKS`, 40).
pub(crate) const MAX_SYMLINKS: usize = 40;

/// How much of a container-supplied link target an error message quotes.
const MAX_SHOWN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum InRootError {
    #[error("opening the container's root {root}: {source}")]
    Root {
        root: String,
        #[source]
        source: Errno,
    },
    #[error("{path} inside the container{via}: {at}: {source}")]
    Walk {
        path: String,
        /// ` (through the symbolic links → a → b)` when links were followed.
        via: String,
        /// The component that failed, as reached inside the root.
        at: String,
        #[source]
        source: Errno,
    },
    #[error("{path} inside the container: more than {MAX_SYMLINKS} symbolic links{via}")]
    TooManyLinks { path: String, via: String },
}

impl InRootError {
    /// Nothing there (yet): the file, or a directory on the way, does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            InRootError::Walk {
                source: Errno::ENOENT,
                ..
            }
        )
    }
}

/// An open file inside the root: its O_PATH fd and its type.
#[derive(Debug)]
pub struct Found {
    pub fd: OwnedFd,
    pub kind: SFlag,
}

/// Resolves `path` (absolute or not, it is taken from the root) inside `root`, a directory
/// such as `/proc/<pid>/root`, without ever leaving it. See the module doc.
pub fn open_in_root(root: &Path, path: &str) -> Result<Found, InRootError> {
    let root_fd = open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| InRootError::Root {
        root: root.display().to_string(),
        source,
    })?;
    // The directories walked below the root, and their names for messages.
    let mut stack: Vec<(OwnedFd, OsString)> = Vec::new();
    let mut todo: VecDeque<OsString> = components(path.as_bytes()).collect();
    let mut via: Vec<String> = Vec::new();
    let shown = |stack: &[(OwnedFd, OsString)], name: &[u8]| {
        let mut p: Vec<u8> = Vec::new();
        for (_, n) in stack {
            p.push(b'/');
            p.extend_from_slice(n.as_bytes());
        }
        p.push(b'/');
        p.extend_from_slice(name);
        one_line(&String::from_utf8_lossy(&p), MAX_SHOWN).into_owned()
    };
    let via_text = |via: &[String]| {
        if via.is_empty() {
            String::new()
        } else {
            format!(" (through the symbolic links → {})", via.join(" → "))
        }
    };
    while let Some(name) = todo.pop_front() {
        if name.as_bytes() == b".." {
            // `..` of the root is the root, as for a process chrooted there.
            stack.pop();
            continue;
        }
        let dir = stack.last().map_or(&root_fd, |(fd, _)| fd);
        let walk_err = |source, stack: &[(OwnedFd, OsString)], via: &[String]| InRootError::Walk {
            path: path.to_owned(),
            via: via_text(via),
            at: shown(stack, name.as_bytes()),
            source,
        };
        let fd = openat(
            dir,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| walk_err(e, &stack, &via))?;
        let st = fstat(&fd).map_err(|e| walk_err(e, &stack, &via))?;
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFLNK {
            if via.len() >= MAX_SYMLINKS {
                return Err(InRootError::TooManyLinks {
                    path: path.to_owned(),
                    via: via_text(&via[..3.min(via.len())]),
                });
            }
            // An empty path with the link's own O_PATH fd reads that very link (Linux ≥
            // 2.6.39), not whatever the name points to by now.
            let target = readlinkat(&fd, "").map_err(|e| walk_err(e, &stack, &via))?;
            via.push(one_line(&target.to_string_lossy(), MAX_SHOWN).into_owned());
            if target.as_bytes().starts_with(b"/") {
                stack.clear();
            }
            for c in components(target.as_bytes()).rev() {
                todo.push_front(c);
            }
            continue;
        }
        if todo.is_empty() {
            return Ok(Found { fd, kind });
        }
        if kind != SFlag::S_IFDIR {
            return Err(walk_err(Errno::ENOTDIR, &stack, &via));
        }
        stack.push((fd, name));
    }
    // The path named the root itself (or walked back up to it).
    let fd = match stack.pop() {
        Some((fd, _)) => fd,
        None => root_fd,
    };
    Ok(Found {
        fd,
        kind: SFlag::S_IFDIR,
    })
}

/// The components of a path, without empty ones and `.`.
fn components(p: &[u8]) -> impl DoubleEndedIterator<Item = OsString> + '_ {
    p.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| OsString::from_vec(c.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::os::unix::net::UnixListener;

    /// The path the fd really names, seen from here.
    fn real(f: &Found) -> String {
        use std::os::fd::AsRawFd;
        std::fs::read_link(format!("/proc/self/fd/{}", f.fd.as_raw_fd()))
            .unwrap()
            .display()
            .to_string()
    }

    #[test]
    fn absolute_and_relative_links_and_dotdot_stay_inside_the_root() {
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host").unwrap();
        let root = host.path().join("root");
        std::fs::create_dir_all(root.join("run/dbus")).unwrap();
        std::fs::create_dir_all(root.join("real")).unwrap();
        let _l = UnixListener::bind(root.join("real/sock")).unwrap();
        let r = |p: &str| open_in_root(&root, p);

        // An absolute link is taken from the container's root, not the host's.
        symlink("/real/sock", root.join("run/dbus/abs")).unwrap();
        let f = r("/run/dbus/abs").unwrap();
        assert_eq!(f.kind, SFlag::S_IFSOCK);
        assert_eq!(real(&f), root.join("real/sock").display().to_string());
        // A relative one, through `..`.
        symlink("../../real/sock", root.join("run/dbus/rel")).unwrap();
        assert_eq!(real(&r("run/dbus/rel").unwrap()), real(&f));
        // `..` never climbs above the root: `/../../outside` is `/outside` inside.
        symlink("../../../../../outside/secret", root.join("run/dbus/up")).unwrap();
        let e = r("/run/dbus/up").unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert_eq!(
            e.to_string(),
            "/run/dbus/up inside the container (through the symbolic links → \
             ../../../../../outside/secret): /outside: ENOENT: No such file or directory"
        );
        // A link to the host's absolute path of a host file does not reach it.
        let host_path = outside.join("secret").display().to_string();
        symlink(&host_path, root.join("run/dbus/host")).unwrap();
        let e = r("/run/dbus/host").unwrap_err();
        assert!(e.is_not_found(), "{e}");
        // The root itself, and a directory.
        assert_eq!(r("/").unwrap().kind, SFlag::S_IFDIR);
        assert_eq!(r("/run/../run/./dbus/").unwrap().kind, SFlag::S_IFDIR);
    }

    #[test]
    fn loops_non_directories_and_odd_names_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        symlink("/b", root.join("a")).unwrap();
        symlink("/a", root.join("b")).unwrap();
        let e = open_in_root(root, "/a/x").unwrap_err();
        assert!(matches!(e, InRootError::TooManyLinks { .. }), "{e}");
        assert!(e.to_string().starts_with("/a/x inside the container: more than 40 symbolic links (through the symbolic links → /b → /a → /b)"), "{e}");
        std::fs::write(root.join("file"), "").unwrap();
        let e = open_in_root(root, "/file/x").unwrap_err();
        assert!(
            e.to_string().ends_with("/file: ENOTDIR: Not a directory"),
            "{e}"
        );
        // A link target with a newline and an escape is quoted on one line.
        symlink("/no\n\u{1b}[2Jwhere", root.join("evil")).unwrap();
        let e = open_in_root(root, "/evil").unwrap_err().to_string();
        assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e}");
        assert!(e.contains("→ /no\\n\\x1b[2Jwhere"), "{e}");
        let e = open_in_root(&root.join("missing"), "/x").unwrap_err();
        assert!(matches!(e, InRootError::Root { .. }), "{e}");
    }
}
