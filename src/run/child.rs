//! Running one Apptainer CLI command to completion as a child: stderr captured, its
//! deadline and EXTEND_TIMEOUT_USEC kept, a stop request noted until it returns.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
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
        self.run_cli_with(argv, extend, deadline, master, false)
            .await
    }

    /// [`Self::run_cli`] for a command whose work is thrown away when a stop comes (the
    /// overlay's creation, in a private directory that is never published then): it runs
    /// in a process group of its own, and the whole group is killed at `deadline` or as
    /// soon as a stop comes, so that its children (mkfs) go with it.
    pub(super) async fn run_cli_abandoning(
        &mut self,
        argv: &[OsString],
        extend: Option<Duration>,
        deadline: Instant,
    ) -> Result<CliResult, RunError> {
        self.run_cli_with(argv, extend, Some(deadline), None, true)
            .await
    }

    async fn run_cli_with(
        &mut self,
        argv: &[OsString],
        extend: Option<Duration>,
        deadline: Option<Instant>,
        master: Option<(&ProcId, &ExitWatch)>,
        abandon_on_stop: bool,
    ) -> Result<CliResult, RunError> {
        let mut cmd = apptainer::command(argv, &self.env);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if abandon_on_stop {
            cmd.process_group(0);
        }
        let mut child = cmd
            .spawn()
            .map_err(os(format!("running {}", Path::new(&argv[0]).display())))?;
        let pid = child.id() as i32;
        let fd = instance::watch_child(pid).map_err(os("pidfd_open"))?;
        let stderr: OwnedFd = child.stderr.take().expect("stderr was piped").into();
        let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr)
            .map_err(os("reading stderr"))?;
        let w = Kill {
            pid,
            group: abandon_on_stop,
            on_stop: abandon_on_stop,
            grace: Duration::from_secs(self.s.timeouts.kill_sec.max(1)),
        };
        let (err_buf, ended) = self
            .wait_cli(&w, &fd, stderr, extend, deadline, master)
            .await;
        if ended == Ended::Abandoned {
            // Never waited on: a process in uninterruptible sleep (mkfs on a hung NFS
            // server) exits when the kernel lets it; as its subreaper we reap it then or
            // at exit.
            return Ok(CliResult::TimedOut { exited: false });
        }
        let status = child.wait().map_err(os("waiting for apptainer"))?;
        if ended == Ended::Killed {
            return Ok(CliResult::TimedOut { exited: true });
        }
        // Apptainer's stderr quotes the container (its .err log, echoed since 1.4): the
        // journal and a terminal get it line by line, escaped.
        Ok(CliResult::Done(
            status,
            crate::os::sanitize::lines(&String::from_utf8_lossy(&err_buf), STDERR_LINE),
        ))
    }

    /// The command `pid` (its pidfd `fd`) to its exit, through the event loop: its stderr
    /// read (up to 64 KiB), killed at `deadline` (and at a stop when `k.on_stop`),
    /// EXTEND_TIMEOUT_USEC sent every `extend`, `master` reaped when it exits. Otherwise the
    /// command is left to finish even when a stop comes (noted for the caller): nothing
    /// half-made is left. Once killed it has `k.grace` to exit, after which it is
    /// abandoned. Returns stderr and how it ended.
    async fn wait_cli(
        &mut self,
        k: &Kill,
        fd: &ExitWatch,
        stderr: tokio::net::unix::pipe::Receiver,
        extend: Option<Duration>,
        deadline: Option<Instant>,
        mut master: Option<(&ProcId, &ExitWatch)>,
    ) -> (Vec<u8>, Ended) {
        let pid = k.pid;
        let mut err_buf = Vec::new();
        // When it was killed, the time it has left to exit.
        let mut give_up: Option<Instant> = None;
        let mut next_extend = extend.map(|d| {
            self.notify.extend(d * 2);
            Instant::now() + d
        });
        let mut stderr = Some(stderr);
        let ended = loop {
            let waits: Waits = Waits {
                master: master.map(|(_, fd)| fd),
                child: Some(fd),
                stderr: stderr.as_ref(),
                at: earliest([
                    next_extend.filter(|_| give_up.is_none()),
                    deadline.filter(|_| give_up.is_none()),
                    give_up,
                ]),
                ..Waits::default()
            };
            match event_loop::next(&mut self.signals, waits).await {
                Wake::Signal(sig) => {
                    self.signals.note(sig, "apptainer runs");
                    if k.on_stop && give_up.is_none() {
                        warn!(
                            pid,
                            "stopping: killing the apptainer command, whose work is thrown away"
                        );
                        give_up = Some(k.kill(&self.notify));
                    }
                }
                Wake::ChildExited if give_up.is_some() => break Ended::Killed,
                Wake::ChildExited => break Ended::Exited,
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
                    if give_up.is_some_and(|g| g <= now) {
                        warn!(
                            pid,
                            timeout_sec = k.grace.as_secs(),
                            "the killed apptainer command has not exited; abandoning it (a process stuck in the kernel, such as mkfs on a hung NFS server, is left to the kernel)"
                        );
                        break Ended::Abandoned;
                    }
                    if give_up.is_none() && deadline.is_some_and(|d| d <= now) {
                        warn!(pid, "apptainer command exceeded its deadline; killing it");
                        give_up = Some(k.kill(&self.notify));
                    }
                    if let (Some(at), Some(d)) = (next_extend, extend) {
                        if at <= now && give_up.is_none() {
                            self.notify.extend(d * 2);
                            next_extend = Some(now + d);
                        }
                    }
                }
                _ => {}
            }
        };
        // What is left in the pipe, once, without waiting: a grandchild that inherited it
        // (an abandoned mkfs) may keep it open for ever.
        if let Some(pipe) = &stderr {
            read_some(pipe, &mut err_buf);
        }
        (err_buf, ended)
    }
}

