//! Real SIF images for the tests (issue 17): a SIF v2 file with one primary system
//! partition, a squashfs made by `mksquashfs` from the cached test rootfs
//! ([`super::rootfs`]), which the Apptainer double boots as Apptainer does (DOUBLE.md,
//! "Booting a SIF"). Each variant differs from the rootfs by a few files given to mksquashfs
//! as pseudo-file definitions (`-p`), so the 200 MB rootfs is never copied.
//!
//! The layout is the one the SIF library writes (github.com/apptainer/sif/v2, v2.20.2, the
//! version Apptainer 1.4.5 vendors; v2.15.2, 1.3.6's, has the same layout, its `create.go`
//! lines being :274, :222 and :82 for the ones cited here):
//! `pkg/sif/sif.go` `header` (:325-339), `pkg/sif/descriptor.go` `rawDescriptor` (:32-48) and
//! `partition` (:51-55), `pkg/sif/create.go` `CreateContainer` (descriptors at 4096, room for
//! 48, :313-318; the data right after them, :252-264), `addObject` (the primary partition
//! sets the header's arch, :110-118; `DescriptorsFree`/`DataSize`, :130-131) and
//! `pkg/sif/descriptor_input.go` (a partition aligned on 4096 bytes, :295-297; the default
//! object group 1 | 0xf0000000, :326). Apptainer's build writes the launch script
//! `#!/usr/bin/env run-singularity\n` (internal/pkg/build/assemblers/sif.go:140).
//!
//! Images are cached beside the rootfs (`/var/cache/apptainer-supervisor-tests/`), named for
//! the rootfs's cache key, [`BUILDER_VERSION`], the compression and the variant; built under
//! a lock into a temporary name and renamed, so parallel tests build each one once.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Changes whenever what [`build`] writes changes, so a stale cached image is never used.
pub const BUILDER_VERSION: u32 = 2;

/// What the image does when booted; every variant carries `/etc/asv-image` holding its
/// marker and a newline, so a test can tell images apart from inside
/// (`/proc/<pid>/root/etc/asv-image`).
#[derive(Debug, Clone, Copy)]
pub enum Variant<'a> {
    /// Boots like the rootfs.
    Good { marker: &'a str },
    /// `unit` (e.g. `asv-slow.service`) fails at every start: a drop-in replaces its
    /// `ExecStart=` by `/bin/false`.
    FailingUnit { unit: &'a str, marker: &'a str },
    /// `/sbin/init` is a shell script that execs `sleep infinity`: no systemd, no bus.
    NeverBoots { marker: &'a str },
}

impl Variant<'_> {
    /// What `/etc/asv-image` holds (without its newline).
    pub fn marker(&self) -> &str {
        match self {
            Variant::Good { marker }
            | Variant::FailingUnit { marker, .. }
            | Variant::NeverBoots { marker } => marker,
        }
    }

    /// The variant's part of the cache file name.
    fn slug(&self) -> String {
        match self {
            Variant::Good { marker } => format!("good-{marker}"),
            Variant::FailingUnit { unit, marker } => format!("failing-{unit}-{marker}"),
            Variant::NeverBoots { marker } => format!("neverboots-{marker}"),
        }
    }
}

/// Names go into file names and mksquashfs pseudo definitions: keep them plain.
fn check_name(what: &str, s: &str) {
    assert!(
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"@._-".contains(&b)),
        "sif: {what} {s:?} must be 1-64 of [A-Za-z0-9@._-]"
    );
}

/// The compression for the squashfs: lz4 (fast to make) when this kernel's squashfs reads
/// it, else gzip, which every squashfs kernel reads (Apptainer accepts both,
/// pkg/image/squashfs.go `CheckSquashfsHeader`, v1.3.6:80-105, v1.4.5:81-106).
fn compression() -> &'static str {
    let out = Command::new("zcat").arg("/proc/config.gz").output();
    match out {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("CONFIG_SQUASHFS_LZ4=y") => "lz4",
        _ => "gzip",
    }
}

