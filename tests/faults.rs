//! The fault table (tests/README.md): each row provoked against the real pieces — the
//! supervisor binary, the Apptainer CLI double (real namespaces, loop-mounted ext3 overlay,
//! real CNI plugins in a test network namespace), the light init or a real systemd booted
//! from the test rootfs. Every test also checks that nothing is left behind and, where it
//! matters, that the next start comes up clean with the overlay's data intact. Needs root.

mod support;

use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::netns::TestNetns;
use support::*;

/// The light init's view of the overlay (DOUBLE.md, "Init modes"), through the container's
/// own mount namespace.
fn overlay_in(w: &World, pid: i32) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{pid}/root/run/apptainer-double/{}/overlay",
        w.name
    ))
}

/// Nothing of the instance is left: no state file, no run record, no loop device, no
/// process of it.
fn nothing_left(w: &World, pids: &[i32]) {
    assert!(!w.state_file().exists(), "state file removed");
    assert!(!w.run_record().exists(), "run record removed");
    eventually(5 * SEC, "loop device released", || {
        loops_for(&w.overlay()).is_empty()
    });
    for p in pids {
        assert!(!alive(*p), "process {p} is gone");
    }
}

/// Files beside the overlay whose name marks an unfinished creation.
fn creation_temps(w: &World) -> Vec<String> {
    std::fs::read_dir(w.overlay().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".creating-") || n.ends_with(".ext3"))
        .collect()
}

fn create_overlay(w: &World) -> PathBuf {
    let overlay = w.overlay();
    let out = w.apptainer(&[
        "overlay",
        "create",
        "-S",
        "-s",
        "64",
        overlay.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    overlay
}

// --- row 1: the container's init is SIGKILLed ----------------------------------------

#[test]
fn init_sigkill_exits_nonzero_cleans_up_and_restarts_with_overlay_data() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-init-kill");
    let (pid, ppid) = w.start();
    std::fs::write(overlay_in(&w, pid).join("marker"), b"kept across a crash").unwrap();
    kill(pid, libc::SIGKILL);
    let out = w.wait(0, 20 * SEC);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("ended by itself"), "{}", stderr(&out));
    nothing_left(&w, &[pid, ppid]);
    // The next start is clean and finds what was written before the crash.
    let (pid2, ppid2) = w.start();
    assert_ne!(pid2, pid);
    assert_eq!(
        std::fs::read(overlay_in(&w, pid2).join("marker")).unwrap(),
        b"kept across a crash"
    );
    w.stop_ok(1);
    nothing_left(&w, &[pid2, ppid2]);
}

/// Row 1, 20 times, on a network: the container's init SIGKILLed is always the instance
/// ending by itself (never "the master died", never a CNI DEL after the master's own), also
/// when the supervisor is stopped (SIGSTOP) until the master has exited, so that both
/// pidfds are ready at once and the master re-raised the same SIGKILL.
#[test]
fn init_sigkill_is_always_the_instance_ending_even_with_the_supervisor_stopped() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let mut w = netns_world("f-init-race", &ns);
    let leases = w.root().join("leases");
    w.append_config(&host_local("hl_race", "asvbr6", "192.168.56", &leases));
    for i in 0..20 {
        let (pid, ppid) = w.start();
        let sup = w.child(i).id() as i32;
        let stopped = i % 2 == 1;
        if stopped {
            kill(sup, libc::SIGSTOP);
        }
        kill(pid, libc::SIGKILL);
        if stopped {
            // The master has run its cleanup and exited (a zombie of the stopped supervisor).
            eventually(30 * SEC, "the master exited", || !alive(ppid));
            kill(sup, libc::SIGCONT);
        }
        let out = w.wait(i, 30 * SEC);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "round {i}: {err}");
        assert!(err.contains("ended by itself"), "round {i}: {err}");
        assert!(
            !err.contains("the Apptainer master (pid"),
            "round {i}: {err}"
        );
        assert!(!err.contains("the dead master left"), "round {i}: {err}");
        nothing_left(&w, &[pid, ppid]);
    }
}

// --- row 2: the master is SIGKILLed (its cleanup never runs) ---------------------------

fn host_local(name: &str, bridge: &str, net: &str, leases: &Path) -> String {
    // One address only: a lease that leaks makes the next start fail.
    format!(
        "[[network]]\nname = \"{name}\"\ntype = \"bridge\"\nbridge = \"{bridge}\"\n\
         [network.ipam]\ntype = \"host-local\"\nsubnet = \"{net}.0/24\"\nrange_start = \"{net}.2\"\n\
         range_end = \"{net}.2\"\ndata_dir = \"{}\"\n",
        leases.display()
    )
}

