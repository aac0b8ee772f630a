//! `run NAME`: a service's life, from setup to exit.
//!
//! Order of work (each step reports its status through [`report`]):
//! 1. fork-sensitive setup before the runtime exists: privilege, subreaper, the service lock;
//!    the service is resolved, host-checked and planned (the [`Plan`] `check` prints);
//! 2. [`leftovers`] of an earlier run are judged by the *container* pid;
//! 3. the [`overlay`] is created if missing (never touched otherwise) and must not be
//!    attached to a loop device already;
//! 4. [`start`]: `apptainer instance start` runs from the plan's argv (no shell, [`child`]);
//!    the state file names the container init and the master, recorded with their start
//!    times and watched through pidfds;
//! 5. [`watch`]: what the running instance does is turned into events; [`policy`] decides
//!    what to do about each, and [`end`] ends the run as it decided ([`halt`] stops the
//!    container in order).
//!
//! Every phase waits through [`event_loop`], which alone owns the signals and holds the
//! crate's one `select!`: signals first, then the pidfds, then what the phase waits on (a
//! CLI command's exit and stderr, the bus connection, the instance's events and timers,
//! the halt's deadlines); each phase loops over it and nothing else waits on its own. A
//! stop that comes while a call must finish is noted there and handed on once it returns.
//! Apptainer moves the container into a cgroup of its own
//! (`apptainer-<pid>.scope`), outside this unit, so systemd's `KillMode` never reaches it:
//! stopping it is our job, here.

pub(crate) mod backoff;
mod child;
mod end;
pub(crate) mod event_loop;
mod halt;
mod leftovers;
mod overlay;
mod policy;
mod report;
mod start;
mod watch;

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;

use std::time::Instant;
use tracing::{debug, info, warn};

use crate::config::Service;
use crate::exit::{self, RunError};
use crate::host::{self, cni_dir, lock, privilege};
use crate::os::apptainer::InstancePaths;
use crate::os::instance::{self, Exit, ExitWatch, ProcId, RunRecord};
use crate::os::live::{Phase, Publisher};
use crate::os::notify::Notifier;
use crate::plan::{argv, Plan};
use event_loop::Signals;
use report::Notice;

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
    privilege::require_root(service)?;
    privilege::apply(&privilege::plan())?;
    if let Some(notice) = privilege::keep_capabilities_notice(service) {
        warn!("{notice}");
    }
    // Resolved first, then checked and planned: what the checks saw is what runs (see
    // host::canonicalize), and the plan is the one `check` prints.
    let canonical = host::canonicalize(service);
    let checked = host::check(&canonical, &ctx.config_dir)?;
    for w in &checked.warnings {
        warn!("{w}");
    }
    let plan = Plan::build(&canonical, &ctx.run_dir, &ctx.paths, Some(&checked));
    let service = &*canonical;
    // Before any thread exists and before the first child: orphans of the CLI (the master)
    // must be reparented to us.
    instance::become_subreaper().map_err(os("PR_SET_CHILD_SUBREAPER"))?;
    let _lock = lock::acquire(&ctx.run_dir, &service.name)?;
    // After the lock: a second supervisor of a running service must change nothing.
    for (path, written) in cni_dir::sync(service)? {
        match written {
            cni_dir::Written::Unchanged => {
                debug!(conflist = %path.display(), "network config unchanged")
            }
            cni_dir::Written::Created => {
                info!(conflist = %path.display(), "network config written")
            }
            cni_dir::Written::Changed(keys) => {
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
        let mut sup = Supervisor::new(service, ctx, plan)?;
        sup.host_warnings = checked.warnings.iter().map(|w| w.to_string()).collect();
        let result = sup.main().await;
        sup.finish(&result);
        result
    })
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
    /// What runs: the start argv and Apptainer's environment come from here.
    plan: Plan,
    env: Vec<(OsString, OsString)>,
    notify: Notifier,
    signals: Signals,
    record_path: PathBuf,
    /// When `instance start` was run: `timeouts.start_sec` counts from here.
    started_at: Instant,
    /// The instance's address from Apptainer's state file (empty without a network).
    ip: String,
    /// The inner manager's last `SystemState`, for the journal.
    system_state: String,
    /// `<run dir>/<name>.json`, for `status` and scripts.
    live: Publisher,
    /// The sizes of the instance's logs before `instance start`: forwarding starts there.
    log_start: crate::os::output::Start,
    /// Failed starts in a row (`<run dir>/<name>.backoff`, see [`backoff`]).
    backoff: backoff::Record,
    backoff_path: PathBuf,
    /// What the host checks warned about, said once in STATUS= and kept for `status`.
    host_warnings: Vec<String>,
    /// The claim on the overlay (host::overlay_lock), held for the run's life.
    claim: Option<crate::host::overlay_lock::Claim>,
}

