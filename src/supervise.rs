//! `run NAME`: the one event loop that starts, watches and stops a service's instance.
//!
//! Order of work (each step sends `STATUS=`):
//! 1. fork-sensitive setup before the runtime exists: subreaper, the service lock;
//! 2. leftovers of an earlier run are judged by the *container* pid (see [`judge`]);
//! 3. the overlay is created if missing (never touched otherwise) and must not be attached
//!    to a loop device already;
//! 4. `apptainer instance start` runs from an argv (no shell); on success the state file
//!    names the container init and the master, which are recorded with their start times;
//! 5. one `select!` loop waits on SIGTERM/SIGINT, the container's pidfd, the master's pidfd
//!    and the watchdog tick — nothing polls.
//!
//! Apptainer moves the container into a cgroup of its own (`apptainer-<pid>.scope`), outside
//! this unit, so systemd's `KillMode` never reaches it: stopping it is our job, here.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tracing::{debug, error, info, warn};

use crate::apptainer::{self, InstancePaths, StateFile};
use crate::argv;
use crate::config::Service;
use crate::config::{OnFailure, ReadinessMode};
use crate::inner::{self, Inner, InnerEvent, Shutdown};
use crate::instance::{self, Exit, ExitWatch, ProcId, RunRecord};
use crate::lock;
use crate::notify::Notifier;
use crate::overlay;
use crate::state::{self, InnerSummary, Phase, Publisher};

/// Exit codes; documented in apptainer-supervisor(8).
pub mod exit {
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
    /// The service is already running: lock held, overlay in use, or a live instance of that
    /// name that this supervisor did not start.
    pub const TEMPFAIL: i32 = 75;
    /// The supervisor runs without root, and the service file asks for what needs root
    /// (`boot`, a network, the overlay image); or it could not narrow its capabilities.
    pub const NOPERM: i32 = 77;
    /// Invalid service file or host setup (including an image without a D-Bus system bus
    /// when readiness needs one).
    pub const CONFIG: i32 = 78;
    /// The container was rebooted from inside: the unit restarts it
    /// (`RestartForceExitStatus=133`, as systemd-nspawn's unit does).
    pub const REBOOTED: i32 = 133;
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    Privilege(#[from] crate::privilege::PrivilegeError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
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
    #[error("an instance named {name} is running (container pid {pid}) that this supervisor did not start; it is left alone\n  hint: stop it the way it was started (e.g. its stop.sh or `apptainer instance stop {name}`), then start this service again")]
    ForeignInstance { name: String, pid: i32 },
    #[error("apptainer instance start failed ({status}):\n{stderr}{log}")]
    StartInstance {
        status: String,
        stderr: String,
        /// What this start added to the instance's `.err` log, with a heading, or empty.
        log: String,
    },
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
            _ => "resources",
        }
    }

    pub fn exit_code(&self) -> i32 {
        use RunError::*;
        match self {
            Host(_) => exit::CONFIG,
            Network(crate::network::NetworkError::Write { .. }) => exit::CANTCREAT,
            Network(_) => exit::CONFIG,
            Lock(lock::LockError::Held { .. }) | OverlayInUse { .. } | ForeignInstance { .. } => {
                exit::TEMPFAIL
            }
            Lock(_) | Os { .. } => exit::OSERR,
            Privilege(_) => exit::NOPERM,
            OverlayNotAFile { .. } => exit::CANTCREAT,
            OverlayUnusable { .. } => exit::CONFIG,
            CreateOverlay { .. } | StartInstance { .. } | StartTimeout { .. } => exit::UNAVAILABLE,
            State(_) | NoStateFile { .. } | NotAMaster { .. } => exit::SOFTWARE,
            InstanceEnded { .. } | MasterDied { .. } => exit::INSTANCE_ENDED,
            StoppedDuringStart | PoweredOffInside { .. } => exit::OK,
            NoInnerBus { .. } => exit::CONFIG,
            Inner(_) | NotReady { .. } => exit::UNAVAILABLE,
            UnitFailed { .. } | Aborted => exit::INSTANCE_ENDED,
            RebootedInside { .. } => exit::REBOOTED,
        }
    }
}

fn os(what: impl Into<String>) -> impl FnOnce(io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Os { what, source }
}

/// Where the supervisor keeps its own runtime files: systemd's `RuntimeDirectory=`
/// (`$RUNTIME_DIRECTORY`), else `/run/apptainer-supervisor`.
pub fn default_run_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(|d| {
            // RuntimeDirectory= with several entries gives a ':'-separated list.
            let d = d.to_string_lossy().into_owned();
            PathBuf::from(d.split(':').next().unwrap_or_default())
        })
        .filter(|d| d.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/run/apptainer-supervisor"))
}

/// What was found from an earlier run, judged by the container pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// Nothing.
    Clean,
    /// Files of a dead instance: remove them.
    Stale,
    /// Our container is alive without its supervisor (the master may be gone): halt it.
    Orphan {
        container: ProcId,
        master: Option<ProcId>,
    },
    /// A live instance of that name that we did not start: never touch it.
    Foreign { pid: i32 },
}

/// Pure: decides what to do with an earlier run's traces. `now(pid)` is the process that
/// has `pid` now; `is_master(ppid)` says whether `ppid` is a live Apptainer master of this
/// instance (its cmdline is `Apptainer instance: <user> [<name>]`).
pub fn judge(
    state: Option<&StateFile>,
    record: Option<&RunRecord>,
    now: impl Fn(i32) -> Option<ProcId>,
    is_master: impl Fn(i32) -> bool,
) -> Leftover {
    if let Some(r) = record {
        if now(r.container.pid) == Some(r.container) {
            let master = Some(r.master).filter(|m| now(m.pid) == Some(*m));
            return Leftover::Orphan {
                container: r.container,
                master,
            };
        }
    }
    match state {
        // A live instance that our record does not know: someone else's (an old start.sh).
        // Apptainer's own test for a live instance is its master (instance_linux.go, ghost
        // cleanup): a pid in a state file left over from before a reboot may belong to
        // anything now, even another service's container.
        Some(s) if now(s.pid).is_some() && is_master(s.ppid) => Leftover::Foreign { pid: s.pid },
        Some(_) => Leftover::Stale,
        None if record.is_some() => Leftover::Stale,
        None => Leftover::Clean,
    }
}

/// Whether `ppid` is alive and is Apptainer's master for instance `name`.
pub fn is_master_of(ppid: i32, name: &str) -> bool {
    instance::cmdline(ppid).is_some_and(|c| master_cmdline_names(&c, name))
}

fn master_cmdline_names(cmdline: &[u8], name: &str) -> bool {
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    argv0.starts_with(apptainer::MASTER_CMDLINE_PREFIX)
        && argv0.ends_with(format!("[{name}]").as_bytes())
}

/// Everything `run` needs besides the service.
pub struct RunContext {
    pub run_dir: PathBuf,
    pub config_dir: PathBuf,
    pub paths: InstancePaths,
}

