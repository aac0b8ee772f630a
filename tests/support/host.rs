//! A real systemd as the "core host": PID 1 in namespaces of its own, on this machine's
//! root filesystem, so that a test can run the shipped unit file under it (`systemctl
//! start`, `Type=notify`, `WatchdogSec=`, `KillMode=`, `Restart=`) although the machine's
//! own PID 1 is not systemd.
//!
//! How it boots (checked on Debian 12, systemd 252, kernel 6.18, hybrid cgroups):
//! 1. a leaf cgroup of its own in the machine's cgroup2 hierarchy (`/sys/fs/cgroup/unified`
//!    here, `/sys/fs/cgroup` on a pure-v2 host); `unshare` is moved into it *before* it
//!    unshares, so that the leaf becomes the root of the new cgroup namespace;
//! 2. `unshare --pid --mount --uts --ipc --cgroup --net --fork --kill-child` runs
//!    [`BOOT_SCRIPT`] as PID 1 of the new PID namespace. The root filesystem stays the
//!    machine's (python3 for the Apptainer double, nsenter, the built binary, the cached
//!    rootfs), in a private mount namespace with a fresh `/proc`, `/run` and `/dev/shm`
//!    (`/tmp` stays the machine's, where a CI clone and its binary may live), and only a cgroup2 on
//!    `/sys/fs/cgroup` (the machine's v1/hybrid mounts there are unmounted, so systemd and
//!    the double both see a pure-v2 host rooted at the leaf);
//! 3. the test moves `unshare` itself back out of the leaf (it sits outside the new PID
//!    namespace, where systemd could not move it into `init.scope`), then lets the script
//!    exec `/lib/systemd/systemd --system --unit=asv-host.target`.
//!
//! Nothing of the machine's image starts: `SYSTEMD_UNIT_PATH=/run/systemd/system:/run/systemd/generator` is the
//! whole unit search path (so `/etc/systemd/system/*.wants` and `/lib/systemd/system`'s
//! `sysinit.target.wants` are never read: no tmpfiles, sysusers, journald, udev writing to
//! the shared root) and `SYSTEMD_GENERATOR_PATH` points at [`GENERATOR_DIR`], empty
//! unless a test puts a generator there (then `systemctl daemon-reload` runs it, and its
//! normal output directory, `/run/systemd/generator`, is the second and last unit path,
//! ranked below `/run/systemd/system` as on a real host). The test provides every unit
//! that this systemd loads. PID 1 logs with
//! `--log-target=kmsg` into a FIFO bound over `/dev/kmsg` that the test reads (and
//! `/dev/console` is `/dev/null`): never to the machine's kernel log or console.
//!
//! Talk to it with [`HostSystemd::systemctl`]: `nsenter` into its namespaces, where
//! `systemctl` uses `/run/systemd/private`. (From outside the PID namespace systemd refuses
//! the private socket: it cannot see the peer's PID.)
//!
//! Cleanup, also when a test fails: `cgroup.kill` on the leaf ends every process made in
//! it (systemd, the supervisor, Apptainer's master, the container, which all live below
//! the leaf), which ends the namespaces and their mounts; then leftover loop devices of the
//! listed overlays are detached and the cgroups removed. `unshare` also dies with the test
//! thread (`PR_SET_PDEATHSIG`) and takes PID 1 with it (`--kill-child`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::loops_for;

/// The target PID 1 starts (`--unit=`): provide it among the units.
pub const BOOT_TARGET: &str = "asv-host.target";

/// The host's only generator directory (`SYSTEMD_GENERATOR_PATH`), on its own `/run`:
/// write a generator to [`HostSystemd::path`]`(GENERATOR_DIR)`, then daemon-reload.
pub const GENERATOR_DIR: &str = "/run/asv-host/generators";

