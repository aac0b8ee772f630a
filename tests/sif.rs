//! Real SIF images booted by the real supervisor (issue 17's groundwork): the images of
//! `tests/support/sif.rs` (a SIF v2 file around a squashfs of the test rootfs), which the
//! Apptainer double loads and mounts as Apptainer does (DOUBLE.md, "Booting a SIF"): the
//! primary system partition on a read-only loop device, squashfs, below the overlay. Needs
//! root, the rootfs and squashfs-tools (`tests/setup.sh`).

mod support;

use std::path::{Path, PathBuf};

use support::sif::{build, place, Variant};
use support::*;

const REQUIRED: &str = "required_units = [\"asv-simple.service\", \"asv-slow.service\"]";

/// Puts `image` (a cached SIF) into the world's service directory and makes the service
/// file use it.
fn use_image(w: &World, image: &Path, name: &str) -> PathBuf {
    let dest = w.service_dir.join("containers").join(name);
    place(image, &dest);
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    let rootfs = rootfs();
    let line = format!("image = \"{}\"", rootfs.display());
    assert!(cfg.contains(&line), "{cfg}");
    std::fs::write(
        w.config_path(),
        cfg.replace(&line, &format!("image = \"{}\"", dest.display())),
    )
    .unwrap();
    dest
}

