//! The harness of `tests/hostile.rs`: a real host systemd (`support::host`) running the
//! shipped unit for a hostile container, the journal as a socket of the test, and the
//! ways the host is read (`systemctl show`, PID 1's notify log, `status`). Included by
//! that test alone (`#[path]`), so the other tests do not compile it.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hostile_peer;
use crate::support::host::{HostSystemd, BOOT_TARGET};
use crate::support::{self, dropin_environment, support, write_apptainer_conf, SEC};

pub const NAME: &str = "ood001";
pub const UNIT: &str = "apptainer-supervisor@ood001.service";
/// An unrelated service of the host: a MAINPID= forged by the container would name it.
pub const BYSTANDER: &str = "asv-bystander.service";
/// The required unit inside, served by the hostile peer.
pub const REQUIRED: &str = "asv-hostile.service";

/// PID 1 of the container (run by the double as its light init): a root of its own on a
/// tmpfs, the machine's `/usr` (and the `/bin`, `/lib` … links to it) bound in, a
/// `dbus.service` unit file so that the image "has D-Bus", then `fake-init` chrooted there.
/// Its mount namespace is private (the double's), so nothing reaches the host.
pub const CROOT_INIT: &str = r#"#!/bin/sh
set -eu
r=$ASV_CROOT
mount -t tmpfs -o mode=0755 asv-croot "$r"
mkdir "$r/usr"
mount --rbind /usr "$r/usr"
for d in bin sbin lib lib64; do
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$r/$d"
  elif [ -d "/$d" ]; then mkdir "$r/$d"; mount --rbind "/$d" "$r/$d"; fi
done
mkdir -p "$r/etc/systemd/system" "$r/run/dbus" "$r/proc" "$r/dev" "$r/tmp" "$r/asv"
cp /etc/ld.so.cache "$r/etc/" 2>/dev/null || :
: > "$r/etc/systemd/system/dbus.service"
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"
cp "$ASV_FAKE_INIT" "$r/asv/init"
exec chroot "$r" /asv/init
"#;

/// The binary under test: the build tree's, or the package's at `ASV_INSTALLED_ROOT` (as
/// in `host_unit.rs`; the RSS bound is about the shipped, optimised binary).
pub fn bin() -> PathBuf {
    match std::env::var_os("ASV_INSTALLED_ROOT") {
        Some(root) => PathBuf::from(root).join("usr/bin/apptainer-supervisor"),
        None => support::BIN.into(),
    }
}

// ---------------------------------------------------------------------------------------
// The journal: a datagram socket of ours where journald's would be.

pub type Entry = BTreeMap<String, Vec<u8>>;

/// One native-protocol datagram: `KEY=VALUE\n`, or `KEY\n` + u64 LE length + value + `\n`.
pub fn parse_entry(mut d: &[u8]) -> Entry {
    let mut e = Entry::new();
    while !d.is_empty() {
        let Some(end) = d.iter().position(|&b| b == b'=' || b == b'\n') else {
            break;
        };
        let key = String::from_utf8_lossy(&d[..end]).into_owned();
        if d[end] == b'=' {
            let rest = &d[end + 1..];
            let nl = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            e.insert(key, rest[..nl].to_vec());
            d = rest.get(nl + 1..).unwrap_or(&[]);
        } else {
            let rest = &d[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            e.insert(key, rest[8..8 + len].to_vec());
            d = rest.get(8 + len + 1..).unwrap_or(&[]);
        }
    }
    e
}

pub struct Journal {
    /// Every entry, with the time it arrived.
    pub entries: Arc<Mutex<Vec<(Instant, Entry)>>>,
}

impl Journal {
    /// Binds the host's `/run/systemd/journal/socket` (the host's own `/run`, which the
    /// supervisor's mount namespace shares) and drains it all the time, as journald does.
    pub fn attach(host: &HostSystemd) -> Journal {
        let dir = host.path("/run/systemd/journal");
        std::fs::create_dir_all(&dir).unwrap();
        let sock = UnixDatagram::bind(dir.join("socket")).expect("binding the journal socket");
        let entries: Arc<Mutex<Vec<(Instant, Entry)>>> = Arc::default();
        let e = entries.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            // Empty datagrams are "is anyone there" probes; journald ignores them too.
            while let Ok(n) = sock.recv(&mut buf) {
                if n > 0 {
                    let entry = parse_entry(&buf[..n]);
                    e.lock().unwrap().push((Instant::now(), entry));
                }
            }
        });
        Journal { entries }
    }

    /// Every entry but PID 1's own (those are read through [`Hostile::notifications`]).
    pub fn all(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| field(e, "SYSLOG_IDENTIFIER") != b"systemd")
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// PID 1's messages, with the time each arrived.
    pub fn pid1(&self) -> Vec<(Instant, String)> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| field(e, "SYSLOG_IDENTIFIER") == b"systemd")
            .map(|(t, e)| {
                (
                    *t,
                    String::from_utf8_lossy(field(e, "MESSAGE")).into_owned(),
                )
            })
            .collect()
    }
}