/// Run as PID 1 of the new namespaces: `sh BOOT_SCRIPT TEST_DIR UNITS_DIR PID1_LOG`.
/// Mounts, copies the units, waits for one line on stdin, then execs systemd.
pub const BOOT_SCRIPT: &str = r#"set -eu
dir=$1 units=$2 log=$3
mount --make-rprivate /
mount -t proc -o nosuid,nodev,noexec proc /proc
# A fresh /run: the unit files go to /run/systemd/system, the first unit path (below).
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/systemd/system /run/asv-host/generators
cp -R "$units/." /run/systemd/system/
# /tmp stays the machine's: the test's directory, the built binary (CI clones may live
# under /tmp) and the double must be reachable at the same paths. Nothing started in
# here cleans /tmp (no tmpfiles: only our units are loaded).
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
# Only a cgroup2, rooted at this cgroup namespace's root (the leaf made for us).
if mountpoint -q /sys/fs/cgroup; then umount -R /sys/fs/cgroup; fi
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
# PID 1 logs to "kmsg": a FIFO the test reads. Nothing reaches the machine's console.
mount --bind "$log" /dev/kmsg
mount --bind /dev/null /dev/console
read -r go
exec env -i container=asv-host \
  SYSTEMD_UNIT_PATH=/run/systemd/system:/run/systemd/generator \
  SYSTEMD_GENERATOR_PATH=/run/asv-host/generators \
  /lib/systemd/systemd --system --unit=asv-host.target --log-target=kmsg \
  --log-level=info --show-status=no </dev/null
"#;

/// Units that stand in for the boot targets. Only these and the service are loaded, so
/// nothing of the machine's own image starts (see `support::host`).
pub fn stand_in_units() -> Vec<(String, String)> {
    let target = |name: &str, why: &str| {
        (
            format!("{name}.target"),
            format!(
                "# Test stand-in: {why}\n[Unit]\nDescription=test stand-in for {name}.target\n"
            ),
        )
    };
    vec![
        target(
            "asv-host",
            "what the host systemd boots into (--unit=); wants nothing",
        ),
        // A service's default dependencies: Requires=/After= sysinit.target, After=
        // basic.target, Conflicts=/Before= shutdown.target (systemd.service(5)).
        target("sysinit", "a service's default dependency; empty here"),
        target("basic", "a service's default dependency; empty here"),
        target("shutdown", "a service's default dependency"),
        // Named by the shipped unit: Wants=/After=network-online.target (pulled in, and
        // reached at once: nothing provides it here), After=time-sync.target
        // remote-fs.target (ordering only).
        target(
            "network-online",
            "named by the shipped unit; no provider here",
        ),
        target("time-sync", "named by the shipped unit; no provider here"),
        target("remote-fs", "named by the shipped unit; no provider here"),
    ]
}

/// A running host systemd. Dropping it ends everything made in it (see the module docs).
pub struct HostSystemd {
    /// PID 1 of the namespaces, as the machine sees it.
    pub pid1: i32,
    unshare: Option<Child>,
    cgroup: PathBuf,
    pid1_log: LogPipe,
    boot_log: PathBuf,
    /// Overlay images whose loop devices must be gone once the host is.
    pub overlays: Vec<PathBuf>,
    torn_down: bool,
}

/// The first cgroup2 mount point of this mount namespace (`/sys/fs/cgroup/unified` on a
/// hybrid host, `/sys/fs/cgroup` on a pure-v2 one).
pub fn cgroup2_root() -> PathBuf {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mi.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .expect("a cgroup2 mount (the host's unified hierarchy)")
}

/// This process's own cgroup2 directory.
fn own_cgroup() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup2 line in /proc/self/cgroup");
    cgroup2_root().join(rel.trim_start_matches('/'))
}

