//! The capabilities a container gets through the supervisor, against the Apptainer
//! double's model of Apptainer's starter (DOUBLE.md, "Capabilities"): Apptainer asks for
//! the list `root default capabilities` in apptainer.conf names (`prepareRootCaps`,
//! internal/pkg/runtime/engine/apptainer/prepare_linux.go:331 at v1.3.6, :332 at v1.4.5),
//! and stage 2 of the starter aborts when that is not inside its permitted set, which a
//! root execve takes from the bounding set (cmd/starter/c/starter.c:275 at v1.3.6, :283 at
//! v1.4.5). So a supervisor that shrank the bounding set could start nothing.
//!
//! - `file` with every capability of this machine's bounding set (the harness's default):
//!   the start succeeds and the container holds the whole list but what `--boot` takes;
//! - `full` (Apptainer's default) on a bounding set without CAP_SYS_RESOURCE (this
//!   machine's own state; `setpriv` makes sure): Apptainer's message and exit status, the
//!   supervisor's exit 69, the message quoted once, for 1.4 (log echoed on stderr) and 1.3
//!   (on stdout);
//! - `no`: no capabilities and no_new_privs in the container.
//! - `security.keep_capabilities` still parses, has no effect, and `check` and `run` say so.
//!
//! Light init (`fake-init`), needs root (but the `check` test).

mod support;

use caps::Capability;
use support::*;

/// `/proc/<pid>/status` field as a mask (`CapEff` ...), or the raw text for others.
fn status(pid: i32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn mask(pid: i32, field: &str) -> u64 {
    u64::from_str_radix(&status(pid, field), 16).unwrap()
}

fn bits(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |m, c| m | c.bitmask())
}

/// What `--boot` removes from the request (launcher_linux.go:374 at v1.3.6, :372 at v1.4.5).
fn boot_drop() -> u64 {
    bits(&[Capability::CAP_SYS_BOOT, Capability::CAP_SYS_RAWIO])
}

/// Every capability this kernel knows (the starter cuts the request to these).
fn kernel_caps() -> u64 {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (1u64 << (last + 1)) - 1
}

#[test]
fn file_list_of_the_whole_bounding_set_starts_and_the_container_holds_it() {
    if !require_root() {
        return;
    }
    let bounding = own_bounding();
    let mut w = World::new("t-capfile");
    // A deployed file that still keeps a capability back: it runs, with a warning.
    w.append_config("[security]\nkeep_capabilities = [\"CAP_SYS_TIME\"]\n");
    w.spawn_run();
    w.wait_ready();
    let (init, master) = w.instance_pids();
    // The supervisor left the bounding set whole, although its own sets are narrow.
    let sup = w.child(0).id() as i32;
    assert_eq!(
        mask(sup, "CapBnd"),
        bounding,
        "the supervisor's bounding set"
    );
    assert_ne!(
        mask(sup, "CapEff"),
        bounding,
        "the supervisor's own sets are narrow"
    );
    // Apptainer's master: the whole bounding set, as root's execve gives it.
    assert_eq!(mask(master, "CapEff"), bounding, "the master's CapEff");
    assert_eq!(mask(master, "CapBnd"), bounding, "the master's CapBnd");
    // The container's init: capability.json's list (the whole bounding set) but what
    // --boot removes, in every set, ambient included (prepareRootCaps sets all five).
    for field in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(
            mask(init, field),
            bounding & !boot_drop(),
            "the container init's {field}"
        );
    }
    assert_eq!(status(init, "NoNewPrivs"), "0");
    let err = stderr(&w.stop_ok(0));
    assert!(
        err.contains(" WARN ")
            && err.contains("security.keep_capabilities: has no effect any more"),
        "{err}"
    );
}

#[test]
fn check_warns_that_keep_capabilities_has_no_effect() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("svc001.toml");
    std::fs::write(
        &file,
        "name = \"svc001\"\nservice_dir = \"/srv/svc001\"\n\
         [security]\nkeep_capabilities = [\"CAP_SYS_TIME\", \"syslog\"]\n",
    )
    .unwrap();
    let check = |json: bool| {
        let mut c = std::process::Command::new(BIN);
        c.arg("--config-dir")
            .arg(dir.path())
            .args(["check", "svc001"]);
        if json {
            c.arg("--json");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout).unwrap()
    };
    let text = check(false);
    assert!(
        text.contains(&format!(
            "warning: {}:4: security.keep_capabilities: has no effect any more",
            file.display()
        )),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&check(true)).unwrap();
    assert!(
        v["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("security.keep_capabilities: has no effect")),
        "{v}"
    );
}