fn netns_world(name: &str, ns: &TestNetns) -> World {
    let mut w = World::new(name);
    w.netns = Some(ns.path());
    // Where Apptainer's `cni plugin path` is read from (beside the network dir).
    std::fs::write(
        w.root().join("apptainer.conf"),
        "cni plugin path = /usr/lib/cni\n",
    )
    .unwrap();
    w
}

#[test]
fn master_sigkill_releases_the_leftover_lease_and_the_next_start_is_clean() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let mut w = netns_world("f-master", &ns);
    let leases = w.root().join("leases");
    w.append_config(&host_local("hl_master", "asvbr5", "192.168.55", &leases));
    let lease = leases.join("hl_master/192.168.55.2");

    // a) The master dies while the supervisor watches.
    let (pid, ppid) = w.start();
    assert!(lease.exists(), "lease taken");
    kill(ppid, libc::SIGKILL);
    let out = w.wait(0, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the Apptainer master (pid"), "{err}");
    assert!(
        err.contains("released the network the dead master left"),
        "{err}"
    );
    assert!(!lease.exists(), "the DEL the master never ran was run");
    nothing_left(&w, &[pid, ppid]);

    // b) Supervisor and master die together (systemd kills the unit's cgroup): the next
    // start finds the stale state file and releases the lease before starting.
    let (pid, ppid) = w.start();
    assert!(lease.exists());
    kill(w.child(1).id() as i32, libc::SIGKILL);
    kill(ppid, libc::SIGKILL);
    let _ = w.wait(1, 5 * SEC);
    eventually(5 * SEC, "instance gone", || !alive(pid) && !alive(ppid));
    assert!(
        lease.exists() && w.state_file().exists(),
        "leftovers are there"
    );
    let msgs = {
        w.spawn_run();
        w.wait_ready()
    };
    assert!(
        msgs.last().unwrap().contains("; ip 192.168.55.2"),
        "the one address was free again: {msgs:?}"
    );
    let out = w.stop_ok(2);
    assert!(
        stderr(&out).contains("released the network the dead master left"),
        "{}",
        stderr(&out)
    );
    eventually(5 * SEC, "lease released by the master's own DEL", || {
        !lease.exists()
    });
}

// --- row 4: the inner systemd hangs -------------------------------------------------------

#[test]
fn frozen_inner_systemd_gets_no_watchdog_and_abort_then_term_still_tear_down() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("f-frozen", "required_units = [\"asv-simple.service\"]");
    w.env.push(("WATCHDOG_USEC".into(), "400000".into()));
    let (pid, ppid) = w.start();
    kill(pid, libc::SIGSTOP);
    // Once a ping sent after the stop went unanswered, the pings in flight have landed;
    // from then on there must be none.
    w.wait_unanswered_ping_after(std::time::SystemTime::now());
    w.notify_drain();
    let pings = w
        .notify_for(SEC)
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    assert_eq!(pings, 0, "no WATCHDOG=1 while PID 1 is stopped");
    // systemd's WatchdogSignal=, then its stop job's SIGTERM right behind it.
    let sup = w.child(0).id() as i32;
    kill(sup, libc::SIGABRT);
    // SIGTERM once the supervisor has acted on the SIGABRT (its STOPPING=1 says so).
    w.notify_until(10 * SEC, |m| m.contains("STOPPING=1"));
    kill(sup, libc::SIGTERM);
    let out = w.wait(0, 60 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is stopped (T state); escalating at once"),
        "{err}"
    );
    nothing_left(&w, &[pid, ppid]);
    // A restart boots cleanly on the same overlay.
    let (pid2, _) = w.start();
    assert_ne!(pid2, pid);
    w.stop_ok(1);
}

// --- row 5: a required unit crash-loops ---------------------------------------------------