impl HostSystemd {
    /// Boots a host systemd whose only units are `units` (path under /run/systemd/system,
    /// content): they must include [`BOOT_TARGET`]. `dir` (the test's directory) is
    /// visible inside at the same path. Returns once systemd reports `running`.
    pub fn boot(dir: &Path, units: &[(String, String)]) -> HostSystemd {
        static N: AtomicU32 = AtomicU32::new(0);
        let stage = dir.join("host");
        let unit_dir = stage.join("units");
        for (rel, text) in units {
            let p = unit_dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
        }
        let pid1_log = LogPipe::new(&stage.join("pid1.fifo"));
        let boot_log = stage.join("boot.log");
        let cgroup = cgroup2_root().join(format!(
            "asv-host-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&cgroup).expect("creating the host's leaf cgroup");
        // From here on, Drop cleans up whatever the rest of boot managed to make.
        let mut h = HostSystemd {
            pid1: 0,
            unshare: None,
            cgroup,
            pid1_log,
            boot_log,
            overlays: Vec::new(),
            torn_down: false,
        };
        let boot_out = std::fs::File::create(&h.boot_log).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(h.cgroup.join("cgroup.procs"))
            .args([
                "unshare",
                "--pid",
                "--mount",
                "--uts",
                "--ipc",
                "--cgroup",
                "--net",
                "--fork",
                "--kill-child",
                "sh",
                "-c",
                BOOT_SCRIPT,
                "asv-host-pid1",
            ])
            .arg(dir)
            .arg(&unit_dir)
            .arg(&h.pid1_log.fifo)
            .stdin(Stdio::piped())
            .stdout(boot_out.try_clone().unwrap())
            .stderr(boot_out);
        // SAFETY: prctl(2) is async-signal-safe and touches only this (child) process.
        // With it `unshare` dies when the test thread does, even by SIGKILL, and
        // --kill-child then takes PID 1 and so the whole namespace with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawning unshare");
        let unshare_pid = child.id() as i32;
        let mut stdin = child.stdin.take().expect("stdin was piped");
        h.unshare = Some(child);
        // PID 1's script is unshare's child; it waits on stdin once its mounts are done.
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid1 = loop {
            if let Some(p) = children_of(unshare_pid).first() {
                break *p;
            }
            h.check_unshare_alive();
            assert!(Instant::now() < deadline, "unshare forked no PID 1");
            std::thread::sleep(Duration::from_millis(10));
        };
        h.pid1 = pid1;
        // unshare stays outside the new PID namespace: back to our own cgroup with it,
        // so that the leaf holds only what systemd manages.
        std::fs::write(own_cgroup().join("cgroup.procs"), unshare_pid.to_string())
            .expect("moving unshare out of the leaf cgroup");
        stdin.write_all(b"go\n").expect("releasing PID 1");
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            h.check_unshare_alive();
            if h.path("/run/systemd/private").exists() {
                let out = h.systemctl(&["is-system-running"]);
                let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if state == "running" {
                    break;
                }
                assert!(
                    !matches!(state.as_str(), "degraded" | "maintenance" | "stopping"),
                    "host systemd is {state}:\n{}",
                    h.pid1_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "host systemd not running after 20 s:\nboot: {}\npid 1: {}",
                std::fs::read_to_string(&h.boot_log).unwrap_or_default(),
                h.pid1_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    fn check_unshare_alive(&mut self) {
        if let Some(Ok(Some(status))) = self.unshare.as_mut().map(|c| c.try_wait()) {
            panic!(
                "unshare exited ({status}) during boot:\n{}",
                std::fs::read_to_string(&self.boot_log).unwrap_or_default()
            );
        }
    }

    /// A path inside the host's mount namespace, seen from here (`/proc/PID1/root/...`).
    pub fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1)).join(p.trim_start_matches('/'))
    }

    /// `nsenter` into the host's mount, PID, UTS, IPC and cgroup namespaces, and its network
    /// namespace with `net` (without: the machine's network, where a test's registry
    /// listens), up to `--`: the command to run follows.
    pub fn nsenter(&self, net: bool) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid1.to_string(), "-m", "-p", "-u", "-i"]);
        if net {
            c.arg("-n");
        }
        c.args(["-C", "--"]);
        c
    }

    /// Runs a command in the host's namespaces. The process itself stays in the test's
    /// cgroup, outside the leaf, so it never shows up in [`HostSystemd::processes`].
    pub fn exec(&self, args: &[&str]) -> Output {
        self.nsenter(true)
            .args(args)
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "")
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// `systemctl ARGS` against this host's systemd.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// `systemctl show -p PROPS UNIT`, as a map.
    pub fn show(&self, unit: &str, props: &[&str]) -> BTreeMap<String, String> {
        let out = self.systemctl(&["show", "-p", &props.join(","), unit]);
        assert!(
            out.status.success(),
            "systemctl show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// What PID 1 logged so far.
    pub fn pid1_log(&self) -> String {
        String::from_utf8_lossy(&self.pid1_log.text.lock().unwrap()).into_owned()
    }

    /// Every process in the host's cgroup tree (machine pids), with its cgroup path
    /// relative to the leaf.
    pub fn processes(&self) -> Vec<(i32, String)> {
        let mut out = Vec::new();
        for_each_cgroup(&self.cgroup, &mut |d| {
            let rel = d
                .strip_prefix(&self.cgroup)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            for p in std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse().ok())
            {
                out.push((p, format!("/{rel}")));
            }
        });
        out
    }

    /// Ends everything: returns what could not be cleaned up (empty when all went).
    pub fn teardown(&mut self) -> Vec<String> {
        self.torn_down = true;
        let mut problems = Vec::new();
        // Every process below the leaf, containers included, in one go (cgroup v2).
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
        if let Some(mut c) = self.unshare.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let populated = |cg: &Path| {
            std::fs::read_to_string(cg.join("cgroup.events"))
                .map(|t| t.lines().any(|l| l == "populated 1"))
                .unwrap_or(false)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while populated(&self.cgroup) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if populated(&self.cgroup) {
            problems.push(format!(
                "processes left in {}: {:?}",
                self.cgroup.display(),
                self.processes()
            ));
        }
        // Loop devices: the master detaches them, or autoclear does once the namespaces'
        // mounts are gone (which can lag the processes a little).
        for img in &self.overlays {
            let deadline = Instant::now() + Duration::from_secs(3);
            while !loops_for(img).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            for dev in loops_for(img) {
                problems.push(format!(
                    "loop device {dev} still attached to {}",
                    img.display()
                ));
                let _ = Command::new("losetup").arg("-d").arg(&dev).status();
            }
        }
        self.pid1_log.stop();
        // Cgroups, deepest first; a dying task can hold one for a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let mut dirs = Vec::new();
            for_each_cgroup(&self.cgroup, &mut |d| dirs.push(d.to_owned()));
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            let mut left = Vec::new();
            for d in dirs {
                if let Err(e) = std::fs::remove_dir(&d) {
                    left.push(format!("{}: {e}", d.display()));
                }
            }
            if left.is_empty() || Instant::now() > deadline {
                problems.extend(left.into_iter().map(|l| format!("cgroup not removed: {l}")));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        problems
    }
}

impl Drop for HostSystemd {
    fn drop(&mut self) {
        if !self.torn_down {
            for p in self.teardown() {
                eprintln!("host systemd cleanup: {p}");
            }
        }
    }
}

/// PID 1's log: a FIFO bound over `/dev/kmsg`, read all the time by a thread of ours (a
/// plain file would not do: systemd opens /dev/kmsg without O_APPEND, and every reopen,
/// by PID 1 or by a forked child, would write over the start of the file).
struct LogPipe {
    fifo: PathBuf,
    text: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl LogPipe {
    fn new(fifo: &Path) -> LogPipe {
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        // Read and write: opening never blocks, and the reader never sees EOF between
        // writers. Opened here, before PID 1 exists, so that its open never blocks either.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(fifo)
            .expect("opening the log FIFO");
        let text: Arc<Mutex<Vec<u8>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (text, stop) = (text.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = f.read(&mut buf) {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    text.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        LogPipe {
            fifo: fifo.to_owned(),
            text,
            stop,
            reader: Some(reader),
        }
    }

    /// Ends the reader (once nothing else writes).
    fn stop(&mut self) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake it up: our own read-write end keeps the FIFO open, so this never blocks.
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&self.fifo) {
            let _ = f.write_all(b"\n");
        }
        let _ = reader.join();
    }
}

impl Drop for LogPipe {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Calls `f` on `root` and every cgroup below it.
fn for_each_cgroup(root: &Path, f: &mut dyn FnMut(&Path)) {
    if !root.is_dir() {
        return;
    }
    f(root);
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                for_each_cgroup(&e.path(), f);
            }
        }
    }
}

/// Live children of `pid` (machine pids).
fn children_of(pid: i32) -> Vec<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
    if let Ok(t) = text {
        return t
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
    }
    // Without CONFIG_PROC_CHILDREN: scan.
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}
