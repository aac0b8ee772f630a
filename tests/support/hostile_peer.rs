//! The hostile container's D-Bus side, for `tests/hostile.rs`: a real `dbus-daemon` on the
//! container's bus socket and, on it, a program that owns `org.freedesktop.systemd1` and
//! answers the supervisor's calls (`LoadUnit`, `Subscribe`, `ListUnitsFiltered`, the
//! Manager's, Unit's and Service's properties) as an inner systemd would — except that what
//! it says is an attacker's.
//!
//! A module of `tests/hostile.rs` only, so no release build and no package ever contains
//! it. That test's own executable is the program: run with [`ENV`] set to the arguments
//! (separated by `\x1f`) and `--exact hostile_peer_main --ignored`, its ignored test
//! `hostile_peer_main` calls [`main`]. The test starts it inside the container's PID
//! namespace (`nsenter --pid`), so the bus daemon the supervisor connects to is a process
//! of the container, as the real one is: a peer check on the socket passes, and what is
//! tested is what lies behind it.
//!
//! Arguments: `MODE SOCKET DIR [MAINPID]`
//! - SOCKET: the container's `/run/dbus/system_bus_socket` reached from here
//!   (`/proc/<init>/root/run/dbus/system_bus_socket`). The daemon binds a temporary name in
//!   the same directory and the socket is renamed into place only once this program owns
//!   `org.freedesktop.systemd1`, so the supervisor never finds a bus without its systemd.
//! - DIR: the test's directory: `bus.conf` is written there, progress lines go to
//!   `DIR/peer.log` (`bus-up`, `subscribed`, `hostile-done`, `system-state-read` (the
//!   hostile SystemState was asked for), `burst-done`,
//!   `ready-sent <CLOCK_MONOTONIC ns>`), and the file `DIR/go` releases readiness.
//! - `write-logs TARGET STATS`: a runaway logger instead (see [`write_logs`]).
//! - MODE:
//!   - `plain`: an honest systemd; once `go` exists, the required units become active and
//!     the boot finishes.
//!   - `hostile`: after `Subscribe`, newline-, escape- and 100 kB-laden unit names (JobNew,
//!     ListUnitsFiltered), ActiveState, SubState, Result and SystemState, each trying to
//!     add `MAINPID=<MAINPID>`, `READY=1` and `WATCHDOG=trigger` to the supervisor's
//!     notify messages and to forge lines on a terminal; then `hostile-done`, and on `go`
//!     an honest readiness.
//!   - `flood`: 100 signals (JobNew, JobRemoved, PropertiesChanged) before every reply, and
//!     after `Subscribe` a burst of 100 000; then `burst-done` and readiness at once.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use zbus::message::Type;
use zbus::{Connection, Message, MessageStream};
use zbus::{ObjectPath, OwnedObjectPath, Variant as Value};

const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";
const SERVICE: &str = "org.freedesktop.systemd1.Service";
const PROPS: &str = "org.freedesktop.DBus.Properties";
const ROOT: &str = "/org/freedesktop/systemd1";

/// Signals sent before each reply in `flood` mode: more than zbus's 64-slot signal queues.
const PER_CALL: usize = 100;
/// The burst after `Subscribe` in `flood` mode.
const BURST: usize = 100_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Hostile,
    Flood,
}

#[derive(Clone, Default)]
struct UnitState {
    name: String,
    active: String,
    sub: String,
    load: String,
    result: String,
}

struct State {
    system: String,
    jobs: u32,
    /// object path → unit
    units: BTreeMap<String, UnitState>,
    next_job: u32,
}

struct Peer {
    mode: Mode,
    conn: Connection,
    state: Mutex<State>,
    dir: PathBuf,
    mainpid: String,
}

fn log(dir: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("peer.log"))
        .expect("peer.log");
    writeln!(f, "{line}").expect("writing peer.log");
}