#[test]
fn crash_looping_required_unit_gets_bounded_restarts_then_exit_1() {
    if !require_root() {
        return;
    }
    let mut w = World::booted(
        "f-loop",
        "required_units = [\"asv-flaky.service\"]\non_failure = \"restart-unit\"\nmax_restarts = 2\nrestart_window_sec = 120",
    );
    let (pid, ppid) = w.start();
    // From now on it fails at every start.
    assert!(w.inside(&["touch", "/run/asv-fail"]).status.success());
    let _ = w.inside(&["systemctl", "kill", "-s", "KILL", "asv-flaky.service"]);
    let out = w.wait(0, 90 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // Each step is in the log, in order: failure, restart 1/2, failure, restart 2/2,
    // failure, budget exhausted.
    let steps = [
        "restart=1 max_restarts=2",
        "restart=2 max_restarts=2",
        "restart budget exhausted",
    ];
    let mut at = 0;
    for s in steps {
        let i = err[at..]
            .find(s)
            .unwrap_or_else(|| panic!("{s:?} after byte {at}: {err}"));
        at += i + s.len();
    }
    assert!(
        err.matches("INNER_UNIT=asv-flaky.service ACTIVE_STATE=failed")
            .count()
            >= 3,
        "each of the three failures logged: {err}"
    );
    let msgs = w.notify_drain();
    for want in ["restarting it (1/2)", "restarting it (2/2)"] {
        assert!(msgs.iter().any(|m| m.contains(want)), "{want}: {msgs:?}");
    }
    assert!(msgs.iter().any(|m| m.contains("STOPPING=1")), "{msgs:?}");
    nothing_left(&w, &[pid, ppid]);
}

// --- row 6: `apptainer instance start` fails ------------------------------------------------

#[test]
fn start_with_a_bad_image_quotes_apptainer_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-badimg");
    let bad = w.service_dir.join("containers/broken.sif");
    std::fs::write(&bad, b"this is not an image").unwrap();
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace(
            "${service_dir}/containers/sandbox",
            "${service_dir}/containers/broken.sif",
        ),
    )
    .unwrap();
    w.spawn_run();
    let out = w.wait(0, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("apptainer instance start failed")
            && err.contains("image format not recognized"),
        "Apptainer's own words are quoted: {err}"
    );
    nothing_left(&w, &[]);
    assert!(
        !w.state_file().parent().unwrap().exists(),
        "no instance directory"
    );
}

/// The back-off file's failure count (0: no file).
fn failed_starts(w: &World) -> u64 {
    std::fs::read(w.run_dir.join(format!("{}.backoff", w.name)))
        .ok()
        .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap())
        .map_or(0, |v| v["failures"].as_u64().unwrap())
}

/// Starts that fail in a row (exit 69) are not retried every `RestartSec=` for ever: the
/// supervisor waits before the next start, longer each time (none after one failure, then
/// 5 s, then 10 s), says so in STATUS= with EXTEND_TIMEOUT_USEC, and a stop during the wait
/// ends the run at once with nothing started. A run that reaches READY clears the count.
#[test]
fn failing_starts_in_a_row_back_off_longer_each_time_and_a_stop_ends_the_wait() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-backoff");
    let bad = w.service_dir.join("containers/broken.sif");
    std::fs::write(&bad, b"this is not an image").unwrap();
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    let broken = cfg.replace(
        "${service_dir}/containers/sandbox",
        "${service_dir}/containers/broken.sif",
    );
    std::fs::write(w.config_path(), &broken).unwrap();
    let mut announced = Vec::new();
    for i in 0..3 {
        w.spawn_run();
        let out = w.wait(i, 60 * SEC);
        assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
        assert_eq!(failed_starts(&w), i as u64 + 1);
        let msgs = w.notify_drain();
        let backoff = msgs.iter().find(|m| m.contains("STATUS=backing off"));
        if let Some(m) = backoff {
            assert!(
                msgs.iter().any(|m| m.contains("EXTEND_TIMEOUT_USEC=")),
                "{msgs:?}"
            );
            assert!(
                stderr(&out).contains("backing off"),
                "in the journal too: {}",
                stderr(&out)
            );
            assert!(
                m.contains("apptainer instance start failed"),
                "the cause: {m}"
            );
        }
        announced.push(backoff.map(|m| {
            let s = &m[m.find("STATUS=").unwrap() + 7..];
            s[..s.find(':').unwrap()].to_owned()
        }));
    }
    assert_eq!(
        announced,
        [
            None,
            None,
            Some("backing off 5 s after 2 failed starts".to_owned())
        ]
    );
    // The fourth waits 10 s; a SIGTERM then ends it at once, and nothing is started.
    let argv_log = w.root().join("argv.log");
    w.env.push((
        "APPTAINER_DOUBLE_ARGV_LOG".into(),
        argv_log.display().to_string(),
    ));
    w.spawn_run();
    w.notify_until(20 * SEC, |m| {
        m.contains("STATUS=backing off 10 s after 3 failed starts")
    });
    kill(w.child(3).id() as i32, libc::SIGTERM);
    let out = w.wait(3, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("stop requested while backing off"), "{err}");
    assert_eq!(instance_starts(&argv_log), 0, "nothing started: {err}");
    assert_eq!(failed_starts(&w), 3, "a stop is no failed start");
    // Fixed, and the back-off skipped as the man page says (the file removed): the start
    // comes at once and READY clears a count written meanwhile.
    std::fs::write(w.config_path(), &cfg).unwrap();
    std::fs::write(
        w.run_dir.join("f-backoff.backoff"),
        br#"{"failures":1,"cause":"x"}"#,
    )
    .unwrap();
    w.start();
    // READY=1 goes out first, the file goes right after.
    eventually(5 * SEC, "READY cleared the count", || {
        failed_starts(&w) == 0
    });
    w.stop_ok(4);
}