/// Entry point of `run`. Sets up what must precede the runtime, then runs the loop.
pub fn run(service: &Service, ctx: &RunContext) -> Result<(), RunError> {
    // First, before any thread exists (capability sets are per thread): refuse what needs
    // root when we lack it, then narrow our own capabilities for good.
    crate::privilege::require_root(service)?;
    crate::privilege::apply(&crate::privilege::plan())?;
    if let Some(notice) = crate::privilege::keep_capabilities_notice(service) {
        warn!("{notice}");
    }
    let env_file = crate::host::check(service, &ctx.config_dir)?;
    // From here on the paths are the resolved ones the checks saw (see host::canonicalize).
    let canonical = crate::host::canonicalize(service);
    let service = &canonical;
    // Before any thread exists and before the first child: orphans of the CLI (the master)
    // must be reparented to us.
    instance::become_subreaper().map_err(os("PR_SET_CHILD_SUBREAPER"))?;
    let _lock = lock::acquire(&ctx.run_dir, &service.name)?;
    // After the lock: a second supervisor of a running service must change nothing.
    for (path, written) in crate::network::sync(service)? {
        match written {
            crate::network::Written::Unchanged => {
                debug!(conflist = %path.display(), "network config unchanged")
            }
            crate::network::Written::Created => {
                info!(conflist = %path.display(), "network config written")
            }
            crate::network::Written::Changed(keys) => {
                info!(conflist = %path.display(), changed = %keys.join(", "), "network config rewritten")
            }
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(os("creating the event loop"))?;
    rt.block_on(async {
        let mut sup = Supervisor::new(service, ctx, env_file)?;
        let result = sup.main().await;
        sup.finish(&result);
        result
    })
}

/// The signals that stop us. SIGABRT is what systemd sends when our watchdog expires
/// (`WatchdogSignal=`): the container lives outside the unit's cgroup, so even then we
/// halt it before going. (A panic still aborts: with a handler that returns, abort(3)
/// restores the default action and raises again.)
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    abrt: tokio::signal::unix::Signal,
}

impl Signals {
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.abrt.recv() => "SIGABRT",
        }
    }
}

/// The running instance as we track it.
struct Tracked {
    container: ProcId,
    master: ProcId,
    container_fd: ExitWatch,
    master_fd: ExitWatch,
}

struct Supervisor<'a> {
    s: &'a Service,
    ctx: &'a RunContext,
    env: Vec<(OsString, OsString)>,
    notify: Notifier,
    signals: Signals,
    record_path: PathBuf,
    /// When `instance start` was run: `timeouts.start_sec` counts from here.
    started_at: Instant,
    /// The instance's address from Apptainer's state file (empty without a network).
    ip: String,
    /// `<run dir>/<name>.json`, for `status` and scripts.
    live: Publisher,
    /// The sizes of the instance's logs before `instance start`: forwarding starts there.
    log_start: crate::output::Start,
}

impl<'a> Supervisor<'a> {
    fn new(
        s: &'a Service,
        ctx: &'a RunContext,
        env_file: Vec<(String, String)>,
    ) -> Result<Self, RunError> {
        let signals = Signals {
            term: signal(SignalKind::terminate()).map_err(os("installing the SIGTERM handler"))?,
            int: signal(SignalKind::interrupt()).map_err(os("installing the SIGINT handler"))?,
            abrt: signal(SignalKind::from_raw(libc::SIGABRT))
                .map_err(os("installing the SIGABRT handler"))?,
        };
        Ok(Supervisor {
            s,
            ctx,
            env: argv::child_env(std::env::vars_os(), &env_file, s),
            notify: Notifier::from_env(),
            signals,
            record_path: RunRecord::path(&ctx.run_dir, &s.name),
            started_at: Instant::now(),
            ip: String::new(),
            live: Publisher::new(&ctx.run_dir, &s.name),
            log_start: crate::output::Start::default(),
        })
    }

    async fn main(&mut self) -> Result<(), RunError> {
        self.live.phase(Phase::Starting, "starting");
        self.clear_leftovers().await?;
        self.ensure_overlay().await?;
        let Some(t) = self.start().await? else {
            return Err(RunError::StoppedDuringStart);
        };
        let r = self.watch(t).await;
        // One PHASE=stopped entry however the watch ended, with the outcome as RESULT.
        match &r {
            Ok(()) => info!(PHASE = "stopped", RESULT = "success", "stopped"),
            Err(e) => info!(PHASE = "stopped", RESULT = e.result(), "stopped"),
        }
        r
    }

    fn status(&mut self, msg: &str) {
        debug!(status = msg, "status");
        self.notify.status(msg);
        self.live.update(|s| s.status = msg.to_owned());
    }

    /// The last word in the live state file: how this run ended.
    fn finish(&mut self, result: &Result<(), RunError>) {
        let (phase, code, error) = match result {
            Ok(()) => (Phase::Stopped, exit::OK, None),
            Err(e) if e.exit_code() == exit::OK => (Phase::Stopped, exit::OK, Some(e.to_string())),
            Err(e) => (Phase::Failed, e.exit_code(), Some(e.to_string())),
        };
        self.live.update(|s| {
            s.exit_code = Some(code);
            s.last_error = error;
            s.instance = None;
            s.master = None;
        });
        let status = match phase {
            Phase::Failed => "failed",
            _ => "stopped",
        };
        self.live.phase(phase, status);
    }

    // --- 2. leftovers -------------------------------------------------------------------

