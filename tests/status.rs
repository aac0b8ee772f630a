//! `status` and the live state file end to end: the real supervisor publishes
//! `<run dir>/<name>.json` while it runs an instance (the Apptainer CLI double, light init),
//! and `status` shows it; a supervisor killed with SIGKILL leaves a file that `status`
//! calls stale, never running; the overlay's fill comes from its real ext3 superblock.

mod support;

use std::process::{Command, Output, Stdio};

use support::*;

/// `status` with the world's directories and no host bus (the UNIT column is `unknown`).
fn status(w: &World, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config-dir")
        .arg(&w.config_dir)
        .arg("status")
        .arg("--run-dir")
        .arg(&w.run_dir)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .env("APPTAINER_CONFIGDIR", &w.apptainer_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run status")
}

fn status_json(w: &World) -> serde_json::Value {
    let out = status(w, &["--json"]);
    assert!(
        out.status.success(),
        "status --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v.as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["service"] == w.name.as_str())
        .unwrap_or_else(|| panic!("{} in {v:#}", w.name));
    row.clone()
}

fn live_file(w: &World) -> serde_json::Value {
    let p = w.run_dir.join(format!("{}.json", w.name));
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// READY=1 goes out first and the state file follows before the supervisor waits again:
/// wait (bounded) for the file to say so.
fn live_ready(w: &World) -> serde_json::Value {
    eventually(5 * SEC, "the state file says ready", || {
        std::fs::read(w.run_dir.join(format!("{}.json", w.name)))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["phase"] == "ready")
    });
    live_file(w)
}

#[test]
fn status_shows_a_running_service_then_how_it_ended() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-status");
    let sup = w.spawn_run();
    w.wait_ready();
    let (pid, ppid) = w.instance_pids();

    // The live state file: written by the supervisor, phase ready, both processes.
    let live = live_ready(&w);
    assert_eq!(live["schema"], 1);
    assert_eq!(live["phase"], "ready");
    assert_eq!(live["supervisor"]["pid"], sup);
    assert_eq!(live["instance"]["pid"], pid);
    assert_eq!(live["master"]["pid"], ppid);
    assert!(live["status"]
        .as_str()
        .unwrap()
        .starts_with("running: instance pid"));
    assert!(live["ready_at"].as_u64().unwrap() >= live["started_at"].as_u64().unwrap());

    let row = status_json(&w);
    assert_eq!(row["phase"], "ready", "{row:#}");
    assert_eq!(row["stale"], false);
    assert_eq!(row["instance_pid"], pid);
    assert!(row["unit"].is_null(), "no host bus: unknown, {row:#}");
    assert!(row["uptime_sec"].as_u64().is_some());
    // The overlay the supervisor created: a sparse file with an ext3 filesystem inside.
    let ov = &row["overlay"];
    assert_eq!(ov["apparent_bytes"], 64 * 1024 * 1024);
    assert!(ov["allocated_bytes"].as_u64().unwrap() < 64 * 1024 * 1024);
    let fill = ov["fs_used_percent"].as_f64().expect("superblock read");
    assert!(fill > 0.0 && fill < 90.0, "{fill}");
    assert!(row["image"]["age_days"].as_u64().is_some());

    let text = status(&w, &[]);
    assert_eq!(text.status.code(), Some(0), "all up → 0");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("SERVICE"), "{text}");
    let fields: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &fields[..4],
        &["t-status", "unknown", "ready", &pid.to_string()],
        "{text}"
    );

    kill(sup as i32, libc::SIGTERM);
    assert!(w.wait(0, 20 * SEC).status.success());
    let live = live_file(&w);
    assert_eq!(live["phase"], "stopped");
    assert_eq!(live["exit_code"], 0);
    assert!(live["instance"].is_null());
    let row = status_json(&w);
    assert_eq!(row["phase"], "stopped");
    assert!(row["instance_pid"].is_null());
    assert_eq!(status(&w, &[]).status.code(), Some(3), "not up → 3");
}

