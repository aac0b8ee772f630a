//! The shipped unit file, `units/apptainer-supervisor@.service`, run by a real systemd as
//! the "core host" (`support::host`: systemd booted as PID 1 in namespaces of its own,
//! since this machine's PID 1 is not systemd), with the container's systemd booted from the
//! cached test rootfs through the Apptainer double. Read through `systemctl show`, as an
//! operator would: the unit is `activating` until the inside is ready, `active` then, stops
//! the inside in order with `Result=success`, and a frozen inner manager ends in
//! `Result=watchdog` and a restart.
//!
//! The same for `ood001.service` as apptainer-supervisor-generator makes it on
//! `daemon-reload` (the built generator in the host's generator directory): loaded from
//! the generator's directory with the service file's timeouts, `activating` until ready,
//! restarted after its container is killed, never running beside
//! `apptainer-supervisor@ood001.service` (Conflicts=), stopped in order.
//!
//! The unit file is the shipped one with one change, ExecStart='s binary path (the built
//! binary, with `--config-dir` for the test's service file); a drop-in adds the test's
//! plumbing and shorter timeouts. Needs root and the rootfs (`tests/support/build-rootfs.sh`).
//!
//! With `ASV_INSTALLED_ROOT` set to an extracted binary RPM (`.ci/run` does this after
//! `packaging/build-rpm.sh`), the binary, the generator and the template unit are the
//! package's files as they install, so the same tests prove the package works as installed.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::host::{stand_in_units, HostSystemd, BOOT_TARGET, GENERATOR_DIR};
use support::{
    dropin_environment, loops_for, require_root, rootfs, support, write_apptainer_conf, SEC,
};

const NAME: &str = "ood001";
const UNIT: &str = "apptainer-supervisor@ood001.service";

/// The files under test: the build tree's, or those of the package extracted at
/// `ASV_INSTALLED_ROOT` (the paths the RPM installs them to).
struct Files {
    bin: PathBuf,
    generator: PathBuf,
    template: PathBuf,
}

fn files() -> Files {
    match std::env::var_os("ASV_INSTALLED_ROOT") {
        Some(root) => {
            let root = PathBuf::from(root);
            let f = Files {
                bin: root.join("usr/bin/apptainer-supervisor"),
                generator: root
                    .join("usr/lib/systemd/system-generators/apptainer-supervisor-generator"),
                template: root.join("usr/lib/systemd/system/apptainer-supervisor@.service"),
            };
            for p in [&f.bin, &f.generator, &f.template] {
                assert!(p.exists(), "ASV_INSTALLED_ROOT lacks {}", p.display());
            }
            f
        }
        None => Files {
            bin: support::BIN.into(),
            generator: env!("CARGO_BIN_EXE_apptainer-supervisor-generator").into(),
            template: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("units/apptainer-supervisor@.service"),
        },
    }
}
/// The unit apptainer-supervisor-generator makes of ood001.toml.
const GENERATED: &str = "ood001.service";
/// What `systemctl show` is asked for while a test waits on the unit.
const PROPS: &[&str] = &[
    "ActiveState",
    "SubState",
    "StatusText",
    "Result",
    "MainPID",
    "NRestarts",
    "ExecMainCode",
    "ExecMainStatus",
];

/// One service, `ood001`, under a freshly booted host systemd.
struct Setup {
    /// Declared before `dir`: the host (and everything in it) goes first.
    host: HostSystemd,
    dir: tempfile::TempDir,
}

struct Opts {
    /// `timeouts.stop_sec` in the service file.
    stop_sec: u64,
    /// The unit's `WatchdogSec=` (a drop-in) and `timeouts.watchdog_sec`; None: the
    /// shipped 60 s.
    watchdog_sec: Option<u64>,
    /// Also run `ood001.service` as the generator makes it: the service file gets
    /// `[unit]`/`[install]`, the generated unit a drop-in with the test's plumbing
    /// (its own timeouts are left as generated), and a broken `ood002.toml` lies beside
    /// it. The generator itself is installed by [`Setup::install_generator`].
    generated: bool,
}

