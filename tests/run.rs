//! `apptainer-supervisor run` end to end: the real binary, a real NOTIFY_SOCKET listener,
//! the Apptainer CLI double (real processes, namespaces, cgroup, loop-mounted ext3
//! overlay) and a light init. Needs root.

mod support;

use support::*;

#[test]
fn ready_only_after_instance_is_up_with_status_steps() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-ready");
    w.spawn_run();
    let msgs = w.wait_ready();
    let statuses: Vec<&String> = msgs.iter().filter(|m| m.contains("STATUS=")).collect();
    assert!(
        msgs.iter().any(|m| m.contains("STATUS=creating overlay")),
        "overlay creation announced: {msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m.contains("STATUS=starting instance")),
        "{msgs:?}"
    );
    let ready = msgs.last().unwrap();
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=running: instance pid"),
        "{ready}"
    );
    assert!(statuses.len() >= 2);
    let (pid, _) = w.instance_pids();
    assert!(ready.contains(&format!("instance pid {pid}")), "{ready}");
    // The run record names the same container.
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.run_record()).unwrap()).unwrap();
    assert_eq!(rec["container"]["pid"], pid);
    // The state file stays where Apptainer put it, so operators' `instance list` sees it.
    let list = w.apptainer(&["instance", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["instances"][0]["instance"], "t-ready");
    assert_eq!(list["instances"][0]["pid"], pid);
    kill(w.child(0).id() as i32, libc::SIGTERM);
    assert!(w.wait(0, 20 * SEC).status.success());
}

#[test]
fn sigterm_halts_init_with_sigrtmin3_and_cleans_up() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-term");
    let (pid, ppid) = w.start();
    assert_eq!(
        loops_for(&w.overlay()).len(),
        1,
        "overlay attached while running"
    );
    kill(w.child(0).id() as i32, libc::SIGTERM);
    let out = w.wait(0, 20 * SEC);
    assert!(
        out.status.success(),
        "exit 0 on SIGTERM: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        w.mark_text().contains("halt"),
        "init got SIGRTMIN+3: {:?}",
        w.mark_text()
    );
    assert!(
        !w.mark_text().contains("sigint"),
        "never SIGINT (reboot for systemd)"
    );
    assert!(!alive(pid) && !alive(ppid));
    assert!(!w.state_file().exists(), "state file removed");
    assert!(!w.run_record().exists(), "run record removed");
    assert!(loops_for(&w.overlay()).is_empty(), "loop device detached");
    let msgs = w.notify_drain();
    assert!(msgs.iter().any(|m| m.contains("STOPPING=1")), "{msgs:?}");
    assert!(
        msgs.iter().any(|m| m.contains("EXTEND_TIMEOUT_USEC=")),
        "{msgs:?}"
    );
}

#[test]
fn halt_is_resent_until_the_init_has_a_handler() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-late-traps");
    w.env.push(("FAKE_INIT_DELAY_TRAPS".into(), "1.5".into()));
    let (pid, _) = w.start();
    // Right away: the init has no handler yet, so a signal now would be dropped.
    kill(w.child(0).id() as i32, libc::SIGTERM);
    let out = w.wait(0, 20 * SEC);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        w.mark_text().contains("halt"),
        "halted, not killed: {:?}",
        w.mark_text()
    );
    assert!(!alive(pid));
}

#[test]
fn watchdog_pings_while_alive_and_container_death_exits_nonzero() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-dog");
    // WATCHDOG_USEC=200 ms → a ping every 100 ms.
    w.env.push(("WATCHDOG_USEC".into(), "200000".into()));
    let (pid, ppid) = w.start();
    let pings = w
        .notify_for(SEC)
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    assert!(
        (5..=15).contains(&pings),
        "about 10 pings in 1 s at 100 ms, got {pings}"
    );
    kill(pid, libc::SIGKILL);
    let out = w.wait(0, 20 * SEC);
    assert_eq!(
        out.status.code(),
        Some(1),
        "instance ended by itself → 1 for Restart=on-failure"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ended by itself") && err.contains("signal 9"),
        "{err}"
    );
    let after = w.notify_drain();
    let ended = after
        .iter()
        .position(|m| m.contains("STATUS=instance ended"))
        .expect("status says so");
    assert!(
        !after[ended..].iter().any(|m| m.contains("WATCHDOG=1")),
        "no pings once the instance died: {after:?}"
    );
    assert!(!alive(ppid), "master gone");
    assert!(!w.state_file().exists() && !w.run_record().exists());
}

