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

/// The ext2/3/4 superblock fields `status` and the start checks need. Read directly
/// (1024 bytes at offset 1024; offsets from the kernel's fs/ext4/ext4.h, struct
/// ext4_super_block), never with a full e2fsck: that is far too slow for a 100 GB image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub block_size: u64,
    pub blocks_count: u64,
    pub free_blocks: u64,
    pub has_journal: bool,
    pub needs_recovery: bool,
    pub errors: bool,
}

impl Superblock {
    /// Used blocks as a percentage of all blocks.
    pub fn fill_percent(&self) -> f64 {
        if self.blocks_count == 0 {
            return 0.0;
        }
        let used = self.blocks_count.saturating_sub(self.free_blocks);
        used as f64 * 100.0 / self.blocks_count as f64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    #[error("{path}: cannot read the superblock: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not an ext2/3/4 filesystem (no superblock magic 0xEF53 at offset 1080)")]
    NotExt { path: PathBuf },
}

pub fn read_superblock(path: &Path) -> Result<Superblock, SuperblockError> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    let f = std::fs::File::open(path).map_err(|source| SuperblockError::Read {
        path: path.to_owned(),
        source,
    })?;
    f.read_exact_at(&mut sb, 1024)
        .map_err(|source| SuperblockError::Read {
            path: path.to_owned(),
            source,
        })?;
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]) as u64;
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]) as u64;
    if u16_at(0x38) != 0xEF53 {
        return Err(SuperblockError::NotExt {
            path: path.to_owned(),
        });
    }
    let incompat = u32_at(0x60);
    let is_64bit = incompat & 0x80 != 0;
    let hi = |o: usize| if is_64bit { u32_at(o) << 32 } else { 0 };
    Ok(Superblock {
        block_size: 1024u64 << u32_at(0x18).min(16),
        blocks_count: u32_at(0x4) | hi(0x150),
        free_blocks: u32_at(0xC) | hi(0x158),
        has_journal: u32_at(0x5C) & 0x4 != 0,
        needs_recovery: incompat & 0x4 != 0,
        errors: u16_at(0x3A) & 0x2 != 0,
    })
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