/// `full` on a bounding set without CAP_SYS_RESOURCE: Apptainer's exact refusal. Returns
/// the supervisor's stderr and the CLI's own (stdout, stderr) for the same start.
fn full_without_sys_resource(name: &str, version: Option<&str>) -> (String, String, String) {
    let mut w = World::new(name);
    let conf = write_apptainer_conf(&w.root().join("apptainer-etc-full"), "full");
    w.env.extend(
        conf.iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string())),
    );
    if let Some(v) = version {
        w.env.push(("APPTAINER_DOUBLE_VERSION".into(), v.into()));
    }
    // This machine's bounding set lacks CAP_SYS_RESOURCE already; make sure elsewhere.
    w.wrap = ["setpriv", "--bounding-set=-sys_resource", "--"]
        .iter()
        .map(Into::into)
        .collect();
    // `full`: every capability of Apptainer's capabilities.Map (bits 0 to 40), cut to the
    // kernel's, less what --boot removes.
    let want = kernel_caps() & ((1u64 << 41) - 1) & !boot_drop();
    let permitted = own_bounding() & !Capability::CAP_SYS_RESOURCE.bitmask();
    let abort = format!(
        "ABORT  : Requesting capability set 0x{want:016x} while permitted capability set is 0x{permitted:016x}"
    );

    // The CLI alone, with the supervisor's `--network none`: exit 255; the starter's line in
    // the .err log and, as the version says, on stderr (1.4) or stdout (1.3).
    let image = w.image();
    let cli = w.apptainer(&[
        "instance",
        "start",
        "--boot",
        "--network",
        "none",
        image.to_str().unwrap(),
        name,
    ]);
    assert_eq!(cli.status.code(), Some(255), "{cli:?}");
    let (out, err) = (
        String::from_utf8_lossy(&cli.stdout).into_owned(),
        String::from_utf8_lossy(&cli.stderr).into_owned(),
    );
    let log_dir = w.apptainer_dir.join("instances/logs");
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let err_log = log_dir.join(host).join("root").join(format!("{name}.err"));
    let log = std::fs::read_to_string(&err_log).unwrap();
    assert_eq!(
        log.lines().next(),
        Some(abort.as_str()),
        "the .err log starts with the starter's line:\n{log}"
    );
    assert!(
        err.contains("FATAL:   while executing starter: failed to start instance: while running")
            && err.trim_end().ends_with("exit status 255"),
        "{err}"
    );

    // The supervisor: exit 69, the refusal quoted once, nothing left behind.
    w.spawn_run();
    let o = w.wait(0, 30 * SEC);
    let sup = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(69), "{sup}");
    assert!(
        sup.contains("apptainer instance start failed (exit status 255)"),
        "{sup}"
    );
    // The error message (the last thing on stderr; the log events before it carry the
    // same text in fields of their own) quotes the refusal exactly once.
    let message = &sup[sup
        .rfind("error: apptainer instance start failed")
        .expect("the error message")..];
    assert_eq!(
        message.matches(&abort).count(),
        1,
        "the starter's refusal quoted exactly once:\n{message}"
    );
    assert!(!w.state_file().exists() && !w.run_record().exists());
    assert!(loops_for(&w.overlay()).is_empty());
    (sup, out, err)
}

#[test]
fn full_on_a_reduced_bounding_set_fails_as_apptainer_1_4_does() {
    if !require_root() {
        return;
    }
    let (sup, out, err) = full_without_sys_resource("t-capfull", None);
    // 1.4 echoes the log on stderr (launcher_linux.go:1254 at v1.4.5), not on stdout.
    assert!(
        err.starts_with("ABORT  : Requesting capability set"),
        "{err}"
    );
    assert!(!out.contains("Requesting capability set"), "{out}");
    // ...so the supervisor names the log instead of quoting it again.
    assert!(
        sup.contains("(Apptainer quoted ") && sup.contains("t-capfull.err above)"),
        "{sup}"
    );
}

#[test]
fn full_on_a_reduced_bounding_set_fails_as_apptainer_1_3_does() {
    if !require_root() {
        return;
    }
    let (sup, out, err) = full_without_sys_resource("t-capfull13", Some("1.3.6"));
    // 1.3 echoes the log on stdout (launcher_linux.go:1253 at v1.3.6), which the
    // supervisor discards: it quotes the log itself.
    assert!(
        out.starts_with("ABORT  : Requesting capability set"),
        "{out}"
    );
    assert!(!err.contains("Requesting capability set"), "{err}");
    let heading = sup
        .rfind("t-capfull13.err:\n")
        .expect("the log quoted with its path");
    assert!(
        sup[heading..].contains("\nABORT  : Requesting capability set"),
        "{sup}"
    );
}

#[test]
fn no_gives_the_container_no_capabilities_and_no_new_privs() {
    if !require_root() {
        return;
    }
    let mut w = World::new("t-capno");
    let conf = write_apptainer_conf(&w.root().join("apptainer-etc-no"), "no");
    w.env.extend(
        conf.iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string())),
    );
    w.spawn_run();
    w.wait_ready();
    let (init, _) = w.instance_pids();
    for field in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(mask(init, field), 0, "the container init's {field}");
    }
    // prepare_linux.go: the `no` branch sets NoNewPrivileges (1.3.6:388 / 1.4.5:389).
    assert_eq!(status(init, "NoNewPrivs"), "1");
    stderr(&w.stop_ok(0));
}