/// The cached SIF for `v`, built on first use (read-only, mode 0444: [`place`] it into a
/// test's service directory; never write to it). Its sha256 differs per variant and marker.
pub fn build(v: &Variant) -> PathBuf {
    check_name("marker", v.marker());
    if let Variant::FailingUnit { unit, .. } = v {
        check_name("unit", unit);
    }
    let rootfs = super::rootfs();
    let cache = rootfs
        .parent()
        .expect("the rootfs is in a cache dir")
        .to_owned();
    let key = rootfs
        .file_name()
        .expect("rootfs-<key>")
        .to_string_lossy()
        .into_owned();
    let comp = compression();
    let name = format!("sif{BUILDER_VERSION}-{key}-{comp}-{}.sif", v.slug());
    let path = cache.join(&name);
    let lock = File::create(cache.join(format!(".{name}.lock"))).expect("sif lock file");
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock the sif lock file");
    if path.exists() {
        return path;
    }
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix(".sif-build-")
        .tempdir_in(&cache)
        .expect("sif build dir");
    let wd = work.path();
    assert!(
        !wd.to_string_lossy().contains(char::is_whitespace),
        "mksquashfs pseudo definitions split on blanks: {}",
        wd.display()
    );
    // Pseudo definitions `NAME TYPE MODE UID GID ...` (mksquashfs(1), squashfs-tools 4.5):
    // `d` a directory, `f` a file filled with a command's output.
    let mut pseudo: Vec<String> = Vec::new();
    let mut exclude: Vec<&str> = Vec::new();
    let file = |rel: &str, mode: &str, content: &str, pseudo: &mut Vec<String>| {
        let src = wd.join(rel.replace('/', "_"));
        std::fs::write(&src, content).unwrap();
        pseudo.push(format!("{rel} f {mode} 0 0 cat {}", src.display()));
    };
    file(
        "etc/asv-image",
        "644",
        &format!("{}\n", v.marker()),
        &mut pseudo,
    );
    // Every boot leaves `/var/lib/asv-booted-<marker>` in the overlay (a oneshot unit, or
    // NeverBoots' init itself): what a rollback's restored overlay must not hold.
    let booted = format!("/var/lib/asv-booted-{}", v.marker());
    if !matches!(v, Variant::NeverBoots { .. }) {
        file(
            "etc/systemd/system/asv-boot-mark.service",
            "644",
            &format!(
                "# sif.rs: a boot of this image writes into the overlay\n[Unit]\nDescription=test: boot mark\n[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo booted > {booted}'\n"
            ),
            &mut pseudo,
        );
        pseudo.push(
            "etc/systemd/system/multi-user.target.wants/asv-boot-mark.service s 777 0 0 /etc/systemd/system/asv-boot-mark.service".to_owned(),
        );
    }
    match v {
        Variant::Good { .. } => {}
        Variant::FailingUnit { unit, .. } => {
            let dir = format!("etc/systemd/system/{unit}.d");
            assert!(!rootfs.join(&dir).exists(), "the rootfs has {dir} already");
            pseudo.push(format!("{dir} d 755 0 0"));
            file(
                &format!("{dir}/asv-fail.conf"),
                "644",
                "# sif.rs FailingUnit: this unit fails at every start\n[Service]\nExecStart=\nExecStart=/bin/false\nRestart=no\n",
                &mut pseudo,
            );
        }
        Variant::NeverBoots { .. } => {
            // /sbin is a link to usr/sbin in the (merged-/usr) rootfs; its init, a link
            // to systemd, is left out and replaced.
            assert!(rootfs.join("usr/sbin/init").is_symlink(), "usr/sbin/init");
            exclude.push("usr/sbin/init");
            file(
                "usr/sbin/init",
                "755",
                &format!("#!/bin/sh\n# sif.rs NeverBoots: no systemd, no bus\necho booted > {booted}\nexec sleep infinity\n"),
                &mut pseudo,
            );
        }
    }
    let squash = wd.join("root.squashfs");
    let mut cmd = Command::new("mksquashfs");
    cmd.arg(&rootfs)
        .arg(&squash)
        .args(["-noappend", "-no-progress", "-quiet", "-comp", comp]);
    for p in &pseudo {
        cmd.arg("-p").arg(p);
    }
    if !exclude.is_empty() {
        // -e takes every argument after it: it comes last.
        cmd.arg("-e").args(&exclude);
    }
    let out = cmd
        .output()
        .expect("mksquashfs (squashfs-tools; tests/setup.sh installs it)");
    assert!(
        out.status.success(),
        "mksquashfs failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let squashed = started.elapsed();
    let tmp = wd.join("image.sif");
    write_sif(&tmp, &squash, &name);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444)).unwrap();
    File::open(&tmp).unwrap().sync_all().unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    eprintln!(
        "sif: built {} in {:.1} s (mksquashfs -comp {comp}: {:.1} s)",
        path.display(),
        started.elapsed().as_secs_f64(),
        squashed.as_secs_f64()
    );
    path
}

/// Puts the cached `image` at `dest` (a test's service directory): a hard link where the
/// file systems allow, else a copy. A hard link shares the cache's inode, and `losetup -j`
/// (`loops_for`) matches loop devices by inode: a test that counts the loop devices of its
/// image uses a marker no other test uses.
pub fn place(image: &Path, dest: &Path) {
    if std::fs::hard_link(image, dest).is_err() {
        std::fs::copy(image, dest).unwrap();
    }
}

/// A SIF v2 file with no objects: the header, every descriptor free, and `payload` as
/// data nothing refers to (`registry::sif_bytes`).
pub fn objectless_sif(payload: &[u8]) -> Vec<u8> {
    let data_offset = DESCRIPTORS_OFFSET + DESCRIPTOR_CAPACITY * DESCRIPTOR_LEN as u64;
    let mut launch = b"#!/usr/bin/env run-singularity\n".to_vec();
    launch.resize(32, 0);
    let mut h = launch;
    h.extend_from_slice(b"SIF_MAGIC\0");
    h.extend_from_slice(b"01\0");
    h.extend_from_slice(&sif_arch());
    h.extend_from_slice(&[0x11; 16]);
    for v in [
        1_700_000_000i64,
        1_700_000_000,
        DESCRIPTOR_CAPACITY as i64, // DescriptorsFree: all
        DESCRIPTOR_CAPACITY as i64, // DescriptorsTotal
        DESCRIPTORS_OFFSET as i64,
        (DESCRIPTOR_CAPACITY * DESCRIPTOR_LEN as u64) as i64,
        data_offset as i64,
        payload.len() as i64,
    ] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(h.len(), HEADER_LEN);
    h.resize(data_offset as usize, 0);
    h.extend_from_slice(payload);
    h
}