    async fn clear_leftovers(&mut self) -> Result<(), RunError> {
        let state = StateFile::read(&self.ctx.paths.state_file).unwrap_or_else(|e| {
            warn!(error = %e, "unreadable instance state file; treating it as stale");
            None
        });
        let record = RunRecord::read(&self.record_path);
        let name = self.s.name.clone();
        match judge(state.as_ref(), record.as_ref(), ProcId::live, |ppid| {
            is_master_of(ppid, &name)
        }) {
            Leftover::Clean => Ok(()),
            Leftover::Stale => {
                info!(
                    state_file = %self.ctx.paths.state_file.display(),
                    "removing leftovers of an instance that is no longer running"
                );
                // A state file still there means its master never finished its cleanup.
                if let Some(st) = state.as_ref().filter(|st| !is_master_of(st.ppid, &name)) {
                    self.release_networks(st.pid).await;
                }
                self.remove_leftovers();
                Ok(())
            }
            Leftover::Foreign { pid } => Err(RunError::ForeignInstance {
                name: self.s.name.clone(),
                pid,
            }),
            Leftover::Orphan { container, master } => {
                warn!(
                    INSTANCE_PID = container.pid,
                    master_alive = master.is_some(),
                    "found this service's container still running without its supervisor; halting it before starting fresh"
                );
                self.status("halting an orphaned instance from an earlier run");
                let container_fd = match instance::watch(&container) {
                    Ok(fd) => fd,
                    // It exited between judging and here: only its leftovers remain.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        self.remove_leftovers();
                        return Ok(());
                    }
                    Err(e) => return Err(os("pidfd_open(container)")(e)),
                };
                // A master that exits between judging and here is simply not waited for.
                let master_fd = master.and_then(|m| instance::watch(&m).ok());
                self.halt(
                    &container,
                    &container_fd,
                    master.as_ref(),
                    master_fd.as_ref(),
                    None,
                )
                .await;
                if master.is_none() {
                    self.release_networks(container.pid).await;
                }
                self.remove_leftovers();
                info!(INSTANCE_PID = container.pid, "orphaned instance halted");
                Ok(())
            }
        }
    }

    /// The CNI DEL a master that died without its cleanup never ran (see [`crate::cni`]),
    /// so that its IPAM leases are free for the next start.
    async fn release_networks(&self, container_pid: i32) {
        if self.s.networks.is_empty() {
            return;
        }
        let per_plugin = Duration::from_secs(self.s.timeouts.kill_sec.max(1));
        for (network, r) in crate::cni::release(self.s, container_pid, per_plugin).await {
            match r {
                Ok(()) => info!(
                    network = %network,
                    container_id = container_pid,
                    "released the network the dead master left (CNI DEL)"
                ),
                Err(e) => warn!(
                    network = %network,
                    container_id = container_pid,
                    error = %e,
                    "could not release the network the dead master left"
                ),
            }
        }
    }

    /// Removes the run record and, when its master is gone, Apptainer's instance directory
    /// (Apptainer's own ghost cleanup would do the same on its next `instance list`).
    fn remove_leftovers(&self) {
        let _ = std::fs::remove_file(&self.record_path);
        if let Ok(Some(st)) = StateFile::read(&self.ctx.paths.state_file) {
            if is_master_of(st.ppid, &self.s.name) {
                return;
            }
        }
        match std::fs::remove_dir_all(&self.ctx.paths.dir) {
            Ok(()) => debug!(dir = %self.ctx.paths.dir.display(), "removed instance directory"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %self.ctx.paths.dir.display(), error = %e, "cannot remove instance directory")
            }
        }
    }

    // --- 3. overlay ---------------------------------------------------------------------

    async fn ensure_overlay(&mut self) -> Result<(), RunError> {
        let path = &self.s.overlay.path;
        // A creation interrupted by a crash or SIGKILL left its temporary; we hold the
        // service lock, so no other run is creating it now.
        match overlay::remove_stale_temps(path) {
            Ok(removed) => {
                for t in removed {
                    info!(overlay = %path.display(), temporary = %t.display(), "removed the temporary of an interrupted overlay creation");
                }
            }
            Err(e) => {
                warn!(overlay = %path.display(), error = %e, "cannot clear temporaries of an interrupted overlay creation")
            }
        }
        match overlay::inspect(path).map_err(os(format!("inspecting {}", path.display())))? {
            overlay::Found::NotAFile(what) => {
                return Err(RunError::OverlayNotAFile {
                    path: path.clone(),
                    what,
                })
            }
            overlay::Found::Image { .. } => {
                if let Some(device) = overlay::attached_loop(path) {
                    return Err(RunError::OverlayInUse {
                        path: path.clone(),
                        device,
                    });
                }
                self.check_superblock(path)?;
                return Ok(());
            }
            overlay::Found::Missing => {}
        }
        info!(overlay = %path.display(), size_mib = self.s.overlay.size_mib, "creating overlay image");
        self.live.phase(Phase::CreatingOverlay, "");
        self.status(&format!(
            "creating overlay {} ({} MiB)",
            path.display(),
            self.s.overlay.size_mib
        ));
        // Built at a temporary name beside the target and moved into place only when
        // complete: a stop, a crash or a full disk never leaves a truncated overlay.img.
        let tmp = overlay::temp_path(path, std::process::id());
        let discard = |tmp: &Path| {
            let mut ext3 = tmp.as_os_str().to_owned();
            ext3.push(".ext3");
            for t in [tmp.to_owned(), PathBuf::from(ext3)] {
                let _ = std::fs::remove_file(t);
            }
        };
        let argv = argv::overlay_create(self.s, &tmp);
        // mkfs of a large image can outlast the start timeout: keep asking for more.
        let extend = Duration::from_secs(30);
        let out = match self.run_cli(&argv, Some(extend), None).await {
            Ok(out) => out,
            Err(e) => {
                discard(&tmp);
                return Err(e);
            }
        };
        match out {
            CliResult::Done(status, _) if status.success() => {
                if let Err(e) = overlay::publish(&tmp, path) {
                    discard(&tmp);
                    return Err(os(format!(
                        "moving the new overlay {} to {}",
                        tmp.display(),
                        path.display()
                    ))(e));
                }
                info!(overlay = %path.display(), "overlay image created");
                Ok(())
            }
            CliResult::Done(status, stderr) => {
                discard(&tmp);
                Err(RunError::CreateOverlay {
                    path: path.clone(),
                    status: describe(status),
                    stderr,
                })
            }
            CliResult::TimedOut => unreachable!("no deadline was given"),
        }
    }

    /// Refuses an existing image whose superblock is broken (never recreating it); warns
    /// when it is over 90% full or was not cleanly unmounted without a journal.
    fn check_superblock(&self, path: &Path) -> Result<(), RunError> {
        let sb = overlay::read_superblock(path)
            .map_err(|source| RunError::OverlayUnusable { source })?;
        let fill = sb.fill_percent();
        if fill > 90.0 {
            warn!(
                overlay = %path.display(),
                fill_percent = format!("{fill:.1}"),
                blocks_count = sb.blocks_count,
                free_blocks = sb.free_blocks,
                block_size = sb.block_size,
                "the overlay image is over 90% full"
            );
        }
        if sb.needs_recovery {
            info!(overlay = %path.display(), "the overlay's journal needs recovery; the kernel replays it at mount");
        }
        if overlay::unclean_without_journal(path) {
            warn!(overlay = %path.display(), "the overlay has no journal and was not cleanly unmounted; the kernel mounts it unchecked");
        }
        Ok(())
    }

    // --- 4. start -----------------------------------------------------------------------

    /// Starts the instance. `Ok(None)`: SIGTERM arrived during start and the half-started
    /// instance was stopped.
    async fn start(&mut self) -> Result<Option<Tracked>, RunError> {
        let argv = argv::instance_start(self.s);
        info!(PHASE = "starting-instance", argv = ?argv, "starting instance");
        self.live
            .phase(Phase::StartingInstance, "starting instance");
        self.status("starting instance");
        let p = &self.ctx.paths;
        self.log_start = crate::output::Start::now(&p.out_log, &p.err_log);
        self.started_at = Instant::now();
        self.live.update(|s| s.started_at = Some(state::unix_now()));
        // Apptainer writes why the container could not be created (a network ADD, a bind,
        // an overlay, the starter's capability check) to the instance's .err log and echoes
        // it on stderr (1.4) or stdout (1.3, discarded): keep where the log ends now, to
        // quote what this start adds when stderr does not (see `start_log_part`).
        let err_log_len = std::fs::metadata(&self.ctx.paths.err_log).map_or(0, |m| m.len());
        let deadline = self.started_at + Duration::from_secs(self.s.timeouts.start_sec);
        let out = self
            .run_cli(&argv, Some(Duration::from_secs(30)), Some(deadline))
            .await;
        let stop_requested = matches!(out, Err(RunError::StoppedDuringStart));
        let out = match out {
            Err(RunError::StoppedDuringStart) => None,
            Err(e) => return Err(e),
            Ok(o) => Some(o),
        };
        match out {
            Some(CliResult::Done(status, stderr)) if !status.success() => {
                error!(exit = %describe(status), stderr = %stderr.trim_end(), "apptainer instance start failed");
                self.cleanup_failed_start().await;
                let added = log_since(&self.ctx.paths.err_log, err_log_len);
                return Err(RunError::StartInstance {
                    status: describe(status),
                    stderr: stderr.trim_end().to_owned(),
                    log: start_log_part(&stderr, &added, &self.ctx.paths.err_log),
                });
            }
            Some(CliResult::TimedOut) => {
                self.cleanup_failed_start().await;
                return Err(RunError::StartTimeout {
                    secs: self.s.timeouts.start_sec,
                });
            }
            _ => {}
        }
        if stop_requested {
            // The CLI was left to finish so that nothing half-made is left; now undo it.
            self.cleanup_failed_start().await;
            return Ok(None);
        }
        match self.adopt() {
            Ok(t) => Ok(Some(t)),
            Err(e) => {
                // E.g. the run record could not be written (a full /run): an instance we
                // cannot track must not outlive us.
                error!(error = %e, "cannot take over the started instance; stopping it");
                self.cleanup_failed_start().await;
                Err(e)
            }
        }
    }

    /// After `instance start` returned 0: read the state file, check the master, record
    /// both processes, open their pidfds.
    fn adopt(&mut self) -> Result<Tracked, RunError> {
        let path = &self.ctx.paths.state_file;
        let st =
            StateFile::read(path)?.ok_or_else(|| RunError::NoStateFile { path: path.clone() })?;
        // Apptainer records the first address of the first network (pkg/network); without
        // one, look in the container's own network namespace.
        self.ip = if st.ip.is_empty() {
            crate::network::container_ip(st.pid).unwrap_or_default()
        } else {
            st.ip.clone()
        };
        let cmdline = instance::cmdline(st.ppid).unwrap_or_default();
        if !cmdline.starts_with(apptainer::MASTER_CMDLINE_PREFIX) {
            return Err(RunError::NotAMaster {
                ppid: st.ppid,
                path: path.clone(),
                cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
            });
        }
        let gone = |what: &str| RunError::Os {
            what: format!("{what} exited right after start"),
            source: io::Error::from_raw_os_error(libc::ESRCH),
        };
        let container = ProcId::of(st.pid).ok_or_else(|| gone("the container"))?;
        let master = ProcId::of(st.ppid).ok_or_else(|| gone("the master"))?;
        let container_fd = instance::watch(&container).map_err(os("pidfd_open(container)"))?;
        let master_fd = instance::watch(&master).map_err(os("pidfd_open(master)"))?;
        RunRecord {
            name: self.s.name.clone(),
            container,
            master,
            state_file: path.clone(),
            overlay: self.s.overlay.path.clone(),
            supervisor_pid: std::process::id(),
        }
        .write(&self.record_path)
        .map_err(os(format!("writing {}", self.record_path.display())))?;
        tracing::Span::current().record("INSTANCE_PID", container.pid);
        let ip = self.ip.clone();
        self.live.update(|s| {
            s.instance = Some(container);
            s.master = Some(master);
            s.ip = ip;
        });
        Ok(Tracked {
            container,
            master,
            container_fd,
            master_fd,
        })
    }

    /// A start that failed or was interrupted may have left an instance behind (the CLI
    /// timed out, or SIGTERM came while it worked): stop what is there.
    async fn cleanup_failed_start(&mut self) {
        if let Ok(Some(st)) = StateFile::read(&self.ctx.paths.state_file) {
            if let (Some(c), true) = (ProcId::of(st.pid), is_master_of(st.ppid, &self.s.name)) {
                let m = ProcId::of(st.ppid);
                if let Ok(cfd) = instance::watch(&c) {
                    let mfd = m.and_then(|m| instance::watch(&m).ok());
                    self.halt(&c, &cfd, m.as_ref(), mfd.as_ref(), None).await;
                }
            }
        }
        self.remove_leftovers();
    }

    // --- 5. watch -----------------------------------------------------------------------

    async fn watch(&mut self, t: Tracked) -> Result<(), RunError> {
        let pid = t.container.pid;
        info!(
            INSTANCE_PID = pid,
            PHASE = "booting",
            master_pid = t.master.pid,
            "instance running"
        );
        self.check_watchdog_setting();
        // The instance's own output → the journal; dropped (and so flushed) on every return.
        let p = &self.ctx.paths;
        let mut output = crate::output::Forwarder::new(
            &self.s.name,
            pid,
            &p.out_log,
            &p.err_log,
            self.log_start,
        );
        let watchdog = match self.notify.watchdog_interval {
            Some(d) => {
                Some(crate::notify::Ticker::new(d).map_err(os("creating the watchdog timer"))?)
            }
            None => None,
        };
        // The first ping right away, as tokio's interval did: the boot may take a while.
        if watchdog.is_some() {
            self.notify.watchdog();
        }
        let r = &self.s.readiness;
        let mut w = WatchState {
            ready: false,
            last_status: String::new(),
            inner: None,
            events: None,
            ping: None,
            shutdown: None,
            restarts: std::collections::VecDeque::new(),
            failed_now: std::collections::BTreeSet::new(),
            verdict: None,
        };
        let start_deadline = self.started_at + Duration::from_secs(self.s.timeouts.start_sec);
        // Our own start timeout decides; keep systemd's TimeoutStartSec= behind it even
        // when overlay creation or an orphan's halt came first.
        if r.mode == ReadinessMode::InnerSystemd {
            let left = start_deadline.saturating_duration_since(Instant::now());
            self.notify.extend(left + Duration::from_secs(30));
        }
        match r.mode {
            ReadinessMode::Instance => {
                w.ready = true;
                info!(
                    INSTANCE_PID = pid,
                    PHASE = "ready",
                    IP = %self.ip,
                    "ready (readiness.mode = instance: the instance is up)"
                );
                let status = self.with_ip(&format!(
                    "running: instance pid {pid} (readiness: instance up)"
                ));
                // READY=1 first (nothing may delay it), the state file right after: it is
                // written before the loop waits again, within a fraction of a millisecond.
                self.notify.ready(&status);
                self.live.update(|s| s.ready_at = Some(state::unix_now()));
                self.live.phase(Phase::Ready, &status);
            }
            ReadinessMode::InnerSystemd => {
                if !inner::image_has_dbus(Path::new(&format!("/proc/{pid}/root"))) {
                    self.stop_tracked(&t, "stopping: the image has no D-Bus system bus", None)
                        .await;
                    return Err(RunError::NoInnerBus {
                        name: self.s.name.clone(),
                    });
                }
                self.live.phase(
                    Phase::Booting,
                    &format!("booting: instance pid {pid}; waiting for its system bus"),
                );
                self.status(&format!(
                    "booting: instance pid {pid}; waiting for its system bus"
                ));
                let left = start_deadline.saturating_duration_since(Instant::now());
                let container = t.container;
                // A stop request while we wait for the bus is served at once.
                let connected = tokio::select! {
                    r = Inner::connect(pid, left, || container.is_alive()) => Some(r),
                    sig = self.signals.recv() => {
                        info!(INSTANCE_PID = pid, signal = sig, "stop requested while the container boots");
                        None
                    }
                };
                let Some(connected) = connected else {
                    self.stop_tracked(&t, "stopping: halting the container", None)
                        .await;
                    return Ok(());
                };
                match connected {
                    Ok(i) => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        tokio::spawn(inner::watch(
                            i.clone(),
                            r.required_units.clone(),
                            r.accept_degraded,
                            tx,
                        ));
                        w.inner = Some(i);
                        w.events = Some(rx);
                    }
                    Err(e) if container.is_alive() => {
                        error!(INSTANCE_PID = pid, error = %e, "cannot reach the container's systemd");
                        self.stop_tracked(
                            &t,
                            "stopping: the container's systemd cannot be reached",
                            None,
                        )
                        .await;
                        return Err(RunError::Inner(e));
                    }
                    // The container died while we waited: the loop below reports it.
                    Err(_) => {}
                }
            }
        }
        let not_ready_by = tokio::time::sleep_until(start_deadline);
        tokio::pin!(not_ready_by);
        loop {
            let flush_due = self.live.due();
            tokio::select! {
                _ = sleep_until_opt(flush_due) => self.live.flush(),
                sig = self.signals.recv() => {
                    info!(INSTANCE_PID = pid, signal = sig, "stop requested");
                    self.stop_tracked(&t, "stopping: halting the container", w.events.as_mut()).await;
                    if sig == "SIGABRT" {
                        return Err(RunError::Aborted);
                    }
                    return Ok(());
                }
                _ = output.changed() => output.pump(),
                _ = t.container_fd.readable() => {
                    return match w.shutdown {
                        Some(kind) => Err(self.shut_down_inside(&t, kind).await),
                        None => Err(self.container_ended(&t).await),
                    };
                }
                _ = t.master_fd.readable() => {
                    if let (false, Some(kind)) = (t.container.is_alive(), w.shutdown) {
                        // Its container shut down from inside; the master is done.
                        return Err(self.shut_down_inside(&t, kind).await);
                    }
                    let exit = instance::try_reap(t.master.pid);
                    let container_alive = t.container.is_alive();
                    error!(
                        INSTANCE_PID = pid,
                        PHASE = "stopping",
                        master_pid = t.master.pid,
                        EXIT_STATUS = %show_exit(exit),
                        container_alive,
                        "the Apptainer master died; its cleanup did not run"
                    );
                    // From here on we are stopping: tell systemd, so that the watchdog
                    // does not fire while the container halts.
                    self.notify.stopping("master died: halting the container");
                    self.halt(&t.container, &t.container_fd, None, None, None).await;
                    self.release_networks(t.container.pid).await;
                    self.remove_leftovers();
                    return Err(RunError::MasterDied {
                        name: self.s.name.clone(),
                        pid: t.master.pid,
                        container: if container_alive { "was halted" } else { "died with it" },
                    });
                }
                ev = recv_opt(&mut w.events) => {
                    match ev {
                        Some(ev) => {
                            if let Some(err) = self.on_inner_event(&mut w, ev, &t).await {
                                return Err(err);
                            }
                        }
                        None => w.events = None,
                    }
                }
                _ = &mut not_ready_by, if !w.ready => {
                    let status = w.verdict.as_ref().map_or_else(|| "the container's systemd was not reached".to_owned(), |v| v.status.clone());
                    error!(INSTANCE_PID = pid, status = %status, timeout_sec = self.s.timeouts.start_sec, "not ready in time");
                    self.stop_tracked(&t, &format!("stopping: not ready after {} s: {status}", self.s.timeouts.start_sec), w.events.as_mut()).await;
                    return Err(RunError::NotReady { secs: self.s.timeouts.start_sec, status });
                }
                _ = tick(&watchdog) => {
                    // Both pidfds not readable ⇒ the instance is alive, and the loop answered.
                    // Once the inner manager is reached, it must answer too (bounded).
                    match &w.inner {
                        None => self.notify.watchdog(),
                        Some(inner) if w.ping.is_none() => {
                            let (tx, rx) = oneshot::channel();
                            let inner = inner.clone();
                            let bound = self.notify.watchdog_interval.unwrap_or(Duration::from_secs(1)) / 2;
                            tokio::spawn(async move { let _ = tx.send(inner.ping(bound).await); });
                            w.ping = Some(rx);
                        }
                        Some(_) => {
                            warn!(INSTANCE_PID = pid, "the container's systemd did not answer the last ping; no WATCHDOG=1");
                        }
                    }
                }
                answered = ping_opt(&mut w.ping) => {
                    w.ping = None;
                    if answered {
                        self.notify.watchdog();
                    } else {
                        warn!(INSTANCE_PID = pid, "the container's systemd did not answer in time; no WATCHDOG=1");
                    }
                }
            }
        }
    }

    /// One event from the inner watcher. Returns an error when the service must end.
    async fn on_inner_event(
        &mut self,
        w: &mut WatchState,
        ev: InnerEvent,
        t: &Tracked,
    ) -> Option<RunError> {
        let pid = t.container.pid;
        let r = self.s.readiness.clone();
        match ev {
            ev @ (InnerEvent::Connected(_) | InnerEvent::Changed(_)) => {
                let (ev_kind, state) = match ev {
                    InnerEvent::Connected(st) => (EvKind::Connected, st),
                    InnerEvent::Changed(st) => (EvKind::Changed, st),
                    _ => unreachable!("matched above"),
                };
                let v = inner::verdict(&state, &r.required_units, r.accept_degraded);
                let summary = InnerSummary::from(&state);
                if v.ready && !w.ready {
                    // READY=1 and its STATUS= in one datagram, without a status-only one first.
                    w.ready = true;
                    let status = self.with_ip(&v.status);
                    // READY=1 first (the inner boot's end → READY is what this loop is
                    // measured on), then the state file, before the loop waits again.
                    self.notify.ready(&status);
                    self.live.update(|s| {
                        s.inner = Some(summary);
                        s.ready_at = Some(state::unix_now());
                    });
                    self.live.phase(Phase::Ready, &status);
                    w.last_status = v.status.clone();
                    info!(INSTANCE_PID = pid, PHASE = "ready", SYSTEM_STATE = %state.system_state, IP = %self.ip, status = %status, "ready");
                } else {
                    if v.status != w.last_status {
                        self.notify.status(&v.status);
                        w.last_status = v.status.clone();
                    }
                    let back = w.ready && v.ready && self.live.state.phase == Phase::Degraded;
                    let status = v.status.clone();
                    self.live.update(|s| {
                        s.inner = Some(summary);
                        s.status = status.clone();
                    });
                    if back {
                        self.live.phase(Phase::Ready, &self.with_ip(&status));
                    }
                }
                let already_failed = if matches!(ev_kind, EvKind::Connected) {
                    v.failed.clone()
                } else {
                    Vec::new()
                };
                w.verdict = Some(v);
                // A required unit that had already failed when we connected gets the
                // policy too: no change signal will ever come for it.
                for (unit, result) in already_failed {
                    w.failed_now.insert(unit.clone());
                    warn!(INSTANCE_PID = pid, INNER_UNIT = %unit, ACTIVE_STATE = "failed", RESULT = %result, "required unit already failed");
                    if let Some(err) = self.on_unit_failed(w, &unit, &result, t).await {
                        return Some(err);
                    }
                }
                None
            }
            InnerEvent::UnitChanged(unit, u) => {
                let failed = u.active_state == "failed";
                let fields = |level_warn: bool| {
                    if level_warn {
                        warn!(INSTANCE_PID = pid, INNER_UNIT = %unit, ACTIVE_STATE = %u.active_state, SUB_STATE = %u.sub_state, RESULT = %u.result, "required unit changed");
                    } else {
                        info!(INSTANCE_PID = pid, INNER_UNIT = %unit, ACTIVE_STATE = %u.active_state, SUB_STATE = %u.sub_state, RESULT = %u.result, "required unit changed");
                    }
                };
                fields(failed);
                if !failed {
                    w.failed_now.remove(&unit);
                    return None;
                }
                if w.shutdown.is_none() && w.failed_now.insert(unit.clone()) {
                    return self.on_unit_failed(w, &unit, &u.result, t).await;
                }
                None
            }
            InnerEvent::Shutdown(kind) => {
                w.shutdown = Some(kind);
                let what = kind.as_str();
                info!(
                    INSTANCE_PID = pid,
                    PHASE = "stopping",
                    shutdown = what,
                    "the container is shutting down from inside"
                );
                self.notify
                    .stopping(&format!("stopping: {what} from inside the container"));
                None
            }
            InnerEvent::Lost(why) => {
                w.events = None;
                w.inner = None;
                if t.container.is_alive() && w.shutdown.is_none() {
                    warn!(INSTANCE_PID = pid, reason = %why, "lost the container's system bus; watching the instance only");
                    self.notify.status(
                        "running: the container's system bus is gone; watching the instance only",
                    );
                }
                None
            }
        }
    }

    /// The failure policy for a required unit that reached `failed` (its own `Restart=`
    /// has given up by then: while it still works the unit is `activating/auto-restart`).
    async fn on_unit_failed(
        &mut self,
        w: &mut WatchState,
        unit: &str,
        result: &str,
        t: &Tracked,
    ) -> Option<RunError> {
        let r = &self.s.readiness;
        match r.on_failure {
            OnFailure::Ignore => None,
            OnFailure::RestartUnit => {
                let now = Instant::now();
                let window = Duration::from_secs(r.restart_window_sec);
                while w
                    .restarts
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > window)
                {
                    w.restarts.pop_front();
                }
                if (w.restarts.len() as u32) < r.max_restarts {
                    w.restarts.push_back(now);
                    warn!(
                        INNER_UNIT = %unit,
                        RESULT = %result,
                        restart = w.restarts.len(),
                        max_restarts = r.max_restarts,
                        window_sec = r.restart_window_sec,
                        "restarting failed required unit (ResetFailed + RestartUnit)"
                    );
                    let status = format!(
                        "degraded: {unit} failed ({result}); restarting it ({}/{})",
                        w.restarts.len(),
                        r.max_restarts
                    );
                    self.notify.status(&status);
                    self.live.update(|s| {
                        s.restarts += 1;
                        s.last_error = Some(format!("{unit} failed ({result})"));
                    });
                    self.live.phase(Phase::Degraded, &status);
                    if let Some(inner) = w.inner.clone() {
                        let unit = unit.to_owned();
                        tokio::spawn(async move {
                            if let Err(e) = inner.restart_unit(&unit).await {
                                warn!(INNER_UNIT = %unit, error = %e, "restarting the unit failed");
                            }
                        });
                    }
                    None
                } else {
                    error!(INNER_UNIT = %unit, RESULT = %result, max_restarts = r.max_restarts, window_sec = r.restart_window_sec, "restart budget exhausted; restarting the whole service");
                    Some(self.give_up(w, unit, result, t).await)
                }
            }
            OnFailure::RestartService => {
                error!(INNER_UNIT = %unit, RESULT = %result, "required unit failed; restarting the whole service (readiness.on_failure = restart-service)");
                Some(self.give_up(w, unit, result, t).await)
            }
        }
    }

    /// Halts the container in order and ends the service with a failure, so that the unit's
    /// `Restart=on-failure` starts it afresh.
    async fn give_up(
        &mut self,
        w: &mut WatchState,
        unit: &str,
        result: &str,
        t: &Tracked,
    ) -> RunError {
        info!(INSTANCE_PID = t.container.pid, PHASE = "stopping", INNER_UNIT = %unit, RESULT = %result, "stopping");
        self.notify.stopping(&format!(
            "stopping: {unit} failed ({result}); the service will be restarted"
        ));
        self.halt(
            &t.container,
            &t.container_fd,
            Some(&t.master),
            Some(&t.master_fd),
            w.events.as_mut(),
        )
        .await;
        self.remove_leftovers();
        RunError::UnitFailed {
            unit: unit.to_owned(),
            result: result.to_owned(),
        }
    }

    /// The container ended after a shutdown job from inside: reboot → 133 (restarted by the
    /// unit's RestartForceExitStatus=), poweroff/halt → 0.
    async fn shut_down_inside(&mut self, t: &Tracked, kind: Shutdown) -> RunError {
        let grace = Duration::from_secs(self.s.timeouts.kill_sec);
        if timeout(grace, t.master_fd.readable()).await.is_err() {
            instance::signal(&t.master, libc::SIGKILL);
            let _ = t.master_fd.readable().await;
        }
        let exit = instance::try_reap(t.master.pid);
        instance::try_reap(t.container.pid);
        self.remove_leftovers();
        info!(INSTANCE_PID = t.container.pid, EXIT_STATUS = %show_exit(exit), shutdown = kind.as_str(), "the container shut down from inside");
        match kind {
            Shutdown::Reboot => RunError::RebootedInside {
                name: self.s.name.clone(),
            },
            Shutdown::Poweroff | Shutdown::Halt => RunError::PoweredOffInside {
                name: self.s.name.clone(),
            },
        }
    }

    /// Halts the tracked instance in order (see [`Self::halt`]) after telling systemd we are
    /// stopping and why, then removes what is left of it.
    async fn stop_tracked(
        &mut self,
        t: &Tracked,
        why: &str,
        events: Option<&mut mpsc::UnboundedReceiver<InnerEvent>>,
    ) {
        info!(INSTANCE_PID = t.container.pid, PHASE = "stopping", status = %why, "stopping");
        self.notify.stopping(why);
        self.halt(
            &t.container,
            &t.container_fd,
            Some(&t.master),
            Some(&t.master_fd),
            events,
        )
        .await;
        self.remove_leftovers();
    }

    /// A status line with the instance's address, when it has one.
    fn with_ip(&self, status: &str) -> String {
        if self.ip.is_empty() {
            status.to_owned()
        } else {
            format!("{status}; ip {}", self.ip)
        }
    }

    /// `timeouts.watchdog_sec` is the watchdog the service is meant to have; the unit's
    /// `WatchdogSec=` (seen as `WATCHDOG_USEC`) is what systemd enforces, so a difference is
    /// worth a warning.
    fn check_watchdog_setting(&self) {
        let unit = self
            .notify
            .watchdog_interval
            .map_or(0, |d| (d * 2).as_secs());
        let want = self.s.timeouts.watchdog_sec;
        if unit != want {
            warn!(
                unit_watchdog_sec = unit,
                config_watchdog_sec = want,
                "the unit's WatchdogSec= differs from timeouts.watchdog_sec; the unit's value is used (set it with a drop-in)"
            );
        }
    }

    /// The container exited without being asked: collect why, let the master clean up.
    async fn container_ended(&mut self, t: &Tracked) -> RunError {
        let pid = t.container.pid;
        // The master's exit status is the container's (Apptainer re-raises its signal).
        let grace = Duration::from_secs(self.s.timeouts.kill_sec);
        let master_exit = match timeout(grace, t.master_fd.readable()).await {
            Ok(_) => instance::try_reap(t.master.pid),
            Err(_) => {
                warn!(
                    master_pid = t.master.pid,
                    "the master did not exit after its container; killing it"
                );
                instance::signal(&t.master, libc::SIGKILL);
                let _ = t.master_fd.readable().await;
                instance::try_reap(t.master.pid)
            }
        };
        // If the master died first the container became our child: reap it too.
        let container_exit = instance::try_reap(pid);
        let exit = container_exit
            .or(master_exit)
            .map_or_else(|| "unknown status".to_owned(), |e: Exit| e.to_string());
        let tail = apptainer::log_tail(&self.ctx.paths.err_log, 10);
        error!(INSTANCE_PID = pid, EXIT_STATUS = %exit, err_log_tail = %tail, "instance ended by itself");
        self.status(&format!("instance ended: {exit}"));
        self.remove_leftovers();
        RunError::InstanceEnded {
            name: self.s.name.clone(),
            pid,
            exit,
            tail: if tail.is_empty() {
                String::new()
            } else {
                format!(
                    "\nlast lines of {}:\n{tail}",
                    self.ctx.paths.err_log.display()
                )
            },
        }
    }

    // --- stop ---------------------------------------------------------------------------

    /// Orderly halt with escalation. Never returns early: when it returns, the container and
    /// the master are gone (or SIGKILLed and reaped as far as we can).
    async fn halt(
        &mut self,
        container: &ProcId,
        container_fd: &ExitWatch,
        master: Option<&ProcId>,
        master_fd: Option<&ExitWatch>,
        mut events: Option<&mut mpsc::UnboundedReceiver<InnerEvent>>,
    ) {
        let to = self.s.timeouts;
        let stop = Duration::from_secs(to.stop_sec);
        let kill = Duration::from_secs(to.kill_sec);
        // An orphan halted before our own start is not this run stopping.
        if self.live.state.phase != Phase::Starting {
            self.live
                .phase(Phase::Stopping, "stopping: halting the container");
        }
        // Room for the orderly halt plus both escalation steps.
        self.notify.extend(stop + kill * 2 + Duration::from_secs(5));
        let deadline = Instant::now() + stop;
        let sig = instance::sig_halt();
        let notify = self.notify.clone();
        let halted = async {
            // The init of a PID namespace drops a signal it has no handler for yet: wait
            // (bounded) until systemd has installed its handlers, then send.
            let mut sent = false;
            let mut last = String::new();
            let mut last_sent: Option<Instant> = None;
            loop {
                if !sent && instance::catches(container.pid, sig) {
                    sent = instance::signal(container, sig);
                    info!(
                        INSTANCE_PID = container.pid,
                        "sent SIGRTMIN+3 (halt) to the container's init"
                    );
                }
                if instance::is_stopped(container.pid) {
                    // SIGSTOPped (or traced): it cannot halt in order, however long we wait.
                    warn!(
                        INSTANCE_PID = container.pid,
                        "the container's init is stopped (T state); escalating at once"
                    );
                    return false;
                }
                let wait = if sent {
                    Duration::from_secs(5)
                } else {
                    Duration::from_millis(50)
                };
                tokio::select! {
                    _ = container_fd.readable() => return true,
                    ev = recv_opt_ref(&mut events) => match ev {
                        // While the inside shuts down in order, say how far it is.
                        Some(InnerEvent::Changed(st)) | Some(InnerEvent::Connected(st)) => {
                            // Hundreds of job changes in a few ms while the inside stops:
                            // a person reads a few updates a second, not each of them.
                            let msg = format!("stopping: {} jobs left inside", st.jobs);
                            let due = last_sent.is_none_or(|t| t.elapsed() >= Duration::from_millis(200));
                            if msg != last && due {
                                notify.status(&msg);
                                last = msg;
                                last_sent = Some(Instant::now());
                            }
                        }
                        Some(_) => {}
                        None => events = None,
                    },
                    _ = tokio::time::sleep(wait) => {
                        if sent {
                            // Keep systemd's stop timeout ahead of us while the inside stops.
                            let left = deadline.saturating_duration_since(Instant::now());
                            notify.extend(left + kill * 2 + Duration::from_secs(5));
                        }
                    }
                }
            }
        };
        if !matches!(timeout(stop, halted).await, Ok(true)) {
            warn!(
                INSTANCE_PID = container.pid,
                timeout_sec = to.stop_sec,
                "the container did not halt in time; forcing it (apptainer instance stop -F, then SIGKILL)"
            );
            self.status("stopping: forcing the container down");
            // Each escalation step gets its own window (instance stop -F, SIGKILL, the
            // master's cleanup), so systemd's stop timeout stays ahead of us.
            self.notify.extend(kill * 3 + Duration::from_secs(5));
            let argv = argv::instance_stop_force(self.s);
            let m = master.zip(master_fd);
            let _ = self
                .run_cli_reaping(&argv, None, Some(Instant::now() + kill), m)
                .await;
            if timeout(kill, container_fd.readable()).await.is_err() {
                self.notify.extend(kill * 2 + Duration::from_secs(5));
                instance::signal(container, libc::SIGKILL);
                let _ = timeout(kill, container_fd.readable()).await;
            }
        }
        // The master cleans up after its container (CNI DEL, loop device, state file).
        if let (Some(m), Some(mfd)) = (master, master_fd) {
            if timeout(kill, mfd.readable()).await.is_err() {
                warn!(
                    master_pid = m.pid,
                    "the master did not finish its cleanup in time; killing it"
                );
                instance::signal(m, libc::SIGKILL);
                let _ = timeout(kill, mfd.readable()).await;
            }
            let exit = instance::try_reap(m.pid);
            info!(master_pid = m.pid, EXIT_STATUS = %show_exit(exit), "master exited");
        }
        instance::try_reap(container.pid);
    }

    // --- running the CLI ----------------------------------------------------------------

    /// Runs one apptainer command to completion, its stderr captured. `extend`: send
    /// EXTEND_TIMEOUT_USEC at that interval while it runs. `deadline`: kill it then.
    /// A stop request while it runs is remembered and returned as `StoppedDuringStart`
    /// after the command finished, so that nothing is left half-made.
    async fn run_cli(
        &mut self,
        argv: &[OsString],
        extend: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<CliResult, RunError> {
        self.run_cli_reaping(argv, extend, deadline, None).await
    }

    /// [`Self::run_cli`], reaping `master` as soon as it exits. `apptainer instance stop`
    /// waits until `kill(ppid, 0)` fails, which a zombie never makes it do: the master is
    /// our child (we are its subreaper), so we must reap it while the CLI waits.
    async fn run_cli_reaping(
        &mut self,
        argv: &[OsString],
        extend: Option<Duration>,
        deadline: Option<Instant>,
        master: Option<(&ProcId, &ExitWatch)>,
    ) -> Result<CliResult, RunError> {
        let mut reaped = master.is_none();
        let mut child = apptainer::command(argv, &self.env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(os(format!("running {}", Path::new(&argv[0]).display())))?;
        let pid = child.id() as i32;
        let fd = instance::watch_child(pid).map_err(os("pidfd_open"))?;
        let stderr: OwnedFd = child.stderr.take().expect("stderr was piped").into();
        let mut stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr)
            .map_err(os("reading stderr"))?;
        let mut err_buf = Vec::new();
        let mut stop_requested = false;
        let mut timed_out = false;
        let mut extend_tick = extend.map(|d| {
            self.notify.extend(d * 2);
            tokio::time::interval_at(Instant::now() + d, d)
        });
        let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
        let kill_at = tokio::time::sleep_until(deadline.unwrap_or(far));
        tokio::pin!(kill_at);
        let mut stderr_open = true;
        let mut chunk = [0u8; 4096];
        loop {
            tokio::select! {
                _ = fd.readable() => break,
                _ = async { master.expect("guarded by !reaped").1.readable().await }, if !reaped => {
                    if let Some((m, _)) = master {
                        let exit = instance::try_reap(m.pid);
                        debug!(master_pid = m.pid, exit = %show_exit(exit), "master exited while apptainer ran");
                    }
                    reaped = true;
                }
                n = stderr.read(&mut chunk), if stderr_open => match n {
                    Ok(0) | Err(_) => stderr_open = false,
                    Ok(n) => if err_buf.len() < 64 * 1024 { err_buf.extend_from_slice(&chunk[..n]) },
                },
                sig = self.signals.recv() => {
                    info!(signal = sig, "stop requested while apptainer runs; stopping once it returns");
                    stop_requested = true;
                }
                _ = &mut kill_at, if !timed_out => {
                    warn!(pid, "apptainer command exceeded its deadline; killing it");
                    // SAFETY: kill(2) on our own child, which has not been reaped yet.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    timed_out = true;
                }
                _ = tick_interval(&mut extend_tick) => {
                    if let Some(d) = extend { self.notify.extend(d * 2); }
                }
            }
        }
        // Drain what is left in the pipe (the writer has exited).
        while stderr_open {
            match stderr.try_read(&mut chunk) {
                Ok(0) | Err(_) => stderr_open = false,
                Ok(n) => err_buf.extend_from_slice(&chunk[..n]),
            }
        }
        let status = child.wait().map_err(os("waiting for apptainer"))?;
        if stop_requested {
            return Err(RunError::StoppedDuringStart);
        }
        if timed_out {
            return Ok(CliResult::TimedOut);
        }
        Ok(CliResult::Done(
            status,
            String::from_utf8_lossy(&err_buf).into_owned(),
        ))
    }
}