#[test]
fn master_killed_takes_the_container_and_the_supervisor_exits_nonzero() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-master");
    let (pid, ppid) = w.start();
    // Apptainer's starter gives the container PR_SET_PDEATHSIG=SIGKILL (starter.c; the
    // double does the same): the master's death takes the container with it, and the
    // master's own cleanup (state file, CNI DEL) never runs.
    kill(ppid, libc::SIGKILL);
    let out = w.wait(0, 20 * SEC);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!alive(pid), "container gone");
    assert!(
        !w.state_file().exists(),
        "the dead master's state file was removed for it"
    );
    assert!(!w.run_record().exists());
    eventually(5 * SEC, "loop device released", || {
        loops_for(&w.overlay()).is_empty()
    });
}

#[test]
fn orphan_of_a_killed_supervisor_is_halted_then_started_fresh() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-orphan");
    let (pid, ppid) = w.start();
    // The supervisor dies, its instance (master and container) lives on.
    kill(w.child(0).id() as i32, libc::SIGKILL);
    let _ = w.wait(0, 5 * SEC);
    assert!(
        alive(pid) && alive(ppid),
        "instance survives its supervisor"
    );
    w.spawn_run();
    let msgs = w.wait_ready();
    assert!(
        msgs.iter().any(|m| m.contains("orphan")),
        "status names the orphan: {msgs:?}"
    );
    assert!(
        !alive(pid) && !alive(ppid),
        "the orphan was halted before the new start"
    );
    assert!(
        w.mark_text().contains("halt"),
        "orderly: {:?}",
        w.mark_text()
    );
    let (new_pid, _) = w.instance_pids();
    assert_ne!(new_pid, pid);
    assert_eq!(
        loops_for(&w.overlay()).len(),
        1,
        "the overlay is attached once, never twice"
    );
    kill(w.child(1).id() as i32, libc::SIGTERM);
    assert!(w.wait(1, 20 * SEC).status.success());
}

#[test]
fn leftovers_of_a_killed_unit_are_cleared_then_started_fresh() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-stale");
    let (pid, ppid) = w.start();
    // What systemd does when the supervisor dies: the rest of the unit's cgroup (the
    // master) is killed; the container dies with its master (PDEATHSIG). The state file
    // and the run record stay behind.
    kill(w.child(0).id() as i32, libc::SIGKILL);
    kill(ppid, libc::SIGKILL);
    let _ = w.wait(0, 5 * SEC);
    eventually(5 * SEC, "instance gone", || !alive(pid) && !alive(ppid));
    assert!(
        w.state_file().exists() && w.run_record().exists(),
        "leftovers are there"
    );
    w.spawn_run();
    w.wait_ready();
    let (new_pid, _) = w.instance_pids();
    assert_ne!(new_pid, pid);
    kill(w.child(1).id() as i32, libc::SIGTERM);
    let out = w.wait(1, 20 * SEC);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("removing leftovers of an instance that is no longer running"),
        "logged: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn second_supervisor_for_the_same_name_is_refused_at_once() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-twice");
    let (pid, _) = w.start();
    let first = w.child(0).id();
    w.spawn_run();
    let out = w.wait(1, 5 * SEC);
    assert_eq!(out.status.code(), Some(75));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already supervised") && err.contains(&format!("pid {first}")),
        "{err}"
    );
    assert!(alive(pid), "the running instance is untouched");
    kill(first as i32, libc::SIGTERM);
    assert!(w.wait(0, 20 * SEC).status.success());
}

