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