#[derive(Clone, Copy)]
enum EvKind {
    Connected,
    Changed,
}

/// What the watch loop knows beyond the two processes.
struct WatchState {
    ready: bool,
    last_status: String,
    inner: Option<Inner>,
    events: Option<mpsc::UnboundedReceiver<InnerEvent>>,
    ping: Option<oneshot::Receiver<bool>>,
    /// A shutdown job seen inside (reboot/poweroff/halt) that we did not ask for.
    shutdown: Option<Shutdown>,
    /// When required units were restarted, within the window.
    restarts: std::collections::VecDeque<Instant>,
    verdict: Option<inner::Verdict>,
    /// Required units whose failure was acted on and that have not left `failed` since.
    /// systemd sends the Unit and Service properties in separate signals, so one failure
    /// shows up more than once (e.g. `Result` reset by ResetFailed while ActiveState still
    /// reads `failed`): each failure must count once against the restart budget.
    failed_now: std::collections::BTreeSet<String>,
}

async fn recv_opt(rx: &mut Option<mpsc::UnboundedReceiver<InnerEvent>>) -> Option<InnerEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_opt_ref(
    rx: &mut Option<&mut mpsc::UnboundedReceiver<InnerEvent>>,
) -> Option<InnerEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn ping_opt(rx: &mut Option<oneshot::Receiver<bool>>) -> bool {
    match rx {
        Some(rx) => rx.await.unwrap_or(false),
        None => std::future::pending().await,
    }
}