#[test]
fn start_with_a_missing_bind_source_is_refused_before_apptainer_runs() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-nobind");
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace(
            "${service_dir}/root:/srv/root",
            "/nonexistent/asv-bind:/srv/x",
        ),
    )
    .unwrap();
    w.spawn_run();
    let out = w.wait(0, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("/nonexistent/asv-bind"), "{err}");
    nothing_left(&w, &[]);
    assert!(!w.overlay().exists(), "not even the overlay was created");
}

#[test]
fn network_add_failure_quotes_the_plugin_and_leaves_no_lease() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let mut w = netns_world("f-addfail", &ns);
    let leases = w.root().join("leases");
    w.append_config(&host_local("hl_ok", "asvbr6", "192.168.56", &leases));
    w.append_config(&host_local("hl_full", "asvbr7", "192.168.57", &leases));
    // The second network's only address belongs to someone else: its ADD fails after the
    // first network's ADD took a lease.
    std::fs::create_dir_all(leases.join("hl_full")).unwrap();
    let foreign = leases.join("hl_full/192.168.57.2");
    std::fs::write(&foreign, "someone-else\r\neth0").unwrap();
    w.spawn_run();
    let out = w.wait(0, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("apptainer instance start failed")
            && err.contains("no IP addresses available"),
        "the plugin's message is quoted: {err}"
    );
    assert!(
        !leases.join("hl_ok/192.168.56.2").exists(),
        "the first network's lease was given back"
    );
    assert_eq!(
        std::fs::read_to_string(&foreign).unwrap(),
        "someone-else\r\neth0",
        "a lease that is not ours is untouched"
    );
    // Our conflists are whole and parse (what `check` renders).
    for n in ["hl_ok", "hl_full"] {
        let text = std::fs::read_to_string(w.network_dir().join(format!("{n}.conflist"))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], n);
    }
    nothing_left(&w, &[]);
}

// --- row 7: SIGTERM during start ------------------------------------------------------------

#[test]
fn sigterm_during_overlay_creation_leaves_no_half_made_image() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-term-mkfs");
    // A sparse image big enough that mkfs.ext3 runs for a second (its inode tables),
    // so the stop request lands while `overlay create` works.
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace("size_mib = 64", "size_mib = 16000"),
    )
    .unwrap();
    w.spawn_run();
    w.notify_until(20 * SEC, |m| m.contains("STATUS=creating overlay"));
    kill(w.child(0).id() as i32, libc::SIGTERM);
    let out = w.wait(0, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("stop requested while apptainer runs"), "{err}");
    assert!(!w.overlay().exists(), "no overlay.img, whole or truncated");
    assert_eq!(
        creation_temps(&w),
        Vec::<String>::new(),
        "no temporary left"
    );
    nothing_left(&w, &[]);
    // The next start creates it from scratch.
    w.start();
    assert_eq!(std::fs::metadata(w.overlay()).unwrap().len(), 16000 << 20);
    w.stop_ok(1);
}

/// The pid a hung mkfs of the double wrote (DOUBLE.md, "Faults"), once it is there.
fn hung_mkfs(pidfile: &Path) -> i32 {
    eventually(20 * SEC, "the double's mkfs hangs", || {
        std::fs::read_to_string(pidfile).is_ok_and(|t| t.ends_with('\n'))
    });
    std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A mkfs that never returns (a hung NFS server): the creation is abandoned at its
/// deadline (`timeouts.overlay_create_sec`) with a clear error, and at once on a stop;
/// either way the command and its mkfs are killed, nothing is published and the private
/// directory is gone.
#[test]
fn a_hung_overlay_creation_is_abandoned_at_its_deadline_and_at_a_stop() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-mkfs-hang");
    let pidfile = w.root().join("mkfs.pid");
    w.env.push((
        "APPTAINER_DOUBLE_FAULT_MKFS_HANG".into(),
        pidfile.display().to_string(),
    ));
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace("kill_sec = 3\n", "kill_sec = 3\noverlay_create_sec = 3\n"),
    )
    .unwrap();
    // At its deadline.
    w.spawn_run();
    let mkfs = hung_mkfs(&pidfile);
    let out = w.wait(0, 60 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("did not finish within 3 s (timeouts.overlay_create_sec)"),
        "{err}"
    );
    eventually(5 * SEC, "the hung mkfs was killed with its group", || {
        !alive(mkfs)
    });
    assert!(!w.overlay().exists(), "nothing published");
    assert_eq!(
        creation_temps(&w),
        Vec::<String>::new(),
        "no temporary left"
    );
    // At a stop, with the default deadline (60 s and more) far away.
    std::fs::write(w.config_path(), &cfg).unwrap();
    std::fs::remove_file(&pidfile).unwrap();
    w.spawn_run();
    let mkfs = hung_mkfs(&pidfile);
    kill(w.child(1).id() as i32, libc::SIGTERM);
    let out = w.wait(1, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("killing the apptainer command"), "{err}");
    eventually(5 * SEC, "the hung mkfs was killed with its group", || {
        !alive(mkfs)
    });
    assert!(!w.overlay().exists(), "nothing published");
    assert_eq!(
        creation_temps(&w),
        Vec::<String>::new(),
        "no temporary left"
    );
    nothing_left(&w, &[]);
}

