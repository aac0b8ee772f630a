//! The service's writable overlay image: is it there, is it sound, is it in use; create it
//! if missing.
//!
//! The overlay holds state that exists nowhere else (for ww001, 100 GB of node images), so
//! this module only ever *creates* an image where none exists. It never removes, truncates
//! or recreates one, and refuses a path that exists but is not a regular file, or whose
//! ext2/3/4 superblock is not one the kernel would mount cleanly ([`read_superblock`]).
//!
//! Creation is atomic and private ([`Creation`]): `apptainer overlay create` builds the
//! image in a fresh 0700 directory beside the target, and only a finished regular file
//! that we made is moved into place with `renameat2(RENAME_NOREPLACE)` (or `link(2)`,
//! which never replaces either), so a stop request, a crash or a full disk during mkfs
//! never leaves a truncated `overlay.img`, and a symbolic link planted beside it is never
//! followed. The private directories of an interrupted creation are removed on the next
//! start ([`remove_stale_temps`]; judged by what they are, not by name). Both live in
//! [`super::overlay_creation`].

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub use super::overlay_creation::{remove_stale_temps, Creation, CreationError};

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

// --- the superblock ---------------------------------------------------------------------

/// Byte offset of the primary superblock in the image, and its size.
const SB_OFFSET: u64 = 1024;
const SB_LEN: usize = 1024;
/// `EXT4_SUPER_MAGIC`.
const MAGIC: u16 = 0xEF53;

// Offsets inside `struct ext4_super_block` (Linux fs/ext4/ext4.h; the same layout serves
// ext2 and ext3, which only leave later fields zero).
const S_BLOCKS_COUNT_LO: usize = 0x04;
const S_FREE_BLOCKS_COUNT_LO: usize = 0x0C;
const S_LOG_BLOCK_SIZE: usize = 0x18;
const S_MAGIC: usize = 0x38;
const S_STATE: usize = 0x3A;
const S_REV_LEVEL: usize = 0x4C;
const S_FEATURE_COMPAT: usize = 0x5C;
const S_FEATURE_INCOMPAT: usize = 0x60;
const S_BLOCKS_COUNT_HI: usize = 0x150;
const S_FREE_BLOCKS_COUNT_HI: usize = 0x158;
const S_ERROR_COUNT: usize = 0x194;

/// `s_state` bits (ext4.h): `EXT4_VALID_FS` (cleanly unmounted), `EXT4_ERROR_FS`.
const STATE_VALID: u16 = 0x0001;
const STATE_ERROR: u16 = 0x0002;
/// `EXT4_FEATURE_COMPAT_HAS_JOURNAL`.
const COMPAT_HAS_JOURNAL: u32 = 0x0004;
/// `EXT4_FEATURE_INCOMPAT_RECOVER`: the journal holds transactions to replay. Normal after
/// a crash or a SIGKILLed container; the kernel replays them at mount.
const INCOMPAT_RECOVER: u32 = 0x0004;
/// `EXT4_FEATURE_INCOMPAT_JOURNAL_DEV`: an external journal device, not a file system.
const INCOMPAT_JOURNAL_DEV: u32 = 0x0008;
/// `EXT4_FEATURE_INCOMPAT_64BIT`: the `_hi` halves of the block counts are valid.
const INCOMPAT_64BIT: u32 = 0x0080;
/// `EXT4_FEATURE_INCOMPAT_SUPP` of ext4.h: FILETYPE, RECOVER, META_BG, EXTENTS, 64BIT,
/// FLEX_BG, EA_INODE, MMP, INLINE_DATA, ENCRYPT, CASEFOLD, CSUM_SEED, LARGEDIR. A bit
/// outside it makes the kernel refuse the mount ("couldn't mount because of unsupported
/// optional features").
const INCOMPAT_SUPPORTED: u32 = 0x0003_E7D6;
/// `EXT4_MAX_BLOCK_LOG_SIZE` (16) minus `EXT4_MIN_BLOCK_LOG_SIZE` (10): 64 KiB blocks.
const MAX_LOG_BLOCK_SIZE: u32 = 6;

