//! The service's writable overlay image: is it there, is it in use, create it if missing.
//!
//! The overlay holds state that exists nowhere else (for ww001, 100 GB of node images), so
//! this module only ever *creates* an image where none exists. It never removes, truncates
//! or recreates one, and refuses a path that exists but is not a regular file.

use std::io;
use std::path::{Path, PathBuf};

/// What is at the overlay path now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Missing,
    /// A regular file (an existing overlay: left as it is).
    Image {
        size: u64,
    },
    /// Something else (a directory, a device, a dangling link…): refuse.
    NotAFile(&'static str),
}

pub fn inspect(path: &Path) -> io::Result<Found> {
    // symlink_metadata: a link to somewhere else is not silently followed.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(Found::Image { size: m.len() }),
        Ok(m) => {
            let ft = m.file_type();
            Ok(Found::NotAFile(if ft.is_dir() {
                "a directory"
            } else if ft.is_symlink() {
                "a symbolic link"
            } else {
                "not a regular file"
            }))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Found::Missing),
        Err(e) => Err(e),
    }
}

/// The loop device (`loopN`) that has `image` as its backing file, if any. Apptainer
/// loop-attaches the overlay for the life of the instance, so an attached image means a
/// container is using it. Read from sysfs: no lock on the image itself, which may live on
/// NFS where a flock becomes a POSIX lock that could collide with Apptainer's own.
pub fn attached_loop(image: &Path) -> Option<String> {
    attached_loop_in(Path::new("/sys/block"), image)
}

fn attached_loop_in(sys_block: &Path, image: &Path) -> Option<String> {
    let want = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_owned());
    let entries = std::fs::read_dir(sys_block).ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if same_backing(backing.trim_end_matches('\n'), &want) {
            return Some(name);
        }
    }
    None
}

/// The kernel prints the path it opened, with " (deleted)" once it was unlinked.
fn same_backing(backing: &str, want: &Path) -> bool {
    let b = backing.strip_suffix(" (deleted)").unwrap_or(backing);
    Path::new(b) == want
}

/// Apptainer's `overlay create` builds `<img>.ext3`-style temporaries beside the target;
/// the directory must exist first.
pub fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_kinds() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("o.img");
        assert_eq!(inspect(&f).unwrap(), Found::Missing);
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(inspect(&f).unwrap(), Found::Image { size: 1 });
        assert_eq!(inspect(d.path()).unwrap(), Found::NotAFile("a directory"));
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert_eq!(inspect(&l).unwrap(), Found::NotAFile("a symbolic link"));
    }

    #[test]
    fn finds_backing_file_in_sysfs_layout() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("overlay.img");
        std::fs::write(&img, b"").unwrap();
        let sys = d.path().join("block");
        for (dev, backing) in [
            ("loop0", "/other.img\n".to_owned()),
            ("loop3", format!("{}\n", img.display())),
        ] {
            std::fs::create_dir_all(sys.join(dev).join("loop")).unwrap();
            std::fs::write(sys.join(dev).join("loop/backing_file"), backing).unwrap();
        }
        std::fs::create_dir_all(sys.join("vda")).unwrap();
        assert_eq!(attached_loop_in(&sys, &img).as_deref(), Some("loop3"));
        assert_eq!(attached_loop_in(&sys, Path::new("/nothing")), None);
        assert!(same_backing("/a/b (deleted)", Path::new("/a/b")));
    }
}