#[test]
fn a_killed_supervisors_state_is_shown_stale_never_running() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-stale");
    w.spawn_run();
    w.wait_ready();
    let (pid, _) = w.instance_pids();
    kill(w.child(0).id() as i32, libc::SIGKILL);
    let _ = w.wait(0, 5 * SEC);
    assert!(alive(pid), "the instance outlives its supervisor");

    let row = status_json(&w);
    assert_eq!(row["phase"], "stale", "{row:#}");
    assert_eq!(row["stale"], true);
    assert!(row["instance_pid"].is_null(), "never shown as running");
    let text = String::from_utf8_lossy(&status(&w, &[]).stdout).into_owned();
    assert!(
        text.contains("warning: t-stale: stale state file: its supervisor"),
        "{text}"
    );

    // The next supervisor halts the orphan and publishes afresh.
    w.spawn_run();
    w.wait_ready();
    live_ready(&w);
    let row = status_json(&w);
    assert_eq!(row["phase"], "ready");
    assert_ne!(row["instance_pid"], pid);
    kill(w.child(1).id() as i32, libc::SIGTERM);
    assert!(w.wait(1, 20 * SEC).status.success());
}

#[test]
fn a_nearly_full_overlay_is_a_warning_and_a_broken_one_is_named() {
    if !require_root() {
        return;
    }
    let w = World::new("t-full");
    // A real ext3 image, 16 MiB, filled by mkfs.ext3 -d with a 13 MiB file: > 90 % used.
    let fill = w.root().join("fill");
    std::fs::create_dir_all(&fill).unwrap();
    std::fs::write(fill.join("data"), vec![0x5a; 13 * 1024 * 1024]).unwrap();
    let ov = w.overlay();
    let mk = Command::new("mkfs.ext3")
        .args(["-q", "-F", "-d"])
        .arg(&fill)
        .arg(&ov)
        .arg("16M")
        .output()
        .unwrap();
    assert!(
        mk.status.success(),
        "{}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let row = status_json(&w);
    let pct = row["overlay"]["fs_used_percent"].as_f64().unwrap();
    assert!(pct >= 90.0, "{pct}");
    let text = String::from_utf8_lossy(&status(&w, &[]).stdout).into_owned();
    assert!(
        text.contains(&format!(
            "warning: t-full: overlay {} is {pct:.0}% full (warning at 90%)",
            ov.display()
        )),
        "{text}"
    );
    assert!(
        text.lines().nth(1).unwrap().contains("not-running"),
        "{text}"
    );

    // Not an ext filesystem: the row says why, nothing is touched.
    std::fs::write(&ov, vec![0u8; 4096]).unwrap();
    let row = status_json(&w);
    assert!(row["overlay"]["fs_used_percent"].is_null());
    assert!(
        row["overlay"]["fs_error"]
            .as_str()
            .unwrap()
            .contains("is not an ext2/3/4 image"),
        "{row:#}"
    );
    assert_eq!(std::fs::read(&ov).unwrap(), vec![0u8; 4096]);
}

#[test]
fn status_shows_the_inner_systemd_its_failed_units_and_restarts() {
    if !require_root() {
        return;
    }
    let mut w = World::booted(
        "s-inner",
        "required_units = [\"asv-simple.service\", \"asv-slow.service\"]",
    );
    w.spawn_run();
    w.wait_ready();
    let live = live_ready(&w);
    assert_eq!(live["inner"]["system_state"], "running", "{live:#}");
    assert_eq!(
        live["inner"]["required_units"]["asv-slow.service"]["active_state"],
        "active"
    );

    // A unit that is not required fails inside: only a live question finds it.
    let out = w.inside(&["systemd-run", "--unit=asv-boom", "--", "/bin/false"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(10 * SEC, "asv-boom failed inside", || {
        let o = w.inside(&["systemctl", "is-failed", "asv-boom.service"]);
        String::from_utf8_lossy(&o.stdout).trim() == "failed"
    });
    let row = status_json(&w);
    assert_eq!(row["inner_failed_live"], true, "{row:#}");
    assert_eq!(row["failed_units"], serde_json::json!(["asv-boom.service"]));
    let text = String::from_utf8_lossy(&status(&w, &[]).stdout).into_owned();
    assert!(
        text.contains("warning: s-inner: failed units inside: asv-boom.service"),
        "{text}"
    );

    // A required unit killed inside is restarted by the supervisor: counted.
    let out = w.inside(&["systemctl", "kill", "-s", "KILL", "asv-simple.service"]);
    assert!(out.status.success());
    // SystemState is degraded now (asv-boom), which readiness accepts by default.
    let mut msgs = w.notify_until(20 * SEC, |m| m.contains("restarting it (1/3)"));
    msgs.extend(w.notify_until(20 * SEC, |m| m.contains("2/2 required units active")));
    msgs.extend(w.notify_for(SEC));
    assert!(
        !msgs.iter().any(|m| m.contains("restarting it (2/3)")),
        "one failure, one restart: {msgs:?}"
    );
    eventually(5 * SEC, "the restart in the state file", || {
        let l = live_file(&w);
        l["restarts"] == 1 && l["phase"] == "ready"
    });
    assert!(live_file(&w)["last_error"]
        .as_str()
        .unwrap()
        .contains("asv-simple.service failed"));
    kill(w.child(0).id() as i32, libc::SIGTERM);
    assert!(w.wait(0, 60 * SEC).status.success());
}

/// The README's `status` sample: the examples' services (names, overlay sizes, addresses
/// and networks as in examples/*.toml, with the test netns's veth `p0` as the parent and
/// test addresses) run at once: ood001 boots the real systemd of the test rootfs, login005
/// and ww001 (its 100 000 MiB sparse overlay created here) the light init. The table is
/// written to target/status-examples.txt.
#[test]
fn the_examples_in_one_status_table() {
    if !require_root() {
        return;
    }
    let ns = support::netns::TestNetns::new();
    let macvlan = |name: &str, addr: &str| {
        format!(
            "[[network]]\nname = \"{name}\"\ntype = \"macvlan\"\nmaster = \"p0\"\nmode = \"bridge\"\n\
             [network.ipam]\ntype = \"static\"\naddresses = [\"{addr}\"]\n"
        )
    };
    let mut ood = World::booted(
        "ood001",
        "required_units = [\"asv-simple.service\", \"asv-slow.service\"]",
    );
    let shared_cfg = ood.config_dir.clone();
    let shared_run = ood.run_dir.clone();
    let mut login = World::new("login005");
    let mut ww = World::new("ww001");
    for w in [&mut ood, &mut login, &mut ww] {
        w.netns = Some(ns.path());
    }
    for w in [&mut login, &mut ww] {
        w.config_dir = shared_cfg.clone();
        w.run_dir = shared_run.clone();
        w.write_config("");
    }
    let set_size = |w: &World, mib: u32| {
        let t = std::fs::read_to_string(w.config_path()).unwrap();
        let t = t.replace("size_mib = 256", "size_mib = 64");
        std::fs::write(
            w.config_path(),
            t.replace("size_mib = 64", &format!("size_mib = {mib}")),
        )
        .unwrap();
    };
    set_size(&ood, 1024);
    set_size(&login, 1024);
    set_size(&ww, 100_000);
    ood.append_config(&macvlan("macvlan_ood001", "10.99.0.21/24"));
    login.append_config(&macvlan("macvlan_login005", "10.99.0.25/24"));
    ww.append_config(&format!(
        "{}[[network]]\nname = \"ipmi_bridge_ww001\"\ntype = \"bridge\"\nbridge = \"asvbr1\"\n\
         [network.ipam]\ntype = \"static\"\naddresses = [\"192.168.78.1/24\"]\n",
        macvlan("macvlan_ww001", "10.99.0.10/24")
    ));
    for w in [&mut ood, &mut login, &mut ww] {
        w.spawn_run();
    }
    for w in [&mut ood, &mut login, &mut ww] {
        w.wait_ready();
        live_ready(w);
    }
    let out = status(&ood, &[]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/status-examples.txt"),
        &table,
    );
    println!("{table}");
    assert_eq!(out.status.code(), Some(0), "{table}");
    let row = |name: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let ood_row = row("ood001");
    assert_eq!(&ood_row[1..3], ["unknown", "ready"], "{table}");
    assert_eq!(ood_row[4], "10.99.0.21");
    assert_eq!(ood_row[6], "running", "the inner SystemState: {table}");
    assert_eq!(row("login005")[4], "10.99.0.25");
    let ww_row = row("ww001");
    assert_eq!(ww_row[4], "10.99.0.10");
    assert!(
        ww_row.iter().any(|c| c.ends_with("/98G")),
        "the 100 000 MiB sparse overlay: {table}"
    );
    for (w, i) in [(&mut ood, 0), (&mut login, 0), (&mut ww, 0)] {
        kill(w.child(i).id() as i32, libc::SIGTERM);
        assert!(w.wait(i, 60 * SEC).status.success());
    }
}

/// `status` asks the container's systemd through the same checks as the supervisor: once the
/// bus socket inside is swapped for a link to a host socket (visible inside through a bind),
/// `status` connects but sends not one byte, says why in a warning, and shows the failed
/// units the supervisor last saw.
#[test]
fn status_refuses_a_container_bus_served_from_the_host() {
    if !require_root() {
        return;
    }
    let mut w = World::booted("s-bus", "required_units = [\"asv-simple.service\"]");
    let listener =
        std::os::unix::net::UnixListener::bind(w.service_dir.join("root/host-bus.sock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    w.spawn_run();
    w.wait_ready();
    live_ready(&w);
    let (pid, _) = w.instance_pids();
    assert_eq!(status_json(&w)["inner_failed_live"], true);

    let out = w.inside(&[
        "sh",
        "-c",
        "mv /run/dbus/system_bus_socket /run/dbus/real && \
         ln -s /srv/root/host-bus.sock /run/dbus/system_bus_socket",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let row = status_json(&w);
    assert_eq!(row["inner_failed_live"], false, "{row:#}");
    let want = format!(
        "the container's systemd was not asked: the container's system bus \
         /run/dbus/system_bus_socket in the root of pid {pid} is served by pid {}, which is \
         not in the container's PID namespace",
        std::process::id()
    );
    assert!(
        row["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().starts_with(&want)),
        "{row:#}"
    );
    let text = String::from_utf8_lossy(&status(&w, &[]).stdout).into_owned();
    assert!(text.contains(&format!("warning: s-bus: {want}")), "{text}");
    // Two `status` runs connected; neither sent a byte.
    let conns = accepted(&listener);
    assert_eq!(conns.len(), 2, "{conns:?}");
    assert!(conns.iter().all(|(_, bytes)| bytes.is_empty()), "{conns:?}");
    w.stop_ok(0);
}

/// What the host checks warned about at start (here a group-writable directory above the
/// image) is said once in STATUS=, kept in the live state file and shown by `status`.
#[test]
fn start_warnings_reach_status_and_the_live_state_file() {
    if !require_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut w = World::new("t-status-warn");
    let dir = w.service_dir.join("containers");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
    w.spawn_run();
    let msgs = w.wait_ready();
    let said: Vec<&String> = msgs
        .iter()
        .filter(|m| m.contains("STATUS=starting with 1 warning(s): "))
        .collect();
    assert_eq!(said.len(), 1, "once: {msgs:?}");
    assert!(said[0].contains(&dir.display().to_string()), "{msgs:?}");
    let live = live_ready(&w);
    let warnings = live["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{live:#}");
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains(&dir.display().to_string()),
        "{live:#}"
    );
    let row = status_json(&w);
    assert!(
        row["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_str().unwrap().starts_with("at start: ")),
        "{row:#}"
    );
    let text = status(&w, &[]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("at start: "), "{text}");
    w.stop_ok(0);
}

/// A SIF under its content address in the world's `containers/images/`, returning its digest.
fn content_addressed(w: &World, payload: &[u8]) -> String {
    let images = w.service_dir.join("containers/images");
    std::fs::create_dir_all(&images).unwrap();
    let tmp = images.join("incoming");
    std::fs::write(&tmp, support::registry::sif_bytes(payload)).unwrap();
    let digest = support::registry::sha256_file(&tmp);
    let name = format!("sha256-{}.sif", digest.trim_start_matches("sha256:"));
    std::fs::rename(&tmp, images.join(name)).unwrap();
    digest
}

/// Points `containers/current.sif` at the image of `digest`, atomically (a new link renamed
/// over the old one), as an update would.
fn point_at(w: &World, digest: &str) {
    let tmp = w.service_dir.join("containers/.current.sif.new");
    std::os::unix::fs::symlink(
        format!("images/sha256-{}.sif", digest.trim_start_matches("sha256:")),
        &tmp,
    )
    .unwrap();
    std::fs::rename(&tmp, w.service_dir.join("containers/current.sif")).unwrap();
}

/// The IMAGE cell (its last two words) of the service's row in the table.
fn image_cell(w: &World) -> (String, String) {
    let out = status(w, &["--no-legend"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(w.name.as_str()))
        .unwrap_or_else(|| panic!("{} in {text}", w.name));
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[f.len() - 2].to_owned(), f[f.len() - 1].to_owned())
}

/// A managed image (apptainer-supervisor(8), IMAGE POINTER): `status` shows its short digest
/// and age, `--json` the full digest; the run records the digest it started (live state,
/// `running_digest`) and Apptainer gets the pointer's target, so a pointer switched while
/// the instance runs changes nothing that runs: `status` keeps showing the running digest
/// and warns that the next start runs the other. An unmanaged image shows `-`.
#[test]
fn status_shows_the_managed_images_digest_and_keeps_the_running_one_after_a_switch() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-digest");
    let one = content_addressed(&w, b"one\n");
    let two = content_addressed(&w, b"two\n");
    point_at(&w, &one);
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    let text = text.replace("containers/sandbox\"", "containers/current.sif\"");
    assert!(text.contains("containers/current.sif"), "{text}");
    std::fs::write(w.config_path(), text).unwrap();
    let short = |d: &str| d[..7 + 12].to_owned();

    // Not running: what the next start runs.
    let row = status_json(&w);
    assert_eq!(row["image"]["digest"], one.as_str(), "{row:#}");
    assert!(row["image"]["running_digest"].is_null(), "{row:#}");
    assert_eq!(image_cell(&w), (short(&one), "0d".to_owned()));

    let sup = w.spawn_run();
    w.wait_ready();
    let live = live_ready(&w);
    assert_eq!(live["image_digest"], one.as_str(), "{live:#}");
    let target = w
        .service_dir
        .join(format!("containers/images/sha256-{}.sif", &one[7..]));
    let target = std::fs::canonicalize(target).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.state_file()).unwrap()).unwrap();
    assert_eq!(state["image"], target.to_str().unwrap(), "{state:#}");

    point_at(&w, &two);
    let row = status_json(&w);
    assert_eq!(row["image"]["digest"], two.as_str(), "{row:#}");
    assert_eq!(row["image"]["running_digest"], one.as_str(), "{row:#}");
    let warning = format!(
        "the image pointer now names {}; the running instance keeps {} until the next start",
        short(&two),
        short(&one)
    );
    assert!(
        row["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == warning.as_str()),
        "{row:#}"
    );
    assert_eq!(image_cell(&w), (short(&one), "0d".to_owned()));
    // What runs is still the first image: the instance's state file names it.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.state_file()).unwrap()).unwrap();
    assert_eq!(state["image"], target.to_str().unwrap(), "{state:#}");

    kill(sup as i32, libc::SIGTERM);
    assert!(w.wait(0, 20 * SEC).status.success());
    let row = status_json(&w);
    assert!(row["image"]["running_digest"].is_null(), "{row:#}");
    assert_eq!(image_cell(&w), (short(&two), "0d".to_owned()));

    // An unmanaged image: no digest anywhere, `-` in the table.
    let u = World::new("t-digest-u");
    let row = status_json(&u);
    assert!(row["image"]["digest"].is_null(), "{row:#}");
    assert_eq!(image_cell(&u), ("-".to_owned(), "0d".to_owned()));
}

/// After a rolled-back update (apptainer-supervisor(8), UPDATE): `status --json` shows the
/// rollback target, the last update with its cause, and the overlay of the failed boot
/// kept aside; the table warns about both on one line each, with what the record says
/// escaped (a cause could carry a container's text). No update runs, so nothing is
/// `in-progress`.
#[test]
fn status_shows_a_rolled_back_update_and_the_overlay_kept_aside() {
    if !require_root() {
        return;
    }
    let w = World::new("t-upd-status");
    let old = content_addressed(&w, b"old\n");
    let new = content_addressed(&w, b"new\n");
    point_at(&w, &old);
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    let text = text.replace("containers/sandbox\"", "containers/current.sif\"");
    std::fs::write(w.config_path(), text).unwrap();
    let failed = w.service_dir.join("overlay/overlay.img.failed-123");
    std::fs::write(&failed, "").unwrap();
    let record = serde_json::json!({
        "schema": 1,
        "previous": old,
        "images": [{"digest": new, "at": 1300, "note": "failed: httpd.service failed"}],
        "last": {
            "result": "rolled-back", "from": old, "to": new,
            "url": "oras://127.0.0.1:5000/t:latest",
            "started_at": 1000, "ended_at": 1300,
            "cause": "required units failed inside during the probation: httpd.service\u{1b}[2J\nforged: row",
            "failed_overlay": failed, "snapshot": true,
            "timings_ms": {"pull": 1200, "rollback": 4000}
        }
    });
    std::fs::write(
        w.service_dir.join("containers/images/update.json"),
        serde_json::to_vec(&record).unwrap(),
    )
    .unwrap();

    let row = status_json(&w);
    let u = &row["update"];
    assert_eq!(u["previous"], old.as_str(), "{row:#}");
    assert_eq!(u["running"], false, "{row:#}");
    assert_eq!(u["last"]["result"], "rolled-back", "{row:#}");
    assert_eq!(u["last"]["to"], new.as_str(), "{row:#}");
    assert_eq!(u["last"]["timings_ms"]["rollback"], 4000, "{row:#}");
    assert_eq!(
        u["kept_aside"],
        serde_json::json!([failed.to_str().unwrap()]),
        "{row:#}"
    );

    let out = status(&w, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("warning: {}: ", w.name)))
        .collect();
    let rolled = lines
        .iter()
        .find(|l| l.contains("was rolled back"))
        .unwrap_or_else(|| panic!("no rollback warning in {text}"));
    assert!(
        rolled.contains(&new[..7 + 12]) && rolled.contains("\\x1b[2J\\nforged: row"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert!(!text.lines().any(|l| l.starts_with("forged")), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("kept aside") && l.contains(failed.to_str().unwrap())),
        "{text}"
    );

    // An unmanaged image has no update view.
    let u = World::new("t-upd-status-u");
    assert!(status_json(&u)["update"].is_null());
}
