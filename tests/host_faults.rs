//! Security and faults of the shipped unit under a real host systemd (`support::host`: a
//! systemd booted as PID 1 in namespaces of its own) with the container's systemd booted
//! from the cached test rootfs through the Apptainer double:
//!
//! * the capability sets the supervisor runs with (`src/host/privilege.rs`), as
//!   `/proc/<pid>/status` shows them, and the bounding set its container inherits;
//! * the hardening directives of `units/apptainer-supervisor@.service`: the kept ones run
//!   in every test here (the unit is the shipped one), and what they do (mount
//!   propagation under `PrivateMounts=`, the device allow-list: the unit's cgroup
//!   confined, the container not) in a test of their own; the dropped ones each in a
//!   drop-in of their own, to show what they break or change (see the table in
//!   apptainer-supervisor(8), HARDENING);
//! * fault row 3: the supervisor SIGKILLed while its instance runs (systemd then kills
//!   Apptainer's master, and the container dies with it: the restart starts fresh, never
//!   two instances or two loop devices at once, the overlay's data kept);
//! * an unprivileged run of a service that needs root (exit 77).
//!
//! Several services share one host systemd (one boot), each with its own service file,
//! service directory, overlay and drop-in. Needs root and the rootfs.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use apptainer_supervisor::host::privilege;
use support::host::{stand_in_units, HostSystemd, BOOT_TARGET};
use support::netns::TestNetns;
use support::{
    dropin_environment, loops_for, own_bounding, require_root, rootfs, stderr, support,
    write_apptainer_conf, World, BIN, SEC,
};

const PROPS: &[&str] = &[
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "NRestarts",
    "StatusText",
];

/// One service under the shared host.
struct Svc {
    name: &'static str,
    /// Extra `[Service]` lines of its drop-in (a hardening directive under test).
    dropin: &'static str,
    /// Extra bind entries (TOML strings) of its service file.
    binds: Vec<String>,
}

/// A host systemd with the shipped unit and several services.
struct Host {
    /// Declared before `dir`: the host (and everything in it) goes first.
    host: HostSystemd,
    dir: tempfile::TempDir,
}

fn unit(name: &str) -> String {
    format!("apptainer-supervisor@{name}.service")
}

impl Host {
    fn new(services: &[Svc]) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("asv-faults-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        let etc = root.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("units/apptainer-supervisor@.service"),
        )
        .unwrap();
        let exec = "\nExecStart=/usr/bin/apptainer-supervisor ";
        assert_eq!(shipped.matches(exec).count(), 1);
        // -v: the supervisor logs the capability sets it ends up with (debug).
        let unit_text = shipped.replace(
            exec,
            &format!("\nExecStart={BIN} -v --config-dir {} ", etc.display()),
        );
        let mut units = stand_in_units();
        units.push(("apptainer-supervisor@.service".into(), unit_text));
        // The double's apptainer.conf: `file` with every capability this machine's bounding
        // set holds (see support::write_apptainer_conf).
        let conf_env =
            dropin_environment(&write_apptainer_conf(&root.join("apptainer-etc"), "file"));
        for s in services {
            let service_dir = root.join("services").join(s.name);
            for d in ["bin", "containers", "overlay", "root"] {
                std::fs::create_dir_all(service_dir.join(d)).unwrap();
            }
            let mut binds = vec!["\"${service_dir}/root:/srv/root\"".to_owned()];
            binds.extend(s.binds.iter().map(|b| format!("{b:?}")));
            std::fs::write(
                etc.join(format!("{}.toml", s.name)),
                format!(
                    "name = \"{}\"\nservice_dir = \"{}\"\nimage = \"{}\"\nbinds = [{}]\n\
                     [apptainer]\nbinary = \"{}\"\n[overlay]\nsize_mib = 256\n\
                     [timeouts]\nstart_sec = 30\nstop_sec = 10\nkill_sec = 3\n",
                    s.name,
                    service_dir.display(),
                    rootfs().display(),
                    binds.join(", "),
                    support("apptainer").display(),
                ),
            )
            .unwrap();
            let log = root.join(format!("{}.log", s.name));
            units.push((
                format!("{}.d/50-test.conf", unit(s.name)),
                format!(
                    "# Test plumbing (as in tests/host_unit.rs).\n[Service]\n\
                     Environment=APPTAINER_CONFIGDIR={}\n{conf_env}\
                     StandardOutput=append:{log}\nStandardError=append:{log}\n\
                     TimeoutStartSec=60s\nTimeoutStopSec=30s\nRestartSec=1s\nLimitCORE=0\n{}\n",
                    root.join("apptainer").display(),
                    s.dropin,
                    log = log.display(),
                ),
            ));
        }
        assert!(units.iter().any(|(n, _)| n == BOOT_TARGET));
        let mut host = HostSystemd::boot(root, &units);
        // A systemd booted by the kernel makes `/` rshared (mount-setup.c; this one, told
        // it runs in a container, leaves the boot script's rprivate): as on a real host,
        // so that the host's later mounts propagate into the units and their containers.
        let shared = host.exec(&["mount", "--make-rshared", "/"]);
        assert!(shared.status.success(), "{shared:?}");
        for s in services {
            host.overlays.push(
                root.join("services")
                    .join(s.name)
                    .join("overlay/overlay.img"),
            );
        }
        Host { host, dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn overlay(&self, name: &str) -> PathBuf {
        self.root()
            .join("services")
            .join(name)
            .join("overlay/overlay.img")
    }

    fn show(&self, name: &str) -> BTreeMap<String, String> {
        self.host.show(&unit(name), PROPS)
    }

    fn logs(&self, name: &str) -> String {
        format!(
            "--- supervisor log of {name}:\n{}\n--- host PID 1 log:\n{}",
            std::fs::read_to_string(self.root().join(format!("{name}.log"))).unwrap_or_default(),
            self.host.pid1_log()
        )
    }

    /// `systemctl start` (waits for the job: active, or failed).
    fn start(&self, name: &str) -> Output {
        self.host.systemctl(&["start", &unit(name)])
    }

    fn stop(&self, name: &str) {
        let out = self.host.systemctl(&["stop", &unit(name)]);
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs(name)
        );
    }

