//! Readiness figures against systemd-nspawn, side by side, printed, never asserted
//! (`cargo bench --bench readiness`; issue "readiness", item 10).
//!
//! Both boot the same rootfs (`support::rootfs()`, with the test units) in the same run,
//! alternately first:
//! - `systemd-nspawn --boot --notify-ready=yes --register=no --keep-unit -D <overlay>`, on a
//!   fresh overlayfs (tmpfs upper) over the rootfs, stdin /dev/null, stdout to a file, with its
//!   own NOTIFY_SOCKET listener, in a leaf cgroup of its own that is removed afterwards (on a
//!   hybrid host nspawn leaves `payload/` and `supervisor/` cgroups and /run/systemd/nspawn
//!   behind, shared/reference/real-systemd-in-namespaces.md);
//! - our supervisor (`World::booted`, the Apptainer CLI double, a fresh ext3 overlay image made
//!   before the clock starts), with `required_units = ["asv-simple.service"]` and
//!   `on_failure = "ignore"`.
//!
//! Measured as in shared/reference/peer-measurements.md: process start → READY=1 at the host
//! socket; the inner manager's FinishTimestampMonotonic → READY=1 arrival (CLOCK_MONOTONIC is
//! shared; arrival is stamped by the thread blocked in recv(2)); SIGTERM → exit with the inner
//! systemd halted in order (the ExecStop= mark of asv-simple is checked in the upper layer);
//! VmHWM of the supervising process just before stop; and, for the supervisor, a required
//! unit's failure inside → the STATUS= naming it (from the unit's InactiveEnterTimestamp
//! inside, and from the return of the kill command).
//!
//! To show where the time goes: the stop is split at the inner PID 1's and the master's exit
//! (pidfds opened before SIGTERM); each run also boots the container with the Apptainer
//! double alone (nobody on the inner bus) and halts it with SIGRTMIN+3; both stop 1 s after
//! READY=1; the first run's notify messages are printed against process start and the inner
//! FinishTimestamp, and its resident memory by mapping.
//!
//! Needs root. `BENCH_RUNS` (default 5); about 50 s with 5 runs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use support::*;

const SIMPLE: &str = "asv-simple.service";
const NSPAWN_RUN_DIR: &str = "/run/systemd/nspawn";

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// CLOCK_MONOTONIC in ns, the clock systemd's `*TimestampMonotonic` (µs) are on.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns as f64 - from_ns as f64) / 1e6
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn schedstat_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a fresh descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Watches processes exit (pidfds opened before the event that ends them): when each was
/// seen gone (CLOCK_MONOTONIC ns). Returns once the first one has exited, or at `within`.
fn wait_exits(fds: &[Option<OwnedFd>], within: Duration) -> Vec<Option<u64>> {
    let deadline = Instant::now() + within;
    let mut seen: Vec<Option<u64>> = vec![None; fds.len()];
    while seen[0].is_none() {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        let idx: Vec<usize> = (0..fds.len())
            .filter(|&i| seen[i].is_none() && fds[i].is_some())
            .collect();
        if idx.is_empty() {
            break;
        }
        let mut pfds: Vec<libc::pollfd> = idx
            .iter()
            .map(|&i| libc::pollfd {
                fd: fds[i].as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid array of pollfds.
        let r = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                left.as_millis().max(1) as i32,
            )
        };
        let now = mono_ns();
        if r < 0 {
            continue;
        }
        for (k, &i) in idx.iter().enumerate() {
            if pfds[k].revents != 0 {
                seen[i] = Some(now);
            }
        }
    }
    seen
}

/// `systemctl show -p …` run by the inner manager's side (`nsenter -m -p`), bounded.
fn inner_show(init_pid: i32, unit: Option<&str>, props: &[&str]) -> HashMap<String, String> {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "2", "10", "nsenter", "-t", &init_pid.to_string()])
        .args(["-m", "-p", "--", "systemctl", "show"]);
    for p in props {
        cmd.args(["-p", p]);
    }
    cmd.args(unit);
    let out = cmd.stdin(Stdio::null()).output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A monotonic µs property as ns (0 / missing = None).
fn us_prop(m: &HashMap<String, String>, k: &str) -> Option<u64> {
    m.get(k)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v > 0)
        .map(|v| v * 1000)
}

