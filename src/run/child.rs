//! Running one Apptainer CLI command to completion as a child: stderr captured, its
//! deadline and EXTEND_TIMEOUT_USEC kept, a stop request noted until it returns.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{os, show_exit, Supervisor};
use crate::exit::RunError;
use crate::os::apptainer;
use crate::os::instance::{self, Exit, ExitWatch, ProcId};
use crate::os::notify::Notifier;

impl Supervisor<'_> {
    /// Runs one apptainer command to completion, its stderr captured. `extend`: send
    /// EXTEND_TIMEOUT_USEC at that interval while it runs. `deadline`: kill it then.
    /// A stop request while it runs is noted (see [`Signals::note`](super::event_loop::Signals))
    /// and left to the caller once the command finished, so that nothing is left half-made.
    pub(super) async fn run_cli(
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
    pub(super) async fn run_cli_reaping(
        &mut self,
        argv: &[OsString],
        extend: Option<Duration>,
        deadline: Option<Instant>,
        master: Option<(&ProcId, &ExitWatch)>,
    ) -> Result<CliResult, RunError> {
        let mut child = apptainer::command(argv, &self.env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(os(format!("running {}", Path::new(&argv[0]).display())))?;
        let pid = child.id() as i32;
        let fd = instance::watch_child(pid).map_err(os("pidfd_open"))?;
        let stderr: OwnedFd = child.stderr.take().expect("stderr was piped").into();
        let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr)
            .map_err(os("reading stderr"))?;
        let op = wait_cli(
            pid,
            fd,
            stderr,
            self.notify.clone(),
            extend,
            deadline,
            master,
        );
        // The command is left to finish even when a stop comes: nothing half-made is left.
        let (err_buf, timed_out) = self.signals.call("apptainer runs", op).await;
        let status = child.wait().map_err(os("waiting for apptainer"))?;
        if timed_out {
            return Ok(CliResult::TimedOut);
        }
        Ok(CliResult::Done(
            status,
            String::from_utf8_lossy(&err_buf).into_owned(),
        ))
    }
}

/// The command `pid` (its pidfd `fd`) to its exit: its stderr read (up to 64 KiB), killed at
/// `deadline`, EXTEND_TIMEOUT_USEC sent every `extend`, `master` reaped when it exits. No
/// signal is handled here: the event loop drives this (`Signals::call`). Returns stderr and whether the
/// deadline killed it.
async fn wait_cli(
    pid: i32,
    fd: ExitWatch,
    mut stderr: tokio::net::unix::pipe::Receiver,
    notify: Notifier,
    extend: Option<Duration>,
    deadline: Option<Instant>,
    master: Option<(&ProcId, &ExitWatch)>,
) -> (Vec<u8>, bool) {
    let mut reaped = master.is_none();
    let mut err_buf = Vec::new();
    let mut timed_out = false;
    let mut extend_tick = extend.map(|d| {
        notify.extend(d * 2);
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
            _ = &mut kill_at, if !timed_out => {
                warn!(pid, "apptainer command exceeded its deadline; killing it");
                // Our own child, not reaped yet: the pid is still its own.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                timed_out = true;
            }
            _ = tick_interval(&mut extend_tick) => {
                if let Some(d) = extend { notify.extend(d * 2); }
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
    (err_buf, timed_out)
}

pub(super) enum CliResult {
    Done(std::process::ExitStatus, String),
    TimedOut,
}

pub(super) fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c).to_string(),
        (None, Some(s)) => Exit::Signal(s).to_string(),
        _ => status.to_string(),
    }
}

pub(super) async fn tick_interval(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}