    /// (container pid, master pid) from Apptainer's state file, host-namespace numbers.
    fn instance(&self, name: &str) -> Option<(i32, i32)> {
        let app = self.root().join("apptainer/instances/app");
        let p = std::fs::read_dir(app).ok()?.flatten().find_map(|h| {
            let p = h
                .path()
                .join("root")
                .join(name)
                .join(format!("{name}.json"));
            p.exists().then_some(p)
        })?;
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        Some((v["pid"].as_i64()? as i32, v["ppid"].as_i64()? as i32))
    }

    /// Runs a command inside the container whose init is `pid` (host numbering).
    fn inside(&self, pid: i32, args: &[&str]) -> Output {
        let pid = pid.to_string();
        let mut all = vec![
            "nsenter", "-t", &pid, "-m", "-p", "-u", "-i", "-n", "-C", "--",
        ];
        all.extend_from_slice(args);
        self.host.exec(&all)
    }

    /// Runs `sh -c CMD` as a service of the container's own systemd (`systemd-run`):
    /// unlike [`Host::inside`] (nsenter, from the test's cgroup and without seccomp
    /// filters), it runs in the container's cgroup, with what the container's init
    /// inherited from the unit.
    fn inside_service(&self, pid: i32, cmd: &str) -> Output {
        self.inside(
            pid,
            &[
                "systemd-run",
                "--quiet",
                "--wait",
                "--pipe",
                "--collect",
                "sh",
                "-c",
                cmd,
            ],
        )
    }

    /// A field of `/proc/<pid>/status` (host numbering), e.g. `CapBnd`.
    fn status_field(&self, pid: i32, field: &str) -> String {
        let text = std::fs::read_to_string(self.host.path(&format!("/proc/{pid}/status")))
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Container inits running now: the distinct `/apptainer/<pid>` cgroups holding a
    /// process (the double's container cgroup, outside the unit).
    fn containers(&self) -> BTreeSet<String> {
        self.host
            .processes()
            .into_iter()
            .filter_map(|(_, cg)| {
                let rest = cg.strip_prefix("/apptainer/")?;
                Some(rest.split('/').next()?.to_owned())
            })
            .collect()
    }

    fn alive(&self, pid: i32) -> bool {
        std::fs::read_to_string(self.host.path(&format!("/proc/{pid}/stat"))).is_ok_and(|s| {
            s.rfind(')')
                .is_some_and(|i| !s[i + 1..].trim_start().starts_with('Z'))
        })
    }

    /// Waits for `name` to be active, or fails with its logs.
    fn start_ok(&self, name: &str) -> (i32, i32, i32) {
        let out = self.start(name);
        let m = self.show(name);
        assert!(
            out.status.success() && m["ActiveState"] == "active",
            "{} did not start: {m:?}\n{}\n{}",
            unit(name),
            String::from_utf8_lossy(&out.stderr),
            self.logs(name)
        );
        let main: i32 = m["MainPID"].parse().unwrap();
        let (c, master) = self
            .instance(name)
            .unwrap_or_else(|| panic!("no state file\n{}", self.logs(name)));
        (main, c, master)
    }
}

fn hex_mask(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("not a capability mask: {s:?}"))
}

/// A directory under /home with a marker file, removed when dropped: shows what a
/// `-B /home` bind gives the container.
struct HomeMarker(PathBuf);

impl HomeMarker {
    fn new(test: &str) -> HomeMarker {
        let d = PathBuf::from(format!(
            "/home/asv-host-faults-{}-{test}",
            std::process::id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("marker"), "from the host's /home\n").unwrap();
        HomeMarker(d)
    }
}

impl Drop for HomeMarker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn supervisor_runs_with_the_documented_capability_sets_and_the_kept_hardening() {
    // The double runs with `root default capabilities = file` listing every capability of
    // this machine's bounding set (Host::new): the start below succeeds only when neither
    // the unit nor the supervisor shrank the bounding set the starter inherits.
    if !require_root() {
        return;
    }
    let home = HomeMarker::new("caps");
    let h = Host::new(&[Svc {
        name: "caps001",
        dropin: "",
        binds: vec!["/home".into()],
    }]);
    let (main, container, master) = h.start_ok("caps001");

    // The supervisor's own sets: SUPERVISOR_CAPS, nothing inheritable or ambient, and the
    // bounding set whole: what this test process has (the host systemd and the unit pass
    // it on unshrunk).
    let own = privilege::mask(&privilege::plan().own);
    let bounding = own_bounding();
    for (field, want) in [
        ("CapEff", own),
        ("CapPrm", own),
        ("CapInh", 0),
        ("CapAmb", 0),
        ("CapBnd", bounding),
    ] {
        let got = hex_mask(&h.status_field(main, field));
        assert_eq!(
            got,
            want,
            "{field} of the supervisor (pid {main}): {got:#x}, documented {want:#x}\n{}",
            h.logs("caps001")
        );
    }
    // ...as it logged them at start (debug), CapBnd's mask included.
    let log = std::fs::read_to_string(h.root().join("caps001.log")).unwrap();
    assert!(
        log.contains("cap_effective=CAP_DAC_OVERRIDE,CAP_DAC_READ_SEARCH,CAP_KILL,CAP_SYS_PTRACE"),
        "{log}"
    );
    assert!(
        log.contains(&format!("cap_bounding={bounding:016x}")),
        "{log}"
    );
    // Apptainer's master got the whole bounding set back as root (execve as uid 0), and
    // the container's init the whole capability.json list (every capability of the
    // bounding set) but CAP_SYS_BOOT and CAP_SYS_RAWIO, which --boot takes away
    // (launcher_linux.go:374 at v1.3.6, :372 at v1.4.5): the starter's check passed.
    assert_eq!(hex_mask(&h.status_field(master, "CapBnd")), bounding);
    assert_eq!(
        hex_mask(&h.status_field(master, "CapEff")),
        bounding,
        "Apptainer runs with the full bounding set although the supervisor's own sets are narrow"
    );
    let boot_drop = privilege::mask(&vec![
        caps::Capability::CAP_SYS_BOOT,
        caps::Capability::CAP_SYS_RAWIO,
    ]);
    for field in ["CapBnd", "CapEff", "CapPrm"] {
        assert_eq!(
            hex_mask(&h.status_field(container, field)),
            bounding & !boot_drop,
            "{field} of the container's init"
        );
    }
    // Nothing inside failed under the kept hardening.
    let failed = h.inside(
        container,
        &["systemctl", "--failed", "--no-legend", "--plain"],
    );
    assert_eq!(String::from_utf8_lossy(&failed.stdout).trim(), "");
    // No NO_NEW_PRIVS anywhere: setuid programs inside keep working.
    assert_eq!(h.status_field(container, "NoNewPrivs"), "0");

