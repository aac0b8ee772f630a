//! Which mount the overlay lives on, and whether Apptainer's lock on it can work across hosts.
//!
//! Apptainer guards a writable overlay with an OFD write lock (pkg/image/image.go
//! `lockSection`). On an NFS mount with `nolock` or `local_lock=all|posix` the kernel keeps
//! fcntl locks local to this host (fs/nfs/file.c `nfs_lock`, `NFS_MOUNT_LOCAL_FCNTL`), so a
//! second host mounting the same image is not stopped, and two kernels writing one ext3
//! image corrupt it silently. The mount is found in /proc/self/mountinfo by the device
//! number of the image (or of the directory it is to be created in).

use std::path::{Path, PathBuf};

/// Where the mount table is read from; tests point it at a fixture
/// (`APPTAINER_SUPERVISOR_MOUNTINFO`, documented in apptainer-supervisor(8) as a test hook).
pub const MOUNTINFO_ENV: &str = "APPTAINER_SUPERVISOR_MOUNTINFO";

/// One line of /proc/self/mountinfo (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub major: u64,
    pub minor: u64,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The super options (the last field), split at commas.
    pub super_opts: Vec<String>,
}

/// What the lock on a file on that mount can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A local filesystem: the lock is this kernel's, and only this kernel mounts it.
    Local,
    /// NFS whose fcntl locks go to the server (NFSv4, or NFSv3 with lockd).
    Shared,
    /// NFS whose fcntl locks stay on this host: the option that says so.
    LocalOnly { option: String },
    /// Another network filesystem: its lock semantics are not checked.
    Unchecked,
}

/// Parses mountinfo text; lines that do not parse are skipped (a mount table that cannot be
/// read only means the check cannot say anything, not that the service is wrong).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split(' ').collect();
    // The optional fields vary in number: the fixed tail starts after the "-" separator.
    let sep = fields.iter().position(|f| *f == "-")?;
    if sep < 6 {
        return None;
    }
    let (major, minor) = fields[2].split_once(':')?;
    let tail = &fields[sep + 1..];
    Some(Mount {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point: PathBuf::from(unescape(fields[4])),
        fstype: (*tail.first()?).to_owned(),
        source: unescape(tail.get(1)?),
        super_opts: tail
            .get(2)
            .map(|o| o.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
    })
}

/// Undoes the kernel's `\ooo` escaping of space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Network filesystems other than NFS: the lock there is whatever that filesystem makes of
/// it, which this check does not know.
const OTHER_NETWORK: &[&str] = &[
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "fuse.glusterfs",
    "glusterfs",
    "lustre",
    "gpfs",
    "beegfs",
    "9p",
    "fuse.sshfs",
    "virtiofs",
    "afs",
    "ocfs2",
    "gfs2",
];

/// The rule: on NFS, `nolock` or `local_lock=all|posix` keep fcntl locks local
/// (`nolock` shows as `nolock` and `local_lock=all`); `local_lock=none|flock` send them to
/// the server.
pub fn lock_scope(m: &Mount) -> Scope {
    if m.fstype == "nfs" || m.fstype == "nfs4" {
        if m.super_opts.iter().any(|o| o == "nolock") {
            return Scope::LocalOnly {
                option: "nolock".to_owned(),
            };
        }
        return match m
            .super_opts
            .iter()
            .find_map(|o| o.strip_prefix("local_lock="))
        {
            Some(v @ ("all" | "posix")) => Scope::LocalOnly {
                option: format!("local_lock={v}"),
            },
            _ => Scope::Shared,
        };
    }
    if OTHER_NETWORK.contains(&m.fstype.as_str()) {
        return Scope::Unchecked;
    }
    Scope::Local
}

/// The NFS version from the super options (`vers=4.2`), if any.
pub fn nfs_version(m: &Mount) -> Option<&str> {
    m.super_opts.iter().find_map(|o| o.strip_prefix("vers="))
}

