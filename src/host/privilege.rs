//! Least privilege: what the supervisor may do itself, what the processes it starts may
//! ever get, and the settings that need root at all.
//!
//! Three capability sets matter (capabilities(7)):
//!
//! * the supervisor's own *effective* and *permitted* sets: only [`SUPERVISOR_CAPS`], from
//!   before the event loop on, for good (capset(2) can never raise them again);
//! * the *bounding* set, which limits everything the supervisor starts later: `apptainer
//!   instance start`/`stop`/`overlay create`, Apptainer's starter, the CNI plugins and the
//!   container's own init and services. It is left as the supervisor got it, never
//!   shrunk: see below;
//! * the *inheritable* and *ambient* sets: cleared; nothing uses them.
//!
//! Why the children still get what they need although our own sets are narrow: an
//! execve(2) by a process whose real or effective uid is 0 treats the new program's file
//! capabilities as all-ones (capabilities(7), "Capabilities and execution of programs by
//! root"), so the new permitted and effective sets are our *bounding* set, whatever our own
//! permitted set holds. `apptainer` (run as root, with the non-setuid starter:
//! `launcher_linux.go` `useSuid()` picks it "if running as root", and falls back to a user
//! namespace only "for root user without effective capability CAP_SYS_ADMIN") thus starts
//! with the whole bounding set, as it needs to create namespaces, mounts, loop devices and
//! CNI interfaces. Raising our own effective set around each spawn would buy nothing and
//! would need the capabilities kept in our permitted set.
//!
//! Why the bounding set is never shrunk: Apptainer's starter requests, for the container
//! of a root user, the capability list `root default capabilities` in apptainer.conf
//! names (`prepareRootCaps`, internal/pkg/runtime/engine/apptainer/prepare_linux.go:331
//! at v1.3.6, :332 at v1.4.5). The default, `full`, is every capability Apptainer knows
//! (pkg/util/apptainerconf/config.go:117 at v1.3.6, :121 at v1.4.5; `SetupPrivileged`,
//! internal/pkg/runtime/engine/config/oci/generate/generate.go:246 / :247), less CAP_SYS_BOOT and
//! CAP_SYS_RAWIO for `--boot` (launcher_linux.go:372 at v1.4.5, :374 at v1.3.6). Stage 2
//! of the starter then aborts with "Requesting capability set ... while permitted
//! capability set is ..." when that list is not inside its permitted set
//! (cmd/starter/c/starter.c:283 at v1.4.5, :275 at v1.3.6), which is our bounding set.
//! Any capability dropped here, or by the unit (`ProtectKernelLogs=` drops CAP_SYSLOG,
//! systemd.exec(5)), would make every start fail. What a site can narrow instead is
//! Apptainer's own list: `root default capabilities = file` with the capabilities of
//! `/etc/apptainer/capability.json` for root (apptainer-supervisor(8), CAPABILITIES).
//! `security.keep_capabilities`, which kept capabilities back from an old drop list, is
//! still read (a deployed file must not stop parsing) and only warned about
//! ([`keep_capabilities_notice`]).
//!
//! What the supervisor itself does, and the capability each step needs (or not):
//!
//! | step | capability |
//! |---|---|
//! | `/proc/<init>/root/run/dbus/system_bus_socket`, `/proc/<init>/ns/net` of a container whose init holds capabilities we do not | `CAP_SYS_PTRACE` (proc(5): ptrace access mode check; `cap_ptrace_access_check` wants the target's permitted set to be a subset of ours otherwise) |
//! | kill(2)/pidfd_send_signal(2) to the master and the container init (uid 0 like us) | none by uid; `CAP_KILL` kept so that a container whose init changed its uids can still be halted |
//! | stat(2) of bind sources and the image under users' 0700 directories, the service and env files | `CAP_DAC_READ_SEARCH` |
//! | writing `/run/apptainer-supervisor`, conflists in `/etc/apptainer/network`, the overlay's directory when a site made it not owner-writable | `CAP_DAC_OVERRIDE` |
//! | pidfd_open(2), `PR_SET_CHILD_SUBREAPER`, flock(2), `/sys/block/loop*/loop/backing_file`, `/proc/<pid>/stat` | none |
//!
//! `PR_SET_NO_NEW_PRIVS` is *not* set: it is inherited across execve(2) and cannot be
//! unset, so it would reach the container's init and every service in it, where setuid
//! programs (`sudo`, `su`, `ssh-keysign` on a login node) and file capabilities (`ping`)
//! stop working (prctl(2), PR_SET_NO_NEW_PRIVS), and Apptainer's own `--allow-setuid` for
//! root (launcher_linux.go: "When running as root, the user can optionally allow setuid
//! with container") would silently do nothing. Besides, with it an execve(2) grants no
//! more than the caller's permitted set, our narrow one, and the starter's check above
//! fails. For the same reasons the unit does not set `NoNewPrivileges=` (see
//! units/apptainer-supervisor@.service).

