//! Readiness, health, failure policy and orderly stop against a real systemd booted in
//! namespaces (the double's rootfs mode on the cached Debian rootfs), talked to over the
//! container's real system bus. Needs root and the rootfs (`tests/support/build-rootfs.sh`).

mod support;

use std::time::Instant;

use support::*;

/// The three test units of the rootfs: asv-simple (sleeps; ExecStop leaves a mark),
/// asv-slow (Type=notify, ready after 1 s), asv-flaky (fails while /run/asv-fail exists).
const REQUIRED: &str = "required_units = [\"asv-simple.service\", \"asv-slow.service\"]";

fn unit_state(w: &World, unit: &str) -> String {
    let out = w.inside(&["systemctl", "show", "-p", "ActiveState", "--value", unit]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn ready_only_once_booted_and_required_units_are_active() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("i-ready", REQUIRED);
    w.spawn_run();
    let msgs = w.wait_ready();
    // At READY=1 the slow unit (1 s) is active already: READY waited for it.
    assert_eq!(unit_state(&w, "asv-slow.service"), "active");
    assert_eq!(unit_state(&w, "asv-simple.service"), "active");
    let state = w.inside(&["systemctl", "is-system-running"]);
    let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
    assert!(state == "running" || state == "degraded", "{state}");
    assert!(
        msgs.iter().any(|m| m.contains("STATUS=booting")),
        "progress shown before READY: {msgs:?}"
    );
    let ready = msgs.last().unwrap();
    assert!(
        ready.contains("READY=1") && ready.contains("2/2 required units active"),
        "{ready}"
    );
    let out = w.stop(0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn crashed_required_unit_is_restarted_and_logged() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("i-crash", REQUIRED);
    w.spawn_run();
    w.wait_ready();
    // Kill it from inside: asv-simple has no Restart=, so it ends `failed`.
    let out = w.inside(&["systemctl", "kill", "-s", "KILL", "asv-simple.service"]);
    assert!(out.status.success());
    let msgs = w.notify_until(20 * SEC, |m| m.contains("STATUS=running: 2/2"));
    assert!(
        msgs.iter()
            .any(|m| m.contains("asv-simple.service failed (signal)")),
        "the failure was in STATUS: {msgs:?}"
    );
    eventually(10 * SEC, "asv-simple active again", || {
        unit_state(&w, "asv-simple.service") == "active"
    });
    // One text, three sinks: the live state file says what STATUS= said last.
    let last = msgs.last().unwrap().clone();
    let text = last
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap()
        .to_owned();
    let live = w.run_dir.join(format!("{}.json", w.name));
    eventually(5 * SEC, "the live state file says the same", || {
        std::fs::read_to_string(&live)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["status"].as_str().is_some_and(|s| s.starts_with(&text)))
    });
    let out = w.stop(0);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("INNER_UNIT=asv-simple.service")
            && err.contains("ACTIVE_STATE=failed")
            && err.contains("restarting failed required unit"),
        "structured events: {err}"
    );
    // ...and the journal too.
    assert!(err.contains(&format!("status={text}")), "{text}: {err}");
    // A ResetFailed half-applied (Result reset, ActiveState not yet) is not logged as a
    // failed unit that succeeded.
    assert!(
        !err.lines()
            .any(|l| l.contains("ACTIVE_STATE=failed") && l.contains("RESULT=success")),
        "{err}"
    );
}

#[test]
fn unit_that_hit_its_start_limit_is_restarted_too() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("i-limit", REQUIRED);
    w.spawn_run();
    w.wait_ready();
    // Restarts in quick succession trip asv-simple's default start limit (5 in 10 s): it
    // ends `failed` with result start-limit-hit, which only ResetFailed clears.
    for _ in 0..6 {
        let _ = w.inside(&["systemctl", "restart", "asv-simple.service"]);
    }
    w.notify_until(20 * SEC, |m| {
        m.contains("asv-simple.service failed (start-limit-hit)")
    });
    w.notify_until(20 * SEC, |m| m.contains("STATUS=running: 2/2"));
    assert_eq!(
        unit_state(&w, "asv-simple.service"),
        "active",
        "ResetFailed cleared the limit"
    );
    assert!(w.stop(0).status.success());
}

#[test]
fn repeated_failure_restarts_the_whole_service() {
    if !require_root() {
        return;
    }
    let mut w = World::booted(
        "i-flaky",
        "required_units = [\"asv-flaky.service\"]\nmax_restarts = 1\nrestart_window_sec = 60",
    );
    w.spawn_run();
    w.wait_ready();
    // From now on it fails at every start.
    assert!(w.inside(&["touch", "/run/asv-fail"]).status.success());
    let _ = w.inside(&["systemctl", "kill", "-s", "KILL", "asv-flaky.service"]);
    let out = w.wait(0, 60 * SEC);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("restart budget exhausted"), "{err}");
    assert!(!w.state_file().exists(), "container halted and cleaned up");
}