#[test]
fn instance_started_by_someone_else_is_never_killed() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-foreign");
    // As the old start.sh would: the same image, name and overlay, without us (and with
    // `--network none`: the `bridge` that `--boot` implies needs a test network namespace).
    let overlay = w.overlay();
    let created = w.apptainer(&[
        "overlay",
        "create",
        "-S",
        "-s",
        "64",
        overlay.to_str().unwrap(),
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
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
        "t-foreign",
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let (pid, _) = w.instance_pids();
    w.spawn_run();
    let out = w.wait(0, 10 * SEC);
    assert_eq!(out.status.code(), Some(75));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not start") && err.contains("hint:"),
        "{err}"
    );
    assert!(alive(pid), "never killed silently");
    let stop = w.apptainer(&["instance", "stop", "-F", "t-foreign"]);
    assert!(stop.status.success());
    eventually(10 * SEC, "foreign instance stopped", || !alive(pid));
}

#[test]
fn failed_start_quotes_apptainer_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-fail");
    w.write_config("");
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace(
            "[apptainer]\n",
            "[apptainer]\nextra_args = [\"--no-such-flag\"]\n",
        ),
    )
    .unwrap();
    w.spawn_run();
    let out = w.wait(0, 20 * SEC);
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("apptainer instance start failed") && err.contains("no-such-flag"),
        "{err}"
    );
    assert!(!w.state_file().exists() && !w.run_record().exists());
    assert!(loops_for(&w.overlay()).is_empty());
}

#[test]
fn existing_overlay_is_never_rewritten() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-keep");
    // A start that fails after the overlay step: the image must be byte-for-byte the same.
    let overlay = w.overlay();
    assert!(w
        .apptainer(&[
            "overlay",
            "create",
            "-S",
            "-s",
            "64",
            overlay.to_str().unwrap()
        ])
        .status
        .success());
    let before = std::fs::read(&overlay).unwrap();
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace(
            "[apptainer]\n",
            "[apptainer]\nextra_args = [\"--no-such-flag\"]\n",
        ),
    )
    .unwrap();
    w.spawn_run();
    assert_eq!(w.wait(0, 20 * SEC).status.code(), Some(69));
    assert!(
        std::fs::read(&overlay).unwrap() == before,
        "overlay bytes unchanged"
    );
}

#[test]
fn missing_overlay_is_created_once_as_sparse_ext3() {
    if !require_root() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let mut w = World::new("t-create");
    w.start();
    let m = std::fs::metadata(w.overlay()).unwrap();
    assert_eq!(m.len(), 64 << 20, "size_mib = 64");
    assert!(m.blocks() * 512 < m.len(), "sparse");
    let img = std::fs::read(w.overlay()).unwrap();
    assert_eq!(&img[1080..1082], &[0x53, 0xEF], "ext2/3 superblock magic");
    kill(w.child(0).id() as i32, libc::SIGTERM);
    assert!(w.wait(0, 20 * SEC).status.success());
    // Second run: the same file (same inode), not a new one.
    let (pid2, _) = w.start();
    assert_eq!(
        std::fs::metadata(w.overlay()).unwrap().ino(),
        m.ino(),
        "not recreated"
    );
    kill(w.child(1).id() as i32, libc::SIGTERM);
    assert!(w.wait(1, 20 * SEC).status.success());
    assert!(!alive(pid2));
}

#[test]
fn overlay_path_that_is_not_a_file_is_refused_untouched() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-dir");
    std::fs::create_dir(w.overlay()).unwrap();
    std::fs::write(w.overlay().join("keep"), b"data").unwrap();
    w.spawn_run();
    let out = w.wait(0, 10 * SEC);
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a directory; it is left untouched"));
    assert_eq!(std::fs::read(w.overlay().join("keep")).unwrap(), b"data");
}

