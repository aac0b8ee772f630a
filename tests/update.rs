//! `apptainer-supervisor update` end to end, as an operator runs it on the core host: the
//! service `ood001` runs under a real host systemd (`support::host`, the shipped template
//! unit), its image a managed pointer into `images/`, booted from real SIF files
//! (`support::sif`: squashfs partitions of the cached rootfs) by the Apptainer double; new
//! images come from a real OCI registry on 127.0.0.1 (Debian's docker-registry) as ORAS
//! artifacts. `update` runs in the host's mount and PID namespaces (where PID 1's private
//! socket is) and the machine's network namespace (where the registry listens). The host's
//! `/run/systemd/journal/socket` is a datagram socket of this test: every entry `update`
//! (and the supervisor) sends is read back and parsed.
//!
//! Needs root, the rootfs, squashfs-tools and docker-registry (tests/setup.sh).

mod support;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::host::{stand_in_units, HostSystemd};
use support::journal_native::{parse, Entry};
use support::registry::{require_registry, sha256_file, GatedRelay, Registry};
use support::sif::{self, Variant};
use support::{dropin_environment, require_root, support, write_apptainer_conf};

const NAME: &str = "ood001";
const UNIT: &str = "apptainer-supervisor@ood001.service";
const REPO: &str = "hpc/ood";

/// One service under a freshly booted host systemd, with a registry beside it.
struct Up {
    /// Declared first: the host (and everything in it) goes first.
    host: HostSystemd,
    reg: Registry,
    journal: Arc<Mutex<Vec<Entry>>>,
    conf_env: Vec<(&'static str, PathBuf)>,
    dir: tempfile::TempDir,
}

fn svc_dir(root: &Path) -> PathBuf {
    root.join("services").join(NAME)
}

/// The image of `v`, placed as `images/sha256-<hex>.sif` (a hard link to the cached file
/// where it can be, so nothing is copied); returns the digest.
fn place(root: &Path, v: &Variant) -> String {
    let sif = sif::build(v);
    let digest = sha256_file(&sif);
    let hex = digest.strip_prefix("sha256:").unwrap();
    let to = svc_dir(root).join(format!("containers/images/sha256-{hex}.sif"));
    if !to.exists() {
        sif::place(&sif, &to);
    }
    digest
}

impl Up {
    fn new() -> Option<Up> {
        if !require_root() || !require_registry() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("asv-update-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        let svc = svc_dir(root);
        for d in ["containers/images", "overlay", "root"] {
            std::fs::create_dir_all(svc.join(d)).unwrap();
        }
        let reg = Registry::start();
        let first = place(root, &Variant::Good { marker: "A" });
        std::os::unix::fs::symlink(
            format!(
                "images/sha256-{}.sif",
                first.strip_prefix("sha256:").unwrap()
            ),
            svc.join("containers/current.sif"),
        )
        .unwrap();
        let etc = root.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join(format!("{NAME}.toml")),
            format!(
                "name = \"{NAME}\"\nservice_dir = \"{}\"\nimage = \"{}\"\nimage_url = \"{}\"\n\
                 binds = [\"${{service_dir}}/root:/srv/root\"]\n\
                 [apptainer]\nbinary = \"{}\"\n[overlay]\nsize_mib = 64\n\
                 [timeouts]\nstart_sec = 20\nstop_sec = 3\nkill_sec = 2\n\
                 [readiness]\nrequired_units = [\"asv-slow.service\"]\non_failure = \"restart-service\"\n\
                 [update]\nprobation_sec = 4\nkeep = 1\n",
                svc.display(),
                svc.join("containers/current.sif").display(),
                reg.oras_url(REPO, "latest"),
                support("apptainer").display(),
            ),
        )
        .unwrap();
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("units/apptainer-supervisor@.service"),
        )
        .unwrap();
        let unit = shipped.replace(
            "\nExecStart=/usr/bin/apptainer-supervisor ",
            &format!(
                "\nExecStart={} --config-dir {} ",
                support::BIN,
                etc.display()
            ),
        );
        assert_ne!(unit, shipped, "the shipped unit's ExecStart= was replaced");
        let conf_env = write_apptainer_conf(&root.join("apptainer-etc"), "file");
        let dropin = format!(
            "# Test plumbing, as in tests/host_unit.rs.\n[Service]\n\
             Environment=APPTAINER_CONFIGDIR={}\n{}\
             StandardOutput=append:{log}\nStandardError=append:{log}\n\
             TimeoutStartSec=40s\nTimeoutStopSec=30s\nRestartSec=1s\nLimitCORE=0\n",
            root.join("apptainer").display(),
            dropin_environment(&conf_env),
            log = root.join("supervisor.log").display(),
        );
        let mut units = stand_in_units();
        // The system bus `update` talks to PID 1 over: Debian's own dbus units, as a core
        // host runs them.
        for u in ["dbus.socket", "dbus.service"] {
            units.push((
                u.into(),
                std::fs::read_to_string(Path::new("/lib/systemd/system").join(u))
                    .unwrap_or_else(|e| panic!("{u} (package dbus, tests/setup.sh): {e}")),
            ));
        }
        units.push(("apptainer-supervisor@.service".into(), unit));
        units.push((format!("{UNIT}.d/50-test.conf"), dropin));
        let mut host = HostSystemd::boot(root, &units);
        host.overlays.push(svc.join("overlay/overlay.img"));