    // The kept hardening is in force; nothing that shrinks the bounding set is (see
    // tests/generator.rs, no_unit_shrinks_the_capability_bounding_set), so no seccomp
    // filter of the unit (ProtectKernelLogs= had one) reaches the container either.
    let props = h.host.show(
        &unit("caps001"),
        &[
            "ProtectSystem",
            "ProtectKernelLogs",
            "ProtectKernelModules",
            "ProtectClock",
            "PrivateDevices",
            "NoNewPrivileges",
        ],
    );
    assert_eq!(props["ProtectSystem"], "yes");
    for p in [
        "ProtectKernelLogs",
        "ProtectKernelModules",
        "ProtectClock",
        "PrivateDevices",
        "NoNewPrivileges",
    ] {
        assert_eq!(props[p], "no", "{p}");
    }
    assert_eq!(h.status_field(main, "Seccomp"), "0");
    assert_eq!(h.status_field(container, "Seccomp"), "0");
    // The shipped unit's hardening gives the container the host's /home as it is.
    let inside = h.inside(container, &["cat", &format!("{}/marker", home.0.display())]);
    assert_eq!(
        String::from_utf8_lossy(&inside.stdout),
        "from the host's /home\n",
        "-B /home shows the host's /home inside: {}",
        String::from_utf8_lossy(&inside.stderr)
    );