impl Setup {
    fn new(o: Opts) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("asv-host-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        let service_dir = root.join("services").join(NAME);
        for d in ["bin", "containers", "overlay", "root"] {
            std::fs::create_dir_all(service_dir.join(d)).unwrap();
        }
        let etc = root.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let watchdog_sec = o.watchdog_sec.unwrap_or(60);
        std::fs::write(
            etc.join(format!("{NAME}.toml")),
            format!(
                "name = \"{NAME}\"\nservice_dir = \"{}\"\nimage = \"{}\"\n\
                 binds = [\"${{service_dir}}/root:/srv/root\"]\n\
                 [apptainer]\nbinary = \"{}\"\n[overlay]\nsize_mib = 256\n\
                 [timeouts]\nstart_sec = 30\nstop_sec = {}\nkill_sec = 3\nwatchdog_sec = {watchdog_sec}\n\
                 [readiness]\nrequired_units = [\"asv-slow.service\"]\n",
                service_dir.display(),
                rootfs().display(),
                support("apptainer").display(),
                o.stop_sec,
            ) + if o.generated {
                "[unit]\ndescription = \"Open OnDemand portal (test)\"\n\
                 after = [\"remote-fs.target\"]\n\
                 [install]\nwanted_by = [\"multi-user.target\"]\n"
            } else {
                ""
            },
        )
        .unwrap();
        if o.generated {
            std::fs::write(etc.join("ood002.toml"), "service_dir = \"/srv/ood002\n").unwrap();
        }

        // The shipped unit, with only the binary's path changed (and --config-dir, a
        // global option, put before the shipped arguments).
        let f = files();
        let bin = f.bin.display();
        let shipped = std::fs::read_to_string(&f.template).unwrap();
        let exec = "\nExecStart=/usr/bin/apptainer-supervisor ";
        assert_eq!(
            shipped.matches(exec).count(),
            1,
            "the shipped unit has one ExecStart=/usr/bin/apptainer-supervisor line"
        );
        let unit = shipped.replace(
            exec,
            &format!("\nExecStart={bin} --config-dir {} ", etc.display()),
        );
        let log = root.join("supervisor.log");
        // The double's apptainer.conf: `file` with every capability this machine's bounding
        // set holds, so a capability dropped on the way (the unit, the supervisor) fails the
        // start as Apptainer's starter would.
        let conf_env =
            dropin_environment(&write_apptainer_conf(&root.join("apptainer-etc"), "file"));
        let mut dropin = format!(
            "# Test plumbing; the shipped unit's meaning is otherwise unchanged.\n\
             [Service]\n\
             # Where the Apptainer double keeps its instance files, as Apptainer does.\n\
             Environment=APPTAINER_CONFIGDIR={}\n\
             {conf_env}\
             # No journald in the test host: the supervisor's log goes to a file.\n\
             StandardOutput=append:{log}\n\
             StandardError=append:{log}\n\
             # Shortened for the test, from the service file's timeouts as the unit derives\n\
             # them: start_sec 30 s + 30 s; stop_sec + 2 x kill_sec 3 s + 5 s < 30 s.\n\
             TimeoutStartSec=60s\n\
             TimeoutStopSec=30s\n\
             RestartSec=1s\n\
             # core_pattern here is \"core\": an abort must not leave a core file in /.\n\
             LimitCORE=0\n",
            root.join("apptainer").display(),
            log = log.display(),
        );
        if let Some(w) = o.watchdog_sec {
            dropin.push_str(&format!(
                "# Shortened for the test (timeouts.watchdog_sec in the service file matches).\n\
                 WatchdogSec={w}s\n"
            ));
        }
        let mut units = stand_in_units();
        units.push(("apptainer-supervisor@.service".into(), unit));
        if o.generated {
            // The generated ExecStart= names /usr/bin/apptainer-supervisor, which this
            // machine does not have: an admin's drop-in replaces it, as `systemctl edit`
            // would. The timeouts stay the generated ones.
            let generated_dropin = format!(
                "# Test plumbing, as for the template's instance.\n\
                 [Service]\n\
                 Environment=APPTAINER_CONFIGDIR={}\n\
                 {conf_env}\
                 StandardOutput=append:{log}\n\
                 StandardError=append:{log}\n\
                 RestartSec=1s\n\
                 LimitCORE=0\n\
                 ExecStart=\n\
                 ExecStart={bin} --config-dir {} run {NAME}\n",
                root.join("apptainer").display(),
                etc.display(),
                log = log.display(),
            );
            units.push((format!("{GENERATED}.d/50-test.conf"), generated_dropin));
            units.push((
                "multi-user.target".into(),
                "# Test stand-in: named by [install] wanted_by; never started here\n\
                 [Unit]\nDescription=test stand-in for multi-user.target\n"
                    .into(),
            ));
        }
        units.push((format!("{UNIT}.d/50-test.conf"), dropin));
        assert!(units.iter().any(|(n, _)| n == BOOT_TARGET));

        let mut host = HostSystemd::boot(root, &units);
        host.overlays.push(service_dir.join("overlay/overlay.img"));
        Setup { host, dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Installs the built apptainer-supervisor-generator as the host's generator. A
    /// two-line wrapper names the test's service directory: systemd runs generators with
    /// an environment of its own, and the real /etc/apptainer-supervisor is the machine's.
    fn install_generator(&self) {
        use std::os::unix::fs::PermissionsExt;
        let p = self
            .host
            .path(GENERATOR_DIR)
            .join("apptainer-supervisor-generator");
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nexport APPTAINER_SUPERVISOR_CONFIG_DIR={}\nexec {} \"$@\"\n",
                self.root().join("etc").display(),
                files().generator.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn overlay(&self) -> PathBuf {
        self.root()
            .join("services")
            .join(NAME)
            .join("overlay/overlay.img")
    }

    fn show(&self) -> BTreeMap<String, String> {
        self.host.show(UNIT, PROPS)
    }

    fn show_unit(&self, unit: &str) -> BTreeMap<String, String> {
        self.host.show(unit, PROPS)
    }

    /// Polls the unit every 50 ms until `done` holds; returns every distinct state seen,
    /// with the time since `t0`, the last one being the state that satisfied `done`.
    fn poll(
        &self,
        t0: Instant,
        within: Duration,
        done: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Vec<(Duration, BTreeMap<String, String>)> {
        self.poll_unit(UNIT, t0, within, done)
    }

    /// [`Setup::poll`] for any unit.
    fn poll_unit(
        &self,
        unit: &str,
        t0: Instant,
        within: Duration,
        done: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Vec<(Duration, BTreeMap<String, String>)> {
        let deadline = Instant::now() + within;
        let mut seen: Vec<(Duration, BTreeMap<String, String>)> = Vec::new();
        loop {
            let m = self.show_unit(unit);
            if seen.last().is_none_or(|(_, last)| *last != m) {
                seen.push((t0.elapsed(), m.clone()));
            }
            if done(&m) {
                return seen;
            }
            if Instant::now() > deadline {
                panic!(
                    "{unit}: condition not reached within {within:?}; seen:\n{}\n{}",
                    timeline(&seen),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The supervisor's log and PID 1's, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- supervisor log:\n{}\n--- host PID 1 log:\n{}",
            std::fs::read_to_string(self.root().join("supervisor.log")).unwrap_or_default(),
            self.host.pid1_log()
        )
    }

    /// Apptainer's state file of the instance, if any.
    fn state_file(&self) -> Option<PathBuf> {
        let app = self.root().join("apptainer/instances/app");
        std::fs::read_dir(app).ok()?.flatten().find_map(|host| {
            let p = host
                .path()
                .join("root")
                .join(NAME)
                .join(format!("{NAME}.json"));
            p.exists().then_some(p)
        })
    }

    /// (container pid, master pid) from the state file, as the host's PID namespace numbers
    /// them.
    fn instance(&self) -> (i32, i32) {
        let p = self
            .state_file()
            .unwrap_or_else(|| panic!("no instance state file\n{}", self.logs()));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        (
            v["pid"].as_i64().unwrap() as i32,
            v["ppid"].as_i64().unwrap() as i32,
        )
    }

    /// Runs a command in the host's namespaces; stdout, trimmed.
    fn host_out(&self, args: &[&str]) -> String {
        let out = self.host.exec(args);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs a command inside the container (`pid` in the host's numbering), from the host.
    fn inside(&self, pid: i32, args: &[&str]) -> String {
        let pid = pid.to_string();
        let mut all = vec![
            "nsenter", "-t", &pid, "-m", "-p", "-u", "-i", "-n", "-C", "--",
        ];
        all.extend_from_slice(args);
        self.host_out(&all)
    }

    /// Whether host-namespace pid `pid` is a live process there.
    fn alive_in_host(&self, pid: i32) -> bool {
        std::fs::read_to_string(self.host.path(&format!("/proc/{pid}/stat"))).is_ok_and(|s| {
            s.rfind(')')
                .is_some_and(|i| !s[i + 1..].trim_start().starts_with('Z'))
        })
    }

    /// After a stop: nothing of the service is left, only the host's PID 1.
    fn assert_nothing_left(&self, container: i32, master: i32) {
        assert!(
            !self.alive_in_host(container) && !self.alive_in_host(master),
            "container {container} and master {master} are gone\n{}",
            self.logs()
        );
        assert!(
            !self
                .host
                .path(&format!("/sys/fs/cgroup/apptainer/{container}"))
                .exists(),
            "the container's own cgroup (outside the unit) is removed"
        );
        assert_eq!(
            self.host.processes(),
            vec![(self.host.pid1, "/init.scope".to_owned())],
            "only the host's PID 1 is left in its cgroup tree\n{}",
            self.logs()
        );
        assert!(self.state_file().is_none(), "no instance state file left");
        assert!(
            !self
                .host
                .path(&format!("/run/apptainer-supervisor/{NAME}.run"))
                .exists(),
            "no run record left"
        );
        assert!(loops_for(&self.overlay()).is_empty(), "no loop device left");
    }
}

/// The start job queued by `systemctl start --no-block` has run its course: the unit left
/// `activating`, and it is not the `inactive` it still shows before systemd has picked up
/// the job (on a loaded machine a first poll can come before that; a start that really
/// ends inactive fails the poll's deadline with the whole timeline).
fn started(m: &BTreeMap<String, String>) -> bool {
    !matches!(m["ActiveState"].as_str(), "activating" | "inactive")
}

fn timeline(seen: &[(Duration, BTreeMap<String, String>)]) -> String {
    seen.iter()
        .map(|(t, m)| {
            format!(
                "{:>6.2}s {}/{} result={} main={} restarts={} exit={}/{} status={:?}",
                t.as_secs_f64(),
                m["ActiveState"],
                m["SubState"],
                m["Result"],
                m["MainPID"],
                m["NRestarts"],
                m["ExecMainCode"],
                m["ExecMainStatus"],
                m["StatusText"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is(m: &BTreeMap<String, String>, active: &str, sub: &str) -> bool {
    m["ActiveState"] == active && m["SubState"] == sub
}

#[test]
fn shipped_unit_is_active_once_the_inside_is_ready_and_stops_it_in_order() {
    if !require_root() {
        return;
    }
    let t0 = Instant::now();
    let mut s = Setup::new(Opts {
        stop_sec: 10,
        watchdog_sec: None,
        generated: false,
    });
    eprintln!("host systemd running after {:?}", t0.elapsed());

    // 1. Start: activating until the container's systemd has booted and asv-slow (ready
    //    after 1 s inside) is active; then active.
    let t = Instant::now();
    let out = s.host.systemctl(&["start", "--no-block", UNIT]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = s.poll(t, 60 * SEC, started);
    eprintln!("start:\n{}", timeline(&seen));
    let (_, last) = seen.last().unwrap();
    assert!(
        is(last, "active", "running"),
        "{}\n{}",
        timeline(&seen),
        s.logs()
    );
    assert_eq!(last["StatusText"], "running: 1/1 required units active");
    let activating = |pred: &dyn Fn(&str) -> bool| {
        seen.iter()
            .any(|(_, m)| is(m, "activating", "start") && pred(&m["StatusText"]))
    };
    assert!(
        activating(&|st| st.starts_with("booting")),
        "the supervisor's STATUS= shows while the unit is activating:\n{}",
        timeline(&seen)
    );
    assert!(
        activating(&|st| st.contains("waiting for asv-slow.service")),
        "activating while the required unit inside was not active yet:\n{}",
        timeline(&seen)
    );
    let (container, master) = s.instance();
    assert_eq!(
        s.inside(container, &["systemctl", "is-active", "asv-slow.service"]),
        "active",
        "at `active` the required unit inside is active"
    );

    // The main PID is the supervisor; the unit's cgroup holds it and Apptainer's master,
    // while the container sits in a cgroup of its own, outside the unit.
    let main: i32 = last["MainPID"].parse().unwrap();
    assert_eq!(
        s.host_out(&["cat", &format!("/proc/{main}/comm")]),
        "apptainer-super"
    );
    let cg = s.host.show(UNIT, &["ControlGroup"])["ControlGroup"].clone();
    let mut in_unit: Vec<i32> = s
        .host_out(&["cat", &format!("/sys/fs/cgroup{cg}/cgroup.procs")])
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    in_unit.sort();
    let mut expect = vec![main, master];
    expect.sort();
    assert_eq!(
        in_unit, expect,
        "the unit's cgroup {cg}: supervisor and master"
    );
    let cgroups = s.host_out(&["cat", &format!("/proc/{container}/cgroup")]);
    let container_cg = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default();
    assert!(
        container_cg.starts_with(&format!("/apptainer/{container}/")),
        "the container's cgroup is outside the unit: {container_cg}"
    );
    // NotifyAccess=main: the container's init never sees NOTIFY_SOCKET.
    let environ = s.host_out(&["cat", &format!("/proc/{container}/environ")]);
    assert!(
        !environ.split('\0').any(|e| e.starts_with("NOTIFY_SOCKET=")),
        "{environ:?}"
    );

    // 2. Stop: the supervisor halts the inner systemd in order (asv-simple's ExecStop
    //    writes its mark into the overlay), the unit ends with Result=success.
    let t = Instant::now();
    let out = s.host.systemctl(&["stop", "--no-block", UNIT]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = s.poll(t, 40 * SEC, |m| {
        matches!(m["ActiveState"].as_str(), "inactive" | "failed")
    });
    eprintln!("stop:\n{}", timeline(&seen));
    let (took, last) = seen.last().unwrap();
    assert!(
        is(last, "inactive", "dead"),
        "{}\n{}",
        timeline(&seen),
        s.logs()
    );
    // A unit that stopped cleanly is unloaded at once (CollectMode=inactive), so `show`
    // reads a fresh one; a failed one would stay `failed`. PID 1's log says which it was.
    assert_eq!(last["Result"], "success");
    let log = s.host.pid1_log();
    assert!(
        log.contains(&format!("{UNIT}: Deactivated successfully."))
            && !log.contains(&format!("{UNIT}: Failed")),
        "{log}"
    );
    // While deactivating, STATUS= says the supervisor is stopping (a poll may still catch
    // the last "running" text, before it handled SIGTERM).
    assert!(
        seen.iter()
            .filter(|(_, m)| m["ActiveState"] == "deactivating")
            .all(|(_, m)| m["StatusText"].starts_with("stopping")
                || m["StatusText"].starts_with("running")),
        "{}",
        timeline(&seen)
    );
    assert!(*took < 10 * SEC, "an orderly halt is quick: {took:?}");
    let mark = std::process::Command::new("debugfs")
        .args(["-R", "cat /upper/var/lib/asv-simple.mark"])
        .arg(s.overlay())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&mark.stdout).contains("stopped"),
        "asv-simple's ExecStop ran inside: an orderly halt\n{}",
        s.logs()
    );
    s.assert_nothing_left(container, master);

    let problems = s.host.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
    eprintln!("whole test: {:?}", t0.elapsed());
}

#[test]
fn frozen_inner_manager_trips_the_units_watchdog_and_the_unit_restarts() {
    if !require_root() {
        return;
    }
    let t0 = Instant::now();
    // stop_sec 3: a frozen inner systemd never halts in order, so the supervisor forces
    // it after that.
    let mut s = Setup::new(Opts {
        stop_sec: 3,
        watchdog_sec: Some(3),
        generated: false,
    });
    let out = s.host.systemctl(&["start", UNIT]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.logs()
    );
    let m = s.host.show(UNIT, &["ActiveState", "WatchdogUSec"]);
    assert_eq!((&*m["ActiveState"], &*m["WatchdogUSec"]), ("active", "3s"));

    // Healthy: WATCHDOG=1 keeps coming (every 1.5 s) and the unit stays active.
    let stamp = || {
        s.host.show(UNIT, &["WatchdogTimestampMonotonic"])["WatchdogTimestampMonotonic"]
            .parse::<u64>()
            .unwrap()
    };
    let before = stamp();
    let deadline = Instant::now() + 10 * SEC;
    while stamp() <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = s.show();
    assert!(is(&m, "active", "running"), "{m:?}\n{}", s.logs());
    assert!(
        stamp() > before,
        "WATCHDOG=1 arrives while the inside answers"
    );

    // Freeze the container's systemd: it no longer answers on D-Bus, so the supervisor
    // stops pinging and systemd's watchdog fires (SIGABRT to the supervisor).
    let (container, master) = s.instance();
    let out = s
        .host
        .exec(&["sh", "-c", &format!("kill -STOP {container}")]);
    assert!(out.status.success());
    let t = Instant::now();
    let seen = s.poll(t, 20 * SEC, |m| m["Result"] == "watchdog");
    let fired = seen.last().unwrap().0;
    assert!(
        fired < 6 * SEC,
        "the watchdog (3 s) fired {fired:?} after the freeze\n{}",
        timeline(&seen)
    );
    // The supervisor halts the container even so (forcing it: it is frozen), then exits 1;
    // Restart=on-failure schedules a restart. (auto-restart lasts RestartSec=1s: the
    // restart count says it passed if a poll missed it.)
    let mut seen = seen;
    seen.extend(s.poll(t, 40 * SEC, |m| {
        is(m, "activating", "auto-restart") || m["NRestarts"] != "0"
    }));
    eprintln!("watchdog:\n{}", timeline(&seen));
    let down = seen.last().unwrap().0;
    eprintln!("frozen at 0 s, watchdog after {fired:?}, supervisor gone after {down:?}");
    assert!(
        seen.iter()
            .any(|(_, m)| is(m, "deactivating", "stop-watchdog")
                && m["StatusText"].starts_with("stopping")),
        "after SIGABRT the supervisor reports that it halts the container:\n{}",
        timeline(&seen)
    );
    // The unit's own budget: stop_sec 3 + 2 x kill_sec 3 + 5 s.
    assert!(
        down - fired < 14 * SEC,
        "halted within the stop budget: {:?}",
        down - fired
    );
    // As the journal would tell it: SIGABRT, then the supervisor's own exit status 1
    // (it handles SIGABRT: not killed, no core), Result=watchdog.
    let log = s.host.pid1_log();
    for line in [
        format!("{UNIT}: Watchdog timeout (limit 3s)!"),
        "(apptainer-super) with signal SIGABRT.".to_owned(),
        format!("{UNIT}: Main process exited, code=exited, status=1/FAILURE"),
        format!("{UNIT}: Failed with result 'watchdog'."),
    ] {
        assert!(log.contains(&line), "{line:?} in PID 1's log:\n{log}");
    }
    assert!(
        !s.alive_in_host(container) && !s.alive_in_host(master),
        "the frozen container was not left behind\n{}",
        s.logs()
    );
    assert!(
        !s.host
            .path(&format!("/sys/fs/cgroup/apptainer/{container}"))
            .exists(),
        "its cgroup is gone too"
    );

    // The restart finds a clean slate and is ready again.
    let seen = s.poll(t, 60 * SEC, |m| m["ActiveState"] == "active");
    eprintln!("restart:\n{}", timeline(&seen));
    let (_, last) = seen.last().unwrap();
    assert!(
        is(last, "active", "running"),
        "{}\n{}",
        timeline(&seen),
        s.logs()
    );
    assert_eq!(last["NRestarts"], "1");
    assert!(s.host.pid1_log().contains(&format!(
        "{UNIT}: Scheduled restart job, restart counter is at 1."
    )));
    assert_eq!(last["StatusText"], "running: 1/1 required units active");
    let (container2, master2) = s.instance();
    assert_ne!(container2, container, "a new container");

    let out = s.host.systemctl(&["stop", UNIT]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = s.show();
    assert!(
        is(&m, "inactive", "dead") && m["Result"] == "success",
        "{m:?}"
    );
    assert!(s
        .host
        .pid1_log()
        .contains(&format!("{UNIT}: Deactivated successfully.")));
    s.assert_nothing_left(container2, master2);

    let problems = s.host.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
    eprintln!("whole test: {:?}", t0.elapsed());
}

/// Whether a line of `out`'s stdout contains `what`.
fn says(out: &std::process::Output, what: &str) -> bool {
    String::from_utf8_lossy(&out.stdout).contains(what)
}

#[test]
fn generated_unit_runs_the_service_and_never_beside_the_template_instance() {
    if !require_root() {
        return;
    }
    let t0 = Instant::now();
    let mut s = Setup::new(Opts {
        stop_sec: 10,
        watchdog_sec: None,
        generated: true,
    });
    let etc = s.root().join("etc");

    // 1. The generator, then daemon-reload: ood001.service exists, from the service file.
    assert_eq!(
        s.host.show(GENERATED, &["LoadState"])["LoadState"],
        "not-found"
    );
    s.install_generator();
    let out = s.host.systemctl(&["daemon-reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = s.host.show(
        GENERATED,
        &[
            "LoadState",
            "FragmentPath",
            "SourcePath",
            "UnitFileState",
            "Description",
            "TimeoutStartUSec",
            "TimeoutStopUSec",
            "Conflicts",
            "After",
        ],
    );
    assert_eq!(m["LoadState"], "loaded", "{m:?}\n{}", s.logs());
    assert_eq!(m["FragmentPath"], "/run/systemd/generator/ood001.service");
    assert_eq!(m["UnitFileState"], "generated");
    assert_eq!(
        Path::new(&m["SourcePath"]),
        etc.join("ood001.toml").as_path()
    );
    assert_eq!(m["Description"], "Open OnDemand portal (test)");
    // From [timeouts]: start_sec 30 + 30; stop_sec 10 + 2 x kill_sec 3 + 5 + 25.
    // (WatchdogUSec reads "infinity" until the unit runs: checked after the start.)
    assert_eq!(
        (&*m["TimeoutStartUSec"], &*m["TimeoutStopUSec"]),
        ("1min", "46s")
    );
    assert!(m["Conflicts"].split(' ').any(|u| u == UNIT), "{m:?}");
    let after: Vec<&str> = m["After"].split(' ').collect();
    assert!(
        after.contains(&UNIT) && after.contains(&"remote-fs.target"),
        "{m:?}"
    );
    assert!(
        s.host.show("multi-user.target", &["Wants"])["Wants"]
            .split(' ')
            .any(|u| u == GENERATED),
        "[install] wanted_by links it into multi-user.target.wants"
    );
    let text =
        std::fs::read_to_string(s.host.path("/run/systemd/generator/ood001.service")).unwrap();
    assert!(
        text.contains(&format!(
            "\nExecStart=/usr/bin/apptainer-supervisor --config-dir {} run ood001\n",
            etc.display()
        )),
        "{text}"
    );
    // The broken ood002.toml beside it: no unit, and a kmsg record that names it.
    assert!(!s
        .host
        .path("/run/systemd/generator/ood002.service")
        .exists());
    let log = s.host.pid1_log();
    let want = format!("]: {}/ood002.toml:1:", etc.display());
    assert!(
        log.lines()
            .any(|l| l.starts_with("<3>apptainer-supervisor-generator[") && l.contains(&want)),
        "{want:?} in PID 1's kmsg:\n{log}"
    );

    // 2. Start: activating until the inside is ready, then active.
    let t = Instant::now();
    let out = s.host.systemctl(&["start", "--no-block", GENERATED]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = s.poll_unit(GENERATED, t, 60 * SEC, started);
    eprintln!("start:\n{}", timeline(&seen));
    let (_, last) = seen.last().unwrap();
    assert!(
        is(last, "active", "running"),
        "{}\n{}",
        timeline(&seen),
        s.logs()
    );
    assert!(
        seen.iter().any(|(_, m)| is(m, "activating", "start")
            && m["StatusText"].contains("waiting for asv-slow.service")),
        "activating while the required unit inside was not active yet:\n{}",
        timeline(&seen)
    );
    assert_eq!(
        s.host.show(GENERATED, &["WatchdogUSec"])["WatchdogUSec"],
        "1min",
        "timeouts.watchdog_sec"
    );
    let status = s.host.systemctl(&["status", GENERATED]);
    assert!(
        says(&status, "Status: \"running: 1/1 required units active\""),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let (container, _) = s.instance();
    assert_eq!(
        s.inside(container, &["systemctl", "is-active", "asv-slow.service"]),
        "active"
    );

    // 3. The container's init killed: the supervisor exits 1, Restart=on-failure brings
    //    the service back with a new container.
    let t = Instant::now();
    let out = s.host.exec(&["kill", "-KILL", &container.to_string()]);
    assert!(out.status.success());
    let seen = s.poll_unit(GENERATED, t, 90 * SEC, |m| {
        m["NRestarts"] == "1" && is(m, "active", "running")
    });
    eprintln!("killed:\n{}", timeline(&seen));
    let log = s.host.pid1_log();
    for line in [
        format!("{GENERATED}: Main process exited, code=exited, status=1/FAILURE"),
        format!("{GENERATED}: Scheduled restart job, restart counter is at 1."),
    ] {
        assert!(log.contains(&line), "{line:?} in PID 1's log:\n{log}");
    }
    let (container2, _) = s.instance();
    assert_ne!(container2, container, "a new container");

    // 4. Conflicts=: starting the template's instance stops ood001.service first (the
    //    generated After= orders that stop before the start), and the other way round.
    let out = s.host.systemctl(&["start", UNIT]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.logs()
    );
    let (g, i) = (s.show_unit(GENERATED), s.show_unit(UNIT));
    assert!(
        is(&g, "inactive", "dead") && g["Result"] == "success",
        "{g:?}"
    );
    assert!(is(&i, "active", "running"), "{i:?}\n{}", s.logs());
    let out = s.host.systemctl(&["start", GENERATED]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.logs()
    );
    let (g, i) = (s.show_unit(GENERATED), s.show_unit(UNIT));
    assert!(is(&g, "active", "running"), "{g:?}\n{}", s.logs());
    assert!(
        is(&i, "inactive", "dead") && i["Result"] == "success",
        "{i:?}"
    );
    let log = s.host.pid1_log();
    assert!(
        log.contains(&format!("{UNIT}: Deactivated successfully."))
            && !log.contains(&format!("{UNIT}: Failed")),
        "the template's instance was stopped in order:\n{log}"
    );

    // 5. Stop: the inner systemd halts in order, Result=success, nothing left.
    let (container, master) = s.instance();
    let out = s.host.systemctl(&["stop", GENERATED]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = s.show_unit(GENERATED);
    assert!(
        is(&m, "inactive", "dead") && m["Result"] == "success",
        "{m:?}\n{}",
        s.logs()
    );
    let log = s.host.pid1_log();
    assert!(
        log.matches(&format!("{GENERATED}: Deactivated successfully."))
            .count()
            >= 2,
        "stopped in order, by Conflicts= and by systemctl stop:\n{log}"
    );
    let mark = std::process::Command::new("debugfs")
        .args(["-R", "cat /upper/var/lib/asv-simple.mark"])
        .arg(s.overlay())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&mark.stdout).contains("stopped"),
        "asv-simple's ExecStop ran inside: an orderly halt\n{}",
        s.logs()
    );
    s.assert_nothing_left(container, master);

    let problems = s.host.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
    eprintln!("whole test: {:?}", t0.elapsed());
}