        // The host's journald socket: this test's.
        let jdir = host.path("/run/systemd/journal");
        std::fs::create_dir_all(&jdir).unwrap();
        let sock = UnixDatagram::bind(jdir.join("socket")).unwrap();
        let journal: Arc<Mutex<Vec<Entry>>> = Arc::default();
        let j = journal.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = sock.recv(&mut buf) {
                if n > 0 {
                    j.lock().unwrap().push(parse(&buf[..n]));
                }
            }
        });

        let up = Up {
            host,
            reg,
            journal,
            conf_env,
            dir,
        };
        let out = up.host.systemctl(&["start", "dbus.service"]);
        assert!(out.status.success(), "dbus: {}", text(&out.stderr));
        let out = up.host.systemctl(&["start", UNIT]);
        assert!(
            out.status.success(),
            "systemctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            up.logs()
        );
        assert_eq!(up.show()["ActiveState"], "active", "{}", up.logs());
        Some(up)
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn images(&self) -> PathBuf {
        svc_dir(self.root()).join("containers/images")
    }

    fn pointer_text(&self) -> String {
        std::fs::read_link(svc_dir(self.root()).join("containers/current.sif"))
            .unwrap()
            .display()
            .to_string()
    }

    fn show(&self) -> BTreeMap<String, String> {
        self.host.show(
            UNIT,
            &[
                "ActiveState",
                "SubState",
                "Result",
                "NRestarts",
                "InvocationID",
                "StatusText",
            ],
        )
    }

    /// Pushes the image of `v` as `REPO:latest`; its layer digest (the SIF's).
    fn push(&self, v: &Variant) -> String {
        self.push_manifest(v).layer_digest
    }

    /// Pushes the image of `v` as `REPO:latest`; what the registry stored.
    fn push_manifest(&self, v: &Variant) -> support::registry::Pushed {
        let data = std::fs::read(sif::build(v)).unwrap();
        self.reg.push_sif(REPO, "latest", "ood.sif", &data)
    }

    /// `apptainer-supervisor update NAME ARGS` as the operator runs it on the host: its
    /// mount and PID namespaces (the system bus), the machine's network (the registry),
    /// the double's environment.
    fn update_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.host.nsenter(false);
        c.args([support::BIN, "--config-dir"])
            .arg(self.root().join("etc"))
            .args(["update", NAME])
            .args(args)
            .env("APPTAINER_CONFIGDIR", self.root().join("apptainer"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.conf_env {
            c.env(k, v);
        }
        c
    }

    fn update(&self, args: &[&str]) -> Output {
        self.update_cmd(args).output().unwrap()
    }

    /// The container's init, in the host's PID numbering.
    fn instance_pid(&self) -> i32 {
        let app = self.root().join("apptainer/instances/app");
        let state = std::fs::read_dir(app)
            .unwrap()
            .flatten()
            .map(|h| {
                h.path()
                    .join("root")
                    .join(NAME)
                    .join(format!("{NAME}.json"))
            })
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no instance state file\n{}", self.logs()));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
        v["pid"].as_i64().unwrap() as i32
    }

    /// A command inside the running container; its stdout.
    fn inside(&self, args: &[&str]) -> String {
        let pid = self.instance_pid().to_string();
        let mut all = vec!["nsenter", "-t", &pid, "-m", "-p", "--"];
        all.extend_from_slice(args);
        let out = self.host.exec(&all);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The image the container runs, by the marker every test image carries.
    fn marker(&self) -> String {
        self.inside(&["cat", "/etc/asv-image"])
    }

    fn entries(&self, pred: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        self.journal
            .lock()
            .unwrap()
            .iter()
            .filter(|e| pred(e))
            .cloned()
            .collect()
    }

    fn logs(&self) -> String {
        let update: Vec<String> = self
            .entries(|e| e.contains_key("UPDATE_STEP"))
            .iter()
            .map(|e| format!("{} {}", e["UPDATE_STEP"], e["MESSAGE"]))
            .collect();
        format!(
            "--- update's journal entries:\n{}\n--- supervisor log:\n{}\n--- host PID 1 log:\n{}",
            update.join("\n"),
            std::fs::read_to_string(self.root().join("supervisor.log")).unwrap_or_default(),
            self.host.pid1_log()
        )
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The names in `dir`, but `update`'s lock file (made by the first update, kept).
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".update.lock")
        .collect();
    v.sort();
    v
}

/// A good image: one restart, READY on the new digest, a file written inside before the
/// update still there after it (the overlay kept), the old image kept. Then the same
/// digest again: nothing restarted. Then `--dry-run` with a newer image in the registry:
/// it says so and changes nothing.
#[test]
fn a_good_image_is_switched_to_and_the_same_digest_restarts_nothing() {
    let Some(up) = Up::new() else { return };
    let old = format!(
        "images/sha256-{}.sif",
        sha256_file(&sif::build(&Variant::Good { marker: "A" }))
            .strip_prefix("sha256:")
            .unwrap()
    );
    assert_eq!(up.marker(), "A");
    up.inside(&["sh", "-c", "echo kept > /var/lib/asv-marker"]);
    let before = up.show();
    let pushed = up.push_manifest(&Variant::Good { marker: "B" });
    let new = pushed.layer_digest.clone();

    let t0 = Instant::now();
    let out = up.update(&[]);
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "update: {}\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        up.logs()
    );
    eprintln!("update (good image): {took:?}\n{}", text(&out.stdout));
    let after = up.show();
    assert_eq!(after["ActiveState"], "active");
    assert_ne!(
        after["InvocationID"], before["InvocationID"],
        "restarted once"
    );
    assert_eq!(up.marker(), "B", "the new image runs");
    assert_eq!(
        up.inside(&["cat", "/var/lib/asv-marker"]),
        "kept",
        "the overlay's file survived the update"
    );
    assert_eq!(
        up.pointer_text(),
        format!("images/sha256-{}.sif", new.strip_prefix("sha256:").unwrap())
    );
    let imgs = files(&up.images());
    assert!(
        imgs.iter().any(|f| format!("images/{f}") == old),
        "old image kept: {imgs:?}"
    );
    assert!(!imgs.iter().any(|f| f.starts_with(".pull-")), "{imgs:?}");
    assert!(
        !svc_dir(up.root())
            .join("overlay/overlay.img.update-snapshot")
            .exists(),
        "the snapshot is removed after a good probation"
    );
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(up.images().join("update.json")).unwrap()).unwrap();
    assert_eq!(rec["last"]["result"], "updated");
    assert_eq!(
        rec["last"]["manifest_digest"], pushed.manifest_digest,
        "the registry's manifest digest, asked through its API"
    );
    assert_eq!(
        rec["previous"],
        sha256_file(&sif::build(&Variant::Good { marker: "A" }))
    );
    let results = up.entries(|e| e.get("UPDATE_RESULT").is_some_and(|r| r == "updated"));
    assert_eq!(results.len(), 1, "{}", up.logs());
    assert_eq!(results[0]["IMAGE_DIGEST"], new);
    assert_eq!(results[0]["OBJECT_SYSTEMD_UNIT"], UNIT);

    // The same digest: nothing restarted.
    let inv = up.show()["InvocationID"].clone();
    let out = up.update(&[]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("up to date"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(up.show()["InvocationID"], inv, "not restarted");

    // --dry-run with a newer image: says so, changes nothing.
    let newer = up.push(&Variant::Good { marker: "C" });
    let before_files = files(&up.images());
    let before_rec = std::fs::read(up.images().join("update.json")).unwrap();
    let out = up.update(&["--dry-run"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let said = text(&out.stdout);
    assert!(
        said.contains(&newer) && said.contains("nothing was changed"),
        "{said}"
    );
    assert_eq!(files(&up.images()), before_files, "no image placed");
    assert_eq!(
        std::fs::read(up.images().join("update.json")).unwrap(),
        before_rec
    );
    assert_eq!(up.show()["InvocationID"], inv, "not restarted");
    assert_eq!(up.marker(), "B");
}

/// Two bad images in turn — a required unit inside that fails, then an init that never
/// boots: each rolled back to the old digest, READY again, the file written before there,
/// the file the failed boot wrote gone with its overlay (kept aside), exit 5 naming the
/// cause, both attempts in the journal.
#[test]
fn a_bad_image_is_rolled_back_with_its_overlay() {
    let Some(up) = Up::new() else { return };
    let good = sha256_file(&sif::build(&Variant::Good { marker: "A" }));
    up.inside(&["sh", "-c", "echo kept > /var/lib/asv-marker"]);
    for (i, (bad, why)) in [
        (
            Variant::FailingUnit {
                unit: "asv-slow.service",
                marker: "F",
            },
            "asv-slow.service",
        ),
        (Variant::NeverBoots { marker: "N" }, "start"),
    ]
    .iter()
    .enumerate()
    {
        let digest = up.push(bad);
        let t0 = Instant::now();
        let out = up.update(&[]);
        eprintln!(
            "update (bad image {i}): {:?}\n{}",
            t0.elapsed(),
            text(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(5),
            "rolled back: {}\n{}",
            text(&out.stderr),
            up.logs()
        );
        let err = text(&out.stderr);
        assert!(err.contains("rolled back") && err.contains(why), "{err}");
        assert_eq!(up.show()["ActiveState"], "active", "{}", up.logs());
        assert_eq!(up.marker(), "A", "the old image runs again");
        assert_eq!(up.inside(&["cat", "/var/lib/asv-marker"]), "kept");
        let mark = format!("asv-booted-{}", bad.marker());
        assert_eq!(
            up.inside(&[
                "sh",
                "-c",
                &format!("ls /var/lib/{mark} 2>/dev/null || true")
            ]),
            "",
            "nothing the failed boot wrote is in the restored overlay"
        );
        assert_eq!(
            up.pointer_text(),
            format!(
                "images/sha256-{}.sif",
                good.strip_prefix("sha256:").unwrap()
            )
        );
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(up.images().join("update.json")).unwrap())
                .unwrap();
        assert_eq!(rec["last"]["result"], "rolled-back");
        assert_eq!(rec["last"]["to"], digest);
        let aside = PathBuf::from(rec["last"]["failed_overlay"].as_str().unwrap());
        // The failed boot did write it: there, in the overlay kept aside (read with
        // debugfs, without mounting it).
        let ls = Command::new("debugfs")
            .args(["-R", "ls /upper/var/lib"])
            .arg(&aside)
            .output()
            .unwrap();
        assert!(
            text(&ls.stdout).contains(&mark),
            "the failed boot's overlay, kept aside at {}, holds {mark}: {}{}",
            aside.display(),
            text(&ls.stdout),
            text(&ls.stderr)
        );
        assert!(
            files(&up.images()).contains(&format!(
                "sha256-{}.sif",
                digest.strip_prefix("sha256:").unwrap()
            )),
            "the failed image is kept"
        );
    }
    // Without the snapshot: rolled back all the same, the image only, and said so; what the
    // failed boot wrote stays in the overlay.
    let bad = Variant::FailingUnit {
        unit: "asv-slow.service",
        marker: "G",
    };
    up.push(&bad);
    let out = up.update(&["--no-overlay-snapshot"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}\n{}", up.logs());
    assert!(
        err.contains("a rollback restores the image only")
            && err.contains("the old image runs on the overlay as the new one left it"),
        "{err}"
    );
    assert_eq!(up.marker(), "A");
    assert_eq!(
        up.inside(&["cat", "/var/lib/asv-booted-G"]),
        "booted",
        "the overlay is as the failed boot left it"
    );
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(up.images().join("update.json")).unwrap()).unwrap();
    assert_eq!(rec["last"]["snapshot"], false);
    assert!(rec["last"].get("failed_overlay").is_none());

    let rolled = up.entries(|e| e.get("UPDATE_RESULT").is_some_and(|r| r == "rolled-back"));
    assert_eq!(
        rolled.len(),
        3,
        "every attempt in the journal\n{}",
        up.logs()
    );
}

/// A snapshot that does not fit (no reflink on tmpfs, allocated size + margin above the
/// free space) is refused before anything is copied: the overlay untouched, no partial
/// file, the message naming the sizes and --no-overlay-snapshot.
#[test]
fn a_snapshot_that_does_not_fit_is_refused_before_copying() {
    if !require_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=300m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mount a 300 MiB tmpfs");
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    let ov = mnt.join("overlay.img");
    std::fs::write(&ov, vec![7u8; 100 << 20]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(apptainer_supervisor::update::snapshot::take(&ov))
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            apptainer_supervisor::update::snapshot::SnapshotError::NoSpace { .. }
        ) && msg.contains("100 MiB allocated")
            && msg.contains("--no-overlay-snapshot"),
        "{msg}"
    );
    assert_eq!(
        files(&mnt),
        vec!["overlay.img".to_owned()],
        "nothing left beside it"
    );
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 100 << 20);
}

/// The registry stops in the middle of the transfer and the operator sends SIGTERM:
/// nothing switched, the unit untouched, no file under a final name and no partial file.
/// And an update where the service does not run is refused.
#[test]
fn an_interrupted_pull_switches_nothing_and_a_host_without_the_service_refuses() {
    let Some(mut up) = Up::new() else { return };
    let data = std::fs::read(sif::build(&Variant::Good { marker: "I" })).unwrap();
    let pushed = up.reg.push_sif(REPO, "big", "ood.sif", &data);
    let relay = GatedRelay::start(&up.reg.addr, 1 << 20);
    let before = up.show();
    let before_files = files(&up.images());
    let url = format!("oras://{}/{REPO}:big", relay.addr);
    let child = up.update_cmd(&["--image", &url]).spawn().unwrap();
    assert!(
        relay.wait_held(Duration::from_secs(60)),
        "the transfer started\n{}",
        up.logs()
    );
    // The partial download is in the pull's private directory, nowhere else in images/.
    let private: Vec<String> = files(&up.images())
        .into_iter()
        .filter(|f| f.starts_with(".pull-"))
        .collect();
    assert_eq!(private.len(), 1, "{:?}", files(&up.images()));
    let partial = support::registry::files_under(&up.images().join(&private[0]));
    assert!(
        partial
            .iter()
            .any(|p| p.to_string_lossy().contains("/oras-tmp-")),
        "Apptainer's temporary layout is in the private directory: {partial:?}"
    );
    up.reg.kill();
    // SIGTERM to `update` itself (nsenter's child).
    let pid = child.id();
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let upd: i32 = kids.split_whitespace().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(upd),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    relay.release();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}\n{}",
        text(&out.stderr),
        up.logs()
    );
    assert_eq!(
        files(&up.images()),
        before_files,
        "nothing placed, no partial file"
    );
    assert!(!files(&up.images())
        .iter()
        .any(|f| f.contains(pushed.layer_digest.strip_prefix("sha256:").unwrap())));
    assert_eq!(
        up.show()["InvocationID"],
        before["InvocationID"],
        "untouched"
    );
    assert_eq!(up.marker(), "A");

    // Stopped here: `update` refuses, naming why.
    let out = up.host.systemctl(&["stop", UNIT]);
    assert!(out.status.success());
    let out = up.update(&[]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("does not run on this host"),
        "{}",
        text(&out.stderr)
    );
}