enum CliResult {
    Done(std::process::ExitStatus, String),
    TimedOut,
}

/// What was appended to `path` after byte `from` (at most its last 16 KiB), trimmed.
fn log_since(path: &Path, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    let read = std::fs::File::open(path).and_then(|mut f| {
        let end = f.metadata()?.len();
        // A log rotated or truncated in between is read from its start.
        let from = if end < from { 0 } else { from };
        f.seek(SeekFrom::Start(from.max(end.saturating_sub(16 * 1024))))?;
        f.read_to_end(&mut buf)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&buf).trim().to_owned(),
        Err(_) => String::new(),
    }
}

/// The `log` part of [`RunError::StartInstance`]: what this start added to the `.err` log
/// (`added`), quoted once. After a failed start Apptainer echoes those lines itself
/// (`starterInstance`): on stdout up to 1.3 (internal/pkg/runtime/launch/launcher_linux.go:1253
/// at v1.3.6, `fmt.Println`), which the supervisor discards, so they are quoted from the
/// log; on stderr since 1.4 (launcher_linux.go:1254 at v1.4.5, `fmt.Fprintln(os.Stderr, ...)`),
/// already in the message, so only the log's path is named.
fn start_log_part(stderr: &str, added: &str, err_log: &Path) -> String {
    if added.is_empty() {
        String::new()
    } else if stderr.contains(added) {
        format!("\n(Apptainer quoted {} above)", err_log.display())
    } else {
        format!("\n{}:\n{added}", err_log.display())
    }
}