/// The mount of device `major:minor` that holds `path`: several mounts can share a device
/// (bind mounts), so the longest mount point that is a prefix of `path` wins, else the
/// last one listed with that device.
pub fn find<'a>(mounts: &'a [Mount], major: u64, minor: u64, path: &Path) -> Option<&'a Mount> {
    let same: Vec<&Mount> = mounts
        .iter()
        .filter(|m| m.major == major && m.minor == minor)
        .collect();
    same.iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .or(same.last())
        .copied()
}

/// What the host check concludes about the overlay's mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Locks stay on this host: refused unless `overlay.allow_local_locks`.
    LocalLocks(String),
    /// Another network filesystem: a warning.
    Unchecked(String),
}

/// The image, or the directory it is to be created in.
fn overlay_at(overlay: &Path) -> PathBuf {
    if overlay.exists() {
        overlay.to_path_buf()
    } else {
        super::overlay::parent_dir(overlay)
    }
}

/// The mount the overlay (or its directory) is on, when the table says.
pub fn overlay_mount(overlay: &Path) -> Option<Mount> {
    use std::os::unix::fs::MetadataExt;
    let at = overlay_at(overlay);
    let dev = std::fs::metadata(&at).ok()?.dev();
    let table = std::env::var_os(MOUNTINFO_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/proc/self/mountinfo"));
    let mounts = parse_mountinfo(&std::fs::read_to_string(&table).ok()?);
    find(
        &mounts,
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        &super::canonical_path(&at),
    )
    .cloned()
}

/// The overlay's mount (the image, or the directory it is to be created in) and its
/// verdict; `Fine` when the mount cannot be found.
pub fn overlay_verdict(overlay: &Path) -> Verdict {
    match overlay_mount(overlay) {
        Some(m) => verdict(&overlay_at(overlay), &m),
        None => Verdict::Fine,
    }
}

/// The verdict and its words for the overlay at `at` on mount `m`.
pub fn verdict(at: &Path, m: &Mount) -> Verdict {
    match lock_scope(m) {
        Scope::Local | Scope::Shared => Verdict::Fine,
        Scope::LocalOnly { option } => Verdict::LocalLocks(format!(
            "overlay {} is on {} ({}, {option}, mounted on {}): file locks there are local to this host, so nothing stops a second host from mounting the image, and two kernels writing one ext3 image corrupt it\n  hint: mount it with local_lock=none (NFSv4, or NFSv3 with lockd and statd), or set overlay.allow_local_locks = true to accept the risk",
            at.display(),
            m.source,
            m.fstype,
            m.mount_point.display()
        )),
        Scope::Unchecked => Verdict::Unchecked(format!(
            "overlay {} is on {} ({}, mounted on {}): whether Apptainer's lock on the image reaches other hosts there is not checked; make sure only one host runs this service",
            at.display(),
            m.source,
            m.fstype,
            m.mount_point.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NFS4: &str = "83 62 0:52 / /shared rw,relatime shared:45 - nfs4 nfs01:/export/shared rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.1.0.11,local_lock=none,addr=10.1.0.5";
    const NFS4_LOCAL: &str = "84 62 0:53 / /shared rw,relatime shared:46 - nfs4 nfs01:/export/shared rw,vers=4.1,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.1.0.12,local_lock=all,addr=10.1.0.5";
    const NFS3_NOLOCK: &str = "91 62 0:54 / /shared rw,relatime shared:47 - nfs nfs01:/export/shared rw,vers=3,rsize=1048576,wsize=1048576,namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.1.0.5,mountvers=3,mountport=20048,mountproto=udp,local_lock=all,addr=10.1.0.5";
    const EXT4: &str = "97 29 253:3 / /srv/services rw,relatime shared:50 - ext4 /dev/mapper/vg0-services rw,seclabel";
    const ROOT: &str =
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict,resuid=65534,resgid=65534";

    fn one(line: &str) -> Mount {
        let m = parse_mountinfo(line);
        assert_eq!(m.len(), 1, "{line}");
        m.into_iter().next().expect("one mount")
    }

    #[test]
    fn nfs4_default_shares_locks() {
        let m = one(NFS4);
        assert_eq!((m.major, m.minor), (0, 52));
        assert_eq!(m.mount_point, Path::new("/shared"));
        assert_eq!(m.source, "nfs01:/export/shared");
        assert_eq!(nfs_version(&m), Some("4.2"));
        assert_eq!(lock_scope(&m), Scope::Shared);
    }

    #[test]
    fn nfs4_local_lock_all_is_refused() {
        let m = one(NFS4_LOCAL);
        assert_eq!(
            lock_scope(&m),
            Scope::LocalOnly {
                option: "local_lock=all".into()
            }
        );
        let Verdict::LocalLocks(why) = verdict(Path::new("/shared/a/overlay.img"), &m) else {
            panic!("not refused");
        };
        for part in [
            "/shared/a/overlay.img",
            "nfs01:/export/shared",
            "local_lock=all",
            "mounted on /shared",
            "overlay.allow_local_locks",
        ] {
            assert!(why.contains(part), "{part} missing from {why}");
        }
        let posix = one(&NFS4_LOCAL.replace("local_lock=all", "local_lock=posix"));
        assert_eq!(
            lock_scope(&posix),
            Scope::LocalOnly {
                option: "local_lock=posix".into()
            }
        );
        let flock = one(&NFS4_LOCAL.replace("local_lock=all", "local_lock=flock"));
        assert_eq!(lock_scope(&flock), Scope::Shared);
    }

    #[test]
    fn nfs3_nolock_is_refused() {
        let m = one(NFS3_NOLOCK);
        assert_eq!(m.fstype, "nfs");
        assert_eq!(
            lock_scope(&m),
            Scope::LocalOnly {
                option: "nolock".into()
            }
        );
    }

    #[test]
    fn local_ext4_is_fine() {
        assert_eq!(lock_scope(&one(EXT4)), Scope::Local);
        let root = one(ROOT);
        assert_eq!((root.major, root.minor), (254, 0));
        assert_eq!(root.mount_point, Path::new("/"));
        assert_eq!(lock_scope(&root), Scope::Local);
        assert_eq!(verdict(Path::new("/x"), &root), Verdict::Fine);
    }

    #[test]
    fn other_network_filesystems_are_only_warned_about() {
        let m = one("120 29 0:60 / /gluster rw - fuse.glusterfs g1:/vol rw,user_id=0");
        assert_eq!(lock_scope(&m), Scope::Unchecked);
        assert!(matches!(
            verdict(Path::new("/gluster/o.img"), &m),
            Verdict::Unchecked(w) if w.contains("fuse.glusterfs")
        ));
    }

    #[test]
    fn escaped_mount_point_is_found() {
        let m = one(
            "85 62 0:55 / /shared\\040data rw - nfs4 nfs01:/export/d rw,vers=4.2,local_lock=none",
        );
        assert_eq!(m.mount_point, Path::new("/shared data"));
        let ms = [m];
        assert!(find(&ms, 0, 55, Path::new("/shared data/ood/overlay.img")).is_some());
    }

    #[test]
    fn mount_is_found_by_st_dev() {
        let table = [ROOT, NFS4, EXT4, NFS3_NOLOCK].join("\n");
        let ms = parse_mountinfo(&table);
        assert_eq!(ms.len(), 4);
        let m = find(&ms, 0, 54, Path::new("/shared/x/overlay.img")).expect("found");
        assert_eq!(m.fstype, "nfs");
        assert!(find(&ms, 9, 9, Path::new("/x")).is_none());
        // A bind mount of the same device: the mount point holding the path wins.
        let bind = "98 29 253:3 /svc/a /opt/a rw - ext4 /dev/mapper/vg0-services rw";
        let ms = parse_mountinfo(&[EXT4, bind].join("\n"));
        let m = find(&ms, 253, 3, Path::new("/srv/services/a/o.img")).expect("found");
        assert_eq!(m.mount_point, Path::new("/srv/services"));
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_mountinfo("nonsense\n1 2 x - y\n").is_empty());
    }

    #[test]
    fn this_machines_table_parses() {
        let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let ms = parse_mountinfo(&text);
        assert!(ms.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