    h.stop("caps001");
    let m = h.show("caps001");
    assert_eq!((&*m["ActiveState"], &*m["Result"]), ("inactive", "success"));
    assert!(!h.alive(container) && !h.alive(master));
    assert!(loops_for(&h.overlay("caps001")).is_empty());
    let mut host = h.host;
    let problems = host.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// A static i386 program that only calls exit(0) through `int 0x80`: shows whether 32-bit
/// programs run in the container (SystemCallArchitectures=).
fn exit0_i386() -> Vec<u8> {
    const BASE: u32 = 0x0804_8000;
    let code: &[u8] = &[0xb8, 1, 0, 0, 0, 0x31, 0xdb, 0xcd, 0x80]; // exit(0)
    let size = 52 + 32 + code.len() as u32;
    let mut e = vec![0x7f, b'E', b'L', b'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for h in [2u16, 3] {
        e.extend(h.to_le_bytes()); // ET_EXEC, EM_386
    }
    for w in [1u32, BASE + 84, 52, 0, 0] {
        e.extend(w.to_le_bytes()); // version, entry, phoff, shoff, flags
    }
    for h in [52u16, 32, 1, 0, 0, 0] {
        e.extend(h.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    for w in [1u32, 0, BASE, BASE, size, size, 5, 0x1000] {
        e.extend(w.to_le_bytes()); // PT_LOAD of the whole file, R+X
    }
    e.extend(code);
    e
}

#[test]
fn kept_private_mounts_and_device_allow_list_start_bind_propagate_and_stop() {
    if !require_root() {
        return;
    }
    let name = "mnt001";
    let home = HomeMarker::new("mnt");
    let pending = tempfile::Builder::new()
        .prefix("asv-later-")
        .tempdir()
        .expect("tempdir");
    let later = pending.path().display().to_string();
    let h = Host::new(&[Svc {
        name,
        dropin: "",
        binds: vec!["/home".into(), format!("{later}:/srv/later")],
    }]);
    // One DeviceAllow= line per entry.
    let shown = h.host.systemctl(&[
        "show",
        "-p",
        "PrivateMounts,DevicePolicy,DeviceAllow",
        &unit(name),
    ]);
    let mut shown: Vec<_> = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    shown.sort();
    assert_eq!(
        shown,
        [
            "DeviceAllow=/dev/fuse rw",
            "DeviceAllow=/dev/loop-control rw",
            "DeviceAllow=block-loop rwm",
            "DeviceAllow=char-pts rw",
            "DevicePolicy=closed",
            "PrivateMounts=yes",
        ]
    );
    let (main, container, master) = h.start_ok(name);
    // The exposure score of the instance as this systemd loaded it (printed: a figure).
    let score = h
        .host
        .exec(&["systemd-analyze", "security", "--no-pager", &unit(name)]);
    let text = String::from_utf8_lossy(&score.stdout);
    println!("systemd-analyze security {}:\n{text}", unit(name));
    assert!(
        text.lines().any(|l| l.starts_with("✓ PrivateMounts=")),
        "{score:?}"
    );
    let cgroup = h.host.show(&unit(name), &["ControlGroup"])["ControlGroup"].clone();
    assert!(cgroup.ends_with(&unit(name)), "{cgroup}");

    // Binds: -B /home gives the host's /home.
    let marker = format!("{}/marker", home.0.display());
    let inside = h.inside(container, &["cat", &marker]);
    assert_eq!(
        String::from_utf8_lossy(&inside.stdout),
        "from the host's /home\n",
        "{}",
        String::from_utf8_lossy(&inside.stderr)
    );
    // An operator's mount on the host after the start (an NFS /shared coming up late)
    // reaches the running container through the unit's private mount namespace.
    let mounted = h.host.exec(&[
        "sh",
        "-c",
        &format!("mount -t tmpfs asv-later {later} && echo mounted later > {later}/marker"),
    ]);
    assert!(mounted.status.success(), "{mounted:?}");
    let inside = h.inside(container, &["cat", "/srv/later/marker"]);
    assert_eq!(
        String::from_utf8_lossy(&inside.stdout),
        "mounted later\n",
        "the host's later mount reaches the container: {}",
        String::from_utf8_lossy(&inside.stderr)
    );
    // ...and none of the unit's or the container's mounts reach the host: not the
    // overlay's ext3, not Apptainer's session tmpfs.
    let host_mounts = h.host.exec(&["cat", "/proc/self/mountinfo"]);
    let host_mounts = String::from_utf8_lossy(&host_mounts.stdout);
    assert!(!host_mounts.contains(" - ext3 "), "{host_mounts}");
    assert!(
        !host_mounts.contains("/run/apptainer-double"),
        "{host_mounts}"
    );
    // The supervisor runs in the unit's namespace, not the host's.
    let ns = |pid: i32| std::fs::read_link(h.host.path(&format!("/proc/{pid}/ns/mnt"))).unwrap();
    assert_ne!(ns(main), ns(1), "PID 1 of the host is 1 in its own /proc");
    assert_eq!(ns(main), ns(master));

    // Devices. /dev/kmsg's numbers (char 1:11), denied by the allow-list, harmless to
    // open for reading. A node made here (outside the unit) opens from the test ...
    let node = h.root().join("kmsg-node");
    let node_s = node.display().to_string();
    let made = Command::new("mknod")
        .args([&node_s, "c", "1", "11"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let open = |path: &str| format!("dd if={path} of=/dev/null count=0 iflag=nonblock");
    let here = Command::new("sh")
        .args(["-c", &open(&node_s)])
        .output()
        .unwrap();
    assert!(here.status.success(), "{here:?}");
    // ... but not from the unit's cgroup, where the supervisor and Apptainer's master run,
    // which may not make one either; loop-control (allowed) opens there.
    let in_unit = |cmd: &str| {
        h.host.exec(&[
            "sh",
            "-c",
            &format!("echo 0 > '/sys/fs/cgroup{cgroup}/cgroup.procs' && {cmd}"),
        ])
    };
    let denied = in_unit(&open(&node_s));
    assert!(
        !denied.status.success()
            && String::from_utf8_lossy(&denied.stderr).contains("Operation not permitted"),
        "DevicePolicy=closed denies the unit's processes /dev/kmsg: {denied:?}"
    );
    let denied = in_unit(&format!("mknod {node_s}-unit c 1 11"));
    assert!(
        !denied.status.success()
            && String::from_utf8_lossy(&denied.stderr).contains("Operation not permitted"),
        "no mknod of a denied device in the unit: {denied:?}"
    );
    let allowed = in_unit(&open("/dev/loop-control"));
    assert!(allowed.status.success(), "{allowed:?}");
    // Inside the container the same mknod and open succeed: Apptainer moved it into a
    // cgroup of its own (the double: /apptainer/<pid>; Apptainer with systemd cgroups:
    // apptainer-<pid>.scope, every device allowed), out of reach of the unit's policy.
    let cg = std::fs::read_to_string(h.host.path(&format!("/proc/{container}/cgroup"))).unwrap();
    assert!(!cg.contains(&unit(name)), "{cg}");
    let inside = h.inside_service(
        container,
        &format!(
            "grep -q '^0::/apptainer/' /proc/self/cgroup && mknod /dev/asv-kmsg c 1 11 && {}",
            open("/dev/asv-kmsg")
        ),
    );
    assert!(
        inside.status.success(),
        "the unit's device policy does not reach the container: {inside:?}"
    );

    // 32-bit programs run inside (SystemCallArchitectures= is left out for them).
    let prog = h.root().join("services").join(name).join("root/exit0-i386");
    std::fs::write(&prog, exit0_i386()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ran = h.inside_service(container, "/srv/root/exit0-i386");
    assert!(ran.status.success(), "an i386 program inside: {ran:?}");

    h.stop(name);
    let m = h.show(name);
    assert_eq!((&*m["ActiveState"], &*m["Result"]), ("inactive", "success"));
    assert!(!h.alive(container) && !h.alive(master));
    assert!(loops_for(&h.overlay(name)).is_empty());
    let mut host = h.host;
    let problems = host.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

#[test]
fn unprivileged_run_of_a_service_that_needs_root_exits_77() {
    if !require_root() {
        return;
    }
    let w = World::new("noroot001");
    w.append_config("[[network]]\nname = \"macvlan_noroot001\"\nexternal = true\n");
    // nobody must reach the service file: the tempdir is 0700.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(w.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
            BIN,
            "--config-dir",
        ])
        .arg(&w.config_dir)
        .args(["run", "noroot001", "--run-dir"])
        .arg(w.root().join("run"))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    // By hand (no journal), the error is printed once, not by the log layer as well.
    assert_eq!(
        err.matches("these settings need root").count(),
        1,
        "the error once: {err}"
    );
    let cfg = w.config_path();
    for want in [
        format!(
            "{}: these settings need root, and the supervisor runs as uid 65534",
            cfg.display()
        ),
        format!("{}: boot (default): --boot is for root only", cfg.display()),
        format!("{}:", cfg.display())
            + &format!(
                "{}: network: --network (CNI) needs root",
                std::fs::read_to_string(&cfg)
                    .unwrap()
                    .lines()
                    .position(|l| l == "name = \"macvlan_noroot001\"")
                    .unwrap()
                    + 1
            ),
        format!(
            "{}: overlay.path (default): a writable ext3 overlay image",
            cfg.display()
        ),
    ] {
        assert!(err.contains(&want), "{want:?} in:\n{err}");
    }
    assert!(!w.overlay().exists(), "nothing was created");
    assert!(!w.root().join("run").exists(), "no run directory either");
}

/// Dropped directives the double shows a reason for, one service each (the table in
/// apptainer-supervisor(8), HARDENING, has every directive and its reason). The kept ones
/// are in the shipped unit itself and run in every test of this file.
const BREAKS: &[(&str, &str)] = &[
    // no_new_privs caps what execve(2) grants at the caller's permitted set, which the
    // supervisor narrowed: Apptainer starts without CAP_SYS_ADMIN.
    ("nnp001", "NoNewPrivileges=yes"),
    ("ns001", "RestrictNamespaces=yes"),
    // Also drops CAP_MKNOD and CAP_SYS_RAWIO from the bounding set, but the start fails
    // earlier, on the loop device for the overlay (attached before the starter's check, as
    // Apptainer's RPC server does).
    ("dev001", "PrivateDevices=yes"),
    ("cg001", "ProtectControlGroups=yes"),
    ("host001", "ProtectHostname=yes"),
    ("sys001", "SystemCallFilter=@system-service"),
    ("pstrict001", "ProtectSystem=strict"),
    ("ptmp001", "PrivateTmp=yes"),
];

/// Dropped directives that shrink the capability bounding set (systemd.exec(5)): the
/// double's starter, asked for every capability of this machine's bounding set
/// (`root default capabilities = file`), refuses the start with Apptainer's message.
const CAP_BREAKS: &[(&str, &str)] = &[
    ("klog001", "ProtectKernelLogs=yes"),
    ("kmod001", "ProtectKernelModules=yes"),
    ("clock001", "ProtectClock=yes"),
    ("cbs001", "CapabilityBoundingSet=~CAP_SYS_TIME"),
];

#[test]
fn dropped_hardening_directives_break_the_start_or_change_the_binds() {
    if !require_root() {
        return;
    }
    let home = HomeMarker::new("home");
    let mut svcs: Vec<Svc> = BREAKS
        .iter()
        .chain(CAP_BREAKS)
        .map(|(name, directive)| Svc {
            name,
            dropin: directive,
            binds: Vec::new(),
        })
        .collect();
    svcs.push(Svc {
        name: "suid001",
        dropin: "RestrictSUIDSGID=yes",
        binds: Vec::new(),
    });
    svcs.push(Svc {
        name: "arch001",
        dropin: "SystemCallArchitectures=native",
        binds: Vec::new(),
    });
    svcs.push(Svc {
        name: "lock001",
        dropin: "LockPersonality=yes",
        binds: Vec::new(),
    });
    svcs.push(Svc {
        name: "home001",
        dropin: "ProtectHome=tmpfs",
        binds: vec!["/home".into()],
    });
    let h = Host::new(&svcs);
    for (name, directive) in BREAKS.iter().chain(CAP_BREAKS) {
        let out = h.start(name);
        let m = h.show(name);
        assert!(
            !out.status.success() && m["ActiveState"] != "active",
            "{directive}: the unit started although the double cannot work under it: {m:?}\n{}",
            h.logs(name)
        );
        let log = std::fs::read_to_string(h.root().join(format!("{name}.log"))).unwrap_or_default();
        // A checkout under /tmp (CI clones may live there) puts the binary itself behind
        // PrivateTmp=: systemd cannot exec it (203/EXEC) before the supervisor could say
        // anything. Either way the unit does not start.
        let binary_hidden = *directive == "PrivateTmp=yes"
            && Path::new(env!("CARGO_MANIFEST_DIR")).starts_with("/tmp");
        // Under systemd the final error is a log event (`ERROR ...`), no `error:` line
        // (src/main.rs since the CLI-conventions change).
        assert!(
            log.lines().any(|l| l.starts_with("ERROR ")) || log.contains("error") || binary_hidden,
            "{directive}: the supervisor says why:\n{log}"
        );
        if CAP_BREAKS.iter().any(|(n, _)| n == name) {
            assert!(
                log.contains("ABORT  : Requesting capability set 0x")
                    && log.contains("while permitted capability set is 0x"),
                "{directive}: Apptainer's starter refuses the shrunk bounding set:\n{log}"
            );
        }
        let _ = h.host.systemctl(&["stop", &unit(name)]);
        assert!(h.instance(name).is_none() || h.instance(name).is_some_and(|(c, _)| !h.alive(c)));
    }
    // A seccomp kill (SIGSYS) of the double's master leaves its loop device behind; the
    // point here is the failed start, so it is detached before the teardown's check.
    for dev in loops_for(&h.overlay("sys001")) {
        let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    }

    // LockPersonality=yes: its filter reaches the container, where systemd cannot set up
    // the same lock for its own journald (228/SECCOMP): the container is degraded.
    let (_, container, _) = h.start_ok("lock001");
    let journald = h.inside(
        container,
        &[
            "systemctl",
            "show",
            "-p",
            "ExecMainStatus,ActiveState",
            "systemd-journald.service",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&journald.stdout),
        "ExecMainStatus=228\nActiveState=failed\n"
    );
    h.stop("lock001");

    // RestrictSUIDSGID=yes: its filter reaches the container, where a package install
    // cannot make its setuid programs (as rpm does with chmod(2) after unpacking).
    let (_, container, _) = h.start_ok("suid001");
    let suid = h.inside_service(container, "touch /tmp/asv-suid && chmod u+s /tmp/asv-suid");
    assert!(
        !suid.status.success()
            && String::from_utf8_lossy(&suid.stderr).contains("Operation not permitted"),
        "RestrictSUIDSGID= forbids setuid files inside: {suid:?}"
    );
    h.stop("suid001");

    // SystemCallArchitectures=native: its filter reaches the container, where a 32-bit
    // program is killed (SIGSYS) at its first system call. (It runs under the shipped
    // unit: kept_private_mounts_and_device_allow_list_start_bind_propagate_and_stop.)
    let (_, container, _) = h.start_ok("arch001");
    let prog = h.root().join("services/arch001/root/exit0-i386");
    std::fs::write(&prog, exit0_i386()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ran = h.inside_service(container, "/srv/root/exit0-i386; echo $?");
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        (128 + libc::SIGSYS).to_string(),
        "an i386 program inside dies of SIGSYS: {ran:?}"
    );
    h.stop("arch001");

    // ProtectHome=tmpfs: the unit's /home is an empty tmpfs, and the container's `-B
    // /home` binds that, not the host's /home.
    let (_, container, _) = h.start_ok("home001");
    let marker = format!("{}/marker", home.0.display());
    assert!(Path::new(&marker).exists());
    let inside = h.inside(container, &["cat", &marker]);
    assert!(
        !inside.status.success(),
        "ProtectHome=tmpfs hides the host's /home from the container's bind: {}",
        String::from_utf8_lossy(&inside.stdout)
    );
    let fstype = h.inside(container, &["stat", "-f", "-c", "%T", "/home"]);
    assert_eq!(String::from_utf8_lossy(&fstype.stdout).trim(), "tmpfs");
    h.stop("home001");

    let mut host = h.host;
    let problems = host.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

#[test]
fn supervisor_sigkilled_under_systemd_restarts_fresh_never_twice_at_once() {
    if !require_root() {
        return;
    }
    let name = "orphan001";
    let h = Host::new(&[Svc {
        name,
        dropin: "",
        binds: Vec::new(),
    }]);
    let overlay = h.overlay(name);
    let (main, container, master) = h.start_ok(name);
    // A marker written inside lands in the overlay's upper layer.
    let out = h.inside(
        container,
        &["sh", "-c", "echo kept > /var/lib/asv-fault.marker"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(loops_for(&overlay).len(), 1);

    // SIGKILL the supervisor, as the OOM killer would. systemd then SIGKILLs what is left
    // in the unit's cgroup (Apptainer's master); the container, in a cgroup of its own,
    // lives on as an orphan. Restart=on-failure starts the supervisor again.
    let out = h.host.exec(&["kill", "-KILL", &main.to_string()]);
    assert!(out.status.success());
    let t = Instant::now();
    let mut most_containers = 0;
    let mut most_loops = 0;
    let mut old_seen_with_new = false;
    let last = loop {
        let cs = h.containers();
        let loops = loops_for(&overlay).len();
        most_containers = most_containers.max(cs.len());
        most_loops = most_loops.max(loops);
        if cs.len() > 1 || (h.alive(container) && cs.iter().any(|c| *c != container.to_string())) {
            old_seen_with_new = true;
        }
        let m = h.show(name);
        if m["ActiveState"] == "active" && m["NRestarts"] != "0" {
            break m;
        }
        assert!(
            t.elapsed() < 60 * SEC,
            "not active again within 60 s: {m:?}\n{}",
            h.logs(name)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(last["NRestarts"], "1");
    assert!(
        h.host.pid1_log().contains(&format!(
            "{}: Main process exited, code=killed, status=9/KILL",
            unit(name)
        )),
        "{}",
        h.host.pid1_log()
    );
    assert!(
        !old_seen_with_new && most_containers <= 1,
        "never two containers of the service at once (most seen: {most_containers})"
    );
    assert!(
        most_loops <= 1,
        "the overlay was never attached twice (most loop devices seen: {most_loops})"
    );
    assert!(
        !h.alive(container) && !h.alive(master),
        "the old instance is gone"
    );
    // What production does (read from this run, and the reason the orphan path of the
    // supervisor is not reached here): with the main process gone, systemd's stop goes
    // straight to the final SIGKILL of the unit's cgroup (KillMode=mixed), which takes
    // Apptainer's master, and the container init dies with its master (PR_SET_PDEATHSIG
    // in Apptainer's starter.c, as the double does). The restart then finds only the
    // dead instance's files. (An orphan that outlives its master is covered in
    // tests/run.rs, orphan_of_a_killed_supervisor_is_halted_then_started_fresh.)
    let log = std::fs::read_to_string(h.root().join(format!("{name}.log"))).unwrap();
    assert!(
        log.contains("removing leftovers of an instance that is no longer running"),
        "{log}"
    );

    let (_, container2, master2) = h
        .instance(name)
        .map(|(c, m)| (0, c, m))
        .expect("a fresh instance");
    assert_ne!(container2, container);
    // The marker survived in the overlay; asv-simple's ExecStop never ran in the old
    // instance (no mark): it was killed, not halted.
    let read =
        |p: &str| String::from_utf8_lossy(&h.inside(container2, &["cat", p]).stdout).into_owned();
    assert_eq!(read("/var/lib/asv-fault.marker"), "kept\n");
    assert_eq!(read("/var/lib/asv-simple.mark"), "", "{log}");
    assert_eq!(loops_for(&overlay).len(), 1);

    h.stop(name);
    assert!(!h.alive(container2) && !h.alive(master2));
    assert!(loops_for(&overlay).is_empty());
    let mut host = h.host;
    let problems = host.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// A service directory reached through a symbolic link (common with NFS-mounted service
/// trees) starts, and Apptainer is given the resolved paths: what the kernel reports back
/// in loop devices and mount tables, checked once.
#[test]
fn symlinked_service_dir_is_started_through_its_resolved_path() {
    if !require_root() {
        return;
    }
    let mut w = World::new("link001");
    let real = w.root().join("nfs/vol1/link001");
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::rename(&w.service_dir, &real).unwrap();
    std::os::unix::fs::symlink(&real, &w.service_dir).unwrap();
    let real = std::fs::canonicalize(&real).unwrap();
    let pid = w.spawn_run();
    w.wait_ready();
    let overlay = real.join("overlay/overlay.img");
    assert_eq!(
        loops_for(&overlay).len(),
        1,
        "the overlay, created through the link"
    );
    support::kill(pid as i32, libc::SIGTERM);
    let out = w.wait(0, 30 * SEC);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let argv = err
        .lines()
        .find(|l| l.contains("starting instance"))
        .unwrap_or_else(|| panic!("no argv logged:\n{err}"));
    for p in [
        overlay.clone(),
        real.join("containers/sandbox"),
        real.join("root"),
    ] {
        assert!(argv.contains(&*p.to_string_lossy()), "{p:?} in {argv}");
    }
    assert!(
        !argv.contains(&*w.service_dir.to_string_lossy()),
        "no path through the link in {argv}"
    );
    assert!(loops_for(&overlay).is_empty());
}

/// `check` shows what `run` executes: the argv `check --host --json` prints is the argv the
/// Apptainer double records `run` starting the instance with, and the files it lists are
/// the ones the running service has; also for a service directory reached through a
/// symlink (both see the resolved paths).
#[test]
fn check_json_shows_the_argv_and_files_run_uses() {
    if !require_root() {
        return;
    }
    for linked in [false, true] {
        let mut w = World::new(if linked { "plan002" } else { "plan001" });
        if linked {
            let real = w.root().join("nfs/vol1/real");
            std::fs::create_dir_all(real.parent().unwrap()).unwrap();
            std::fs::rename(&w.service_dir, &real).unwrap();
            std::os::unix::fs::symlink(&real, &w.service_dir).unwrap();
        }
        let log = w.root().join("argv.log");
        w.env.push((
            "APPTAINER_DOUBLE_ARGV_LOG".into(),
            log.display().to_string(),
        ));
        // `check` has no --run-dir: it plans in the run directory systemd would give.
        w.env
            .push(("RUNTIME_DIRECTORY".into(), w.run_dir.display().to_string()));
        let name = w.name.clone();
        let out = w.cli(&["check", "--host", "--json", &name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let planned: Vec<String> = plan["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        w.start();
        // While it runs, every file the plan names for this run is where the plan says.
        for f in plan["files"].as_array().unwrap() {
            let what = f["what"].as_str().unwrap();
            let path = std::path::Path::new(f["path"].as_str().unwrap());
            if [
                "lock",
                "run record",
                "live state",
                "instance state file",
                "overlay image",
            ]
            .iter()
            .any(|k| what.contains(k))
            {
                assert!(
                    path.exists(),
                    "{what}: {} (linked: {linked})",
                    path.display()
                );
            }
        }
        w.stop_ok(0);
        let runs = instance_starts(&log);
        assert_eq!(runs.len(), 1, "one instance start: {runs:?}");
        assert_eq!(runs[0][1..], planned[1..], "linked: {linked}");
        assert_eq!(
            std::fs::canonicalize(&runs[0][0]).unwrap(),
            std::fs::canonicalize(&planned[0]).unwrap()
        );
        if linked {
            assert!(
                !planned
                    .iter()
                    .any(|a| a.contains(&*w.service_dir.to_string_lossy())),
                "no path through the link in {planned:?}"
            );
        }
    }
}

/// Two services naming one overlay, one through a symlinked directory: still one overlay.
#[test]
fn overlay_claimed_through_a_symlink_is_still_a_claim() {
    if !require_root() {
        return;
    }
    let w = World::new("one001");
    let link = w.root().join("link-to-one001");
    std::os::unix::fs::symlink(&w.service_dir, &link).unwrap();
    let text = std::fs::read_to_string(w.config_path())
        .unwrap()
        .replace("name = \"one001\"", "name = \"two001\"")
        .replace(
            &format!("service_dir = \"{}\"", w.service_dir.display()),
            &format!("service_dir = \"{}\"", link.display()),
        );
    assert!(text.contains(&*link.to_string_lossy()));
    std::fs::write(w.config_dir.join("two001.toml"), text).unwrap();
    let out = w.cli(&["check", "two001"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("is also the overlay of service one001"),
        "{err}"
    );
}

/// No shell between the service file and execve(2): the supervisor starts and stops a
/// booted container with no `sh` or `bash` on its PATH and SHELL pointing nowhere; `sh`
/// and `bash` on that PATH are traps that record any call.
#[test]
fn no_shell_is_run_between_the_service_file_and_execve() {
    if !require_root() {
        return;
    }
    // The source: no shell is ever spawned.
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    let mut files = Vec::new();
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() > 10, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for bad in [
            "Command::new(\"sh\")",
            "Command::new(\"bash\")",
            "Command::new(\"/bin/sh\")",
            "Command::new(\"/bin/bash\")",
            "libc::system(",
            "\"-c\"",
        ] {
            assert!(!text.contains(bad), "{bad} in {}", path.display());
        }
    }
    let mut w = World::booted("noshell001", "mode = \"inner-systemd\"");
    let bin = w.root().join("path");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = w.root().join("shell-calls");
    for sh in ["sh", "bash", "dash"] {
        let p = bin.join(sh);
        std::fs::write(
            &p,
            format!(
                "#!/bin/dash\necho \"$0 $*\" >> {}\nexit 97\n",
                calls.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The double is a Python script (`#!/usr/bin/env python3`): python3 is all PATH has.
    std::os::unix::fs::symlink("/usr/bin/python3", bin.join("python3")).unwrap();
    w.env.push(("PATH".into(), bin.display().to_string()));
    w.env.push(("SHELL".into(), "/nonexistent/sh".into()));
    let pid = w.spawn_run();
    w.wait_ready();
    support::kill(pid as i32, libc::SIGTERM);
    let out = w.wait(0, 60 * SEC);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !calls.exists(),
        "a shell was run: {}",
        std::fs::read_to_string(&calls).unwrap_or_default()
    );
}

/// Bind sources of the examples that every Linux host has, kept as they are; every other
/// host path an example binds is the site's (`/shared`, `/orcd`, ...).
const HOST_BIND_SOURCES: &[&str] = &["/home", "/sys/fs/cgroup", "/dev/fuse"];

/// [`check_json_shows_the_argv_and_files_run_uses`] for every shipped example
/// (`examples/*.toml`): the argv `check --host --json` prints is the argv the Apptainer
/// double records `run` passing to `instance start`, and every file the plan names is
/// there while `run` runs.
///
/// Each example runs in a world of its own. What is rewritten, and why (nothing else: the
/// flags, bind destinations, networks with their masters and addresses, overlay, hostname
/// and env stay the example's own):
/// * `service_dir` = the world's root + the example's path (`/shared/services/ood/ood001`
///   → `$TMP/shared/services/ood/ood001`): this host has no `/shared`;
/// * a bind source of the site (not in [`HOST_BIND_SOURCES`]) moves under the world's root
///   with its container path spelled out (`/shared` → `$TMP/shared:/shared`,
///   `/home/systems/slurm/etc/slurm:/etc/slurm` → `$TMP/home/systems/slurm/etc/slurm:/etc/slurm`):
///   a missing bind source is refused (exit 78), and the host's root is not ours to fill;
/// * an `[apptainer]` table is added: `binary` = the double, `network_dir` = the world's
///   CNI config dir (the supervisor writes the examples' conflists there, not in
///   `/etc/apptainer/network`);
/// * the image (the examples' `${service_dir}/containers/container.sif`) is a placeholder
///   SIF with no objects (`support::registry::sif_bytes`): it loads as image.Init loads a
///   SIF, and the light init never mounts it (DOUBLE.md, deviation 1);
/// * the overlay is pre-created at the example's path with 64 MiB, so no 1 GiB or 100 GB
///   creation happens (an existing overlay is used as it is, never resized).
///
/// The examples' macvlan parent `eth0` is a veth the test makes in a network namespace of
/// its own (`TestNetns`), where `run` (and so the double's master and the CNI plugins)
/// runs: no real interface is touched. The light init keeps the host's root, so a host
/// system bus would be taken for the container's (and refused, exit 69) before the files
/// are looked at: `run` gets a private mount namespace with a tmpfs on `/run/dbus`, and
/// keeps waiting for the container's bus (the examples' readiness names units that only
/// the real images have) until the test's SIGTERM halts it (exit 0).
#[test]
fn check_json_shows_the_argv_and_files_run_uses_for_every_example() {
    if !require_root() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 5, "{examples:?}");
    for example in &examples {
        example_plan_is_what_runs(example);
    }
}

/// `check --host --json`, then `run`, for one example (see the test above).
fn example_plan_is_what_runs(example: &Path) {
    let at = example.display().to_string();
    let mut t: toml::Table = std::fs::read_to_string(example).unwrap().parse().unwrap();
    let name = t["name"].as_str().unwrap().to_owned();
    let ns = TestNetns::new();
    let masters: BTreeSet<String> = t["network"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.get("master").and_then(|m| m.as_str()).map(str::to_owned))
        .collect();
    for m in &masters {
        ns.add_veth(m, &format!("{m}p"));
    }
    let mut w = World::new(&name);
    w.netns = Some(ns.path());
    w.wrap = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "if [ -d /run/dbus ]; then mount -t tmpfs tmpfs /run/dbus; fi; exec \"$@\"",
        "sh",
    ]
    .map(Into::into)
    .to_vec();
    let root = w.root().to_owned();
    let under_root = |p: &str| PathBuf::from(format!("{}{p}", root.display()));

    let service_dir = under_root(t["service_dir"].as_str().unwrap());
    for d in ["containers", "overlay", "root"] {
        std::fs::create_dir_all(service_dir.join(d)).unwrap();
    }
    t.insert(
        "service_dir".into(),
        service_dir.display().to_string().into(),
    );
    let binds: Vec<toml::Value> = t["binds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let b = b.as_str().unwrap();
            let (src, dst) = b.split_once(':').unwrap_or((b, b));
            if src.starts_with("${service_dir}") || HOST_BIND_SOURCES.contains(&src) {
                return b.into();
            }
            std::fs::create_dir_all(under_root(src)).unwrap();
            format!("{}:{dst}", under_root(src).display()).into()
        })
        .collect();
    t.insert("binds".into(), binds.into());
    assert!(!t.contains_key("apptainer"), "{at}: [apptainer] is set");
    let mut apptainer = toml::Table::new();
    apptainer.insert(
        "binary".into(),
        support("apptainer").display().to_string().into(),
    );
    apptainer.insert(
        "network_dir".into(),
        w.network_dir().display().to_string().into(),
    );
    t.insert("apptainer".into(), apptainer.into());
    std::fs::write(w.config_path(), toml::to_string(&t).unwrap()).unwrap();
    // World's drop cleans up the loop devices of the overlay under this directory.
    w.service_dir = service_dir;

    // The image and the overlay where the plan (unchecked) puts them.
    let draft = argv_of(&plan_json(&w, &["check", "--json", &name], &at));
    let image = PathBuf::from(&draft[draft.len() - 2]);
    std::fs::write(&image, support::registry::sif_bytes(name.as_bytes())).unwrap();
    let overlay = &draft[draft.iter().position(|a| a == "--overlay").unwrap() + 1];
    let out = w.apptainer(&["overlay", "create", "-S", "-s", "64", overlay]);
    assert!(out.status.success(), "{at}: {}", stderr(&out));

    let log = root.join("argv.log");
    w.env.push((
        "APPTAINER_DOUBLE_ARGV_LOG".into(),
        log.display().to_string(),
    ));
    // `check` has no --run-dir: it plans in the run directory systemd would give.
    w.env
        .push(("RUNTIME_DIRECTORY".into(), w.run_dir.display().to_string()));
    let plan = plan_json(&w, &["check", "--host", "--json", &name], &at);
    let planned = argv_of(&plan);
    // The example's own shape: its networks, in order, and its binds' container paths.
    let networks: Vec<&str> = t["network"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    let net_at = planned.iter().position(|a| a == "--network").unwrap();
    assert_eq!(planned[net_at + 1], networks.join(","), "{at}");
    assert!(planned.contains(&"--boot".to_owned()), "{at}: {planned:?}");
    let planned_binds: Vec<&str> = planned
        .windows(2)
        .filter(|p| p[0] == "--bind")
        .map(|p| p[1].as_str())
        .collect();
    let sd = w.service_dir.display().to_string();
    let binds: Vec<String> = t["binds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().replace("${service_dir}", &sd))
        .collect();
    assert_eq!(planned_binds, binds, "{at}: the example's binds, in order");
    assert_eq!(&planned[planned.len() - 1], &name);
    eprintln!("{at}: {}", planned.join(" "));

    w.spawn_run();
    // Every file the plan names for this run is there while it runs.
    let files: Vec<(String, PathBuf)> = plan["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["what"].as_str().unwrap().to_owned(),
                PathBuf::from(f["path"].as_str().unwrap()),
            )
        })
        .collect();
    assert!(
        files
            .iter()
            .any(|(what, p)| what.starts_with("overlay") && p == Path::new(overlay)),
        "{at}: the overlay of the argv in {files:?}"
    );
    let deadline = Instant::now() + 60 * SEC;
    loop {
        let missing: Vec<_> = files.iter().filter(|(_, p)| !p.exists()).collect();
        if missing.is_empty() {
            break;
        }
        if let Some(status) = w.child(0).try_wait().unwrap() {
            let out = w.wait(0, SEC);
            panic!(
                "{at}: run ended ({status}) with {missing:?} missing:\n{}",
                stderr(&out)
            );
        }
        assert!(Instant::now() < deadline, "{at}: never there: {missing:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    w.stop_ok(0);

    let runs = instance_starts(&log);
    assert_eq!(runs.len(), 1, "{at}: one instance start: {runs:?}");
    assert_eq!(runs[0][1..], planned[1..], "{at}");
    assert_eq!(
        std::fs::canonicalize(&runs[0][0]).unwrap(),
        std::fs::canonicalize(&planned[0]).unwrap(),
        "{at}"
    );
}

/// `check ... --json` of `w`, which must succeed.
fn plan_json(w: &World, args: &[&str], at: &str) -> serde_json::Value {
    let out = w.cli(args);
    assert!(out.status.success(), "{at}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The plan's `argv`.
fn argv_of(plan: &serde_json::Value) -> Vec<String> {
    plan["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The `instance start` argvs the double recorded in its argv log (one JSON array a line).
fn instance_starts(log: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Vec<String>>(l).unwrap())
        .filter(|a| a.get(1..3) == Some(&["instance".to_owned(), "start".to_owned()][..]))
        .collect()
}