#[test]
fn temporaries_of_an_interrupted_creation_are_removed_on_the_next_start() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-temps");
    let dir = w.overlay().parent().unwrap().to_owned();
    // What a SIGKILL during `overlay create` leaves: our private 0700 directory with the
    // half-made image and Apptainer's `<path>.ext3` in it.
    let ours = dir.join(".overlay.img.creating-Xy12Zq");
    std::fs::create_dir(&ours).unwrap();
    std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o700)).unwrap();
    for n in ["overlay.img", "overlay.img.ext3"] {
        std::fs::write(ours.join(n), vec![0u8; 8192]).unwrap();
    }
    // Judged by what it is, not by its name: a link of that pattern is not ours, and
    // what it points to is never entered.
    let keep = w.root().join("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("data"), b"not ours").unwrap();
    std::os::unix::fs::symlink(&keep, dir.join(".overlay.img.creating-link")).unwrap();
    w.spawn_run();
    w.wait_ready();
    assert_eq!(creation_temps(&w), [".overlay.img.creating-link"]);
    assert_eq!(std::fs::read(keep.join("data")).unwrap(), b"not ours");
    let out = w.stop_ok(0);
    assert!(
        stderr(&out).contains("removed the temporary of an interrupted overlay creation"),
        "{}",
        stderr(&out)
    );
}

/// Apptainer's `overlay create` follows links (truncate/dd, chmod, rename): a link planted
/// at any name a creation could be predicted to use — our old `.overlay.img.creating-<pid>`
/// for the next few thousand pids, Apptainer's own `overlay.img.ext3` — must never lead it
/// to a host file. The overlay is made in a private directory; the host file keeps its
/// content and mode, and the links are left as they were.
#[test]
fn links_planted_at_guessable_temporary_names_touch_no_host_file() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-plant");
    let dir = w.overlay().parent().unwrap().to_owned();
    let victim = w.root().join("victim.conf");
    std::fs::write(&victim, b"host file\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut planted = vec!["overlay.img.ext3".to_owned()];
    for pid in last + 1..last + 3000 {
        planted.push(format!(".overlay.img.creating-{pid}"));
        planted.push(format!(".overlay.img.creating-{pid}.ext3"));
    }
    for n in &planted {
        std::os::unix::fs::symlink(&victim, dir.join(n)).unwrap();
    }
    w.spawn_run();
    w.wait_ready();
    assert!(
        w.child(0).id() > last && w.child(0).id() < last + 3000,
        "the supervisor's pid {} is among the planted names",
        w.child(0).id()
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"host file\n");
    assert_eq!(
        std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777,
        0o644
    );
    let m = std::fs::symlink_metadata(w.overlay()).unwrap();
    assert!(m.file_type().is_file() && m.len() == 64 << 20, "{m:?}");
    for n in &planted {
        assert_eq!(std::fs::read_link(dir.join(n)).unwrap(), victim, "{n}");
    }
    w.stop_ok(0);
}

#[test]
fn sigterm_during_instance_start_stops_what_was_started() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-term-start");
    create_overlay(&w);
    w.spawn_run();
    w.notify_until(20 * SEC, |m| m.contains("STATUS=starting instance"));
    kill(w.child(0).id() as i32, libc::SIGTERM);
    let out = w.wait(0, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("stopped during start-up; nothing was left running"),
        "{err}"
    );
    nothing_left(&w, &[]);
    let (pid, ppid) = w.start();
    w.stop_ok(1);
    nothing_left(&w, &[pid, ppid]);
}

/// The `instance start` lines of the double's argv log.
fn instance_starts(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"instance\", \"start\""))
        .count()
}