pub fn field<'a>(e: &'a Entry, k: &str) -> &'a [u8] {
    e.get(k).map_or(&[], Vec::as_slice)
}

/// Control bytes that would act on a terminal or forge a line: C0 but TAB, DEL, and the C1
/// CSI in its UTF-8 form.
pub fn control_bytes(b: &[u8]) -> Vec<String> {
    let mut found: Vec<String> = b
        .iter()
        .filter(|&&c| (c < 0x20 && c != b'\t') || c == 0x7f)
        .map(|c| format!("{c:#04x}"))
        .collect();
    if b.windows(2).any(|w| w == [0xc2, 0x9b]) {
        found.push("U+009B".into());
    }
    found.sort();
    found.dedup();
    found
}

// ---------------------------------------------------------------------------------------
// The host.

pub struct Opts {
    pub start_sec: u64,
    pub stop_sec: u64,
    pub watchdog_sec: u64,
    /// A tmpfs of this size (MiB) as Apptainer's log directory (`NAME.out`, `NAME.err`).
    pub log_fs_mib: Option<u64>,
}

pub struct Hostile {
    pub host: HostSystemd,
    pub journal: Journal,
    /// The log file system's mount point in this (the machine's) mount namespace.
    pub log_fs: Option<PathBuf>,
    pub peer_dir: PathBuf,
    pub peers: Vec<Child>,
    pub dir: tempfile::TempDir,
}

impl Hostile {
    pub fn new(o: Opts) -> Hostile {
        let dir = tempfile::Builder::new()
            .prefix("asv-hostile-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_owned();
        let service_dir = root.join("services").join(NAME);
        for d in ["containers/sandbox", "overlay"] {
            std::fs::create_dir_all(service_dir.join(d)).unwrap();
        }
        let etc = root.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join(format!("{NAME}.toml")),
            format!(
                "name = \"{NAME}\"\nservice_dir = \"{}\"\n\
                 image = \"${{service_dir}}/containers/sandbox\"\n\
                 [apptainer]\nbinary = \"{}\"\n[overlay]\nsize_mib = 64\n\
                 [timeouts]\nstart_sec = {}\nstop_sec = {}\nkill_sec = 3\nwatchdog_sec = {}\n\
                 [readiness]\nrequired_units = [\"{REQUIRED}\"]\n",
                service_dir.display(),
                support("apptainer").display(),
                o.start_sec,
                o.stop_sec,
                o.watchdog_sec,
            ),
        )
        .unwrap();
        let init = root.join("croot-init");
        std::fs::write(&init, CROOT_INIT).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(root.join("croot")).unwrap();
        let peer_dir = root.join("peer");
        std::fs::create_dir(&peer_dir).unwrap();

        // Apptainer's log directory (the double: <APPTAINER_CONFIGDIR>/instances/logs/...)
        // on a file system of its own, mounted before the host boots so that the host's
        // mount namespace, copied at boot, has it too.
        let apptainer_dir = root.join("apptainer");
        std::fs::create_dir(&apptainer_dir).unwrap();
        std::fs::set_permissions(&apptainer_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let log_fs = o.log_fs_mib.map(|mib| {
            let logs = apptainer_dir.join("instances/logs");
            std::fs::create_dir_all(&logs).unwrap();
            let out = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={mib}m,mode=0700"),
                    "asv-logs",
                ])
                .arg(&logs)
                .output()
                .unwrap();
            assert!(out.status.success(), "mount: {}", support::stderr(&out));
            logs
        });