impl<'a> Supervisor<'a> {
    fn new(s: &'a Service, ctx: &'a RunContext, plan: Plan) -> Result<Self, RunError> {
        let notify = Notifier::from_env();
        let signals = Signals::install(notify.clone()).map_err(|(what, e)| os(what)(e))?;
        Ok(Supervisor {
            s,
            ctx,
            env: argv::child_env(std::env::vars_os(), &plan.env, s),
            plan,
            notify,
            signals,
            record_path: RunRecord::path(&ctx.run_dir, &s.name),
            started_at: Instant::now(),
            ip: String::new(),
            system_state: String::new(),
            live: Publisher::new(&ctx.run_dir, &s.name),
            log_start: crate::os::output::Start::default(),
            backoff: backoff::read(&backoff::path(&ctx.run_dir, &s.name)),
            backoff_path: backoff::path(&ctx.run_dir, &s.name),
            host_warnings: Vec::new(),
            claim: None,
        })
    }

    async fn main(&mut self) -> Result<(), RunError> {
        self.report(Notice::Status, Some(Phase::Starting), "starting");
        if !self.host_warnings.is_empty() {
            // Once, and in the live state file for `status`: the journal has them in full.
            let first: Vec<&str> = self
                .host_warnings
                .iter()
                .map(|w| w.lines().next().unwrap_or_default())
                .collect();
            let warnings = self.host_warnings.clone();
            self.live.update(|s| s.warnings = warnings);
            self.status(&format!(
                "starting with {} warning(s): {}",
                first.len(),
                first.join("; ")
            ));
        }
        // After each step: a stop the loop noted while a command ran (an orphan's forced
        // stop, the overlay's creation, the instance's start, which then undid what it made
        // and returned `None`) ends the run there.
        // A stop that came between two waits (while no phase listened) is received here,
        // before the next step begins, never after it started something.
        self.clear_leftovers().await?;
        if self.signals.stop_pending("the back-off") {
            return Err(RunError::StoppedDuringStart);
        }
        // After earlier starts failed in a row (69/71/75), wait before trying again.
        self.back_off().await?;
        if self.signals.stop_pending("the overlay") {
            return Err(RunError::StoppedDuringStart);
        }
        self.ensure_overlay().await?;
        if self.signals.stop_pending("the instance start") {
            return Err(RunError::StoppedDuringStart);
        }
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

    /// A status line that begins no new phase (see [`report`]).
    fn status(&mut self, msg: &str) {
        self.report(Notice::Status, None, msg);
    }

    /// The last word in the live state file: how this run ended.
    fn finish(&mut self, result: &Result<(), RunError>) {
        self.count_failed_start(result);
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
        // The loop is over: a status the rate held back goes out now.
        self.notify.finish();
    }
}

/// How a process ended, for log fields ("exit status 0", "killed by signal 9 (SIGKILL)").
fn show_exit(e: Option<Exit>) -> String {
    e.map_or_else(|| "not reaped".to_owned(), |e| e.to_string())
}