/// CLOCK_MONOTONIC in ns: the clock of systemd's `*TimestampMonotonic` properties.
fn monotonic_ns() -> u128 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes only into the timespec we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    assert_eq!(r, 0, "clock_gettime");
    t.tv_sec as u128 * 1_000_000_000 + t.tv_nsec as u128
}

/// A unit's object path, escaped as systemd does (`_xx` for every byte but `[A-Za-z0-9]`).
fn unit_path(name: &str) -> String {
    let mut p = format!("{ROOT}/unit/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(b as char);
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    p
}

impl Peer {
    /// The text every hostile field carries: notify fields after a newline, terminal
    /// codes, and a value long enough to matter.
    fn evil(&self, tag: &str, long: usize) -> String {
        format!(
            "hostile-{tag}\nMAINPID={pid}\nREADY=1\nWATCHDOG=trigger\nSTATUS=forged-by-the-container\r\n\
             \x1b[2J\x1b[31mforged-line\x1b]0;pwned\x07\u{9b}0m\t{fill}",
            pid = self.mainpid,
            fill = "x".repeat(long)
        )
    }

    async fn signal(
        &self,
        path: &str,
        iface: &str,
        name: &str,
        body: &(impl serde::Serialize + zbus::DynamicType),
    ) {
        let _ = self
            .conn
            .emit_signal(None::<zbus::names::BusName<'_>>, path, iface, name, body)
            .await;
    }

    async fn job_new(&self, unit: &str) {
        let id = {
            let mut s = self.state.lock().unwrap();
            s.next_job += 1;
            s.jobs += 1;
            s.next_job
        };
        let job = OwnedObjectPath::try_from(format!("{ROOT}/job/{id}")).unwrap();
        self.signal(ROOT, MANAGER, "JobNew", &(id, job, unit)).await;
    }

    async fn job_removed(&self, unit: &str) {
        let id = {
            let mut s = self.state.lock().unwrap();
            s.jobs = s.jobs.saturating_sub(1);
            s.next_job
        };
        let job = OwnedObjectPath::try_from(format!("{ROOT}/job/{id}")).unwrap();
        self.signal(ROOT, MANAGER, "JobRemoved", &(id, job, unit, "done"))
            .await;
    }

    /// Sets and announces a unit's states (both interfaces, as systemd sends them).
    async fn set_unit(&self, path: &str, active: &str, sub: &str, result: &str) {
        {
            let mut s = self.state.lock().unwrap();
            if let Some(u) = s.units.get_mut(path) {
                u.active = active.to_owned();
                u.sub = sub.to_owned();
                u.result = result.to_owned();
            }
        }
        let mut unit: BTreeMap<&str, Value<'_>> = BTreeMap::new();
        unit.insert("ActiveState", Value::from(active));
        unit.insert("SubState", Value::from(sub));
        self.signal(
            path,
            PROPS,
            "PropertiesChanged",
            &(UNIT, unit, Vec::<String>::new()),
        )
        .await;
        let mut service: BTreeMap<&str, Value<'_>> = BTreeMap::new();
        service.insert("Result", Value::from(result));
        self.signal(
            path,
            PROPS,
            "PropertiesChanged",
            &(SERVICE, service, Vec::<String>::new()),
        )
        .await;
    }

    async fn startup_finished(&self, system: &str) {
        self.state.lock().unwrap().system = system.to_owned();
        self.signal(
            ROOT,
            MANAGER,
            "StartupFinished",
            &(0u64, 0u64, 1000u64, 0u64, 2000u64, 3000u64),
        )
        .await;
    }

    fn unit_paths(&self) -> Vec<String> {
        self.state.lock().unwrap().units.keys().cloned().collect()
    }

    /// Every required unit active, the boot finished: what makes the supervisor ready.
    async fn become_ready(&self) {
        for p in self.unit_paths() {
            self.set_unit(&p, "active", "running", "success").await;
        }
        self.startup_finished("running").await;
        log(&self.dir, &format!("ready-sent {}", monotonic_ns()));
    }

    async fn wait_for_go(&self) {
        let go = self.dir.join("go");
        while !go.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `n` signals of the kinds the supervisor follows, alternating.
    async fn flood(&self, n: usize, tag: &str) {
        let paths = self.unit_paths();
        for i in 0..n {
            match (i % 3, paths.first()) {
                (1, _) => self.job_removed(&format!("{tag}-{i}.service")).await,
                (2, Some(p)) => {
                    // A new SubState each time, the ActiveState and Result kept: the flood
                    // changes what the supervisor must follow, never whether it is ready.
                    let (active, result) = {
                        let s = self.state.lock().unwrap();
                        let u = &s.units[p];
                        (u.active.clone(), u.result.clone())
                    };
                    let sub = if i % 2 == 0 { "flood-a" } else { "flood-b" };
                    self.set_unit(p, &active, sub, &result).await;
                }
                _ => self.job_new(&format!("{tag}-{i}.service")).await,
            }
        }
    }

    /// What runs after `Subscribe` was answered.
    async fn script(self: Arc<Self>) {
        match self.mode {
            Mode::Plain => {
                self.wait_for_go().await;
                self.become_ready().await;
            }
            Mode::Hostile => {
                for name in [
                    self.evil("job", 0) + ".service",
                    self.evil("job-long", 100_000) + ".service",
                ] {
                    self.job_new(&name).await;
                    self.job_removed(&name).await;
                }
                for p in self.unit_paths() {
                    self.set_unit(
                        &p,
                        &self.evil("active", 100_000),
                        &self.evil("sub", 100_000),
                        &self.evil("result", 100_000),
                    )
                    .await;
                }
                // The boot "finishes": the supervisor re-reads SystemState and gets this.
                self.startup_finished(&self.evil("system", 100_000)).await;
                log(&self.dir, "hostile-done");
                self.wait_for_go().await;
                self.become_ready().await;
            }
            Mode::Flood => {
                self.flood(BURST, "burst").await;
                log(&self.dir, "burst-done");
                self.become_ready().await;
            }
        }
    }

    fn property(&self, path: &str, iface: &str, prop: &str) -> Option<Value<'static>> {
        let s = self.state.lock().unwrap();
        let v = match (iface, prop) {
            (MANAGER, "SystemState") => Value::from(s.system.clone()),
            (MANAGER, "NJobs") => Value::from(s.jobs),
            (MANAGER, "Version") => Value::from("252-hostile".to_owned()),
            (MANAGER, "FinishTimestampMonotonic") => Value::from(0u64),
            (UNIT, _) | (SERVICE, _) => {
                let u = s.units.get(path)?;
                match prop {
                    "ActiveState" => Value::from(u.active.clone()),
                    "SubState" => Value::from(u.sub.clone()),
                    "LoadState" => Value::from(u.load.clone()),
                    "Result" => Value::from(u.result.clone()),
                    "Id" => Value::from(u.name.clone()),
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some(v)
    }

    async fn handle(self: &Arc<Self>, msg: Message) -> zbus::Result<()> {
        let hdr = msg.header();
        if hdr.message_type() != Type::MethodCall {
            return Ok(());
        }
        if self.mode == Mode::Flood {
            self.flood(PER_CALL, "call").await;
        }
        let iface = hdr.interface().map(|i| i.to_string()).unwrap_or_default();
        let member = hdr.member().map(|m| m.to_string()).unwrap_or_default();
        let path = hdr.path().map(|p| p.to_string()).unwrap_or_default();
        let body = msg.body();
        match (iface.as_str(), member.as_str()) {
            (MANAGER, "Subscribe") => {
                self.conn.reply(&hdr, &()).await?;
                log(&self.dir, "subscribed");
                tokio::spawn(self.clone().script());
            }
            (MANAGER, "LoadUnit") | (MANAGER, "GetUnit") => {
                let name: String = body.deserialize()?;
                let p = unit_path(&name);
                self.state
                    .lock()
                    .unwrap()
                    .units
                    .entry(p.clone())
                    .or_insert_with(|| UnitState {
                        name,
                        active: "activating".into(),
                        sub: "start".into(),
                        load: "loaded".into(),
                        result: "success".into(),
                    });
                self.conn
                    .reply(&hdr, &ObjectPath::try_from(p.as_str())?)
                    .await?;
            }
            (MANAGER, "ListUnitsFiltered") | (MANAGER, "ListUnits") => {
                let names = if self.mode == Mode::Hostile {
                    vec![
                        self.evil("unit", 0) + ".service",
                        self.evil("unit-long", 100_000) + ".service",
                    ]
                } else {
                    Vec::new()
                };
                let rows: Vec<_> = names
                    .into_iter()
                    .map(|n| {
                        let p = OwnedObjectPath::try_from(unit_path(&n)).unwrap();
                        (
                            n,
                            "hostile".to_owned(),
                            "loaded".to_owned(),
                            "failed".to_owned(),
                            "failed".to_owned(),
                            String::new(),
                            p,
                            0u32,
                            String::new(),
                            OwnedObjectPath::try_from("/").unwrap(),
                        )
                    })
                    .collect();
                self.conn.reply(&hdr, &rows).await?;
            }
            (MANAGER, "ResetFailedUnit") => self.conn.reply(&hdr, &()).await?,
            (MANAGER, "RestartUnit") | (MANAGER, "StartUnit") => {
                let job = OwnedObjectPath::try_from(format!("{ROOT}/job/1")).unwrap();
                self.conn.reply(&hdr, &job).await?;
            }
            (PROPS, "Get") => {
                let (i, p): (String, String) = body.deserialize()?;
                if p == "SystemState" && self.state.lock().unwrap().system.starts_with("hostile-") {
                    log(&self.dir, "system-state-read");
                }
                match self.property(&path, &i, &p) {
                    Some(v) => self.conn.reply(&hdr, &v).await?,
                    None => {
                        self.conn
                            .reply_error(
                                &hdr,
                                "org.freedesktop.DBus.Error.UnknownProperty",
                                &format!("no property {i}.{p} here"),
                            )
                            .await?
                    }
                }
            }
            ("org.freedesktop.DBus.Peer", "Ping") => self.conn.reply(&hdr, &()).await?,
            _ => {
                self.conn
                    .reply_error(
                        &hdr,
                        "org.freedesktop.DBus.Error.UnknownMethod",
                        &format!("{iface}.{member} is not served here"),
                    )
                    .await?
            }
        }
        Ok(())
    }
}

/// Starts `dbus-daemon` listening at `listen` with a configuration that lets any root
/// client own any name; returns once it accepts connections. A thread waits for it and
/// notes its end in `peer.log` (it ends with the container's PID namespace).
fn start_daemon(dir: &Path, listen: &Path) {
    let conf = dir.join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
  <!-- Room for the whole burst: what is measured is the supervisor, not this daemon. -->
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_replies_per_connection">1000000</limit>
</busconfig>
"#,
            listen.display()
        ),
    )
    .expect("writing bus.conf");
    let mut child = Command::new("dbus-daemon")
        .args(["--nofork", "--nopidfile", "--nosyslog", "--print-address=1"])
        .arg(format!("--config-file={}", conf.display()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting dbus-daemon");
    // The address is printed once the daemon listens.
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("dbus-daemon's address");
    assert!(!line.trim().is_empty(), "dbus-daemon printed no address");
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        let status = child.wait();
        log(&dir, &format!("dbus-daemon exited: {status:?}"));
    });
}

/// `write-logs TARGET STATS`: a runaway logger. Appends 200-byte lines to TARGET (the
/// init's `/proc/<pid>/fd/1` or `/2`: Apptainer's `NAME.out`/`NAME.err`, opened with
/// O_APPEND as Apptainer opens them) as fast as it can, 64 KiB per write(2) as a program
/// with a fully buffered stdout does, for ever; a failed write (ENOSPC: the file system is
/// full) is counted and the writing goes on. Every 16 MiB STATS gets
/// "BYTES_WRITTEN FAILED_WRITES".
fn write_logs(target: &Path, stats: &Path) -> ! {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(target)
        .expect("opening the container's log");
    let (mut bytes, mut failed) = (0u64, 0u64);
    let mut n = 0u64;
    let mut buf = Vec::with_capacity(64 * 1024);
    for round in 0u64.. {
        buf.clear();
        while buf.len() + 200 <= 64 * 1024 {
            let line = format!("{n:>12} runaway logger {}\n", "y".repeat(200 - 29));
            buf.extend_from_slice(line.as_bytes());
            n += 1;
        }
        match f.write(&buf) {
            Ok(k) => bytes += k as u64,
            Err(_) => failed += 1,
        }
        if round % 256 == 0 || failed == 1 {
            let _ = std::fs::write(stats, format!("{bytes} {failed}\n"));
        }
    }
    unreachable!("the loop has no end")
}

/// Where the test puts the peer's arguments, separated by `\x1f`.
pub const ENV: &str = "ASV_HOSTILE_PEER";

/// The peer's program: its arguments from [`ENV`]; never returns while it has work.
/// Without [`ENV`] (an `--include-ignored` run) there is nothing to do.
pub fn main() {
    let Some(line) = std::env::var_os(ENV) else {
        eprintln!("{ENV} is not set: this is the hostile peer's entry point, not a test");
        return;
    };
    let mut args: Vec<String> = vec!["hostile-peer".into()];
    args.extend(line.to_string_lossy().split('\x1f').map(str::to_owned));
    if args.get(1).map(String::as_str) == Some("write-logs") {
        let usage = "usage: hostile-peer write-logs TARGET STATS";
        write_logs(
            Path::new(args.get(2).expect(usage)),
            Path::new(args.get(3).expect(usage)),
        );
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(serve(args));
}

async fn serve(args: Vec<String>) {
    let usage = "usage: hostile-peer plain|hostile|flood SOCKET DIR [MAINPID]";
    let mode = match args.get(1).map(String::as_str) {
        Some("plain") => Mode::Plain,
        Some("hostile") => Mode::Hostile,
        Some("flood") => Mode::Flood,
        _ => panic!("{usage}"),
    };
    let socket = PathBuf::from(args.get(2).expect(usage));
    let dir = PathBuf::from(args.get(3).expect(usage));
    let mainpid = args.get(4).cloned().unwrap_or_else(|| "1".into());
    let temp = socket.with_file_name(".hostile-peer-socket");
    start_daemon(&dir, &temp);
    let conn = zbus::connection::Builder::address(format!("unix:path={}", temp.display()).as_str())
        .name("org.freedesktop.systemd1")
        .build()
        .await
        .expect("connecting to our dbus-daemon as org.freedesktop.systemd1");
    std::fs::rename(&temp, &socket).expect("putting the bus socket in place");
    log(&dir, "bus-up");
    let peer = Arc::new(Peer {
        mode,
        conn: conn.clone(),
        state: Mutex::new(State {
            system: "starting".into(),
            jobs: 3,
            units: BTreeMap::new(),
            next_job: 100,
        }),
        dir: dir.clone(),
        mainpid,
    });
    let mut stream = MessageStream::from(&conn);
    while let Some(msg) = stream.next().await {
        let Ok(msg) = msg else { continue };
        if let Err(e) = peer.handle(msg).await {
            log(&dir, &format!("error: {e}"));
        }
    }
}