/// `systemctl …` inside, bounded; true when it exited 0.
fn inner_ctl(init_pid: i32, args: &[&str]) -> bool {
    Command::new("timeout")
        .args(["-k", "2", "10", "nsenter", "-t", &init_pid.to_string()])
        .args(["-m", "-p", "--", "systemctl"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_quiet(prog: &str, args: &[&str]) -> bool {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A NOTIFY_SOCKET datagram listener; a thread blocked in recv(2) stamps each arrival with
/// CLOCK_MONOTONIC at once.
struct Listener {
    sock: UnixDatagram,
    rx: Receiver<(u64, String)>,
    /// Everything received so far, with its arrival time (ns).
    log: Vec<(u64, String)>,
}

impl Listener {
    fn bind(path: &Path) -> std::io::Result<Listener> {
        let sock = UnixDatagram::bind(path)?;
        let reader = sock.try_clone()?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends when the Listener shuts the socket down.
            while let Ok(n) = reader.recv(&mut buf) {
                let t = mono_ns();
                if n == 0 {
                    break;
                }
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((t, msg)).is_err() {
                    break;
                }
            }
        });
        Ok(Listener {
            sock,
            rx,
            log: Vec::new(),
        })
    }

    /// Waits (bounded; gives up early when `alive` turns false) for a new message that
    /// satisfies `pred`; its arrival time.
    fn wait_for(
        &mut self,
        within: Duration,
        alive: &mut dyn FnMut() -> bool,
        pred: &dyn Fn(&str) -> bool,
    ) -> Option<u64> {
        let deadline = Instant::now() + within;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            match self
                .rx
                .recv_timeout((deadline - now).min(Duration::from_millis(200)))
            {
                Ok((t, m)) => {
                    let hit = pred(&m);
                    self.log.push((t, m));
                    if hit {
                        return Some(t);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if !alive() {
                        return None;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Collects what arrives within `d`.
    fn settle(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(m) => self.log.push(m),
                Err(_) => break,
            }
        }
    }

    fn first(&self, pred: impl Fn(&str) -> bool) -> Option<u64> {
        self.log.iter().find(|(_, m)| pred(m)).map(|(t, _)| *t)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

fn is_ready(m: &str) -> bool {
    m.lines().any(|l| l == "READY=1")
}

/// What one boot gave; None where that step did not work out.
#[derive(Default)]
struct Sample {
    start_ready: Option<f64>,
    start_userspace: Option<f64>,
    inner_boot: Option<f64>,
    finish_ready_us: Option<f64>,
    cpu_to_ready: Option<f64>,
    hwm_mib: Option<f64>,
    rss_anon_mib: Option<f64>,
    rss_file_mib: Option<f64>,
    stop: Option<f64>,
    /// SIGTERM → the container's init (inner PID 1) gone.
    stop_init: Option<f64>,
    /// Inner PID 1 gone → the supervising process gone.
    init_to_exit: Option<f64>,
    /// Supervisor only: inner PID 1 gone → master gone; master gone → supervisor gone.
    init_to_master: Option<f64>,
    master_to_exit: Option<f64>,
    orderly: bool,
    // Supervisor only.
    start_instance: Option<f64>,
    start_connected: Option<f64>,
    fail_inactive_status: Option<f64>,
    fail_exit_status: Option<f64>,
    fail_first_status: Option<f64>,
    fail_kill_status: Option<f64>,
    fail_kill_cmd: Option<f64>,
    /// Arrivals: ms after process start, ms after the inner FinishTimestamp, the message.
    timeline: Vec<(f64, Option<f64>, String)>,
    finish_ns: Option<u64>,
    /// Resident memory by mapping (kB), largest first, just before stop.
    smaps: Vec<(u64, String)>,
    /// Double alone (no supervisor): SIGRTMIN+3 → inner PID 1 gone, → master gone.
    alone_halt: Option<f64>,
    alone_master: Option<f64>,
}

/// The inner boot from the init's side: (start → Userspace, Finish − Userspace, Finish →
/// arrival in µs).
fn boot_figures(s: &mut Sample, init_pid: i32, t0: u64, ready_at: u64) {
    let p = inner_show(
        init_pid,
        None,
        &["UserspaceTimestampMonotonic", "FinishTimestampMonotonic"],
    );
    let user = us_prop(&p, "UserspaceTimestampMonotonic");
    let finish = us_prop(&p, "FinishTimestampMonotonic");
    s.start_userspace = user.map(|u| ms(t0, u));
    if let (Some(u), Some(f)) = (user, finish) {
        s.inner_boot = Some(ms(u, f));
    }
    s.finish_ready_us = finish.map(|f| ms(f, ready_at) * 1e3);
    s.finish_ns = finish;
}

/// The arrivals, plus the stop's events (`(…)` lines: SIGTERM sent, processes gone).
fn timeline(s: &mut Sample, t0: u64, l: &Listener, events: &[(Option<u64>, &str)]) {
    let mut all: Vec<(u64, String)> = l.log.clone();
    all.extend(
        events
            .iter()
            .filter_map(|(t, what)| t.map(|t| (t, format!("({what})")))),
    );
    all.sort_by_key(|(t, _)| *t);
    s.timeline = all
        .iter()
        .map(|(a, m)| (ms(t0, *a), s.finish_ns.map(|f| ms(f, *a)), m.clone()))
        .collect();
}

/// Rss per mapped file (anonymous mappings together), kB, largest first.
fn smaps(pid: u32) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: HashMap<String, u64> = HashMap::new();
    let mut cur = String::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: range perms offset dev inode [path]
            let path = line.split_whitespace().nth(5).unwrap_or("[anon]");
            cur = Path::new(path)
                .file_name()
                .map_or(path.to_owned(), |n| n.to_string_lossy().into_owned());
            if !path.starts_with('/') {
                cur = "[anon, heap, stack]".into();
            }
        } else if first == "Rss:" {
            let kb: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *by.entry(cur.clone()).or_default() += kb;
        }
    }
    let mut v: Vec<(u64, String)> = by.into_iter().map(|(k, v)| (v, k)).collect();
    v.sort_by(|a, b| b.cmp(a));
    v
}

/// Peak and current memory of the supervising process, just before stop.
fn memory(s: &mut Sample, pid: u32) {
    let mib = |f| Some(status_kb(pid, f) as f64 / 1024.0);
    s.hwm_mib = mib("VmHWM:");
    s.rss_anon_mib = mib("RssAnon:");
    s.rss_file_mib = mib("RssFile:");
    s.smaps = smaps(pid);
}

/// Lets the booted system settle for the same time after READY=1 in both cases.
fn settle_until(ready_ns: u64, after: Duration) {
    let until = ready_ns + after.as_nanos() as u64;
    let now = mono_ns();
    if until > now {
        std::thread::sleep(Duration::from_nanos(until - now));
    }
}

const SETTLE: Duration = Duration::from_millis(1000);

// --- systemd-nspawn ---------------------------------------------------------------------

/// The cgroup hierarchies nspawn touches: the unified one, plus name=systemd on a hybrid host.
fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_owned()];
    }
    ["unified", "systemd"]
        .iter()
        .map(|h| root.join(h))
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

/// Removes a cgroup directory tree, leaves first (bounded retries while it empties).
fn rm_cgroup_tree(p: &Path) -> bool {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rm_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(p).is_ok() || !p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn is_mountpoint(p: &Path) -> bool {
    let p = p.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&p))
}

fn umount(p: &Path) {
    if is_mountpoint(p) && !run_quiet("umount", &[&p.to_string_lossy()]) {
        run_quiet("umount", &["-l", &p.to_string_lossy()]);
    }
}

/// One nspawn boot's setup: tmpfs + overlay, a leaf cgroup per hierarchy, the listener.
/// Dropping it undoes all of it, whatever happened.
struct NspawnRig {
    dir: tempfile::TempDir,
    machine: String,
    cgroups: Vec<PathBuf>,
    child: Option<Child>,
    leader: Option<i32>,
}

impl NspawnRig {
    fn new(machine: &str, rootfs: &Path) -> Result<NspawnRig, String> {
        let dir = tempfile::Builder::new()
            .prefix("asv-nspawn-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let mut rig = NspawnRig {
            dir,
            machine: machine.to_owned(),
            cgroups: Vec::new(),
            child: None,
            leader: None,
        };
        let d = rig.dir.path().to_owned();
        if !run_quiet("mount", &["-t", "tmpfs", "tmpfs", &d.to_string_lossy()]) {
            return Err("mounting the tmpfs failed".into());
        }
        for sub in ["upper", "work", machine] {
            std::fs::create_dir(d.join(sub)).map_err(|e| e.to_string())?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            rootfs.display(),
            d.join("upper").display(),
            d.join("work").display()
        );
        if !run_quiet(
            "mount",
            &[
                "-t",
                "overlay",
                "overlay",
                "-o",
                &opts,
                &d.join(machine).to_string_lossy(),
            ],
        ) {
            return Err("mounting the overlay failed".into());
        }
        for h in hierarchies() {
            let leaf = h.join(format!("asv-bench-{machine}"));
            std::fs::create_dir(&leaf).map_err(|e| format!("{}: {e}", leaf.display()))?;
            rig.cgroups.push(leaf);
        }
        Ok(rig)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join(&self.machine)
    }

    fn spawn(&mut self, notify: &Path) -> std::io::Result<u32> {
        let console = std::fs::File::create(self.dir.path().join("console.log"))?;
        let procs: Vec<CString> = self
            .cgroups
            .iter()
            .map(|c| CString::new(c.join("cgroup.procs").to_string_lossy().as_bytes()).unwrap())
            .collect();
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args([
            "--boot",
            "--notify-ready=yes",
            "--register=no",
            "--keep-unit",
            "-D",
        ])
        .arg(self.root())
        .env("NOTIFY_SOCKET", notify)
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console);
        // SAFETY: between fork and exec only open/write/close on prepared C strings.
        unsafe {
            cmd.pre_exec(move || {
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    libc::close(fd);
                    if !ok {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Lines the ExecStop= of asv-simple wrote (in the tmpfs upper layer).
    fn stop_marks(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("upper/var/lib/asv-simple.mark"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn console_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

impl Drop for NspawnRig {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                if let Some(l) = self.leader {
                    kill(l, libc::SIGKILL);
                }
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        let d = self.dir.path().to_owned();
        umount(&d.join(&self.machine));
        umount(&d);
        for cg in &self.cgroups {
            if !rm_cgroup_tree(cg) {
                eprintln!("warning: could not remove cgroup {}", cg.display());
            }
        }
        // nspawn removes its own entries here on a clean exit; make sure of it.
        let prop = Path::new(NSPAWN_RUN_DIR)
            .join("propagate")
            .join(&self.machine);
        umount(&prop);
        let _ = std::fs::remove_dir(prop);
    }
}

fn nspawn_run(i: usize, rootfs: &Path) -> Result<Sample, String> {
    let machine = format!("asvbench-{}-{i}", std::process::id());
    let mut rig = NspawnRig::new(&machine, rootfs)?;
    let sock_path = rig.dir.path().join("notify.sock");
    let mut l = Listener::bind(&sock_path).map_err(|e| e.to_string())?;
    let mut s = Sample::default();
    let t0 = mono_ns();
    let pid = rig.spawn(&sock_path).map_err(|e| e.to_string())?;
    let ready = l.wait_for(Duration::from_secs(40), &mut || rig.alive(), &is_ready);
    let Some(ready) = ready else {
        return Err(format!(
            "nspawn: no READY=1 within 40 s; got {:?}\n{}",
            l.log,
            rig.console_tail()
        ));
    };
    let cpu = schedstat_ns(pid);
    s.start_ready = Some(ms(t0, ready));
    s.cpu_to_ready = Some(cpu as f64 / 1e6);
    let leader = l
        .log
        .iter()
        .flat_map(|(_, m)| m.lines())
        .find_map(|x| x.strip_prefix("X_NSPAWN_LEADER_PID="))
        .and_then(|v| v.parse::<i32>().ok())
        .or_else(|| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .ok()
                .and_then(|c| c.split_whitespace().next().and_then(|v| v.parse().ok()))
        });
    rig.leader = leader;
    let Some(leader) = leader else {
        return Err("nspawn: no leader pid".into());
    };
    boot_figures(&mut s, leader, t0, ready);

    settle_until(ready, SETTLE);
    memory(&mut s, pid);
    let fds = [pidfd(pid as i32), pidfd(leader)];
    let t = mono_ns();
    kill(pid as i32, libc::SIGTERM);
    let seen = wait_exits(&fds, Duration::from_secs(30));
    let exited = seen[0];
    s.stop = exited.map(|e| ms(t, e));
    s.stop_init = seen[1].map(|e| ms(t, e));
    if let (Some(i), Some(e)) = (seen[1], seen[0]) {
        s.init_to_exit = Some(ms(i, e));
    }
    let code = rig.child.as_mut().and_then(|c| {
        if exited.is_some() {
            c.wait().ok()
        } else {
            None
        }
    });
    l.settle(Duration::from_millis(20));
    s.orderly = code.is_some_and(|c| c.success()) && rig.stop_marks() == 1;
    let events = [
        (Some(t), "SIGTERM sent"),
        (seen[1], "inner PID 1 gone"),
        (seen[0], "nspawn gone"),
    ];
    if !s.orderly {
        eprintln!(
            "nspawn run {i}: stop not orderly (exit {code:?}, {} ExecStop marks)\n{}",
            rig.stop_marks(),
            rig.console_tail()
        );
    }
    timeline(&mut s, t0, &l, &events);
    Ok(s)
}

// --- the supervisor -----------------------------------------------------------------------

/// ExecStop= marks of asv-simple in the World's ext3 overlay (mounted read-only afterwards).
fn overlay_marks(img: &Path) -> Option<usize> {
    let mnt = tempfile::Builder::new().prefix("asv-ovl-").tempdir().ok()?;
    let m = mnt.path().to_string_lossy().into_owned();
    if !run_quiet(
        "mount",
        &["-o", "loop,ro,noload", &img.to_string_lossy(), &m],
    ) {
        return None;
    }
    let n = std::fs::read_to_string(mnt.path().join("upper/var/lib/asv-simple.mark"))
        .map(|s| s.lines().count())
        .unwrap_or(0);
    umount(mnt.path());
    Some(n)
}

/// The same container started by the Apptainer double alone (no supervisor, so nobody on
/// the inner bus), halted with SIGRTMIN+3 after the same settling time: what the stop costs
/// without us.
fn double_alone_halt(i: usize, s: &mut Sample) {
    let w = World::booted(&format!("rdya{i}"), "");
    let ov = w.overlay();
    let ov = ov.to_string_lossy();
    let rootfs = rootfs();
    let binds = format!("{}:/srv/root", w.service_dir.join("root").display());
    if !w
        .apptainer(&["overlay", "create", "-S", "-s", "256", &ov])
        .status
        .success()
        || !w
            .apptainer(&[
                "instance",
                "start",
                "--boot",
                // As the supervisor passes it for a service without [[network]]: without
                // it Apptainer (and the double) would run its default bridge network.
                "--network",
                "none",
                "--bind",
                &binds,
                "--overlay",
                &ov,
                &rootfs.to_string_lossy(),
                &w.name,
            ])
            .status
            .success()
    {
        eprintln!("double alone, run {i}: instance start failed");
        return;
    }
    let (init, master) = w.instance_pids();
    let deadline = Instant::now() + Duration::from_secs(30);
    let finish = loop {
        let p = inner_show(init, None, &["FinishTimestampMonotonic"]);
        if let Some(f) = us_prop(&p, "FinishTimestampMonotonic") {
            break Some(f);
        }
        if Instant::now() > deadline || !alive(init) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(finish) = finish else {
        eprintln!("double alone, run {i}: the inner systemd did not finish booting");
        return;
    };
    settle_until(finish, SETTLE);
    let fds = [pidfd(master), pidfd(init)];
    let t = mono_ns();
    kill(init, libc::SIGRTMIN() + 3);
    let seen = wait_exits(&fds, Duration::from_secs(30));
    s.alone_halt = seen[1].map(|e| ms(t, e));
    s.alone_master = seen[0].map(|e| ms(t, e));
}

fn ours_run(i: usize) -> Result<Sample, String> {
    let mut w = World::booted(
        &format!("rdy{i}"),
        &format!("required_units = [\"{SIMPLE}\"]\non_failure = \"ignore\""),
    );
    // Made before the clock starts, as the nspawn overlay is.
    let ov = w.overlay();
    let out = w.apptainer(&[
        "overlay",
        "create",
        "-S",
        "-s",
        "256",
        &ov.to_string_lossy(),
    ]);
    if !out.status.success() {
        return Err(format!(
            "overlay create: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Our own listener at the World's NOTIFY_SOCKET path, so that arrivals are stamped in
    // the receiving thread (the World's own socket is left unbound from the path).
    let _ = std::fs::remove_file(&w.notify_path);
    let mut l = Listener::bind(&w.notify_path).map_err(|e| e.to_string())?;
    let mut s = Sample::default();

    let t0 = mono_ns();
    let pid = w.spawn_run();
    let ready = {
        let w = &mut w;
        l.wait_for(
            Duration::from_secs(40),
            &mut || matches!(w.child(0).try_wait(), Ok(None)),
            &is_ready,
        )
    };
    let Some(ready) = ready else {
        let _ = w.child(0).kill();
        let out = w.wait(0, Duration::from_secs(5));
        return Err(format!(
            "supervisor: no READY=1 within 40 s; got {:?}\n{}",
            l.log,
            String::from_utf8_lossy(&out.stderr)
        ));
    };
    let cpu = schedstat_ns(pid);
    s.start_ready = Some(ms(t0, ready));
    s.cpu_to_ready = Some(cpu as f64 / 1e6);
    s.start_instance = l.first(|m| m.contains("instance pid")).map(|t| ms(t0, t));
    s.start_connected = l
        .first(|m| m.contains("jobs queued") || is_ready(m))
        .map(|t| ms(t0, t));
    let (init, master) = w.instance_pids();
    boot_figures(&mut s, init, t0, ready);

    // A required unit fails inside: SIGKILL (asv-simple has no Restart=), then the STATUS=.
    l.settle(Duration::from_millis(50));
    let n_before = l.log.len();
    let k0 = mono_ns();
    let killed = inner_ctl(init, &["kill", "-s", "KILL", SIMPLE]);
    let k1 = mono_ns();
    let failed_msg = |m: &str| {
        m.lines()
            .any(|x| x.starts_with("STATUS=") && x.contains(&format!("{SIMPLE} failed")))
    };
    let status_at = if killed {
        let w = &mut w;
        l.wait_for(
            Duration::from_secs(10),
            &mut || matches!(w.child(0).try_wait(), Ok(None)),
            &failed_msg,
        )
    } else {
        None
    };
    // Messages that arrived while the kill command was still running count too.
    let status_at = status_at.or_else(|| {
        l.log[n_before..]
            .iter()
            .find(|(_, m)| failed_msg(m))
            .map(|(t, _)| *t)
    });
    if let Some(st) = status_at {
        let p = inner_show(
            init,
            Some(SIMPLE),
            &[
                "ActiveExitTimestampMonotonic",
                "InactiveEnterTimestampMonotonic",
            ],
        );
        let exit = us_prop(&p, "ActiveExitTimestampMonotonic");
        let inactive = us_prop(&p, "InactiveEnterTimestampMonotonic");
        s.fail_inactive_status = inactive.map(|t| ms(t, st));
        s.fail_exit_status = exit.map(|t| ms(t, st));
        s.fail_first_status = inactive.and_then(|e| {
            l.log[n_before..]
                .iter()
                .find(|(_, m)| m.contains("STATUS="))
                .map(|(t, _)| ms(e, *t))
        });
        s.fail_kill_status = Some(ms(k1, st));
        s.fail_kill_cmd = Some(ms(k0, k1));
    } else {
        eprintln!(
            "supervisor run {i}: no STATUS naming the failed {SIMPLE} (kill ok: {killed}); got {:?}",
            &l.log[n_before..]
        );
    }
    // Back to the state nspawn's container is in (asv-simple running) before the stop.
    if inner_ctl(init, &["start", SIMPLE]) {
        let w = &mut w;
        let _ = l.wait_for(
            Duration::from_secs(10),
            &mut || matches!(w.child(0).try_wait(), Ok(None)),
            &|m: &str| m.contains("STATUS=running: 1/1 required units active"),
        );
    }

    settle_until(ready, SETTLE);
    memory(&mut s, pid);
    let fds = [pidfd(pid as i32), pidfd(init), pidfd(master)];
    let t = mono_ns();
    kill(pid as i32, libc::SIGTERM);
    let seen = wait_exits(&fds, Duration::from_secs(30));
    let exited = seen[0];
    s.stop = exited.map(|e| ms(t, e));
    s.stop_init = seen[1].map(|e| ms(t, e));
    if let (Some(i), Some(e)) = (seen[1], seen[0]) {
        s.init_to_exit = Some(ms(i, e));
    }
    if let (Some(i), Some(m), Some(e)) = (seen[1], seen[2], seen[0]) {
        s.init_to_master = Some(ms(i, m));
        s.master_to_exit = Some(ms(m, e));
    }
    l.settle(Duration::from_millis(20));
    let events = [
        (Some(t), "SIGTERM sent"),
        (seen[1], "inner PID 1 gone"),
        (seen[2], "Apptainer master gone"),
        (seen[0], "supervisor gone"),
    ];
    timeline(&mut s, t0, &l, &events);
    if exited.is_some() {
        let out = w.wait(0, Duration::from_secs(5));
        let err = String::from_utf8_lossy(&out.stderr);
        // One ExecStop= mark, from the halt (a unit whose main process was SIGKILLed goes
        // straight to stop-sigterm: the crash above runs no ExecStop=).
        let marks = overlay_marks(&ov);
        s.orderly = out.status.success() && !err.contains("forcing") && marks == Some(1);
        if !s.orderly {
            eprintln!(
                "supervisor run {i}: stop not orderly ({}, ExecStop marks {marks:?})\n{err}",
                out.status
            );
        }
    }
    Ok(s)
}

// --- figures --------------------------------------------------------------------------------

#[derive(Default, Clone)]
struct Stats(Vec<f64>);

impl Stats {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    }

    fn median(&self) -> Option<f64> {
        let v = self.sorted();
        let n = v.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    fn show(&self, prec: usize) -> String {
        let v = self.sorted();
        match self.median() {
            None => "n/a".into(),
            Some(m) => format!("{m:.prec$} [{:.prec$}..{:.prec$}]", v[0], v[v.len() - 1]),
        }
    }
}

fn collect(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Stats {
    Stats(samples.iter().filter_map(f).collect())
}

fn row(label: &str, unit: &str, prec: usize, n: &Stats, o: &Stats, goal: &str) {
    let ratio = match (o.median(), n.median()) {
        (Some(a), Some(b)) if b > 0.0 && a >= 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    };
    println!(
        "{label:<44} {:<26} {:<26} {ratio:<7} {goal}",
        format!("{} {unit}", n.show(prec)),
        format!("{} {unit}", o.show(prec)),
    );
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "n/a",
    }
}

fn print_timeline(who: &str, s: &Sample) {
    println!("  {who} (ms after process start; ms after the inner FinishTimestamp):");
    let mut i = 0;
    while i < s.timeline.len() {
        let (t, f, m) = &s.timeline[i];
        let f = f.map_or("".into(), |f| format!("{f:+.3}"));
        let m = m.trim_end().replace('\n', " | ");
        // Runs of "stopping: N jobs left inside" are shown as one line.
        let mut j = i + 1;
        if m.starts_with("STATUS=stopping: ") && m.ends_with(" jobs left inside") {
            while j < s.timeline.len() && s.timeline[j].2.trim_end().ends_with(" jobs left inside")
            {
                j += 1;
            }
        }
        if j > i + 1 {
            let last = &s.timeline[j - 1];
            println!(
                "    {t:>9.3} {f:>10}  {m} … ({} such messages until {:.3}, the last: {})",
                j - i,
                last.0,
                last.2.trim_end()
            );
        } else {
            println!("    {t:>9.3} {f:>10}  {m}");
        }
        i = j;
    }
}

/// Cgroups this bench or nspawn could have made at the hierarchies' roots (ours, and the
/// `payload`/`supervisor` nspawn makes where it runs), and /run/systemd/nspawn. Other
/// people's cgroups (tests running at the same time) are not ours to judge.
fn leftover_snapshot() -> Vec<String> {
    let mine = |n: &str| n.starts_with("asv-bench-") || n == "payload" || n == "supervisor";
    let mut v: Vec<String> = hierarchies()
        .iter()
        .flat_map(|h| std::fs::read_dir(h).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| mine(&e.file_name().to_string_lossy()))
        .map(|e| e.path().display().to_string())
        .collect();
    if Path::new(NSPAWN_RUN_DIR).exists() {
        v.push(NSPAWN_RUN_DIR.into());
    }
    v.sort();
    v
}

fn main() {
    if !require_root() {
        return;
    }
    let runs = env_num("BENCH_RUNS", 5) as usize;
    let rootfs = rootfs();
    let version = Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_else(|_| "systemd-nspawn missing".into());
    println!("readiness bench: {runs} runs; rootfs {}", rootfs.display());
    println!("nspawn: {version}; supervisor: {BIN} (Apptainer CLI double)");
    let before = leftover_snapshot();
    let nspawn_dir_existed = Path::new(NSPAWN_RUN_DIR).exists();
    let started = Instant::now();

    let mut ns: Vec<Sample> = Vec::new();
    let mut us: Vec<Sample> = Vec::new();
    for i in 0..runs {
        // Alternate who goes first, so that neither always boots on warmer caches.
        for turn in 0..2 {
            if (i + turn) % 2 == 0 {
                match nspawn_run(i, &rootfs) {
                    Ok(s) => {
                        println!(
                            "run {}: nspawn     start→READY {:>8.1} ms, stop {:>7.1} ms",
                            i + 1,
                            s.start_ready.unwrap_or(f64::NAN),
                            s.stop.unwrap_or(f64::NAN)
                        );
                        ns.push(s)
                    }
                    Err(e) => eprintln!("run {}: nspawn failed: {e}", i + 1),
                }
            } else {
                match ours_run(i) {
                    Ok(mut s) => {
                        double_alone_halt(i, &mut s);
                        println!(
                            "run {}: supervisor start→READY {:>8.1} ms, stop {:>7.1} ms, failure→STATUS {:>6.2} ms",
                            i + 1,
                            s.start_ready.unwrap_or(f64::NAN),
                            s.stop.unwrap_or(f64::NAN),
                            s.fail_inactive_status.unwrap_or(f64::NAN)
                        );
                        us.push(s)
                    }
                    Err(e) => eprintln!("run {}: supervisor failed: {e}", i + 1),
                }
            }
        }
    }

    // Leftovers: nspawn's own empty run dirs, if it made them; then what is still there.
    if !nspawn_dir_existed {
        for d in ["locks", "propagate", ""] {
            let _ = std::fs::remove_dir(Path::new(NSPAWN_RUN_DIR).join(d));
        }
    }
    let after = leftover_snapshot();
    let left: Vec<&String> = after.iter().filter(|p| !before.contains(p)).collect();

    println!("\nfirst run, resident memory by mapping just before stop (kB):");
    for (who, v) in [("systemd-nspawn", &ns), ("apptainer-supervisor", &us)] {
        if let Some(s) = v.first() {
            let top: Vec<String> = s
                .smaps
                .iter()
                .take(6)
                .map(|(kb, name)| format!("{name} {kb}"))
                .collect();
            println!("  {who}: {}", top.join(", "));
        }
    }
    println!("\nfirst run, notify messages as they arrived:");
    if let Some(s) = ns.first() {
        print_timeline("systemd-nspawn", s);
    }
    if let Some(s) = us.first() {
        print_timeline("apptainer-supervisor", s);
    }

    let n = |f: fn(&Sample) -> Option<f64>| collect(&ns, f);
    let o = |f: fn(&Sample) -> Option<f64>| collect(&us, f);
    let e = Stats::default();
    println!(
        "\n{:<44} {:<26} {:<26} {:<7} goal",
        "median [min..max]", "systemd-nspawn", "apptainer-supervisor", "ours/ns"
    );
    let start_ready = (n(|s| s.start_ready), o(|s| s.start_ready));
    row(
        "process start → READY=1 at the host socket",
        "ms",
        1,
        &start_ready.0,
        &start_ready.1,
        "",
    );
    row(
        "  process start → inner systemd start",
        "ms",
        1,
        &n(|s| s.start_userspace),
        &o(|s| s.start_userspace),
        "(UserspaceTimestampMonotonic)",
    );
    row(
        "  inner boot (Finish − Userspace)",
        "ms",
        1,
        &n(|s| s.inner_boot),
        &o(|s| s.inner_boot),
        "",
    );
    let fwd = (n(|s| s.finish_ready_us), o(|s| s.finish_ready_us));
    let fwd_ok = fwd.1.median().map(|m| m <= 1000.0);
    row(
        "  inner Finish → READY=1 arrival",
        "µs",
        0,
        &fwd.0,
        &fwd.1,
        &format!("≤ 1000 µs median: {}", verdict(fwd_ok)),
    );
    row(
        "  process start → `instance start` done",
        "ms",
        1,
        &e,
        &o(|s| s.start_instance),
        "(STATUS \"booting: instance pid …\")",
    );
    row(
        "  process start → inner bus connected",
        "ms",
        1,
        &e,
        &o(|s| s.start_connected),
        "(first STATUS from the inner state)",
    );
    row(
        "supervising process CPU, start → READY",
        "ms",
        2,
        &n(|s| s.cpu_to_ready),
        &o(|s| s.cpu_to_ready),
        "(schedstat)",
    );
    let stop = (n(|s| s.stop), o(|s| s.stop));
    let stop_ok = match (stop.1.median(), stop.0.median()) {
        (Some(a), Some(b)) => Some(a <= b),
        _ => None,
    };
    let orderly = |v: &[Sample]| {
        format!(
            "{}/{}",
            v.iter().filter(|s| s.orderly).count(),
            v.iter().filter(|s| s.stop.is_some()).count()
        )
    };
    row(
        "SIGTERM → process exit",
        "ms",
        1,
        &stop.0,
        &stop.1,
        &format!("≤ nspawn's: {}", verdict(stop_ok)),
    );
    println!(
        "{:<44} {:<26} {:<26}",
        "  halted in order (exit 0, ExecStop= ran)",
        orderly(&ns),
        orderly(&us)
    );
    row(
        "  SIGTERM → inner PID 1 gone",
        "ms",
        1,
        &n(|s| s.stop_init),
        &o(|s| s.stop_init),
        "(the same rootfs halting)",
    );
    row(
        "  inner PID 1 gone → process exit",
        "ms",
        1,
        &n(|s| s.init_to_exit),
        &o(|s| s.init_to_exit),
        "(cleanup after the container)",
    );
    row(
        "    inner PID 1 gone → Apptainer master gone",
        "ms",
        1,
        &e,
        &o(|s| s.init_to_master),
        "(the double's cleanup)",
    );
    row(
        "  without us: SIGRTMIN+3 → inner PID 1 gone",
        "ms",
        1,
        &e,
        &o(|s| s.alone_halt),
        "(double alone, nobody on the bus)",
    );
    row(
        "  without us: SIGRTMIN+3 → master gone",
        "ms",
        1,
        &e,
        &o(|s| s.alone_master),
        "",
    );
    row(
        "    master gone → supervisor exit",
        "ms",
        1,
        &e,
        &o(|s| s.master_to_exit),
        "",
    );
    let rss = (n(|s| s.hwm_mib), o(|s| s.hwm_mib));
    let rss_ok = rss.1.median().map(|m| m <= 2.0);
    row(
        "peak RSS (VmHWM) just before stop",
        "MiB",
        2,
        &rss.0,
        &rss.1,
        &format!("≤ 2 MiB: {}", verdict(rss_ok)),
    );
    row(
        "  RssAnon just before stop",
        "MiB",
        2,
        &n(|s| s.rss_anon_mib),
        &o(|s| s.rss_anon_mib),
        "",
    );
    row(
        "  RssFile just before stop",
        "MiB",
        2,
        &n(|s| s.rss_file_mib),
        &o(|s| s.rss_file_mib),
        "",
    );
    println!("\nrequired unit failure inside ({SIMPLE}, `systemctl kill -s KILL`, on_failure = \"ignore\"):");
    let fail = o(|s| s.fail_inactive_status);
    let fail_ok = fail.median().map(|m| m <= 5.0);
    row(
        "  unit failed (InactiveEnterTimestamp) → STATUS",
        "ms",
        2,
        &e,
        &fail,
        &format!("≤ 5 ms median: {}", verdict(fail_ok)),
    );
    // A SIGKILLed main process sends the unit from active straight to failed (no
    // ExecStop=), so both timestamps are usually the same; show the other only if not.
    let exit_row = o(|s| s.fail_exit_status);
    if exit_row.0 != fail.0 {
        row(
            "  unit left active (ActiveExitTimestamp) → STATUS",
            "ms",
            2,
            &e,
            &exit_row,
            "",
        );
    } else {
        println!("  (ActiveExitTimestamp = InactiveEnterTimestamp in every run: active → failed at once)");
    }
    row(
        "  unit failed → first STATUS of any kind",
        "ms",
        2,
        &e,
        &o(|s| s.fail_first_status),
        "",
    );
    row(
        "  kill command returned → STATUS",
        "ms",
        2,
        &e,
        &o(|s| s.fail_kill_status),
        "",
    );
    row(
        "  (kill command itself: nsenter + systemctl)",
        "ms",
        1,
        &e,
        &o(|s| s.fail_kill_cmd),
        "",
    );
    println!(
        "\nsamples: nspawn {}, supervisor {}; took {:.1} s",
        ns.len(),
        us.len(),
        started.elapsed().as_secs_f64()
    );
    if left.is_empty() {
        println!("leftovers (new cgroups, {NSPAWN_RUN_DIR}): none");
    } else {
        println!("leftovers (new cgroups, {NSPAWN_RUN_DIR}): {left:?}");
    }
}