#[test]
fn required_unit_that_never_starts_means_no_ready_and_says_why() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("i-never", "required_units = [\"asv-missing.service\"]");
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace("start_sec = 30", "start_sec = 8"),
    )
    .unwrap();
    w.spawn_run();
    let out = w.wait(0, 60 * SEC);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("not ready after 8 s") && err.contains("asv-missing.service (not found)"),
        "{err}"
    );
    let msgs = w.notify_drain();
    assert!(
        !msgs.iter().any(|m| m.contains("READY=1")),
        "never ready: {msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("asv-missing.service (not found)")),
        "{msgs:?}"
    );
}

#[test]
fn frozen_inner_manager_stops_the_watchdog() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("i-frozen", REQUIRED);
    w.env.push(("WATCHDOG_USEC".into(), "400000".into()));
    w.spawn_run();
    w.wait_ready();
    let pings = |w: &World| {
        w.notify_for(SEC)
            .iter()
            .filter(|m| m.contains("WATCHDOG=1"))
            .count()
    };
    assert!(pings(&w) >= 3, "pings while healthy");
    let (pid, _) = w.instance_pids();
    kill(pid, libc::SIGSTOP);
    // Once a ping sent after the stop went unanswered, the pings in flight have landed;
    // from then on there must be none.
    w.wait_unanswered_ping_after(std::time::SystemTime::now());
    w.notify_drain();
    assert_eq!(pings(&w), 0, "no WATCHDOG=1 while PID 1 is frozen");
    kill(pid, libc::SIGCONT);
    assert!(pings(&w) >= 1, "pings again once it answers");
    assert!(w.stop(0).status.success());
}

#[test]
fn sigterm_halts_in_order_and_the_overlay_keeps_what_was_written() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("i-persist", REQUIRED);
    w.spawn_run();
    w.wait_ready();
    assert!(w
        .inside(&["sh", "-c", "echo kept > /var/lib/asv-persist"])
        .status
        .success());
    let t = Instant::now();
    let out = w.stop(0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("stop took {:?}", t.elapsed());
    // The ExecStop= of asv-simple ran: an orderly halt, not a kill.
    let mark = std::process::Command::new("debugfs")
        .args(["-R", "cat /upper/var/lib/asv-simple.mark"])
        .arg(w.overlay())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&mark.stdout).contains("stopped"),
        "ExecStop ran inside"
    );
    let msgs = w.notify_drain();
    assert!(msgs.iter().any(|m| m.contains("STOPPING=1")), "{msgs:?}");
    // Started again on the same overlay: the file is there.
    w.spawn_run();
    w.wait_ready();
    let out = w.inside(&["cat", "/var/lib/asv-persist"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept");
    assert!(w.stop(1).status.success());
}

#[test]
fn reboot_inside_exits_133_and_poweroff_exits_0() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("i-reboot", REQUIRED);
    w.spawn_run();
    w.wait_ready();
    let _ = w.inside(&["systemctl", "reboot"]);
    let out = w.wait(0, 60 * SEC);
    assert_eq!(
        out.status.code(),
        Some(133),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!w.state_file().exists());

    w.spawn_run();
    w.wait_ready();
    let _ = w.inside(&["systemctl", "poweroff"]);
    let out = w.wait(1, 60 * SEC);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("powered off from inside"));
}