        let shipped = std::fs::read_to_string(match std::env::var_os("ASV_INSTALLED_ROOT") {
            Some(r) => {
                PathBuf::from(r).join("usr/lib/systemd/system/apptainer-supervisor@.service")
            }
            None => {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("units/apptainer-supervisor@.service")
            }
        })
        .unwrap();
        let exec = "\nExecStart=/usr/bin/apptainer-supervisor ";
        assert_eq!(shipped.matches(exec).count(), 1);
        let unit = shipped.replace(
            exec,
            &format!(
                "\nExecStart={} --config-dir {} ",
                bin().display(),
                etc.display()
            ),
        );
        let log = root.join("supervisor.log");
        let conf_env =
            dropin_environment(&write_apptainer_conf(&root.join("apptainer-etc"), "file"));
        let dropin = format!(
            "# Test plumbing; the shipped unit's meaning is otherwise unchanged.\n\
             [Service]\n\
             Environment=APPTAINER_CONFIGDIR={}\n\
             {conf_env}\
             # The hostile container: the light init in a root of its own.\n\
             Environment=APPTAINER_DOUBLE_INIT={}\n\
             Environment=ASV_CROOT={}\n\
             Environment=ASV_FAKE_INIT={}\n\
             StandardOutput=append:{log}\n\
             StandardError=append:{log}\n\
             TimeoutStartSec={}s\n\
             TimeoutStopSec=30s\n\
             WatchdogSec={}s\n\
             # One run per test: what a restart would do is not the question here.\n\
             Restart=no\n\
             LimitCORE=0\n",
            apptainer_dir.display(),
            init.display(),
            root.join("croot").display(),
            support("fake-init").display(),
            o.start_sec + 30,
            o.watchdog_sec,
            log = log.display(),
        );
        let target = |name: &str| {
            (
                format!("{name}.target"),
                format!("[Unit]\nDescription=test stand-in for {name}.target\n"),
            )
        };
        let units = vec![
            target("asv-host"),
            target("sysinit"),
            target("basic"),
            target("shutdown"),
            target("network-online"),
            target("time-sync"),
            target("remote-fs"),
            (
                BYSTANDER.to_owned(),
                "[Unit]\nDescription=an unrelated host service (test)\n\
                 [Service]\nExecStart=/bin/sleep infinity\n\
                 StandardOutput=null\nStandardError=null\n"
                    .to_owned(),
            ),
            // PID 1 logs to the journal only while it sees journald running (systemd's
            // manager_journal_is_running: these two units up); the socket that receives
            // it is ours, [`Journal::attach`].
            (
                "systemd-journald.socket".to_owned(),
                "# Test stand-in: journald's socket unit, so that PID 1 logs to the journal\n\
                 [Unit]\nDefaultDependencies=no\n\
                 [Socket]\nListenDatagram=/run/asv-journald-stand-in.sock\n"
                    .to_owned(),
            ),
            (
                "systemd-journald.service".to_owned(),
                "# Test stand-in: the journal is the test's socket\n\
                 [Unit]\nDefaultDependencies=no\n\
                 [Service]\nExecStart=/bin/sleep infinity\n\
                 StandardOutput=null\nStandardError=null\n"
                    .to_owned(),
            ),
            ("apptainer-supervisor@.service".to_owned(), unit),
            (format!("{UNIT}.d/50-test.conf"), dropin),
        ];
        assert!(units.iter().any(|(n, _)| n == BOOT_TARGET));
        let mut host = HostSystemd::boot(&root, &units);
        host.overlays.push(service_dir.join("overlay/overlay.img"));
        let journal = Journal::attach(&host);
        // Every notify datagram PID 1 accepts is logged at debug level, field by field: to
        // the journal (ours), where no rate limit applies (PID 1's kmsg target allows 200
        // lines per 5 s), and where each arrives with its time.
        for args in [
            &[
                "start",
                "systemd-journald.socket",
                "systemd-journald.service",
            ][..],
            &["log-target", "journal"][..],
            &["log-level", "debug"][..],
            &["start", BYSTANDER][..],
        ] {
            let out = host.systemctl(args);
            assert!(
                out.status.success(),
                "systemctl {args:?}: {}",
                support::stderr(&out)
            );
        }
        Hostile {
            host,
            journal,
            log_fs,
            peer_dir,
            peers: Vec::new(),
            dir,
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn show(&self, unit: &str, props: &[&str]) -> BTreeMap<String, String> {
        self.host.show(unit, props)
    }

    pub fn unit(&self) -> BTreeMap<String, String> {
        self.show(
            UNIT,
            &["ActiveState", "SubState", "Result", "MainPID", "StatusText"],
        )
    }

    /// The supervisor's log file and PID 1's, for failure messages (the last 20 kB).
    pub fn logs(&self) -> String {
        let tail = |s: String| {
            let cut = s.len().saturating_sub(20_000);
            let cut = (cut..s.len())
                .find(|&i| s.is_char_boundary(i))
                .unwrap_or(s.len());
            s[cut..].to_owned()
        };
        let journal: String = self
            .journal
            .all()
            .iter()
            .filter(|e| field(e, "SYSLOG_IDENTIFIER") == b"apptainer-supervisor")
            .map(|e| {
                let mut l: String = e
                    .iter()
                    .filter(|(k, _)| !k.starts_with("CODE_") && k.as_str() != "SYSLOG_IDENTIFIER")
                    .map(|(k, v)| {
                        let v = String::from_utf8_lossy(&v[..v.len().min(300)]).into_owned();
                        format!("{k}={v:?} ")
                    })
                    .collect();
                l.push('\n');
                l
            })
            .collect();
        format!(
            "--- supervisor's journal:\n{}\n--- supervisor log:\n{}\n--- peer log:\n{}\n--- host PID 1 log (tail):\n{}",
            tail(journal),
            tail(std::fs::read_to_string(self.root().join("supervisor.log")).unwrap_or_default()),
            std::fs::read_to_string(self.peer_dir.join("peer.log")).unwrap_or_default()
                + &std::fs::read_to_string(self.peer_dir.join("peer.out")).unwrap_or_default(),
            tail(
                self.host.pid1_log()
                    + &self
                        .journal
                        .pid1()
                        .into_iter()
                        .map(|(_, m)| m + "\n")
                        .collect::<String>()
            )
        )
    }

    /// Polls the unit every 50 ms until `done`; panics with the logs after `within`.
    pub fn wait_unit(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let deadline = Instant::now() + within;
        loop {
            let m = self.unit();
            if done(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{UNIT}: {what} not reached within {within:?}; last {m:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn start(&self) {
        let out = self.host.systemctl(&["start", "--no-block", UNIT]);
        assert!(out.status.success(), "{}", support::stderr(&out));
    }

    /// The container's init, as the host's PID namespace numbers it, once its own root is
    /// in place (its `/run/dbus` exists).
    pub fn container(&self) -> i32 {
        let deadline = Instant::now() + 60 * SEC;
        loop {
            if let Some(pid) = self.state_file_pid() {
                if self
                    .host
                    .path(&format!("/proc/{pid}/root/run/dbus"))
                    .is_dir()
                {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no container with its own root after 60 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn state_file_pid(&self) -> Option<i32> {
        let app = self.root().join("apptainer/instances/app");
        let p = std::fs::read_dir(app).ok()?.flatten().find_map(|h| {
            let p = h
                .path()
                .join("root")
                .join(NAME)
                .join(format!("{NAME}.json"));
            p.exists().then_some(p)
        })?;
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v["pid"].as_i64().map(|p| p as i32)
    }

    /// The container's bus socket, seen from the host's mount namespace.
    pub fn bus_socket(&self, cpid: i32) -> String {
        format!("/proc/{cpid}/root/run/dbus/system_bus_socket")
    }

    /// Runs `hostile-peer ARGS` inside the container's PID namespace (only: it stays in
    /// the host's mount namespace and reaches the container's files by `/proc/<pid>/root`).
    /// It dies with the container's PID namespace.
    pub fn spawn_in_container(&mut self, cpid: i32, args: &[&str]) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.peer_dir.join("peer.out"))
            .unwrap();
        let child = self
            .host
            .nsenter(true)
            .args(["nsenter", "-t", &cpid.to_string(), "-p", "--"])
            .arg(std::env::current_exe().expect("current_exe"))
            .args([
                "--exact",
                "hostile_peer_main",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(hostile_peer::ENV, args.join("\x1f"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("nsenter");
        self.peers.push(child);
    }

    pub fn start_peer(&mut self, mode: &str, cpid: i32, mainpid: &str) {
        let socket = self.bus_socket(cpid);
        let dir = self.peer_dir.display().to_string();
        self.spawn_in_container(cpid, &[mode, &socket, &dir, mainpid]);
    }

    pub fn peer_log(&self) -> String {
        std::fs::read_to_string(self.peer_dir.join("peer.log")).unwrap_or_default()
    }

    /// Waits for the peer to log a line starting with `what`; returns that line.
    pub fn wait_peer(&self, within: Duration, what: &str) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.peer_log().lines().find(|l| l.starts_with(what)) {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "the peer did not say {what:?} within {within:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn go(&self) {
        std::fs::write(self.peer_dir.join("go"), "").unwrap();
    }

    /// `apptainer-supervisor status` in the host's namespaces, as an operator runs it.
    pub fn status(&self) -> std::process::Output {
        let bin = bin();
        let etc = self.root().join("etc");
        self.host.exec(&[
            bin.to_str().unwrap(),
            "--config-dir",
            etc.to_str().unwrap(),
            "status",
        ])
    }

    /// The notify datagrams PID 1 accepted from `pid` so far, each as its fields.
    pub fn notifications(&self, pid: &str) -> Vec<Vec<String>> {
        self.timed_notifications(pid)
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    /// [`Self::notifications`] with the time PID 1's log line about each arrived.
    pub fn timed_notifications(&self, pid: &str) -> Vec<(Instant, Vec<String>)> {
        let head = format!("Got notification message from PID {pid} (");
        self.journal
            .pid1()
            .into_iter()
            .filter_map(|(t, l)| {
                let rest = &l[l.find(&head)? + head.len()..];
                let inner = rest.strip_suffix(')').unwrap_or(rest);
                Some((t, inner.split(", ").map(str::to_owned).collect()))
            })
            .collect()
    }

    pub fn stop(&self) -> BTreeMap<String, String> {
        let out = self.host.systemctl(&["stop", UNIT]);
        assert!(out.status.success(), "{}", support::stderr(&out));
        self.unit()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        for c in &mut self.peers {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(m) = &self.log_fs {
            // Lazily: the host's copy of the mount goes with its namespace.
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// A field that a container could only have added through a newline in our text.
pub fn forged(fields: &[String]) -> Vec<String> {
    fields
        .iter()
        .filter(|f| {
            f.starts_with("MAINPID=")
                || f.starts_with("WATCHDOG=trigger")
                || f.starts_with("STATUS=forged")
                || f.starts_with("WATCHDOG_USEC=")
        })
        .cloned()
        .collect()
}

/// `pid` (the host's numbering) as this test's PID namespace numbers it.
pub fn machine_pid(host: &HostSystemd, pid: i32) -> i32 {
    host.processes()
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    let l = s.lines().find(|l| l.starts_with("NSpid:"))?.to_owned();
                    l.split_whitespace().nth(2).map(|n| n == pid.to_string())
                })
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("host pid {pid} not found among the host's processes"))
}

/// CLOCK_MONOTONIC in µs: the clock of systemd's `*TimestampMonotonic` properties.
pub fn monotonic_us() -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes only into the timespec we own.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) },
        0
    );
    t.tv_sec * 1_000_000 + t.tv_nsec / 1000
}

/// Waits for process `pid` (this namespace's numbering) to exit, through a pidfd; returns
/// CLOCK_MONOTONIC (µs) right after it did.
pub fn wait_exit(pid: i32, within: Duration) -> i64 {
    // SAFETY: pidfd_open(2) with plain integers; the descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor of ours.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(within.as_millis()).unwrap_or(u16::MAX);
    let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).expect("poll");
    assert_eq!(n, 1, "process {pid} still alive after {within:?}");
    monotonic_us()
}

pub fn monotonic_prop(s: &Hostile, prop: &str) -> i64 {
    s.show(UNIT, &[prop])[prop].parse().unwrap()
}

/// The requirements of a case, checked one by one: the test fails at its end with every
/// one that did not hold, so that one missing defence does not hide how the others fare.
#[derive(Default)]
pub struct Checks(Vec<String>);

impl Checks {
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w: String = what().chars().take(3000).collect();
            eprintln!("NOT MET: {w}");
            self.0.push(w);
        }
    }

    pub fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} requirement(s) not met:\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}