/// A stop that comes while a leftover orphan is halted ends the run there: the orphan is
/// halted, and no fresh container is started (the double's argv log has no `instance start`).
#[test]
fn sigterm_during_an_orphans_halt_starts_no_new_container() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-term-orphan");
    // The orphan's init has no halt handler for a long while (systemd before it is ready):
    // the halt waits out stop_sec, so the SIGTERM lands during it.
    w.env.push(("FAKE_INIT_DELAY_TRAPS".into(), "600".into()));
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace("stop_sec = 10", "stop_sec = 4"),
    )
    .unwrap();
    let (pid, ppid) = w.start();
    kill(w.child(0).id() as i32, libc::SIGKILL);
    let _ = w.wait(0, 5 * SEC);
    assert!(alive(pid) && alive(ppid), "the orphan lives on");
    let argv_log = w.root().join("argv.log");
    w.env.push((
        "APPTAINER_DOUBLE_ARGV_LOG".into(),
        argv_log.display().to_string(),
    ));
    w.spawn_run();
    w.notify_until(20 * SEC, |m| {
        m.contains("STATUS=halting an orphaned instance")
    });
    kill(w.child(1).id() as i32, libc::SIGTERM);
    let out = w.wait(1, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("stop requested while the container halts"),
        "{err}"
    );
    // The log is written: the orphan's forced stop is in it, and nothing else started.
    let log = std::fs::read_to_string(&argv_log).unwrap_or_default();
    assert!(log.contains("\"stop\""), "{log}");
    assert_eq!(instance_starts(&argv_log), 0, "no new container: {log}");
    assert!(!alive(pid) && !alive(ppid), "the orphan was halted");
    nothing_left(&w, &[pid, ppid]);
}

#[test]
fn sigterm_during_boot_halts_the_booting_container() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("f-term-boot", "required_units = [\"asv-slow.service\"]");
    w.spawn_run();
    w.notify_until(60 * SEC, |m| m.contains("STATUS=booting"));
    let (pid, ppid) = w.instance_pids();
    kill(w.child(0).id() as i32, libc::SIGTERM);
    let out = w.wait(0, 60 * SEC);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    nothing_left(&w, &[pid, ppid]);
    let msgs = w.notify_drain();
    assert!(!msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
}

// --- row 8: the overlay image itself ---------------------------------------------------------

/// Writes `bytes` at `offset` of the file.
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn fingerprint(path: &Path) -> (u64, u64, i64, Vec<u8>) {
    let m = std::fs::metadata(path).unwrap();
    let mut head = vec![0u8; 8192];
    use std::os::unix::fs::FileExt;
    let n = std::fs::File::open(path)
        .unwrap()
        .read_at(&mut head, 0)
        .unwrap();
    head.truncate(n);
    (m.ino(), m.len(), m.mtime_nsec(), head)
}

#[test]
fn overlay_from_mkfs_reads_as_a_sound_ext3() {
    if !require_root() {
        return;
    }
    let w = World::new("f-sb");
    let overlay = create_overlay(&w);
    let sb = apptainer_supervisor::host::read_superblock(&overlay).unwrap();
    assert!(sb.has_journal, "ext3: {sb:?}");
    assert!(!sb.needs_recovery && !sb.errors);
    assert_eq!(sb.blocks_count * sb.block_size, 64 << 20, "{sb:?}");
    assert!(
        sb.fill_percent() > 0.0 && sb.fill_percent() < 20.0,
        "{sb:?}"
    );
}

/// What a case does to a good image.
type Damage = fn(&Path);

#[test]
fn broken_overlay_images_are_refused_with_78_and_never_recreated() {
    if !require_root() {
        return;
    }
    // (what is done to a good image, what the refusal says)
    let cases: [(&str, Damage, &str); 4] = [
        (
            "magic",
            |p| poke(p, 1080, &[0, 0]),
            "is not an ext2/3/4 image",
        ),
        (
            "errors",
            |p| poke(p, 1024 + 0x3A, &[0x03, 0x00]),
            "the kernel recorded file-system errors",
        ),
        (
            "features",
            |p| poke(p, 1024 + 0x62, &[0x80]),
            "features this kernel cannot mount",
        ),
        (
            "truncated",
            |p| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(32 << 20).unwrap();
            },
            "the image was truncated",
        ),
    ];
    for (what, damage, says) in cases {
        let mut w = World::new(&format!("f-bad-{what}"));
        let overlay = create_overlay(&w);
        damage(&overlay);
        let before = fingerprint(&overlay);
        w.spawn_run();
        let out = w.wait(0, 30 * SEC);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{what}: {err}");
        assert!(
            err.contains(says) && err.contains("left untouched and not recreated"),
            "{what}: {err}"
        );
        assert!(fingerprint(&overlay) == before, "{what}: image unchanged");
        nothing_left(&w, &[]);
    }
}

