//! Every exit code of every command, and how a run's end ([`RunError`]) maps to its exit
//! code and its final `RESULT=`. Documented in apptainer-supervisor(8), EXIT STATUS;
//! tests/docs.rs checks that every code here is there.

use std::io;
use std::path::PathBuf;

use crate::host::{self, lock, overlay, privilege};
use crate::os::{apptainer, inner};

/// Stopped on request, cleanly (or powered off from inside).
pub const OK: i32 = 0;
/// The instance ended by itself, its master vanished, or a required unit kept failing:
/// systemd's `Restart=on-failure` starts it afresh.
pub const INSTANCE_ENDED: i32 = 1;
/// Bad command line (clap).
pub const USAGE: i32 = 2;
/// `status` (text): at least one service shown is not up (as `systemctl status` says 3
/// for a unit that is not active).
pub const NOT_ALL_UP: i32 = 3;
/// `status NAME`: no such service (neither a service file nor a supervisor's state file),
/// as systemctl says 4 for a unit it cannot find.
pub const NO_SUCH_SERVICE: i32 = 4;
/// `update`: the new image failed (its start, or a required unit during probation) and
/// was rolled back: the previous image (and overlay) run again, READY.
pub const ROLLED_BACK: i32 = 5;
/// `update`: the new image failed and the rollback did not bring the service back up:
/// look at it now (`status`, the journal); the failed image and overlay are kept aside.
pub const ROLLBACK_FAILED: i32 = 6;
/// `migrate`: an input (start.sh, host_vars) cannot be parsed.
pub const DATAERR: i32 = 65;
/// `migrate`: an input file cannot be read.
pub const NOINPUT: i32 = 66;
/// `apptainer instance start` or `overlay create` failed, the container's systemd could
/// not be reached, or the service was not ready within `timeouts.start_sec`.
pub const UNAVAILABLE: i32 = 69;
/// A bug or an unexpected state.
pub const SOFTWARE: i32 = 70;
/// An operating-system call failed (fork, pidfd, mkdir…).
pub const OSERR: i32 = 71;
/// The overlay path is unusable (exists but is not a regular file); `migrate`'s output
/// file exists already or cannot be written.
pub const CANTCREAT: i32 = 73;
/// The overlay's lock was lost while the instance ran (an NFSv4 lease expired while this
/// host was cut off; the kernel reports it as EIO): the container was halted at once.
pub const IOERR: i32 = 74;
/// The service is already running: lock held, overlay in use, or a live instance of that
/// name that this supervisor did not start.
pub const TEMPFAIL: i32 = 75;
/// The supervisor runs without root, and the service file asks for what needs root
/// (`boot`, a network, the overlay image); or it could not narrow its capabilities.
pub const NOPERM: i32 = 77;
/// Invalid service file or host setup (including an image without a D-Bus system bus
/// when readiness needs one).
pub const CONFIG: i32 = 78;
/// `update` was interrupted (SIGINT, SIGTERM, SIGHUP) before anything was switched.
pub const INTERRUPTED: i32 = 130;
/// The container was rebooted from inside: the unit restarts it
/// (`RestartForceExitStatus=133`, as systemd-nspawn's unit does).
pub const REBOOTED: i32 = 133;