/// Apptainer mounts a fresh sysfs read-write (container_linux.go `addKernelMount`), and the
/// double does too. With a writable /sys, systemd-udevd and systemd-udev-trigger would run
/// and trigger uevents on the host's devices: the test rootfs must have no udev (and has
/// none), which this checks before anything else, as the booted systemd sees it.
#[test]
fn sysfs_is_writable_as_under_apptainer_and_the_test_rootfs_runs_no_udev() {
    if !require_root() {
        return;
    }
    let rootfs = rootfs();
    for p in ["bin/udevadm", "lib/systemd/systemd-udevd"] {
        assert!(
            !rootfs.join(p).exists(),
            "{p} in the test rootfs: mask the udev units there before booting it with a writable /sys"
        );
    }
    let mut w = World::booted("i-sysfs", REQUIRED);
    w.spawn_run();
    w.wait_ready();
    let mounts = w.inside(&["cat", "/proc/self/mounts"]);
    let mounts = String::from_utf8_lossy(&mounts.stdout).into_owned();
    let sys = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/sys"))
        .unwrap_or_else(|| panic!("no /sys mount: {mounts}"));
    assert!(sys.starts_with("sysfs /sys sysfs rw,nosuid,nodev"), "{sys}");
    for unit in ["systemd-udevd.service", "systemd-udev-trigger.service"] {
        let out = w.inside(&["systemctl", "show", "-p", "LoadState", "--value", unit]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "not-found",
            "{unit}"
        );
    }
    let out = w.stop(0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first cgroup2 mount's super options (the hierarchy's root flags, e.g. `nsdelegate`).
fn cgroup2_super_options() -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split_once(" - "))
        .find(|(_, r)| r.starts_with("cgroup2 "))
        .map(|(_, r)| r.split(' ').nth(2).unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// Apptainer creates no cgroup namespace and puts the container in a cgroup of its own; the
/// booted systemd then builds its tree below that cgroup, in the host's hierarchy (here the
/// cgroupfs path `/apptainer/<pid>`, DOUBLE.md deviation 5). The host's cgroup2 root flags
/// are left as they were.
#[test]
fn no_cgroup_namespace_the_inner_systemd_lives_below_the_containers_cgroup() {
    if !require_root() {
        return;
    }
    let flags = cgroup2_super_options();
    let mut w = World::booted("i-cgroup", REQUIRED);
    w.spawn_run();
    w.wait_ready();
    let (pid, _) = w.instance_pids();
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/cgroup")).unwrap();
    assert_eq!(ns(&pid.to_string()), ns("self"), "no cgroup namespace");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cg.lines()
            .any(|l| l == format!("0::/apptainer/{pid}/init.scope")),
        "{cg}"
    );
    let inner = w.inside(&["cat", "/proc/1/cgroup"]);
    assert!(
        String::from_utf8_lossy(&inner.stdout).contains(&format!("0::/apptainer/{pid}/init.scope")),
        "the container sees the host's path: {}",
        String::from_utf8_lossy(&inner.stdout)
    );
    assert_eq!(unit_state(&w, "asv-simple.service"), "active");
    assert_eq!(cgroup2_super_options(), flags, "root flags unchanged");
    let out = w.stop(0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bus socket is looked up in the container's root, never the host's, and must be served
/// from inside. The test image's `dbus.socket` gets a drop-in (written inside, kept in the
/// overlay) that listens on `/run/dbus/real_socket` instead and puts at
/// `/run/dbus/system_bus_socket` a symlink to whatever the host file `bus-link` (bound at
/// `/srv/root`) says:
/// 1. an absolute link to a link inside (`/run/dbus/link` → `real_socket`): READY, as
///    through the plain socket (the kernel would have resolved `/run/dbus/link` on the host);
/// 2. the host's absolute path of a socket the test listens on: nothing there inside, so
///    the supervisor never connects (the listener sees no connection) and says why;
/// 3. the same socket, visible inside through the bind: connected, but its peer is a host
///    process, so the supervisor sends not one byte and stops at once with a clear error.
#[test]
fn bus_socket_is_resolved_in_the_containers_root_and_a_host_socket_is_refused() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("i-bus", REQUIRED);
    let bound = w.service_dir.join("root");
    let listener_path = bound.join("host-bus.sock");
    let listener = std::os::unix::net::UnixListener::bind(&listener_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    // The real socket is never at the bus path: no attempt can reach it there first.
    std::fs::write(
        bound.join("asv-bus.conf"),
        "[Socket]\nListenStream=\nListenStream=/run/dbus/real_socket\n\
         ExecStartPre=/bin/sh -c 'mkdir -p /run/dbus && \
         ln -sfn real_socket /run/dbus/link && \
         ln -sfn \"$$(cat /srv/root/bus-link)\" /run/dbus/system_bus_socket'\n",
    )
    .unwrap();
    w.spawn_run();
    w.wait_ready();
    let out = w.inside(&[
        "sh",
        "-c",
        "mkdir -p /etc/systemd/system/dbus.socket.d && \
         cp /srv/root/asv-bus.conf /etc/systemd/system/dbus.socket.d/",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    w.stop_ok(0);

    // 1. Links inside, one absolute, one relative.
    std::fs::write(bound.join("bus-link"), "/run/dbus/link").unwrap();
    w.spawn_run();
    w.wait_ready();
    let link = w.inside(&["readlink", "/run/dbus/system_bus_socket"]);
    assert_eq!(
        String::from_utf8_lossy(&link.stdout).trim(),
        "/run/dbus/link"
    );
    w.stop_ok(1);

    // 2. An absolute link to the host's path of a host socket.
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace("start_sec = 30", "start_sec = 8"),
    )
    .unwrap();
    let host_path = listener_path.display().to_string();
    std::fs::write(bound.join("bus-link"), &host_path).unwrap();
    w.spawn_run();
    let out = w.wait(2, 60 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains(" s; last attempt: resolving the container's system bus inside its root: /run/dbus/system_bus_socket inside the container (through the symbolic links → ")
            && err.contains(&format!("→ {host_path}): ")),
        "{err}"
    );
    // The supervisor has exited: whatever it would have connected is queued by now.
    assert_eq!(accepted(&listener), [], "nobody reached the host socket");

    // 3. The same socket through the bind: found inside, served from the host.
    std::fs::write(bound.join("bus-link"), "/srv/root/host-bus.sock").unwrap();
    let sup = w.spawn_run() as i32;
    let out = w.wait(3, 60 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("the container's system bus /run/dbus/system_bus_socket in the root of pid ")
            && err.contains(&format!(
                "is served by pid {}, which is not in the container's PID namespace",
                std::process::id()
            ))
            && err.contains("refusing to talk to it"),
        "{err}"
    );
    let from_us: Vec<_> = accepted(&listener)
        .into_iter()
        .filter(|(pid, _)| *pid == sup)
        .collect();
    assert_eq!(
        from_us,
        [(sup, Vec::new())],
        "connected, and not one byte sent"
    );
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A boot storm from the container's own systemd: a unit of the image starts 2 000 oneshot
/// units at boot (one StartUnit each), so the boot ends only after ~4 000 JobNew/JobRemoved
/// and their property changes, while the watchdog pings. READY=1 comes; `STATUS=` follows the job count a
/// few times a second, not once per job (it was one per job); WATCHDOG=1 goes on. The
/// figures (STATUS= count and rate, pings, the supervisor's peak RSS) are printed.
#[test]
fn a_boot_storm_inside_reaches_status_a_few_times_a_second() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("i-storm", REQUIRED);
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace("start_sec = 30", "start_sec = 240"),
    )
    .unwrap();
    let bound = w.service_dir.join("root");
    std::fs::write(
        bound.join("asv-noop@.service"),
        "[Service]\nType=oneshot\nExecStart=/bin/true\n",
    )
    .unwrap();
    std::fs::write(
        bound.join("asv-storm.service"),
        "[Service]\nType=oneshot\nExecStart=/usr/local/bin/asv-storm\n\
         [Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    std::fs::write(
        bound.join("asv-storm"),
        "#!/bin/sh\nsystemctl start --no-block $(seq -f 'asv-noop@%g.service' 1 2000) && \
         touch /run/asv-storm-done\n",
    )
    .unwrap();
    w.spawn_run();
    w.wait_ready();
    let out = w.inside(&[
        "sh",
        "-c",
        "cp /srv/root/asv-noop@.service /srv/root/asv-storm.service /etc/systemd/system/ && \
         install -m 0755 /srv/root/asv-storm /usr/local/bin/asv-storm && \
         systemctl enable asv-storm.service",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    w.stop_ok(0);
    w.notify_drain();

    w.env.push(("WATCHDOG_USEC".into(), "1000000".into()));
    let t = Instant::now();
    let sup = w.spawn_run();
    let msgs = w.wait_ready_within(240 * SEC);
    let secs = t.elapsed().as_secs_f64();
    let hwm = status_kib(sup, "VmHWM:");
    let statuses = msgs.iter().filter(|m| m.contains("STATUS=")).count();
    let pings = msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    let most_jobs = msgs
        .iter()
        .filter_map(|m| m.split("STATUS=booting: ").nth(1))
        .filter_map(|s| s.split(' ').next()?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    eprintln!(
        "boot storm: READY after {secs:.1} s, {statuses} STATUS= ({:.1}/s), most jobs shown \
         {most_jobs}, {pings} WATCHDOG=1, supervisor VmHWM {hwm} KiB",
        statuses as f64 / secs
    );
    // systemctl made its 2 000 StartUnit calls (one JobNew each) before the boot ended.
    let done = w.inside(&["test", "-e", "/run/asv-storm-done"]);
    assert!(done.status.success(), "the storm ran inside");
    // The rate limit (src/os/inner/events.rs): a burst of 16 state changes, then 3 a second,
    // and the job count twice a second; a few more for the steps before the bus.
    let limit = 16 + 8 + (5.0 * secs).ceil() as usize;
    assert!(
        statuses <= limit,
        "{statuses} STATUS= in {secs:.1} s (limit {limit})"
    );
    let jobs_left = w.inside(&["systemctl", "list-jobs", "--no-legend"]);
    assert!(jobs_left.stdout.is_empty(), "booted: no job left");
    w.stop_ok(1);
}