#[test]
fn overlay_over_90_percent_full_is_warned_about_at_start() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-full");
    let (pid, _) = w.start();
    // Fill it (dd may well end with ENOSPC: full is what is wanted).
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!(
            "of={}",
            overlay_in(&w, pid).join("upper/big").display()
        ))
        .args(["bs=1M", "count=60", "conv=fsync"])
        .output()
        .unwrap();
    w.stop_ok(0);
    let sb = apptainer_supervisor::host::read_superblock(&w.overlay()).unwrap();
    assert!(sb.fill_percent() > 90.0, "{sb:?}");
    w.start();
    let out = w.stop_ok(1);
    let err = stderr(&out);
    assert!(
        err.contains("the overlay image is over 90% full") && err.contains("fill_percent="),
        "{err}"
    );
}

// --- row 9: the disk fills up -------------------------------------------------------------

/// Set in the child that runs inside its own mount namespace (see
/// [`full_tmpfs_keeps_previous_files_intact`]).
const IN_NS: &str = "ASV_FAULTS_PRIVATE_MOUNTS";

/// Runs this test binary's test `name` again under `unshare -m` (a private mount
/// namespace), so that it can mount a tiny tmpfs without touching the host's mounts.
fn rerun_in_private_mounts(name: &str) {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env(IN_NS, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran the test:\n{text}");
}

/// A tmpfs of `pages` pages at a fresh directory, filled so that `free` pages remain.
fn tiny_tmpfs(pages: u64, free: u64) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={}k", pages * 4)])
        .arg("tmpfs")
        .arg(d.path())
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(
        d.path().join("filler"),
        vec![1u8; ((pages - free) * 4096) as usize],
    )
    .unwrap();
    d
}

#[test]
fn full_tmpfs_keeps_previous_files_intact() {
    if !require_root() {
        return;
    }
    if std::env::var_os(IN_NS).is_none() {
        rerun_in_private_mounts("full_tmpfs_keeps_previous_files_intact");
        return;
    }
    use apptainer_supervisor::os::write_atomic;
    use apptainer_supervisor::os::{ProcId, RunRecord};
    // Room for the old files, then nothing.
    let d = tiny_tmpfs(16, 3);
    let root = d.path();
    let record = RunRecord {
        name: "svc".into(),
        container: ProcId {
            pid: 10,
            start_time: 1,
        },
        master: ProcId {
            pid: 9,
            start_time: 1,
        },
        state_file: "/x/svc.json".into(),
        overlay: "/x/overlay.img".into(),
        supervisor_pid: 8,
    };
    let rec = root.join("svc.run");
    record.write(&rec).unwrap();
    let state = root.join("svc.state.json");
    write_atomic(&state, b"{\"old\":true}", 0o644).unwrap();
    let conflist = root.join("net.conflist");
    write_atomic(&conflist, b"{\"name\":\"net\"}\n", 0o644).unwrap();
    let old: Vec<Vec<u8>> = [&rec, &state, &conflist]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    // Eat the last pages.
    let mut n = 0;
    while std::fs::write(root.join(format!("eat{n}")), vec![2u8; 4096]).is_ok() {
        n += 1;
    }
    let files_before = names_in(root);
    let big = vec![b'x'; 3 * 4096];
    let e = write_atomic(&state, &big, 0o644).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let e = write_atomic(&conflist, &big, 0o644).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let mut bigger = record.clone();
    bigger.state_file = PathBuf::from("/y".repeat(4096));
    let e = bigger.write(&rec).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    for (p, want) in [&rec, &state, &conflist].iter().zip(&old) {
        assert_eq!(&std::fs::read(p).unwrap(), want, "{} intact", p.display());
    }
    assert_eq!(names_in(root), files_before, "no temporary file left");
    let _ = Command::new("umount").arg(root).status();
}

#[test]
fn full_run_dir_at_start_is_a_clear_error_and_the_instance_is_stopped() {
    if !require_root() {
        return;
    }
    let mut w = World::new("f-enospc");
    // The run dir is a 16-page tmpfs with one page free (the lock file takes it), in a
    // mount namespace of the supervisor's own; the double and the instance inherit it.
    let run = w.run_dir.clone();
    std::fs::create_dir_all(&run).unwrap();
    w.wrap = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "mount -t tmpfs -o size=64k tmpfs \"$0\" && head -c 61440 /dev/zero > \"$0/filler\" && exec \"$@\"",
    ]
    .iter()
    .map(Into::into)
    .chain([run.clone().into_os_string()])
    .collect();
    w.spawn_run();
    let out = w.wait(0, 60 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(71), "{err}");
    assert!(
        err.contains(&format!("writing {}", w.run_record().display()))
            && err.contains("No space left on device"),
        "{err}"
    );
    assert!(
        err.contains("cannot take over the started instance; stopping it"),
        "{err}"
    );
    nothing_left(&w, &[]);
    assert!(
        w.mark_text().contains("halt"),
        "the started instance was halted in order: {:?}",
        w.mark_text()
    );
}