use caps::{CapSet, Capability, CapsHashSet};
use tracing::debug;

use crate::config::keys;
use crate::config::Service;

/// A set of capabilities, sorted by number (`caps::Capability` is not `Ord`).
pub type Caps = Vec<Capability>;

fn sorted(mut v: Caps) -> Caps {
    v.sort_by_key(|c| c.index());
    v.dedup();
    v
}

/// What the supervisor keeps in its own effective and permitted sets (see the table in the
/// module docs).
pub const SUPERVISOR_CAPS: &[Capability] = &[
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_KILL,
    Capability::CAP_SYS_PTRACE,
];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{file}: these settings need root, and the supervisor runs as uid {euid}:\n{}\n  hint: run it as root (the systemd unit does), or change these settings", .settings.iter().map(|s| format!("  {s}")).collect::<Vec<_>>().join("\n"))]
    NeedsRoot {
        file: String,
        euid: u32,
        settings: Vec<String>,
    },
    #[error("{what}: {reason}")]
    Caps { what: String, reason: String },
}

/// The capability sets the supervisor sets up for itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The supervisor's own effective and permitted sets.
    pub own: Caps,
}

/// Pure: the plan. The bounding set is not part of it: it is never shrunk (module docs).
pub fn plan() -> Plan {
    Plan {
        own: sorted(SUPERVISOR_CAPS.to_vec()),
    }
}

/// The warning for a service file that still sets `security.keep_capabilities`, which no
/// longer has an effect: `check` prints it and `run` logs it. None when the list is empty.
pub fn keep_capabilities_notice(s: &Service) -> Option<String> {
    if s.security.keep_capabilities.is_empty() {
        return None;
    }
    Some(format!(
        "{}: has no effect any more: the supervisor no longer drops capabilities from the bounding set, as Apptainer's starter refuses to start when it lacks any capability that `root default capabilities` in apptainer.conf asks for; remove the setting\n  hint: to give containers fewer capabilities, set `root default capabilities = file` and list them in capability.json (apptainer-supervisor(8), CAPABILITIES)",
        s.locate(keys::SECURITY_KEEP_CAPABILITIES)
    ))
}

/// Why each setting of `s` needs root, for a supervisor that runs as `euid`. Empty when
/// `euid` is 0.
pub fn needs_root(s: &Service, euid: u32) -> Vec<String> {
    if euid == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    if s.boot {
        // launcher_linux.go: `launcher.WithPrivilege(l.uid, l.cfg.Boot, "--boot", ...)`,
        // which fails for any uid but 0.
        out.push(format!(
            "{}: --boot is for root only in Apptainer (launcher_linux.go, WithPrivilege)",
            s.locate(keys::BOOT)
        ));
    }
    if let Some(n) = s.networks.first() {
        // container_linux.go, setupNetwork: "network requires root or a suid installation
        // with /etc/subuid --fakeroot"; besides, the conflists go to a root-owned directory.
        out.push(format!(
            "{}:{}: network: --network (CNI) needs root in Apptainer (container_linux.go, setupNetwork), and its conflists are written to {}",
            s.file.display(),
            n.line,
            s.apptainer.network_dir.display()
        ));
    }
    // Without root Apptainer mounts an ext3 overlay image through fuse2fs in a user
    // namespace (Apptainer's persistent_overlays docs), not on a loop device: the
    // supervisor's guard against mounting it twice (loop devices backed by the image)
    // would see nothing.
    out.push(format!(
        "{}: a writable ext3 overlay image ({}) is loop-mounted only as root; unprivileged Apptainer uses fuse2fs, where nothing guards against mounting it twice",
        s.locate(keys::OVERLAY_PATH),
        s.overlay.path.display()
    ));
    out
}

/// Refuses a configuration that needs root when we are not root (exit 77).
pub fn require_root(s: &Service) -> Result<(), PrivilegeError> {
    let euid = nix::unistd::geteuid().as_raw();
    let settings = needs_root(s, euid);
    if settings.is_empty() {
        return Ok(());
    }
    Err(PrivilegeError::NeedsRoot {
        file: s.file.display().to_string(),
        euid,
        settings,
    })
}

/// The sets after [`apply`], as the kernel reports them.
#[derive(Debug, Clone)]
pub struct Applied {
    pub effective: Caps,
    pub permitted: Caps,
    pub inheritable: Caps,
    pub bounding: Caps,
}