/// How a CLI command is killed, and how long it then has.
struct Kill {
    pid: i32,
    /// It leads a process group of its own: kill the whole group (its mkfs too).
    group: bool,
    /// A stop kills it at once.
    on_stop: bool,
    grace: Duration,
}

impl Kill {
    /// SIGKILL; returns when to give up waiting for its exit. `EXTEND_TIMEOUT_USEC`
    /// covers that wait.
    fn kill(&self, notify: &crate::os::notify::Notifier) -> Instant {
        use nix::sys::signal::{kill, killpg, Signal};
        use nix::unistd::Pid;
        // Our own child, not reaped yet: the pid (and its group) is still its own.
        let p = Pid::from_raw(self.pid);
        let _ = if self.group {
            killpg(p, Signal::SIGKILL)
        } else {
            kill(p, Signal::SIGKILL)
        };
        notify.extend(self.grace + Duration::from_secs(5));
        Instant::now() + self.grace
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Exited,
    /// Killed (deadline or stop) and exited.
    Killed,
    /// Killed and still not exited after the grace.
    Abandoned,
}

/// The longest line of a CLI command's stderr that is quoted.
const STDERR_LINE: usize = 1024;

/// Reads what `pipe` has now into `buf` (kept to 64 KiB); false once it is closed.
fn read_some(pipe: &tokio::net::unix::pipe::Receiver, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    // At most 64 KiB a call: a writer that keeps pace (a grandchild flooding the pipe)
    // must not hold the loop; what is left keeps the pipe readable for the next wake-up.
    for _ in 0..16 {
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
    true
}

pub(super) enum CliResult {
    Done(std::process::ExitStatus, String),
    /// Killed at its deadline (or at a stop, see [`Supervisor::run_cli_abandoning`]);
    /// `exited`: false when it did not exit within the grace and was abandoned.
    TimedOut {
        exited: bool,
    },
}

pub(super) fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c).to_string(),
        (None, Some(s)) => Exit::Signal(s).to_string(),
        _ => status.to_string(),
    }
}
