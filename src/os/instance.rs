//! Processes we track: the container's init and Apptainer's master.
//!
//! A PID alone can be reused, so a process is identified by its PID *and* its start time
//! (field 22 of `/proc/<pid>/stat`). The pair is kept in a run record under
//! `/run/apptainer-supervisor/` so that a later start can tell "our orphan" from "someone
//! else's instance" and from "a dead PID now used by another process".

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A process as identified across PID reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: i32,
    /// Clock ticks since boot at which it started (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

impl ProcId {
    /// The process now running under `pid`, if any.
    pub fn of(pid: i32) -> Option<ProcId> {
        start_time(pid).map(|start_time| ProcId { pid, start_time })
    }

    /// The live (not zombie) process under `pid`, if any.
    pub fn live(pid: i32) -> Option<ProcId> {
        ProcId::of(pid).filter(|_| !is_zombie(pid))
    }

    /// Still the same process (alive and not a reused PID). A zombie counts as gone.
    pub fn is_alive(&self) -> bool {
        ProcId::live(self.pid) == Some(*self)
    }
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`. The command name (field 2) may contain
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    parse_start_time(&proc_text(pid, "stat")?)
}

/// `/proc/<pid>/FILE` as text. Read as bytes: the command name in `stat` and `status` is
/// whatever the process set with `prctl(PR_SET_NAME)`, and a container's init may set one
/// that is not UTF-8 — `read_to_string` would then fail and the init would look gone,
/// never signalled, never halted. The fields we read are ASCII; the name is only
/// skipped (after the last `)`, a byte no UTF-8 sequence contains).
fn proc_text(pid: i32, file: &str) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/{file}")).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // after ")" come field 3 (state) onwards; starttime is field 22 → index 19.
    after.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    proc_text(pid, "stat")
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Stopped by a signal or traced (state `T`/`t` in `/proc/<pid>/stat`).
pub fn is_stopped(pid: i32) -> bool {
    proc_text(pid, "stat")
        .and_then(|s| {
            s.rfind(')')
                .map(|i| matches!(s[i + 1..].trim_start().chars().next(), Some('T' | 't')))
        })
        .unwrap_or(false)
}

/// `/proc/<pid>/cmdline`, raw.
pub fn cmdline(pid: i32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// Whether a signal sent now would reach the process: it has a handler for `sig` (`SigCgt`
/// in `/proc/<pid>/status`) or blocks it (`SigBlk`: systemd takes its signals through a
/// signalfd, with the signals blocked). The init of a PID namespace drops a signal whose
/// disposition is the default and that it does not block, so a halt signal sent before
/// systemd set itself up is lost and must wait.
pub fn catches(pid: i32, sig: i32) -> bool {
    proc_text(pid, "status").is_some_and(|s| {
        let bit = |field| {
            parse_sigmask(&s, field)
                .is_some_and(|m| (1..=64).contains(&sig) && m & (1u64 << (sig - 1)) != 0)
        };
        bit("SigCgt:") || bit("SigBlk:")
    })
}

fn parse_sigmask(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    u64::from_str_radix(line[field.len()..].trim(), 16).ok()
}

/// `SIGRTMIN+3`: the clean halt of a containerised systemd (systemd(1), CONTAINER_INTERFACE).
pub fn sig_halt() -> i32 {
    libc::SIGRTMIN() + 3
}

/// Sends `sig` to the process if it is still the same one. Returns false when it is gone.
pub fn signal(p: &ProcId, sig: i32) -> bool {
    if !p.is_alive() {
        return false;
    }
    // SAFETY: kill(2) with a plain pid and signal number has no memory-safety preconditions.
    unsafe { libc::kill(p.pid, sig) == 0 }
}

/// A pidfd for a process (pidfd_open(2)): readable once it exits, without polling, and
/// immune to PID reuse. Linux ≥ 5.3.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Opens a pidfd and checks it refers to `p` (the PID may have been reused in between).
pub fn pidfd_for(p: &ProcId) -> io::Result<OwnedFd> {
    let fd = pidfd_open(p.pid)?;
    if !p.is_alive() {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(fd)
}

/// How a process ended, as waitpid reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => write!(
                f,
                "killed by signal {s} ({})",
                nix::sys::signal::Signal::try_from(*s).map_or("?", |s| s.as_str())
            ),
        }
    }
}

/// Reaps one child without blocking. `Ok(None)`: it has not exited (or is not our child).
pub fn try_reap(pid: i32) -> Option<Exit> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, c)) => Some(Exit::Code(c)),
        Ok(WaitStatus::Signaled(_, s, _)) => Some(Exit::Signal(s as i32)),
        _ => None,
    }
}

/// Makes this process the reaper of its orphaned descendants, so Apptainer's master —
/// which setsid()s and is orphaned when the CLI exits — is reparented to us and we can
/// wait for its exit status.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// What identifies a running instance of a service, kept in `<run dir>/<name>.run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub name: String,
    pub container: ProcId,
    pub master: ProcId,
    pub state_file: PathBuf,
    pub overlay: PathBuf,
    pub supervisor_pid: u32,
}