/// Why a `run` ended (an `Err` even when the code is 0: a stop during start, a poweroff).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    OverlayClaim(#[from] host::overlay_lock::ClaimError),
    #[error(transparent)]
    Privilege(#[from] privilege::PrivilegeError),
    #[error(transparent)]
    Network(#[from] host::cni_dir::NetworkError),
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("overlay {path} exists but is {what}; it is left untouched\n  hint: move it aside or point overlay.path at the image")]
    OverlayNotAFile { path: PathBuf, what: &'static str },
    #[error("overlay {path} is attached to /dev/{device}: a container is using it\n  hint: find it with `losetup -j {path}` and `apptainer instance list`")]
    OverlayInUse { path: PathBuf, device: String },
    #[error("{source}; the image is left untouched and not recreated\n  hint: inspect it with `dumpe2fs -h` and `e2fsck -n`, or restore it from a backup")]
    OverlayUnusable {
        #[source]
        source: overlay::SuperblockError,
    },
    #[error("creating overlay {path} failed ({status}):\n{stderr}")]
    CreateOverlay {
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("creating overlay {path}: {source}")]
    OverlayCreation {
        path: PathBuf,
        #[source]
        source: overlay::CreationError,
    },
    #[error("creating overlay {path} did not finish within {secs} s (timeouts.overlay_create_sec): abandoned, nothing published{}", if *.abandoned { "; apptainer overlay create did not exit when killed (a mkfs stuck in the kernel, e.g. on a hung NFS server) and is left to the kernel" } else { "" })]
    CreateOverlayTimeout {
        path: PathBuf,
        secs: u64,
        abandoned: bool,
    },
    #[error("an instance named {name} is running (container pid {pid}) that this supervisor did not start; it is left alone\n  hint: stop it the way it was started (e.g. its stop.sh or `apptainer instance stop {name}`), then start this service again")]
    ForeignInstance { name: String, pid: i32 },
    #[error("apptainer instance start failed ({status}):\n{stderr}{log}")]
    StartInstance {
        status: String,
        stderr: String,
        /// What this start added to the instance's `.err` log, with a heading, or empty.
        log: String,
    },
    #[error("taking the lock on overlay {path} did not return within {secs} s (timeouts.start_sec): is its NFS server answering?")]
    ClaimTimeout { path: PathBuf, secs: u64 },
    #[error("apptainer instance start did not return within {secs} s (timeouts.start_sec)")]
    StartTimeout { secs: u64 },
    #[error(transparent)]
    State(#[from] apptainer::StateError),
    #[error("apptainer instance start succeeded but wrote no state file at {path}")]
    NoStateFile { path: PathBuf },
    #[error(
        "process {ppid} named as master in {path} is not an Apptainer master (cmdline {cmdline:?})"
    )]
    NotAMaster {
        ppid: i32,
        path: PathBuf,
        cmdline: String,
    },
    #[error("instance {name} (container pid {pid}) ended by itself: {exit}{tail}")]
    InstanceEnded {
        name: String,
        pid: i32,
        exit: String,
        tail: String,
    },
    #[error("the Apptainer master (pid {pid}) of {name} died; its container {container}")]
    MasterDied {
        name: String,
        pid: i32,
        container: &'static str,
    },
    #[error("stopped during start-up; nothing was left running")]
    StoppedDuringStart,
    #[error("the image of {name} has no D-Bus system bus (no dbus.service or dbus-broker.service), which readiness.mode = \"inner-systemd\" needs\n  hint: install dbus in the image, or set readiness.mode = \"instance\" (READY=1 once the instance is up)")]
    NoInnerBus { name: String },
    #[error(transparent)]
    Inner(#[from] inner::InnerError),
    #[error("not ready after {secs} s (timeouts.start_sec): {status}")]
    NotReady { secs: u64, status: String },
    #[error("required unit {unit} failed ({result}); the service is restarted as a whole")]
    UnitFailed { unit: String, result: String },
    #[error("{name} was rebooted from inside; exiting with 133 so that systemd starts it again")]
    RebootedInside { name: String },
    #[error("aborted by the service manager (SIGABRT: the watchdog expired); the container was halted first")]
    Aborted,
    #[error("{name} was powered off from inside")]
    PoweredOffInside { name: String },
    #[error("the overlay's lock on {path} was lost ({why}); another host may be using the image: the container was halted\n  hint: find which host runs the service now (the holder record beside the image names it) before starting it here again")]
    LockLost { path: PathBuf, why: String },
}

impl RunError {
    /// The final `RESULT=` of a run that ended in this error (apptainer-supervisor(8),
    /// JOURNAL FIELDS), after systemd's own `Result` values where one fits.
    pub fn result(&self) -> &'static str {
        match self {
            RunError::InstanceEnded { .. } => "exit-code",
            RunError::MasterDied { .. } => "master-died",
            RunError::UnitFailed { .. } => "unit-failed",
            RunError::NotReady { .. } => "timeout",
            RunError::Aborted => "watchdog",
            RunError::RebootedInside { .. } => "reboot",
            RunError::PoweredOffInside { .. } => "poweroff",
            RunError::LockLost { .. } => "lock-lost",
            _ => "resources",
        }
    }

    pub fn exit_code(&self) -> i32 {
        use RunError::*;
        match self {
            Host(_) => CONFIG,
            Network(host::cni_dir::NetworkError::Write { .. }) => CANTCREAT,
            Network(_) => CONFIG,
            Lock(lock::LockError::Held { .. }) | OverlayInUse { .. } | ForeignInstance { .. } => {
                TEMPFAIL
            }
            OverlayClaim(host::overlay_lock::ClaimError::Held { .. }) => TEMPFAIL,
            OverlayClaim(host::overlay_lock::ClaimError::NotSupported { .. }) => CONFIG,
            OverlayClaim(_) => OSERR,
            Lock(_) | Os { .. } => OSERR,
            Privilege(_) => NOPERM,
            OverlayNotAFile { .. } => CANTCREAT,
            OverlayUnusable { .. } => CONFIG,
            // A directory others can write is the host's setup, like the path rule's refusals;
            // the rest (mkdtemp, the move into place) are system calls that failed.
            OverlayCreation {
                source: overlay::CreationError::SharedDir { .. },
                ..
            } => CONFIG,
            OverlayCreation { .. } => OSERR,
            CreateOverlay { .. }
            | CreateOverlayTimeout { .. }
            | StartInstance { .. }
            | StartTimeout { .. }
            | ClaimTimeout { .. } => UNAVAILABLE,
            State(_) | NoStateFile { .. } | NotAMaster { .. } => SOFTWARE,
            InstanceEnded { .. } | MasterDied { .. } => INSTANCE_ENDED,
            StoppedDuringStart | PoweredOffInside { .. } => OK,
            NoInnerBus { .. } => CONFIG,
            Inner(_) | NotReady { .. } => UNAVAILABLE,
            UnitFailed { .. } | Aborted => INSTANCE_ENDED,
            RebootedInside { .. } => REBOOTED,
            LockLost { .. } => IOERR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A creation refused because others can write the overlay's directory (the directory
    /// changed after the host checks passed) is the host's setup: 78, as `check --host`
    /// says for it, not a failed system call.
    #[test]
    fn a_creation_refused_in_a_shared_directory_is_a_config_error() {
        let e = RunError::OverlayCreation {
            path: "/s/overlay.img".into(),
            source: overlay::CreationError::SharedDir {
                dir: "/s".into(),
                mode: 0o775,
            },
        };
        assert_eq!(e.exit_code(), CONFIG);
        assert!(e.to_string().contains("chmod go-w /s"), "{e}");
        let e = RunError::OverlayCreation {
            path: "/s/overlay.img".into(),
            source: overlay::CreationError::Publish {
                path: "/s/overlay.img".into(),
                source: io::Error::from_raw_os_error(libc::EIO),
            },
        };
        assert_eq!(e.exit_code(), OSERR);
    }
}