/// Applies `plan` to this process. Call it before any thread exists: capability sets are
/// per thread and a new thread copies its creator's. Does nothing but report when we are
/// not root (an unprivileged supervisor has nothing to give up, and [`require_root`] has
/// already refused the settings that need root).
pub fn apply(plan: &Plan) -> Result<Applied, PrivilegeError> {
    let err = |what: &str| {
        let what = what.to_owned();
        move |e: caps::errors::CapsError| PrivilegeError::Caps {
            what,
            reason: e.to_string(),
        }
    };
    if nix::unistd::geteuid().is_root() {
        // The bounding set stays whole: it is what Apptainer's starter gets as its
        // permitted set (module docs).
        caps::clear(None, CapSet::Ambient).map_err(err("clearing the ambient set"))?;
        caps::clear(None, CapSet::Inheritable).map_err(err("clearing the inheritable set"))?;
        let own: CapsHashSet = plan.own.iter().copied().collect();
        // Effective before permitted: the effective set must stay a subset of the permitted.
        caps::set(None, CapSet::Effective, &own).map_err(err("setting the effective set"))?;
        caps::set(None, CapSet::Permitted, &own).map_err(err("setting the permitted set"))?;
    }
    let read = |set: CapSet, what: &str| -> Result<Caps, PrivilegeError> {
        Ok(sorted(
            caps::read(None, set)
                .map_err(err(what))?
                .into_iter()
                .collect(),
        ))
    };
    let applied = Applied {
        effective: read(CapSet::Effective, "reading the effective set")?,
        permitted: read(CapSet::Permitted, "reading the permitted set")?,
        inheritable: read(CapSet::Inheritable, "reading the inheritable set")?,
        bounding: read(CapSet::Bounding, "reading the bounding set")?,
    };
    debug!(
        cap_effective = %show(&applied.effective),
        cap_permitted = %show(&applied.permitted),
        cap_inheritable = %show(&applied.inheritable),
        cap_bounding = format_args!("{:016x}", mask(&applied.bounding)),
        "capabilities"
    );
    Ok(applied)
}

/// `CAP_A,CAP_B` (or `none`), sorted.
pub fn show(set: &Caps) -> String {
    if set.is_empty() {
        return "none".to_owned();
    }
    set.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The bitmask `/proc/<pid>/status` shows for a set (`CapBnd:` etc.).
pub fn mask(set: &Caps) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_narrows_only_our_own_sets() {
        assert_eq!(
            show(&plan().own),
            "CAP_DAC_OVERRIDE,CAP_DAC_READ_SEARCH,CAP_KILL,CAP_SYS_PTRACE"
        );
    }

    #[test]
    fn mask_matches_proc_status_bits() {
        let s: Caps = vec![Capability::CAP_KILL, Capability::CAP_SYS_PTRACE];
        // CAP_KILL is bit 5, CAP_SYS_PTRACE bit 19.
        assert_eq!(mask(&s), (1 << 5) | (1 << 19));
    }

    fn load(extra: &str) -> Result<Service, crate::config::ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("svc001.toml");
        std::fs::write(
            &p,
            format!("name = \"svc001\"\nservice_dir = \"/srv/svc001\"\n{extra}"),
        )
        .unwrap();
        crate::config::load(&p, None)
    }

    #[test]
    fn keep_capabilities_is_read_and_checked() {
        let s = load("[security]\nkeep_capabilities = [\"CAP_SYS_TIME\", \"syslog\"]\n").unwrap();
        assert_eq!(
            s.security.keep_capabilities,
            [Capability::CAP_SYS_TIME, Capability::CAP_SYSLOG]
        );
        let notice = keep_capabilities_notice(&s).expect("a notice for a set list");
        assert!(
            notice.contains(":4: security.keep_capabilities: has no effect any more")
                && notice.contains("root default capabilities = file"),
            "{notice}"
        );
        assert_eq!(
            keep_capabilities_notice(&load("[security]\nkeep_capabilities = []\n").unwrap()),
            None
        );
        assert_eq!(keep_capabilities_notice(&load("").unwrap()), None);
        let e = load("[security]\nkeep_capabilities = [\"CAP_FLY\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":4:")
                && e.contains("security.keep_capabilities")
                && e.contains("\"CAP_FLY\" is not a Linux capability name"),
            "{e}"
        );
    }

    #[test]
    fn needs_root_names_each_setting_unless_root() {
        let s = load("[[network]]\nname = \"macvlan_svc001\"\nexternal = true\n").unwrap();
        assert!(needs_root(&s, 0).is_empty());
        let why = needs_root(&s, 1000);
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].contains("boot (default): --boot is for root only"));
        assert!(why[1].contains(":4: network: --network (CNI) needs root"));
        assert!(why[2].contains("overlay.path (default): a writable ext3 overlay image"));
        let s = load("boot = false\n").unwrap();
        assert_eq!(
            needs_root(&s, 1000).len(),
            1,
            "the overlay still needs root"
        );
    }
}
