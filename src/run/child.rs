//! Running one Apptainer CLI command to completion as a child: stderr captured, its
//! deadline and EXTEND_TIMEOUT_USEC kept, a stop request noted until it returns.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::event_loop::{self, earliest, Waits, Wake};
use super::{os, show_exit, Supervisor};
use crate::exit::RunError;
use crate::os::apptainer;
use crate::os::instance::{self, Exit, ExitWatch, ProcId};

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
        let (err_buf, timed_out) = self
            .wait_cli(pid, &fd, stderr, extend, deadline, master)
            .await;
        let status = child.wait().map_err(os("waiting for apptainer"))?;
        if timed_out {
            return Ok(CliResult::TimedOut);
        }
        Ok(CliResult::Done(
            status,
            String::from_utf8_lossy(&err_buf).into_owned(),
        ))
    }

    /// The command `pid` (its pidfd `fd`) to its exit, through the event loop: its stderr
    /// read (up to 64 KiB), killed at `deadline`, EXTEND_TIMEOUT_USEC sent every `extend`,
    /// `master` reaped when it exits. The command is left to finish even when a stop comes
    /// (noted for the caller): nothing half-made is left. Returns stderr and whether the
    /// deadline killed it.
    async fn wait_cli(
        &mut self,
        pid: i32,
        fd: &ExitWatch,
        stderr: tokio::net::unix::pipe::Receiver,
        extend: Option<Duration>,
        deadline: Option<Instant>,
        mut master: Option<(&ProcId, &ExitWatch)>,
    ) -> (Vec<u8>, bool) {
        let mut err_buf = Vec::new();
        let mut timed_out = false;
        let mut next_extend = extend.map(|d| {
            self.notify.extend(d * 2);
            Instant::now() + d
        });
        let mut stderr = Some(stderr);
        loop {
            let waits: Waits = Waits {
                master: master.map(|(_, fd)| fd),
                child: Some(fd),
                stderr: stderr.as_ref(),
                at: earliest([next_extend, deadline.filter(|_| !timed_out)]),
                ..Waits::default()
            };
            match event_loop::next(&mut self.signals, waits).await {
                Wake::Signal(sig) => self.signals.note(sig, "apptainer runs"),
                Wake::ChildExited => break,
                Wake::MasterExited => {
                    if let Some((m, _)) = master.take() {
                        let exit = instance::try_reap(m.pid);
                        debug!(master_pid = m.pid, exit = %show_exit(exit), "master exited while apptainer ran");
                    }
                }
                Wake::Stderr => {
                    if let Some(pipe) = &stderr {
                        if !read_some(pipe, &mut err_buf) {
                            stderr = None;
                        }
                    }
                }
                Wake::Deadline => {
                    let now = Instant::now();
                    if deadline.is_some_and(|d| d <= now) && !timed_out {
                        warn!(pid, "apptainer command exceeded its deadline; killing it");
                        // Our own child, not reaped yet: the pid is still its own.
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        timed_out = true;
                    }
                    if let (Some(at), Some(d)) = (next_extend, extend) {
                        if at <= now {
                            self.notify.extend(d * 2);
                            next_extend = Some(now + d);
                        }
                    }
                }
                _ => {}
            }
        }
        // Drain what is left in the pipe (the writer has exited).
        if let Some(pipe) = &stderr {
            while read_some(pipe, &mut err_buf) {}
        }
        (err_buf, timed_out)
    }
}

/// Reads what `pipe` has now into `buf` (kept to 64 KiB); false once it is closed.
fn read_some(pipe: &tokio::net::unix::pipe::Receiver, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match pipe.try_read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                if buf.len() < 64 * 1024 {
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
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