/// SIF header fields (pkg/sif/sif.go:325-339), little endian, no padding: 128 bytes.
const HEADER_LEN: usize = 32 + 10 + 3 + 3 + 16 + 8 * 8;
/// One `rawDescriptor` (pkg/sif/descriptor.go:32-48): 585 bytes.
const DESCRIPTOR_LEN: usize = 4 + 1 + 4 * 3 + 8 * 7 + 128 + 384;
const DESCRIPTORS_OFFSET: u64 = 4096;
const DESCRIPTOR_CAPACITY: u64 = 48;
/// `DataPartition` (sif.go:131-134), `FsSquash` (:178), `PartPrimSys` (:211).
const DATA_PARTITION: i32 = 0x4004;
const FS_SQUASH: i32 = 1;
const PART_PRIMSYS: i32 = 2;
/// `archType` of amd64 and arm64 (pkg/sif/arch.go:15, :17).
fn sif_arch() -> [u8; 3] {
    match std::env::consts::ARCH {
        "x86_64" => *b"02\0",
        "aarch64" => *b"04\0",
        other => panic!("sif.rs: no SIF arch for {other}"),
    }
}

/// Writes the SIF at `out` around the squashfs file `squash`.
fn write_sif(out: &Path, squash: &Path, id_seed: &str) {
    let size = std::fs::metadata(squash).unwrap().len();
    let data_offset = DESCRIPTORS_OFFSET + DESCRIPTOR_CAPACITY * DESCRIPTOR_LEN as u64;
    let part_offset = data_offset.div_ceil(4096) * 4096;
    let with_padding = part_offset - data_offset + size;
    // Reproducible per image name: the ID is a name-based value, the times fixed.
    let id = {
        let mut id = [0u8; 16];
        for (i, b) in id_seed.bytes().enumerate() {
            id[i % 16] = id[i % 16].wrapping_mul(31).wrapping_add(b);
        }
        id[6] = (id[6] & 0x0f) | 0x40; // a version-4 style UUID
        id[8] = (id[8] & 0x3f) | 0x80;
        id
    };
    let time: i64 = 1_700_000_000;
    let arch = sif_arch();

    let mut h = Vec::with_capacity(HEADER_LEN);
    let mut launch = b"#!/usr/bin/env run-singularity\n".to_vec();
    launch.resize(32, 0);
    h.extend_from_slice(&launch);
    h.extend_from_slice(b"SIF_MAGIC\0");
    h.extend_from_slice(b"01\0");
    h.extend_from_slice(&arch);
    h.extend_from_slice(&id);
    for v in [
        time,
        time,
        DESCRIPTOR_CAPACITY as i64 - 1, // DescriptorsFree
        DESCRIPTOR_CAPACITY as i64,     // DescriptorsTotal
        DESCRIPTORS_OFFSET as i64,
        (DESCRIPTOR_CAPACITY * DESCRIPTOR_LEN as u64) as i64, // DescriptorsSize
        data_offset as i64,
        with_padding as i64, // DataSize
    ] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(h.len(), HEADER_LEN);

    let mut d = Vec::with_capacity(DESCRIPTOR_LEN);
    d.extend_from_slice(&DATA_PARTITION.to_le_bytes());
    d.push(1); // Used
    d.extend_from_slice(&1u32.to_le_bytes()); // ID
    d.extend_from_slice(&(1u32 | 0xf000_0000).to_le_bytes()); // GroupID
    d.extend_from_slice(&0u32.to_le_bytes()); // LinkedID
    for v in [
        part_offset as i64,
        size as i64,
        with_padding as i64,
        time,
        time,
        0,
        0,
    ] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    let mut name = [0u8; 128];
    name[..6].copy_from_slice(b"rootfs");
    d.extend_from_slice(&name);
    let mut extra = [0u8; 384];
    extra[0..4].copy_from_slice(&FS_SQUASH.to_le_bytes());
    extra[4..8].copy_from_slice(&PART_PRIMSYS.to_le_bytes());
    extra[8..11].copy_from_slice(&arch);
    d.extend_from_slice(&extra);
    assert_eq!(d.len(), DESCRIPTOR_LEN);

    let mut f = File::create(out).unwrap();
    f.write_all(&h).unwrap();
    f.seek(SeekFrom::Start(DESCRIPTORS_OFFSET)).unwrap();
    f.write_all(&d).unwrap();
    // The other 47 descriptors are unused (zero); the partition starts aligned.
    f.seek(SeekFrom::Start(part_offset)).unwrap();
    std::io::copy(&mut File::open(squash).unwrap(), &mut f).unwrap();
    assert_eq!(f.stream_position().unwrap(), part_offset + size);
}