/// What the overlay's ext2/3/4 superblock says, for the start-up checks and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub block_size: u64,
    pub blocks_count: u64,
    pub free_blocks: u64,
    pub has_journal: bool,
    /// The journal has transactions to replay (the last mount did not end cleanly). Not an
    /// error: the kernel replays them when Apptainer mounts the image.
    pub needs_recovery: bool,
    /// The kernel recorded file-system errors (`EXT4_ERROR_FS` or `s_error_count`):
    /// `read_superblock` refuses such an image, so this is only ever seen as `false` there.
    pub errors: bool,
}

impl Superblock {
    /// Used blocks as a share of all blocks, 0–100.
    pub fn fill_percent(&self) -> f64 {
        if self.blocks_count == 0 {
            return 0.0;
        }
        let used = self.blocks_count.saturating_sub(self.free_blocks);
        used as f64 * 100.0 / self.blocks_count as f64
    }
}

/// Why an overlay image is refused. No variant is ever repaired here: an image with user
/// data is for an operator to look at (`e2fsck -n`, `dumpe2fs -h`).
#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is {size} bytes, too small to hold an ext2/3/4 superblock")]
    TooSmall { path: PathBuf, size: u64 },
    #[error("{path} is not an ext2/3/4 image (magic {found:#06x} at byte 1080, want 0xef53)")]
    NotExt { path: PathBuf, found: u16 },
    #[error("{path}: the ext superblock has an impossible block size (s_log_block_size {log})")]
    BadBlockSize { path: PathBuf, log: u32 },
    #[error(
        "{path}: the ext superblock has an impossible block count ({blocks} blocks, {free} free)"
    )]
    BadBlockCount {
        path: PathBuf,
        blocks: u64,
        free: u64,
    },
    #[error("{path}: the file system claims {blocks} blocks of {block_size} bytes ({need} bytes) but the file holds only {size}: the image was truncated")]
    Truncated {
        path: PathBuf,
        blocks: u64,
        block_size: u64,
        need: u128,
        size: u64,
    },
    #[error(
        "{path}: the kernel recorded file-system errors in it (s_state {state:#x}, {count} errors)"
    )]
    HasErrors {
        path: PathBuf,
        state: u16,
        count: u32,
    },
    #[error(
        "{path}: the file system uses features this kernel cannot mount (incompat bits {bits:#x})"
    )]
    UnknownFeatures { path: PathBuf, bits: u32 },
    #[error("{path} is an external ext journal device, not a file system")]
    JournalDevice { path: PathBuf },
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads and judges the primary superblock of the image at `path` (1024 bytes at offset
/// 1024), without mounting and without a full `e2fsck`: a few reads, whatever the image
/// size. Refuses what the kernel would refuse or would mount in a broken state.
pub fn read_superblock(path: &Path) -> Result<Superblock, SuperblockError> {
    let read_err = |source| SuperblockError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    if size < SB_OFFSET + SB_LEN as u64 {
        return Err(SuperblockError::TooSmall {
            path: path.to_owned(),
            size,
        });
    }
    let mut b = [0u8; SB_LEN];
    f.seek(SeekFrom::Start(SB_OFFSET)).map_err(read_err)?;
    f.read_exact(&mut b).map_err(read_err)?;
    parse_superblock(&b, size).map_err(|e| e.at(path))
}

/// A [`SuperblockError`] before the path is known (for [`parse_superblock`]).
#[derive(Debug, PartialEq, Eq)]
enum Bad {
    NotExt(u16),
    BlockSize(u32),
    BlockCount(u64, u64),
    Truncated(u64, u64, u128, u64),
    Errors(u16, u32),
    Features(u32),
    JournalDevice,
}

impl Bad {
    fn at(self, path: &Path) -> SuperblockError {
        let path = path.to_owned();
        match self {
            Bad::NotExt(found) => SuperblockError::NotExt { path, found },
            Bad::BlockSize(log) => SuperblockError::BadBlockSize { path, log },
            Bad::BlockCount(blocks, free) => SuperblockError::BadBlockCount { path, blocks, free },
            Bad::Truncated(blocks, block_size, need, size) => SuperblockError::Truncated {
                path,
                blocks,
                block_size,
                need,
                size,
            },
            Bad::Errors(state, count) => SuperblockError::HasErrors { path, state, count },
            Bad::Features(bits) => SuperblockError::UnknownFeatures { path, bits },
            Bad::JournalDevice => SuperblockError::JournalDevice { path },
        }
    }
}

/// Pure: judges the 1024 superblock bytes of an image of `file_size` bytes.
fn parse_superblock(b: &[u8; SB_LEN], file_size: u64) -> Result<Superblock, Bad> {
    let magic = le16(b, S_MAGIC);
    if magic != MAGIC {
        return Err(Bad::NotExt(magic));
    }
    // Revision 0 (EXT2_GOOD_OLD_REV) has no feature fields; mke2fs has not written one
    // since 1.x, but its zeros read as "no features", which is right.
    let (compat, incompat) = if le32(b, S_REV_LEVEL) == 0 {
        (0, 0)
    } else {
        (le32(b, S_FEATURE_COMPAT), le32(b, S_FEATURE_INCOMPAT))
    };
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return Err(Bad::JournalDevice);
    }
    let unknown = incompat & !INCOMPAT_SUPPORTED;
    if unknown != 0 {
        return Err(Bad::Features(unknown));
    }
    let log = le32(b, S_LOG_BLOCK_SIZE);
    if log > MAX_LOG_BLOCK_SIZE {
        return Err(Bad::BlockSize(log));
    }
    let block_size = 1024u64 << log;
    let wide = incompat & INCOMPAT_64BIT != 0;
    let join = |lo: usize, hi: usize| {
        u64::from(le32(b, lo))
            | if wide {
                u64::from(le32(b, hi)) << 32
            } else {
                0
            }
    };
    let blocks_count = join(S_BLOCKS_COUNT_LO, S_BLOCKS_COUNT_HI);
    let free_blocks = join(S_FREE_BLOCKS_COUNT_LO, S_FREE_BLOCKS_COUNT_HI);
    if blocks_count == 0 || free_blocks > blocks_count {
        return Err(Bad::BlockCount(blocks_count, free_blocks));
    }
    let need = u128::from(blocks_count) * u128::from(block_size);
    if need > u128::from(file_size) {
        return Err(Bad::Truncated(blocks_count, block_size, need, file_size));
    }
    let state = le16(b, S_STATE);
    let error_count = le32(b, S_ERROR_COUNT);
    if state & STATE_ERROR != 0 || error_count != 0 {
        return Err(Bad::Errors(state, error_count));
    }
    Ok(Superblock {
        block_size,
        blocks_count,
        free_blocks,
        has_journal: compat & COMPAT_HAS_JOURNAL != 0,
        needs_recovery: incompat & INCOMPAT_RECOVER != 0,
        errors: false,
    })
}

