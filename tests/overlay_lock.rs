//! One overlay, one host (issue 16): the overlay's mount refused when its file locks stay on
//! this host (mount options from a mountinfo fixture: no NFS server runs here), and the
//! start guard between supervisors of two simulated core hosts.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use support::{require_root, stderr, World};

/// A mountinfo table whose only line puts `dir`'s device on an NFS mount with `opts`.
fn nfs_mountinfo(w: &World, dir: &Path, fstype: &str, opts: &str) -> std::path::PathBuf {
    let dev = std::fs::metadata(dir).unwrap().dev();
    let mount_point = std::fs::canonicalize(w.root()).unwrap();
    let line = format!(
        "500 1 {}:{} / {} rw,relatime shared:45 - {fstype} nfs01:/export/shared rw,{opts},addr=10.1.0.5\n",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        mount_point.display()
    );
    let file = w.root().join("mountinfo");
    std::fs::write(&file, line).unwrap();
    file
}

#[test]
fn overlay_on_local_lock_nfs_is_refused_naming_the_option() {
    if !require_root() {
        return;
    }
    let mut w = World::new("lck001");
    let table = nfs_mountinfo(
        &w,
        &w.service_dir.join("overlay"),
        "nfs4",
        "vers=4.1,hard,proto=tcp,sec=sys,local_lock=all",
    );
    let argv_log = w.root().join("argv.log");
    w.env.push((
        "APPTAINER_SUPERVISOR_MOUNTINFO".into(),
        table.display().to_string(),
    ));
    w.env.push((
        "APPTAINER_DOUBLE_ARGV_LOG".into(),
        argv_log.display().to_string(),
    ));
    let mount_point = std::fs::canonicalize(w.root()).unwrap();
    let name = w.name.clone();
    for args in [
        vec!["check", "--host", name.as_str()],
        vec!["run", name.as_str(), "--run-dir"],
    ] {
        let mut args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        if args[0] == "run" {
            args.push(w.run_dir.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = w.cli(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
        for part in [
            "overlay.path",
            "local_lock=all",
            "nfs01:/export/shared",
            &format!("mounted on {}", mount_point.display()),
            "overlay.allow_local_locks",
        ] {
            assert!(err.contains(part), "{args:?}: {part} missing from {err}");
        }
    }
    assert!(!argv_log.exists(), "apptainer was called");
    assert!(!w.overlay().exists(), "an overlay was created");

    // NFSv3 with nolock: the same, naming nolock.
    nfs_mountinfo(
        &w,
        &w.service_dir.join("overlay"),
        "nfs",
        "vers=3,hard,nolock,proto=tcp,local_lock=all",
    );
    let out = w.cli(&["check", "--host", &name]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("nolock"), "{}", stderr(&out));

    // Accepted with allow_local_locks: only a warning.
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace("[overlay]\n", "[overlay]\nallow_local_locks = true\n"),
    )
    .unwrap();
    let out = w.cli(&["check", "--host", &name]);
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "{all}");
    assert!(all.contains("nolock") && all.contains("accepted"), "{all}");

    // A mount whose locks reach the server: no word about it.
    std::fs::write(w.config_path(), cfg).unwrap();
    nfs_mountinfo(
        &w,
        &w.service_dir.join("overlay"),
        "nfs4",
        "vers=4.2,hard,proto=tcp,local_lock=none",
    );
    let out = w.cli(&["check", "--host", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("local_lock"), "{}", stderr(&out));
}

/// Two simulated core hosts (mount and UTS namespaces of their own, their own host names
/// and boot ids, one shared directory) run the same service on one overlay: the second
/// start is refused with 75 naming the first host, Apptainer never called; once the first
/// stopped, the second starts and the holder record names it.
#[test]
fn second_host_is_refused_naming_the_first_and_starts_once_it_stopped() {
    if !require_root() {
        return;
    }
    let mut a = World::new("lck002");
    a.as_host("core1", "11111111-1111-1111-1111-111111111111");
    let mut b = World::new("lck002");
    b.as_host("core2", "22222222-2222-2222-2222-222222222222");
    let shared = a.overlay();
    let cfg = std::fs::read_to_string(b.config_path()).unwrap();
    std::fs::write(
        b.config_path(),
        cfg.replace(
            "[overlay]\n",
            &format!("[overlay]\npath = \"{}\"\n", shared.display()),
        ),
    )
    .unwrap();
    let argv_log = b.root().join("argv.log");
    b.env.push((
        "APPTAINER_DOUBLE_ARGV_LOG".into(),
        argv_log.display().to_string(),
    ));
    let record = shared.parent().unwrap().join(".overlay.img.holder");

    let a_pid = a.spawn_run();
    a.wait_ready();
    let held: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("holder record")).unwrap();
    assert_eq!(held["host"], "core1", "{held}");
    assert_eq!(held["pid"], a_pid, "{held}");

    let name = b.name.clone();
    let run_dir = b.run_dir.display().to_string();
    let t0 = std::time::Instant::now();
    let out = b.cli(&["run", &name, "--run-dir", &run_dir]);
    eprintln!("second start refused in {:?}", t0.elapsed());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{err}");
    for part in [
        "core1".to_owned(),
        format!("supervisor pid {a_pid}"),
        "boot 11111111-1111-1111-1111-111111111111".to_owned(),
        shared.display().to_string(),
    ] {
        assert!(err.contains(&part), "{part} missing from {err}");
    }
    assert!(
        !argv_log.exists(),
        "apptainer was called on the second host"
    );

    // `check --host` and `status` on the second host name the holder.
    let out = b.cli(&["check", "--host", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("held by core1"),
        "check --host: {}",
        stderr(&out)
    );
    let out = b.cli(&["status", "--run-dir", &run_dir, "--json", &name]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    let lock = v[0]["overlay"]["lock"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(lock.starts_with("held by core1"), "status: {v:#}");
    let out = b.cli(&["status", "--run-dir", &run_dir, &name]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("held by core1")
            || stderr(&out).contains("held by core1"),
        "status text: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );

    a.stop_ok(0);
    assert!(
        !record.exists(),
        "the first host's record outlived its claim"
    );
    let b_pid = b.spawn_run();
    b.wait_ready();
    let held: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("holder record")).unwrap();
    assert_eq!(held["host"], "core2", "{held}");
    assert_eq!(held["pid"], b_pid, "{held}");
    assert_eq!(held["boot_id"], "22222222-2222-2222-2222-222222222222");
    b.stop_ok(0);
}

/// The reaction to a lost lock only: no NFS server runs here, so the test hook
/// (`APPTAINER_SUPERVISOR_TEST_LOCK_PROBE`) makes the probe report the loss once its file
/// exists. The supervisor stops pinging the watchdog, halts the container and exits 74 with
/// `RESULT=lock-lost`; at most two watchdog ticks (one WatchdogSec) pass between the loss
/// and STOPPING=1.
#[test]
fn lost_lock_reaction_only_halts_within_one_watchdog_period_and_exits_74() {
    if !require_root() {
        return;
    }
    let mut w = World::new("lck003");
    let trigger = w.root().join("lose-the-lock");
    // WatchdogSec=2 s: a tick (WATCHDOG=1 and a probe) every second.
    w.env.push(("WATCHDOG_USEC".into(), "2000000".into()));
    w.env.push((
        "APPTAINER_SUPERVISOR_TEST_LOCK_PROBE".into(),
        trigger.display().to_string(),
    ));
    let (pid, _) = w.start();
    // A probe or two that found the lock held: still running, still pinging.
    let before = w.notify_until(10 * support::SEC, |m| m.contains("WATCHDOG=1"));
    assert!(support::alive(pid), "{before:?}");
    let t0 = std::time::Instant::now();
    std::fs::write(&trigger, "").unwrap();
    let out = w.wait(0, 60 * support::SEC);
    eprintln!("lost lock → supervisor exited in {:?}", t0.elapsed());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(74), "{err}");
    assert!(err.contains("lock") && err.contains("was lost"), "{err}");
    assert!(
        err.contains("lock-lost"),
        "RESULT=lock-lost in the log: {err}"
    );
    assert!(!support::alive(pid), "the container was halted");
    let after = w.notify_drain();
    let stopping = after
        .iter()
        .position(|m| m.contains("STOPPING=1"))
        .unwrap_or_else(|| panic!("no STOPPING=1: {after:?}"));
    let pings_before_stop = after[..stopping]
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    assert!(
        pings_before_stop <= 2,
        "more than one watchdog period of pings after the loss: {after:?}"
    );
    assert!(
        !after[stopping..].iter().any(|m| m.contains("WATCHDOG=1")),
        "a WATCHDOG=1 after STOPPING=1: {after:?}"
    );
    assert!(
        after[stopping].contains("lock was lost"),
        "STATUS= says why: {after:?}"
    );
}

/// An Apptainer started by hand on the overlay (another instance name, so no leftover of
/// ours): its lock on [0, size) is seen before `instance start`, refused 75 "holder
/// unknown", and the hand-started instance is left alone.
#[test]
fn hand_started_apptainer_on_the_overlay_is_refused_holder_unknown() {
    if !require_root() {
        return;
    }
    let mut w = World::new("lck004");
    let overlay = w.overlay();
    let created = w.apptainer(&[
        "overlay",
        "create",
        "-S",
        "-s",
        "64",
        overlay.to_str().unwrap(),
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    let image = w.image();
    let started = w.apptainer(&[
        "instance",
        "start",
        "--boot",
        "--network",
        "none",
        "--overlay",
        overlay.to_str().unwrap(),
        image.to_str().unwrap(),
        "lck004-by-hand",
    ]);
    assert!(started.status.success(), "{}", stderr(&started));
    w.spawn_run();
    let out = w.wait(0, 30 * support::SEC);
    let err = stderr(&out);
    let stop = w.apptainer(&["instance", "stop", "-F", "lck004-by-hand"]);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("holder unknown"), "{err}");
    assert!(
        stop.status.success(),
        "the hand-started instance was left running: {}",
        stderr(&stop)
    );
}