#[test]
fn child_environment_is_scrubbed_and_layered() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-env");
    std::fs::write(
        w.service_dir.join("bin/.service_env"),
        "export FROM_FILE=1\nBOTH=file\n",
    )
    .unwrap();
    w.write_config("");
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(w.config_path(), format!("{cfg}[env]\nBOTH = \"config\"\n")).unwrap();
    w.env.push(("WATCHDOG_USEC".into(), "10000000".into()));
    w.start();
    eventually(5 * SEC, "init wrote its environment", || {
        w.env_dump.exists()
    });
    let env = std::fs::read_to_string(&w.env_dump).unwrap();
    for gone in ["NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID="] {
        assert!(
            !env.lines().any(|l| l.starts_with(gone)),
            "{gone} reached the init:\n{env}"
        );
    }
    assert!(env.lines().any(|l| l == "FROM_FILE=1"), "{env}");
    assert!(
        env.lines().any(|l| l == "container=apptainer"),
        "systemd's container interface: {env}"
    );
    assert!(env.lines().any(|l| l == "BOTH=config"), "{env}");
    kill(w.child(0).id() as i32, libc::SIGTERM);
    assert!(w.wait(0, 20 * SEC).status.success());
}

#[test]
fn container_leaves_the_supervisors_cgroup() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-cgroup");
    let (pid, ppid) = w.start();
    let cg = |p: i32| std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap();
    let v2 = |s: String| {
        s.lines()
            .find(|l| l.starts_with("0::"))
            .unwrap_or_default()
            .to_owned()
    };
    let sup = v2(cg(w.child(0).id() as i32));
    assert_eq!(v2(cg(ppid)), sup, "the master stays in the unit's cgroup");
    assert_ne!(
        v2(cg(pid)),
        sup,
        "the container does not: KillMode cannot reach it"
    );
    kill(w.child(0).id() as i32, libc::SIGTERM);
    assert!(w.wait(0, 20 * SEC).status.success());
}

#[test]
fn overlay_attached_to_a_loop_device_is_refused() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-attached");
    let overlay = w.overlay();
    assert!(w
        .apptainer(&[
            "overlay",
            "create",
            "-S",
            "-s",
            "64",
            overlay.to_str().unwrap()
        ])
        .status
        .success());
    // As if another container (or a hand-run start.sh) had it open.
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(out.status.success());
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    w.spawn_run();
    let out = w.wait(0, 10 * SEC);
    let _ = std::process::Command::new("losetup")
        .args(["-d", &dev])
        .status();
    assert_eq!(out.status.code(), Some(75));
    let err = String::from_utf8_lossy(&out.stderr);
    let name = dev.trim_start_matches("/dev/");
    assert!(
        err.contains(&format!(
            "is attached to /dev/{name}: a container is using it"
        )),
        "{err}"
    );
    assert!(!w.state_file().exists(), "nothing was started");
}

#[test]
fn watchdog_abort_still_halts_the_container() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-abort");
    let (pid, _) = w.start();
    // systemd's WatchdogSignal= (SIGABRT) when our pings stopped.
    kill(w.child(0).id() as i32, libc::SIGABRT);
    let out = w.wait(0, 20 * SEC);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        w.mark_text().contains("halt"),
        "halted in order, not abandoned"
    );
    assert!(!alive(pid));
    assert!(!w.state_file().exists());
}

/// SIGABRT (systemd's watchdog) and SIGTERM (its stop job) arrive together, in either
/// order, no pause between: the watchdog's verdict stands, exit 1, every time.
#[test]
fn sigabrt_and_sigterm_together_always_exit_1() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-abrtterm");
    for i in 0..50 {
        let (pid, _) = w.start();
        let sup = w.child(i).id() as i32;
        let (first, second) = if i % 2 == 0 {
            (libc::SIGABRT, libc::SIGTERM)
        } else {
            (libc::SIGTERM, libc::SIGABRT)
        };
        kill(sup, first);
        kill(sup, second);
        let out = w.wait(i, 20 * SEC);
        assert_eq!(out.status.code(), Some(1), "round {i}: {}", stderr(&out));
        assert!(!alive(pid), "round {i}: the container was halted");
    }
}