/// Whether an image without a journal was not cleanly unmounted (`EXT4_VALID_FS` clear):
/// the kernel mounts it with a warning ("mounting unchecked fs"), so we only warn too.
pub fn unclean_without_journal(path: &Path) -> bool {
    let mut b = [0u8; SB_LEN];
    let ok = File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(SB_OFFSET))?;
            f.read_exact(&mut b)
        })
        .is_ok();
    ok && le16(&b, S_MAGIC) == MAGIC
        && le32(&b, S_FEATURE_COMPAT) & COMPAT_HAS_JOURNAL == 0
        && le16(&b, S_STATE) & STATE_VALID == 0
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

    /// A superblock as mke2fs writes it for an ext3 image of `blocks` 4 KiB blocks.
    fn sb(blocks: u32, free: u32) -> [u8; SB_LEN] {
        let mut b = [0u8; SB_LEN];
        b[S_BLOCKS_COUNT_LO..][..4].copy_from_slice(&blocks.to_le_bytes());
        b[S_FREE_BLOCKS_COUNT_LO..][..4].copy_from_slice(&free.to_le_bytes());
        b[S_LOG_BLOCK_SIZE..][..4].copy_from_slice(&2u32.to_le_bytes());
        b[S_MAGIC..][..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[S_STATE..][..2].copy_from_slice(&STATE_VALID.to_le_bytes());
        b[S_REV_LEVEL..][..4].copy_from_slice(&1u32.to_le_bytes());
        b[S_FEATURE_COMPAT..][..4].copy_from_slice(&COMPAT_HAS_JOURNAL.to_le_bytes());
        b[S_FEATURE_INCOMPAT..][..4].copy_from_slice(&0x2u32.to_le_bytes());
        b
    }

    fn set32(b: &mut [u8; SB_LEN], at: usize, v: u32) {
        b[at..][..4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn sound_ext3_superblock_is_read() {
        let got = parse_superblock(&sb(1000, 100), 1000 * 4096).unwrap();
        assert_eq!(
            got,
            Superblock {
                block_size: 4096,
                blocks_count: 1000,
                free_blocks: 100,
                has_journal: true,
                needs_recovery: false,
                errors: false
            }
        );
        assert!((got.fill_percent() - 90.0).abs() < 1e-9);
    }

    #[test]
    fn journal_needing_recovery_is_normal() {
        let mut b = sb(1000, 500);
        set32(&mut b, S_FEATURE_INCOMPAT, 0x2 | INCOMPAT_RECOVER);
        assert!(parse_superblock(&b, 1000 * 4096).unwrap().needs_recovery);
    }

    #[test]
    fn high_halves_count_only_with_64bit() {
        let mut b = sb(1000, 500);
        set32(&mut b, S_BLOCKS_COUNT_HI, 1);
        assert_eq!(
            parse_superblock(&b, 1000 * 4096).unwrap().blocks_count,
            1000
        );
        set32(&mut b, S_FEATURE_INCOMPAT, 0x2 | INCOMPAT_64BIT);
        assert_eq!(
            parse_superblock(&b, 1000 * 4096),
            Err(Bad::Truncated(
                (1 << 32) + 1000,
                4096,
                ((1u128 << 32) + 1000) * 4096,
                1000 * 4096
            ))
        );
    }

    #[test]
    fn broken_superblocks_are_refused_with_the_reason() {
        let ok = sb(1000, 500);
        let mut b = ok;
        b[S_MAGIC] = 0;
        assert_eq!(parse_superblock(&b, 1 << 30), Err(Bad::NotExt(0xEF00)));
        let mut b = ok;
        set32(&mut b, S_LOG_BLOCK_SIZE, 7);
        assert_eq!(parse_superblock(&b, 1 << 30), Err(Bad::BlockSize(7)));
        let mut b = ok;
        b[S_STATE..][..2].copy_from_slice(&(STATE_VALID | STATE_ERROR).to_le_bytes());
        assert_eq!(parse_superblock(&b, 1 << 30), Err(Bad::Errors(3, 0)));
        let mut b = ok;
        set32(&mut b, S_ERROR_COUNT, 2);
        assert_eq!(parse_superblock(&b, 1 << 30), Err(Bad::Errors(1, 2)));
        let mut b = ok;
        set32(&mut b, S_FEATURE_INCOMPAT, 0x2 | 0x1000);
        assert_eq!(parse_superblock(&b, 1 << 30), Err(Bad::Features(0x1000)));
        let mut b = ok;
        set32(&mut b, S_FEATURE_INCOMPAT, INCOMPAT_JOURNAL_DEV);
        assert_eq!(parse_superblock(&b, 1 << 30), Err(Bad::JournalDevice));
        assert_eq!(
            parse_superblock(&sb(10, 11), 1 << 30),
            Err(Bad::BlockCount(10, 11))
        );
        assert_eq!(
            parse_superblock(&ok, 999 * 4096),
            Err(Bad::Truncated(1000, 4096, 1000 * 4096, 999 * 4096))
        );
    }

    #[test]
    fn read_superblock_of_small_and_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("o.img");
        std::fs::write(&f, b"tiny").unwrap();
        assert!(matches!(
            read_superblock(&f),
            Err(SuperblockError::TooSmall { size: 4, .. })
        ));
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let e = read_superblock(&f).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is not an ext2/3/4 image (magic 0x0000 at byte 1080, want 0xef53)",
                f.display()
            )
        );
    }
}