// --- row 11: many instances at once ----------------------------------------------------------

fn instance_masters() -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).into_owned();
            c.starts_with("Apptainer instance: ").then_some((pid, c))
        })
        .collect()
}

#[test]
fn twenty_instances_start_and_stop_concurrently_without_crossing() {
    if !require_root() {
        return;
    }
    const N: usize = 20;
    let mut ws: Vec<World> = (0..N)
        .map(|i| World::new(&format!("f-many{i:02}")))
        .collect();
    for w in &mut ws {
        w.spawn_run();
    }
    let mut seen = Vec::new();
    for w in &mut ws {
        // 20 starts share the machine: a longer wait than one start gets.
        let msgs = w.wait_ready_within(180 * SEC);
        let (pid, ppid) = w.instance_pids();
        assert!(
            msgs.last()
                .unwrap()
                .contains(&format!("instance pid {pid}")),
            "{}: {msgs:?}",
            w.name
        );
        // Each record and state file names this service's own instance.
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(w.state_file()).unwrap()).unwrap();
        assert_eq!(st["name"], w.name.as_str());
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(w.run_record()).unwrap()).unwrap();
        assert_eq!(rec["name"], w.name.as_str());
        assert_eq!(rec["container"]["pid"], pid);
        assert_eq!(rec["master"]["pid"], ppid);
        let master = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap();
        assert!(
            String::from_utf8_lossy(&master).contains(&format!("[{}]", w.name)),
            "the master of {} is its own",
            w.name
        );
        assert_eq!(loops_for(&w.overlay()).len(), 1, "{}", w.name);
        seen.push((pid, ppid));
    }
    let mut pids: Vec<i32> = seen.iter().flat_map(|(a, b)| [*a, *b]).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 2 * N, "no process shared between instances");
    for w in &mut ws {
        kill(w.child(0).id() as i32, libc::SIGTERM);
    }
    for (w, (pid, ppid)) in ws.iter_mut().zip(&seen) {
        let out = w.wait(0, 90 * SEC);
        assert!(out.status.success(), "{}: {}", w.name, stderr(&out));
        nothing_left(w, &[*pid, *ppid]);
    }
    let left: Vec<_> = instance_masters()
        .into_iter()
        .filter(|(_, c)| c.contains("[f-many"))
        .collect();
    assert!(left.is_empty(), "no master left: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for w in &ws {
        let root = w.root().to_string_lossy().into_owned();
        assert!(
            !mounts.contains(&root),
            "no mount of {} left on the host",
            w.name
        );
    }
}

/// Row 8: an overlay on a file system mounted read-only. Apptainer would not fail: it
/// mounts the overlay read-only and goes on, so nothing the service writes is kept. The
/// host checks refuse it (78) before Apptainer runs, with the image left as it was.
#[test]
fn overlay_on_a_read_only_file_system_is_refused_before_apptainer_runs() {
    if !require_root() {
        return;
    }
    if std::env::var_os(IN_NS).is_none() {
        rerun_in_private_mounts(
            "overlay_on_a_read_only_file_system_is_refused_before_apptainer_runs",
        );
        return;
    }
    let mut w = World::new("f-ro-fs");
    let overlay = create_overlay(&w);
    let before = fingerprint(&overlay);
    // A read-only bind of the overlay's directory over itself, in this test's own mount
    // namespace, as a read-only NFS export or a `mount -o ro` would look.
    let dir = overlay.parent().unwrap().to_path_buf();
    for args in [&["--bind"][..], &["-o", "remount,bind,ro"][..]] {
        let st = Command::new("mount")
            .args(args)
            .args(if args.len() == 1 {
                vec![&dir, &dir]
            } else {
                vec![&dir]
            })
            .status()
            .unwrap();
        assert!(st.success(), "mount {args:?}");
    }
    let says = "is on a file system mounted read-only: Apptainer would mount the overlay read-only";
    let check = w.cli(&["check", "--host", &w.name]);
    assert_eq!(check.status.code(), Some(78), "{}", stderr(&check));
    assert!(stderr(&check).contains(says), "{}", stderr(&check));
    w.spawn_run();
    let out = w.wait(0, 30 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains(says) && err.contains("overlay.path"), "{err}");
    assert!(fingerprint(&overlay) == before, "image unchanged");
    nothing_left(&w, &[]);
    let _ = Command::new("umount").arg(&dir).status();
}