/// An image that is not a managed pointer is refused before anything is asked of the host,
/// with the one-line change that makes it managed (exit 78, the file and key named).
#[test]
fn an_unmanaged_image_is_refused_with_the_change_to_make() {
    let d = tempfile::tempdir().unwrap();
    let svc = d.path().join("svc");
    std::fs::create_dir_all(svc.join("containers")).unwrap();
    std::fs::write(
        svc.join("containers/container.sif"),
        b"not switched by update",
    )
    .unwrap();
    let file = d.path().join("web.toml");
    std::fs::write(
        &file,
        format!(
            "service_dir = \"{}\"\nimage = \"{}\"\nimage_url = \"oras://127.0.0.1:1/x:y\"\n",
            svc.display(),
            svc.join("containers/container.sif").display()
        ),
    )
    .unwrap();
    let out = Command::new(support::BIN)
        .args(["update", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&format!("{}:2: image", file.display()))
            && err.contains("managed image pointer")
            && err.contains("hint: cd "),
        "{err}"
    );
    assert_eq!(
        std::fs::read(svc.join("containers/container.sif")).unwrap(),
        b"not switched by update"
    );
    assert!(!svc.join("containers/images").exists(), "nothing made");
}

/// A URL that Apptainer builds into a SIF on this host (a new digest at every pull), and
/// two services whose pointers share one `images/` directory (one record, lock and
/// retention for both), are refused before anything is asked of the host (78).
#[test]
fn a_built_image_url_and_a_shared_images_directory_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let etc = d.path().join("etc");
    let shared = d.path().join("shared/containers");
    std::fs::create_dir_all(shared.join("images")).unwrap();
    std::fs::create_dir_all(&etc).unwrap();
    let hex = "ab".repeat(32);
    std::fs::write(shared.join(format!("images/sha256-{hex}.sif")), b"x").unwrap();
    std::os::unix::fs::symlink(format!("images/sha256-{hex}.sif"), shared.join("a.sif")).unwrap();
    std::os::unix::fs::symlink(format!("images/sha256-{hex}.sif"), shared.join("b.sif")).unwrap();
    let write = |name: &str, pointer: &str, url: &str| {
        let svc = d.path().join(name);
        std::fs::create_dir_all(&svc).unwrap();
        std::fs::write(
            etc.join(format!("{name}.toml")),
            format!(
                "service_dir = \"{}\"\nimage = \"{}\"\nimage_url = \"{url}\"\n",
                svc.display(),
                shared.join(pointer).display()
            ),
        )
        .unwrap();
    };
    let update = |name: &str| {
        Command::new(support::BIN)
            .arg("--config-dir")
            .arg(&etc)
            .args(["update", name])
            .output()
            .unwrap()
    };
    write("web1", "a.sif", "docker://example.org/web:latest");
    let out = update("web1");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("web1.toml:3: image_url") && err.contains("cannot follow docker://"),
        "{err}"
    );
    write("web1", "a.sif", "oras://127.0.0.1:1/web:latest");
    write("web2", "b.sif", "oras://127.0.0.1:1/web:latest");
    let out = update("web1");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("holds the images of web2 too"), "{err}");
    assert!(
        !shared.join("images/update.json").exists(),
        "nothing written"
    );
}