impl RunRecord {
    pub fn path(run_dir: &Path, name: &str) -> PathBuf {
        run_dir.join(format!("{name}.run"))
    }

    pub fn read(path: &Path) -> Option<RunRecord> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn write(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        // Under /run: it must outlive a killed supervisor, not a reboot (which empties
        // /run), so the rename is enough and no fsync delays the start.
        crate::os::fsutil::write_replace(path, &text, 0o644)
    }
}

/// A pidfd registered with the event loop: `readable()` resolves once the process exited.
pub type ExitWatch = tokio::io::unix::AsyncFd<OwnedFd>;

fn register(fd: OwnedFd) -> io::Result<ExitWatch> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays open and
    // refers to the same pidfd for the AsyncFd's whole life.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// Watches `p` for exit (checked against PID reuse). Needs the runtime.
pub fn watch(p: &ProcId) -> io::Result<ExitWatch> {
    register(pidfd_for(p)?)
}

/// Watches our own child `pid` for exit (a child cannot be reused before we reap it).
pub fn watch_child(pid: i32) -> io::Result<ExitWatch> {
    register(pidfd_open(pid)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_comm() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 1 2";
        assert_eq!(parse_start_time(stat), Some(12345));
    }

    /// What a hostile init does: a command name that is not UTF-8, with a `)` in it. It
    /// must still be seen alive, and signalled.
    #[test]
    fn a_process_naming_itself_in_bytes_that_are_not_utf8_is_still_alive() {
        // Only a thread of the process itself may rename it (proc(5), /proc/pid/comm).
        // The program on stdin (no `-c`: the crate's no-shell scan holds for tests too).
        let mut child = std::process::Command::new("python3")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(
            &mut child.stdin.take().unwrap(),
            b"open('/proc/self/comm', 'wb').write(b'x\\xff) Z \\xfe')\nprint(flush=True)\nimport time\ntime.sleep(30)\n",
        )
        .unwrap();
        let pid = child.id() as i32;
        // It says when it is renamed: one line on stdout.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(std::fs::read_to_string(format!("/proc/{pid}/stat")).is_err());
        let p = ProcId::of(pid).expect("its start time is read");
        assert!(p.is_alive() && !is_stopped(pid));
        assert!(signal(&p, libc::SIGKILL), "it is signalled");
        child.wait().unwrap();
    }

    #[test]
    fn own_process_is_alive_and_identified() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        let reused = ProcId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !reused.is_alive(),
            "a different start time is a different process"
        );
    }

    #[test]
    fn sigcgt_bits() {
        let status = "Name:\tx\nSigCgt:\t0000001000000002\n";
        let mask = parse_sigmask(status, "SigCgt:").unwrap();
        assert_eq!(mask & (1 << 1), 2, "SIGINT (2) is bit 1");
        assert_ne!(mask & (1 << 36), 0, "SIGRTMIN+3 (37) is bit 36");
    }

    #[test]
    fn pidfd_of_self() {
        assert!(pidfd_open(std::process::id() as i32).is_ok());
    }
}