/// How a process ended, for log fields ("exit status 0", "killed by signal 9 (SIGKILL)").
fn show_exit(e: Option<Exit>) -> String {
    e.map_or_else(|| "not reaped".to_owned(), |e| e.to_string())
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c).to_string(),
        (None, Some(s)) => Exit::Signal(s).to_string(),
        _ => status.to_string(),
    }
}

/// Sleeps until `at`; never wakes without one (no timer while nothing is pending).
async fn sleep_until_opt(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn tick(t: &Option<crate::notify::Ticker>) {
    match t {
        Some(t) => t.tick().await,
        None => std::future::pending::<()>().await,
    }
}

async fn tick_interval(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(pid: i32) -> StateFile {
        StateFile {
            pid,
            ppid: 10,
            name: "x".into(),
            user: "root".into(),
            image: String::new(),
            ip: String::new(),
            log_err_path: String::new(),
            log_out_path: String::new(),
            cgroup: true,
        }
    }

    fn rec(pid: i32, start: u64) -> RunRecord {
        RunRecord {
            name: "x".into(),
            container: ProcId {
                pid,
                start_time: start,
            },
            master: ProcId {
                pid: 10,
                start_time: 5,
            },
            state_file: PathBuf::new(),
            overlay: PathBuf::new(),
            supervisor_pid: 1,
        }
    }

    /// Processes alive now: (pid, start time).
    fn procs(alive: &'static [(i32, u64)]) -> impl Fn(i32) -> Option<ProcId> {
        move |pid| {
            alive
                .iter()
                .find(|(p, _)| *p == pid)
                .map(|&(pid, start_time)| ProcId { pid, start_time })
        }
    }

    #[test]
    fn master_cmdline_must_name_the_instance() {
        assert!(master_cmdline_names(
            b"Apptainer instance: root [ood001]\0/x",
            "ood001"
        ));
        assert!(!master_cmdline_names(
            b"Apptainer instance: root [ood002]\0",
            "ood001"
        ));
        assert!(!master_cmdline_names(
            b"/usr/sbin/httpd\0[ood001]",
            "ood001"
        ));
    }

    #[test]
    fn state_file_from_before_a_reboot_is_stale_even_if_its_pid_lives() {
        // The pid now belongs to something else and no master of this instance lives.
        assert_eq!(
            judge(Some(&st(20)), None, procs(&[(20, 3)]), |_| false),
            Leftover::Stale
        );
    }

    #[test]
    fn log_since_reads_only_what_this_start_added() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("x.err");
        std::fs::write(&log, "old run\n").unwrap();
        let from = std::fs::metadata(&log).unwrap().len();
        std::fs::write(&log, "old run\nFATAL:   network setup failed\n").unwrap();
        assert_eq!(log_since(&log, from), "FATAL:   network setup failed");
        assert_eq!(
            log_since(&log, 10_000),
            "old run\nFATAL:   network setup failed"
        );
        assert_eq!(log_since(&d.path().join("none"), 0), "");
    }

    #[test]
    fn a_failed_starts_log_is_quoted_once() {
        let log = Path::new("/root/.apptainer/instances/logs/h/root/x.err");
        let added = "ABORT  : Requesting capability set 0x1 while permitted capability set is 0x0";
        // 1.3: the log went to stdout (discarded), stderr has only Apptainer's own error.
        let v13 = "FATAL:   while executing starter: failed to start instance: exit status 255\n";
        assert_eq!(
            start_log_part(v13, added, log),
            format!("\n{}:\n{added}", log.display())
        );
        // 1.4: stderr has the log's lines (and a blank line) before its own error.
        let v14 = format!("{added}\n\n{v13}");
        let part = start_log_part(&v14, added, log);
        assert_eq!(
            part,
            format!("\n(Apptainer quoted {} above)", log.display())
        );
        assert_eq!(
            format!("{v14}{part}")
                .matches("Requesting capability set")
                .count(),
            1
        );
        assert_eq!(start_log_part(v13, "", log), "");
    }

    #[test]
    fn nothing_is_clean() {
        assert_eq!(judge(None, None, procs(&[]), |_| true), Leftover::Clean);
    }

    #[test]
    fn dead_container_is_stale() {
        assert_eq!(
            judge(Some(&st(20)), Some(&rec(20, 7)), procs(&[]), |_| true),
            Leftover::Stale
        );
        assert_eq!(
            judge(None, Some(&rec(20, 7)), procs(&[]), |_| true),
            Leftover::Stale
        );
    }

    #[test]
    fn our_container_alive_is_an_orphan_even_with_master_gone() {
        let got = judge(Some(&st(20)), Some(&rec(20, 7)), procs(&[(20, 7)]), |_| {
            true
        });
        assert_eq!(
            got,
            Leftover::Orphan {
                container: ProcId {
                    pid: 20,
                    start_time: 7
                },
                master: None
            }
        );
    }

    #[test]
    fn reused_pid_is_not_ours() {
        // Same pid, other start time, and it is no container init: a reused pid.
        assert_eq!(
            judge(Some(&st(20)), Some(&rec(20, 7)), procs(&[(20, 99)]), |_| {
                false
            }),
            Leftover::Stale
        );
    }

    #[test]
    fn unknown_live_instance_is_foreign() {
        assert_eq!(
            judge(Some(&st(20)), None, procs(&[(20, 3)]), |_| true),
            Leftover::Foreign { pid: 20 }
        );
    }
}