/// A good SIF boots the inner systemd to READY; its marker shows from inside; the loop
/// device of its system partition lives exactly as long as the instance, whether the
/// supervisor halts it or `apptainer instance stop` does.
#[test]
fn a_sif_boots_to_ready_and_leaves_no_loop_device() {
    if !require_root() {
        return;
    }
    let image = build(&Variant::Good {
        marker: "tests-sif-good",
    });
    let mut w = World::booted("s-good", REQUIRED);
    let sif = use_image(&w, &image, "good.sif");
    w.spawn_run();
    let msgs = w.wait_ready();
    assert!(
        msgs.last().unwrap().contains("2/2 required units active"),
        "{msgs:?}"
    );
    let (pid, _) = w.instance_pids();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/root/etc/asv-image")).unwrap(),
        "tests-sif-good\n"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    assert!(
        root.contains(" - overlay ") && root.contains("/rootfs"),
        "the squashfs is the root's image layer: {root}"
    );
    assert_eq!(loops_for(&sif).len(), 1, "one loop device while it runs");
    w.stop_ok(0);
    assert_eq!(loops_for(&sif), Vec::<String>::new(), "after the halt");

    // The same image through the double alone, stopped by `apptainer instance stop`.
    w.env.push(("container".into(), "apptainer".into()));
    let s = sif.to_str().unwrap();
    let out = w.apptainer(&[
        "instance",
        "start",
        "--boot",
        "--network",
        "none",
        s,
        "s-good2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Stopped before anything is asserted, so a failure leaves no instance behind.
    let running = loops_for(&sif).len();
    let stop = w.apptainer(&["instance", "stop", "s-good2"]);
    assert_eq!(running, 1, "one loop device while it runs");
    assert!(stop.status.success(), "{}", stderr(&stop));
    assert_eq!(loops_for(&sif), Vec::<String>::new(), "after instance stop");
}

/// A SIF whose required unit fails at start ends the run with the unit-failed exit (1).
#[test]
fn a_sif_whose_required_unit_fails_ends_the_run_unit_failed() {
    if !require_root() {
        return;
    }
    let image = build(&Variant::FailingUnit {
        unit: "asv-slow.service",
        marker: "tests-sif-failing",
    });
    let mut w = World::booted(
        "s-fail",
        &format!("{REQUIRED}\non_failure = \"restart-service\""),
    );
    let sif = use_image(&w, &image, "failing.sif");
    w.spawn_run();
    let out = w.wait(0, 60 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("required unit asv-slow.service failed (exit-code)"),
        "{err}"
    );
    assert!(
        !w.notify_drain().iter().any(|m| m.contains("READY=1")),
        "never ready"
    );
    assert_eq!(loops_for(&sif), Vec::<String>::new());
}

/// A SIF whose init never brings up systemd: no READY; the start fails once the
/// container's system bus has not appeared in time, and the init, which ignores the halt
/// signal, is forced down.
#[test]
fn a_sif_whose_init_never_boots_fails_the_start() {
    if !require_root() {
        return;
    }
    let image = build(&Variant::NeverBoots {
        marker: "tests-sif-never",
    });
    let mut w = World::booted("s-never", REQUIRED);
    let cfg = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(
        w.config_path(),
        cfg.replace("start_sec = 30", "start_sec = 5")
            .replace("stop_sec = 10", "stop_sec = 2"),
    )
    .unwrap();
    let sif = use_image(&w, &image, "never.sif");
    w.spawn_run();
    let out = w.wait(0, 60 * SEC);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("/run/dbus/system_bus_socket") && err.contains("did not appear within"),
        "{err}"
    );
    assert!(
        !w.notify_drain().iter().any(|m| m.contains("READY=1")),
        "never ready"
    );
    assert_eq!(loops_for(&sif), Vec::<String>::new());
}

/// A launch line, `SIF_MAGIC` and `payload`: what an older stand-in called a SIF, which
/// image.Init does not take for one.
fn magic_only(payload: &[u8]) -> Vec<u8> {
    let mut b = b"#!/usr/bin/env run-singularity\n".to_vec();
    b.resize(32, 0);
    b.extend_from_slice(b"SIF_MAGIC\0");
    b.extend_from_slice(payload);
    b
}

/// What Apptainer refuses, the double refuses with Apptainer's words: a magic-only file
/// shorter than the 2048 bytes image.Init reads, one with a header but a wrong version,
/// "SIF_MAGIC" away from its place, a real SIF header with no system partition, and the
/// registry tests' object-less SIF (`sif_bytes`), which loads but cannot boot.
#[test]
fn a_sif_without_a_system_partition_is_refused_at_start() {
    if !require_root() {
        return;
    }
    let mut fake_big = magic_only(&[0u8; 4096]);
    fake_big.truncate(4096);
    let image = build(&Variant::Good {
        marker: "tests-sif-good",
    });
    // The good image with its one descriptor marked unused: a SIF with no objects.
    let mut empty = std::fs::read(&image).unwrap()[..32768].to_vec();
    empty[4096 + 4] = 0;
    // "SIF_MAGIC" among the first 2048 bytes makes image.Init load it as a SIF, whose
    // header then has no magic where it belongs.
    let mut moved_magic = vec![0u8; 2048];
    moved_magic[100..109].copy_from_slice(b"SIF_MAGIC");
    let cases: [(&str, Vec<u8>, String); 5] = [
        (
            "fake.sif",
            magic_only(b"fake\n"),
            "image format not recognized".into(),
        ),
        (
            "objectless.sif",
            support::registry::sif_bytes(b"no objects\n"),
            "no root filesystem found".into(),
        ),
        ("fake-big.sif", fake_big, "incompatible SIF version".into()),
        (
            "moved-magic.sif",
            moved_magic,
            "could not open image".into(),
        ),
        (
            "empty.sif",
            empty,
            "While checking container encryption: while getting root filesystem in".into(),
        ),
    ];
    for (name, bytes, want) in cases {
        let mut w = World::booted("s-refused", REQUIRED);
        let path = w.service_dir.join("containers").join(name);
        std::fs::write(&path, bytes).unwrap();
        let cfg = std::fs::read_to_string(w.config_path()).unwrap();
        std::fs::write(
            w.config_path(),
            cfg.replace(
                &format!("image = \"{}\"", rootfs().display()),
                &format!("image = \"{}\"", path.display()),
            ),
        )
        .unwrap();
        w.spawn_run();
        let out = w.wait(0, 30 * SEC);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(69), "{name}: {err}");
        assert!(err.contains(&want), "{name}: {err}");
        if name == "fake.sif" {
            assert!(
                err.contains(&format!(
                    "While checking container encryption: could not open image {}: image format not recognized",
                    path.display()
                )),
                "{err}"
            );
        }
        if name == "moved-magic.sif" {
            assert!(err.contains("invalid SIF magic"), "{err}");
        }
        if name == "empty.sif" {
            assert!(err.contains("no root filesystem found"), "{err}");
        }
        assert!(loops_for(&path).is_empty());
    }
}
